"""embedding-opt's target shown in the score's unit, and mitigation that falls short said so (CLI, audit, report)."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.audit import AuditConfig, run_audit
from diffmem.cli.main import main
from diffmem.metrics import mitigation_loss
from diffmem.mitigate import MitigationConfig
from diffmem.prompts import PromptRecord, PromptSet
from diffmem.sampling import SamplingConfig
from diffmem.targets import describe_target, mitigation_shortfalls, target_as_score

torch.set_num_threads(1)
FAST = SamplingConfig(num_generations=2, num_inference_steps=3, batch_size=8)


def test_target_as_score_bounds_the_mean_d():
    d = torch.tensor([[0.3, 0.5], [0.4, 0.4], [0.1, 0.7]])  # (prompts, G=2)
    batch = mitigation_loss(d, "batch")
    for row, loss in zip(d, batch):  # a batch loss <= T means a mean d <= T / sqrt(G)
        assert float(row.mean()) <= target_as_score(float(loss), "batch", 2) + 1e-7
    assert target_as_score(float(batch[1]), "batch", 2) == pytest.approx(0.4)  # equal d: the bound is reached
    assert target_as_score(0.25, "mean", 4) == 0.25
    text = describe_target(0.4308, "batch", 2)
    assert text.startswith("d <= 0.305 (mean first-step d, the score's unit") and "--target-loss 0.4308" in text
    with pytest.raises(ValueError, match="--target-unit"):
        target_as_score(1.0, "sum")


def test_shortfalls_one_line_per_case():
    rows = [{"index": 0, "prompt": "a", "iterations": 5, "initial_loss": 2.0, "final_loss": 1.0, "final_d": 0.7},
            {"index": 1, "prompt": "b", "iterations": 2, "initial_loss": 2.0, "final_loss": 0.3, "final_d": 0.2}]
    (s,) = mitigation_shortfalls(rows, 0.5, "batch", 2, max_iters=5, lr=0.01)
    assert s.kind == "iteration_limit" and s.index == 0 and "\n" not in s.text
    assert "iteration limit (5)" in s.text and "--max-iters (now 5)" in s.text and "--lr (now 0.01)" in s.text
    assert f"d <= {0.5 / 2 ** 0.5:.3f}" in s.text
    below = [{"index": i, "iterations": 0, "initial_loss": 0.2, "final_loss": 0.2, "initial_d": 0.1, "final_d": 0.1}
             for i in range(3)]
    (s,) = mitigation_shortfalls(below, 3.0, "batch", 2, max_iters=10)
    assert s.kind == "no_iterations" and "lower --target-loss" in s.text and "highest 0.100" in s.text
    assert mitigation_shortfalls(rows[1:], 0.5, "batch", 2, max_iters=5) == []
    serve = mitigation_shortfalls(rows[:1], 0.5, max_iters=5, flags=("--mitigation-max-iters", "--mitigation-lr"))
    assert "--mitigation-max-iters" in serve[0].text


def test_audit_reports_a_target_above_every_score(tiny_sd, tmp_path):
    """Stable Diffusion's target 3 on a tiny random model: nothing to optimize, said in the log and the report."""
    prompts = PromptSet([PromptRecord(i, p) for i, p in enumerate(["a red cat", "a blue dog"])], "test")
    result = run_audit(tiny_sd, prompts, None, AuditConfig(threshold=0.0, sampling=FAST), tmp_path, progress=False)
    mitigated = [json.loads(l) for l in (tmp_path / "mitigate.jsonl").read_text().splitlines()]
    assert all(m["iterations"] == 0 and m["initial_loss"] <= 3.0 for m in mitigated)
    assert [s.kind for s in result.shortfalls] == ["no_iterations"]
    html = (tmp_path / "index.html").read_text()
    assert "Mitigation fell short" in html and "lower --target-loss" in html
    goal = f"{target_as_score(3.0, 'batch', 2):.3f}"
    assert f"target d &le; {goal}, in the score's unit" in html  # each card, in the score's unit
    assert f"d &lt;= {goal} (mean first-step d, the score&#x27;s unit" in html  # the summary names the unit


def test_audit_and_mitigate_cli_report_the_iteration_limit(tiny_sd_folder, tmp_path, capsys):
    (tmp_path / "p.txt").write_text("a red cat\n")
    common = ["--model", str(tiny_sd_folder), "--device", "cpu", "--prompts", str(tmp_path / "p.txt"),
              "--num-generations", "2", "--num-inference-steps", "3", "--target-loss", "0", "--max-iters", "1",
              "--no-progress"]
    assert main(["audit", *common, "--threshold", "0", "--out", str(tmp_path / "a")]) == 0
    out = capsys.readouterr().out
    assert "mitigation fell short: #0 stopped at the iteration limit (1)" in out and "raise --max-iters (now 1)" in out
    assert "keep its images/ folder beside it" in out
    assert "not reached" in (tmp_path / "a" / "index.html").read_text()
    assert main(["mitigate", *common, "--method", "embedding-opt", "--out", str(tmp_path / "m")]) == 0
    out = capsys.readouterr().out
    assert "(target first-step d <= 0.000 (mean first-step d, the score's unit" in out
    assert out.count("mitigation fell short: #0 stopped at the iteration limit (1)") == 1

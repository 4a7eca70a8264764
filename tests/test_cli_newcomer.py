"""A newcomer's first commands: verdicts, sample-size warnings, one-line errors before the model loads."""

from __future__ import annotations

import json
import sys

import pytest
import torch

from diffmem.cli.main import main
from diffmem.metrics import fpr_sample_warning
from diffmem.prompts import PromptFileError, read_prompts

torch.set_num_threads(1)


def _detect_args(folder, tmp_path, *extra):
    (tmp_path / "p.txt").write_text("a red cat\nblue sky\n")
    return ["detect", "--model", str(folder), "--device", "cpu", "--prompts", str(tmp_path / "p.txt"),
            "--out", str(tmp_path / "d.jsonl"), "--track-steps", "1", "--num-generations", "1",
            "--num-inference-steps", "3", *extra]


def test_detect_prints_a_verdict_or_how_to_get_one(tiny_sd_folder, tmp_path, capsys):
    assert main(_detect_args(tiny_sd_folder, tmp_path, "--no-progress")) == 0
    out, err = capsys.readouterr()
    assert "no verdict: no threshold known. Pass --threshold T" in out
    assert "Loading weights" not in err  # --no-progress silences the loaders' bars too
    rows = [json.loads(l) for l in (tmp_path / "d.jsonl").read_text().splitlines()]
    cut = sorted(r["score"] for r in rows)[1]  # the higher score: one of two prompts memorized
    (tmp_path / "d.jsonl").unlink()
    (tmp_path / "threshold.json").write_text(json.dumps({"value": cut, "method": "fpr"}))  # as diffmem audit writes it
    assert main(_detect_args(tiny_sd_folder, tmp_path, "--threshold", str(tmp_path / "threshold.json"))) == 0
    out = capsys.readouterr().out
    assert f"verdict: 1 of 2 prompts memorized (score >= threshold {cut:.4g}" in out
    assert out.count("[memorized]") == 1 and out.count("[not memorized]") == 1


def test_explain_prints_a_verdict(tiny_sd_folder, tmp_path, capsys):
    argv = ["explain", "--model", str(tiny_sd_folder), "--device", "cpu", "--prompt", "a red cat",
            "--num-generations", "1", "--num-inference-steps", "3", "--no-png"]
    assert main(argv + ["--threshold", "0"]) == 0
    assert "verdict: memorized (score " in capsys.readouterr().out
    assert main(argv + ["--threshold", "1e9"]) == 0
    assert "verdict: not memorized" in capsys.readouterr().out
    assert main(argv) == 0
    assert "no verdict: no threshold known" in capsys.readouterr().out


@pytest.mark.parametrize("argv, message", [
    (["explain", "--prompt", "a", "--threshold", "high"], "--threshold 'high': neither a number nor a JSON file"),
    (["detect", "--prompts", "absent.csv"], "absent.csv: no such file"),
    (["mitigate", "--method", "embedding-opt", "--prompts", "absent.txt", "--out", "o"], "absent.txt: no such file"),
    (["bench", "detect", "--memorized", "m.jsonl", "--out", "o"], "give both --memorized and --non-memorized"),
    (["serve", "--calibration-prompts", "absent.jsonl"], "absent.jsonl: no such file"),
])
def test_argument_checks_run_before_the_model_loads(argv, message, tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    rc = main([*argv[:2], "--model", str(tmp_path / "no-model"), *argv[2:]] if argv[0] == "bench"
              else [argv[0], "--model", str(tmp_path / "no-model"), *argv[1:]])
    err = capsys.readouterr().err
    assert rc == 2 and message in err and "no-model" not in err


def test_roc_warns_on_few_negatives_and_names_a_missing_method(tmp_path, capsys):
    row = lambda s: json.dumps({"prompt": "p", "index": 0, "seed": 0, "score": s, "text_noise_norm": [[s, s]]})
    (tmp_path / "m.jsonl").write_text(row(1.0) + "\n" + row(0.9) + "\n")
    (tmp_path / "n.jsonl").write_text("".join(row(0.1 + 0.01 * i) + "\n" for i in range(20)))
    argv = ["roc", "--memorized", str(tmp_path / "m.jsonl"), "--non-memorized", str(tmp_path / "n.jsonl"),
            "--plot", str(tmp_path / "roc.png"), "--json", str(tmp_path / "roc.json")]
    assert main(argv) == 0
    assert "the 1% FPR rests on 20 non-memorized prompts; measuring it needs at least 100" in capsys.readouterr().out
    assert "rests on 20" in json.loads((tmp_path / "roc.json").read_text())["warning"]
    assert main(argv + ["--method", "carlini"]) == 2
    err = capsys.readouterr().err
    assert "m.jsonl:1: no carlini score in this row" in err and "it has wen" in err and "Traceback" not in err
    assert fpr_sample_warning(100, 0.01) is None and fpr_sample_warning(99, 0.01) is not None
    assert fpr_sample_warning(34, 0.03) is None


def test_csv_without_pandas_and_parquet_says_which_extra(tmp_path, monkeypatch):
    (tmp_path / "p.csv").write_text("caption,id\na red cat,7\n\"blue, sky\",8\n", encoding="utf-8")
    with_pandas = read_prompts(tmp_path / "p.csv")
    monkeypatch.setitem(sys.modules, "pandas", None)  # the default install: no pandas, no pyarrow
    records = read_prompts(tmp_path / "p.csv")
    assert [r.prompt for r in records] == [r.prompt for r in with_pandas] == ["a red cat", "blue, sky"]
    assert records[1].source == {"id": "8"}
    with pytest.raises(PromptFileError, match="no column 'text'"):
        read_prompts(tmp_path / "p.csv", "text")
    (tmp_path / "p.parquet").write_bytes(b"PAR1")
    with pytest.raises(PromptFileError, match=r'needs pandas and pyarrow, not installed: pip install "diffmem\[data\]"'):
        read_prompts(tmp_path / "p.parquet")


def test_serve_api_gives_the_target_in_the_score_unit_and_the_shortfall(tiny_sd):
    from diffmem.explain import ExplainConfig
    from diffmem.mitigate import MitigationConfig
    from diffmem.web.server import ExplainApp, Threshold, mitigation_hook

    config = ExplainConfig(generations=2, num_inference_steps=3)
    app = ExplainApp(tiny_sd, Threshold(0.5, "test", fpr=0.01, num_reference=40), config, image_steps=None)
    assert "rests on 40 reference prompts" in app.info()["threshold_warning"]
    app.mitigate = mitigation_hook(MitigationConfig("embedding-opt", target_loss=0.0, max_iters=1), None)
    res = app.mitigated("a red cat")
    assert res["target_score"] == 0.0 and res["target_unit"] == "batch" and res["iterations"] == 1
    assert "stopped at the iteration limit (1)" in res["shortfall"] and "--mitigation-max-iters" in res["shortfall"]
    app.mitigate = mitigation_hook(MitigationConfig("embedding-opt", target_loss=1e6), None)
    res = app.mitigated("a red cat")
    assert res["target_score"] == pytest.approx(1e6 / 2 ** 0.5) and "0 iterations" in res["shortfall"]

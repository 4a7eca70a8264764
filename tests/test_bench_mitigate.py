"""``diffmem bench mitigate``: every method over its sweep against no mitigation on the same prompts and
seeds (the lab and a tiny SD folder with a pair dataset), skipped methods, resume after a kill, the
similarity's top-3 mean, and evaluation spread over two processes."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.files import read_rows
from diffmem.testing import MeanColourDescriptor, make_tiny_clip_folder, run_cli

FAST = ["--num-generations", "2", "--num-inference-steps", "3", "--batch-size", "4", "--no-progress"]


def diffmem(*args, kill=None):
    return run_cli(*args, kill=kill, timeout=600)


@pytest.fixture
def pairs(tmp_path):
    """A dataset folder of image + caption .txt pairs: SD's training images for the copy metrics."""
    folder = tmp_path / "pairs"
    folder.mkdir()
    for i, (rgb, caption) in enumerate([((255, 0, 0), "a red thing"), ((0, 0, 255), "a blue thing")]):
        Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(folder / f"{i:08d}.png")
        (folder / f"{i:08d}.txt").write_text(caption + "\n")
    return folder


def ok_rows(results: dict, method: str | None = None) -> list[dict]:
    return [r for r in results["rows"] if r["status"] == "ok" and (method is None or r["method"] == method)]


def without(rows, *keys):
    return [{k: v for k, v in r.items() if k not in keys} for r in rows]


def check_against_folders(out, results):
    """Every row of the benchmark from its method's evaluation folder, computed here again."""
    none = ok_rows(results, "none")
    assert len(none) == 1 and none[0]["extra_unet_rows_per_prompt"] == 0
    for r in ok_rows(results):
        summary = json.loads((out / r["method"] / "summary.json").read_text())["results"][r["method"]][r["setting"]]
        rows = [p for p in read_rows(out / r["method"] / "per_prompt.jsonl") if p["setting"] == r["setting"]]
        assert r["num_prompts"] == len(rows) == 2 and r["num_generations"] == 4
        n = sum(p["num_generations"] for p in rows)
        if r["copy_rate"] is not None:
            assert r["copy_rate"] == pytest.approx(sum(p["copies"] for p in rows) / n)
        for metric, stats in r["similarity"].items():
            for k in ("mean", "max", "top3_mean"):
                assert stats[k] == pytest.approx(np.mean([p[metric][k] for p in rows]))
            # G = 2: a prompt's top 3 is both its generations, whose mean is the prompt's mean
            assert stats["top3_mean"] == pytest.approx(stats["mean"])
        assert r["unet_rows_per_prompt"] == pytest.approx(np.mean([p["unet_rows"] for p in rows]))
        assert r["extra_unet_rows_per_prompt"] == pytest.approx(r["unet_rows_per_prompt"] - none[0]["unet_rows_per_prompt"])
        assert r["seconds_per_prompt"] == pytest.approx(summary["seconds_per_prompt"]) and r["seconds_per_prompt"] > 0


# -- the similarity's top-3 mean ------------------------------------------------------------------

def test_top3_mean_is_the_mean_of_the_three_most_similar_generations():
    from diffmem.similarity import pixel_cosine, tiled_l2

    train = torch.zeros(1, 3, 16, 16)
    values = [0.1, 0.5, 0.3, 0.2, 0.4]
    gen = torch.stack([torch.full((3, 16, 16), v) for v in values])
    assert tiled_l2(gen, train).top_mean(3) == pytest.approx(np.mean(sorted(values)[:3]))  # a distance: the smallest
    cos = pixel_cosine(gen, torch.full((1, 3, 16, 16), 0.9))
    assert cos.top_mean(3) == pytest.approx(np.sort(cos.matrix[:, 0])[-3:].mean())
    assert cos.top_mean(10) == pytest.approx(cos.best.mean())  # fewer generations than k: all of them
    with pytest.raises(ValueError, match="k 0"):
        cos.top_mean(0)


# -- how a sweep becomes evaluation runs ----------------------------------------------------------

@dataclass
class _TwoParams:
    a: float = 1.0
    b: int = 2


class _Refuses:
    name, knob, off, Params = "refuses-test", None, {}, None

    def check(self, model):
        raise ValueError("refuses-test needs a lab model")

    def plan(self, model, unit, params):
        raise AssertionError("a refused method is never run")


class _Grid:
    name, knob, off, Params = "grid-test", "a", {}, _TwoParams

    def plan(self, model, unit, params):
        from diffmem.mitigations import Plan

        return Plan()


@pytest.fixture
def fake_methods(monkeypatch):
    import diffmem.evaluate
    import diffmem.mitigate
    from diffmem.mitigations import _INSTANCES, MITIGATIONS

    for cls in (_Refuses, _Grid):
        monkeypatch.setitem(MITIGATIONS, cls.name, cls)
        monkeypatch.setitem(_INSTANCES, cls.name, cls())
    methods = (*diffmem.mitigate.METHODS, _Refuses.name, _Grid.name)
    monkeypatch.setattr(diffmem.mitigate, "METHODS", methods)
    monkeypatch.setattr(diffmem.evaluate, "METHODS", methods)


def test_a_sweep_runs_exactly_its_settings(fake_methods):
    from diffmem.bench import BenchMitigateConfig, sweep_configs
    from diffmem.evaluate import settings_of

    bench = BenchMitigateConfig(methods=("grid-test",))
    params = lambda sweep: [[s.params for s in settings_of(c)] for c in sweep_configs("grid-test", sweep, bench)]
    grid = [{"a": a, "b": b} for a in (0.5, 1.5) for b in (1, 3)]
    assert params(grid) == [grid]  # a grid: one evaluation
    diagonal = [{"a": 0.5, "b": 1}, {"a": 1.5, "b": 3}]
    assert params(diagonal) == [[diagonal[0]], [diagonal[1]]]  # no grid: one evaluation per setting
    assert params([{}]) == [[{}]]
    aug = sweep_configs("rand-word-add", [{"repeat_num": n} for n in (1, 2)], bench)
    assert [[s.repeat_num for s in settings_of(c)] for c in aug] == [[1, 2]]
    opt = sweep_configs("embedding-opt", [{"target_loss": 2.0}, {}], bench)
    assert [[s.target_loss for s in settings_of(c)] for c in opt] == [[2.0, None]]
    with pytest.raises(ValueError, match="--methods nope"):
        BenchMitigateConfig(methods=("none", "nope"))


def test_param_fixes_a_parameter_in_every_setting_and_the_table_names_it(tiny_sd_folder, pairs, tmp_path):
    from diffmem.bench import BenchMitigateConfig
    from diffmem.cli.main import main

    out = tmp_path / "bench"
    assert main(["bench", "mitigate", "--model", str(tiny_sd_folder), "--dataset", str(pairs), "--methods", "gni",
                 "--param", "protocol=per-prompt", "--num-generations", "1", "--num-inference-steps", "2",
                 "--batch-size", "4", "--no-progress", "--out", str(out)]) == 0
    settings = [f"scale={s:g},protocol=per-prompt" for s in (0.05, 0.1, 0.25, 0.5)]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["setting"] for r in rows if r["method"] == "gni"] == settings
    assert {p["protocol"] for p in read_rows(out / "gni" / "per_prompt.jsonl")} == {"per-prompt"}
    assert "| gni | scale=0.1,protocol=per-prompt |" in (out / "table.md").read_text()
    with pytest.raises(ValueError, match="--param protocol"):
        BenchMitigateConfig(methods=("rand-word-add",), params={"protocol": "per-prompt"})


# -- a tiny SD folder with a pair dataset: SSCD > 0.5 copies, CLIP score, a refused method -----------

def test_bench_on_a_tiny_sd_folder_with_a_pair_dataset(tiny_sd, pairs, tmp_path, fake_methods):
    from diffmem.bench import BenchMitigateConfig, bench_mitigate
    from diffmem.eval_sets import folder_eval_set
    from diffmem.sampling import SamplingConfig

    sscd = tmp_path / "sscd.pt"
    torch.jit.script(MeanColourDescriptor()).save(str(sscd))
    config = BenchMitigateConfig(methods=("refuses-test", "rand-word-add"), sscd=str(sscd),
                                 clip=str(make_tiny_clip_folder(tmp_path / "clip")),
                                 sampling=SamplingConfig(num_inference_steps=2, num_generations=2, batch_size=4))
    out = tmp_path / "bench"
    results = bench_mitigate(tiny_sd, folder_eval_set(pairs, 32), config, out, progress=False)
    assert results["copy_rule"] == "sscd beyond 0.5" and results["x_axis"] == "clip_score"
    assert results["similarity_metric"] == "sscd"
    assert [(r["method"], r.get("setting")) for r in results["rows"]] == [
        ("none", "default"), ("refuses-test", None), *[("rand-word-add", f"repeat_num={n}") for n in (1, 2, 4, 8)]]
    skipped = results["rows"][1]
    assert skipped["status"] == "skipped" and skipped["reason"] == "refuses-test needs a lab model"
    check_against_folders(out, results)
    for r in ok_rows(results):
        rows = [p for p in read_rows(out / r["method"] / "per_prompt.jsonl") if p["setting"] == r["setting"]]
        # G = 2: a prompt's generations are its SSCD max and min; copies are those above 0.5
        assert r["copy_rate"] == sum((p["sscd"]["max"] > 0.5) + (p["sscd"]["min"] > 0.5) for p in rows) / 4
        assert r["clip_score"] == pytest.approx(np.mean([p["clip_score"] for p in rows]))
        assert r["extra_unet_rows_per_prompt"] == 0  # a rewritten prompt costs no UNet rows
    table = (out / "table.md").read_text()
    assert "| refuses-test | skipped: refuses-test needs a lab model |" in table
    assert "| sscd mean | sscd max | sscd top-3 | CLIP score | extra UNet rows / prompt | s / prompt |" in table
    assert table.count("| rand-word-add | repeat_num=") == 4
    assert json.loads((out / "results.json").read_text())["rows"] == json.loads(json.dumps(results["rows"]))
    assert (out / "tradeoff.png").read_bytes()[:4] == b"\x89PNG"


# -- resume after a kill ends equal to an uninterrupted run -------------------------------------------

def test_resume_after_a_kill_equals_an_uninterrupted_run(tiny_sd_folder, pairs, tmp_path):
    from diffmem.bench import BenchMitigateConfig, bench_mitigate
    from diffmem.eval_sets import folder_eval_set

    args = ["bench", "mitigate", "--model", tiny_sd_folder, "--dataset", pairs, "--methods",
            "none,rand-word-add,embedding-opt", *FAST]
    from diffmem.cli.main import main

    whole, cut = tmp_path / "whole", tmp_path / "cut"
    assert main([*map(str, args), "--out", str(whole)]) == 0
    # 2 prompts, one per unit: none's 2 units, then rand-word-add's 4 settings x 2: killed inside its second setting
    killed = diffmem(*args, "--out", cut, kill="evaluate.unit:5")
    assert killed.returncode == -9
    assert json.loads((cut / "finished.json").read_text())["folders"] == ["none"]
    none_summary = (cut / "none" / "summary.json").stat().st_mtime_ns
    with pytest.raises(FileExistsError, match="--resume"):
        bench_mitigate(SimpleNamespace(name="m"), folder_eval_set(pairs, 32), BenchMitigateConfig(), cut)  # before any work
    resumed = diffmem(*args, "--out", cut, "--resume")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert (cut / "none" / "summary.json").stat().st_mtime_ns == none_summary  # a finished method is not redone
    a, b = (json.loads((d / "results.json").read_text()) for d in (whole, cut))
    assert without(a["rows"], "seconds_per_prompt") == without(b["rows"], "seconds_per_prompt")
    assert [r["method"] for r in a["rows"]] == ["none", *["rand-word-add"] * 4, "embedding-opt"]
    for method in ("none", "rand-word-add", "embedding-opt"):
        assert without(read_rows(whole / method / "per_prompt.jsonl"), "seconds") == \
            without(read_rows(cut / method / "per_prompt.jsonl"), "seconds")
    files = lambda d: sorted(str(p.relative_to(d)) for p in d.rglob("*") if p.is_file())
    assert files(whole) == files(cut)
    cut_table = lambda d: [line.rsplit("|", 2)[0] for line in (d / "table.md").read_text().splitlines()]
    assert cut_table(whole) == cut_table(cut)  # seconds aside


# -- the lab ---------------------------------------------------------------------------------------

@pytest.mark.slow
def test_bench_mitigate_on_the_fast_lab(fast_lab_folder, fast_lab, tmp_path):
    from diffmem.cli.main import main
    from diffmem.mitigations import get_mitigation
    from diffmem.sampling import SamplingConfig

    out = tmp_path / "lab_bench"
    assert main(["bench", "mitigate", "--model", str(fast_lab_folder), "--limit", "2", "--methods",
                 "none,rand-word-add,embedding-opt", "--num-generations", "2", "--num-inference-steps", "5",
                 "--out", str(out), "--no-progress"]) == 0
    results = json.loads((out / "results.json").read_text())
    assert results["copy_rule"].startswith("lab judge") and results["x_axis"] == "alignment"
    sampling = SamplingConfig(num_inference_steps=5, num_generations=2)
    targets = [s["target_loss"] for s in get_mitigation("embedding-opt").sweep(fast_lab, sampling)]
    assert [r["value"] for r in ok_rows(results, "embedding-opt")] == pytest.approx(targets)
    assert [r["value"] for r in ok_rows(results, "rand-word-add")] == [1, 2, 4, 8]
    check_against_folders(out, results)
    for r in ok_rows(results):
        assert 0 <= r["copy_rate"] <= 1 and 0 <= r["alignment"] <= 1
        assert {"mean", "max", "top3_mean"} <= set(r["similarity"]["pixel_cosine"])
    assert all(r["extra_unet_rows_per_prompt"] == 0 for r in ok_rows(results, "rand-word-add"))
    assert all(r["extra_unet_rows_per_prompt"] > 0 for r in ok_rows(results, "embedding-opt"))
    table = (out / "table.md").read_text()
    assert "| alignment | extra UNet rows / prompt |" in table and len(table.splitlines()) == 4 + 1 + 4 + 4
    assert (out / "tradeoff.png").stat().st_size > 0


# -- two processes ---------------------------------------------------------------------------------

@pytest.mark.slow
def test_two_processes_equal_one(tiny_sd_folder, pairs, tmp_path):
    """bench mitigate (through run_evaluation) under `accelerate launch` with two processes: the merged
    per-prompt rows and the results equal a single process's, no part file is left."""
    import diffmem.cli.main as cli

    args = ["bench", "mitigate", "--model", str(tiny_sd_folder), "--dataset", str(pairs), "--methods",
            "none,rand-word-add", *FAST]
    single, multi = tmp_path / "single", tmp_path / "multi"
    assert diffmem(*args, "--out", single).returncode == 0
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines",
           "1", "--mixed_precision", "no", "--dynamo_backend", "no", cli.__file__, *args, "--out", str(multi)]
    res = subprocess.run(cmd, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(multi.rglob("*.part*"))
    for method in ("none", "rand-word-add"):
        a, b = read_rows(single / method / "per_prompt.jsonl"), read_rows(multi / method / "per_prompt.jsonl")
        assert len(a) == (1 if method == "none" else 4) * 2
        assert without(a, "seconds") == without(b, "seconds")
        assert json.loads((multi / method / "summary.json").read_text())["provenance"]["num_processes"] == 2
    a, b = (json.loads((d / "results.json").read_text()) for d in (single, multi))
    assert without(a["rows"], "seconds_per_prompt") == without(b["rows"], "seconds_per_prompt")
    assert b["num_processes"] == 2

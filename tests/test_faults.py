"""Every long verb killed at a named point (SIGKILL, via DIFFMEM_KILL_AT) and resumed ends with the
files of an uninterrupted run. Training's checkpoint case is in test_train.py; the whole matrix,
timed, is benchmarks/fault_matrix.py."""

import json
from pathlib import Path

import pytest

from diffmem.testing import run_cli

FAST = ["--num-inference-steps", "3", "--num-generations", "2", "--batch-size", "4", "--no-progress"]


def diffmem(*args, kill=None):
    return run_cli(*args, kill=kill)


@pytest.fixture()
def prompts(tmp_path):
    p = tmp_path / "p.txt"
    p.write_text("".join(f"prompt number {i}\n" for i in range(5)))
    return p


def without_seconds(path: Path) -> bytes:
    """The file's bytes, with the wall-time field of result rows (``seconds``) taken out of JSON Lines
    and CSV tables: the one measurement that differs between two runs of the same work."""
    import csv
    import io

    if path.suffix == ".jsonl":
        rows = [json.loads(line) for line in path.read_text().splitlines()]
        return "\n".join(json.dumps({k: v for k, v in r.items() if k != "seconds"}) for r in rows).encode()
    if path.suffix == ".csv":
        rows = list(csv.reader(io.StringIO(path.read_text())))
        drop = rows[0].index("seconds") if rows and "seconds" in rows[0] else None
        return repr([[c for i, c in enumerate(r) if i != drop] for r in rows]).encode()
    return path.read_bytes()


def same_files(a: Path, b: Path, skip=("meta.json", "run.json", "summary.json")):
    """Every file of two output folders is byte-identical (provenance files aside, which hold times;
    the rows' wall time aside)."""
    files = sorted(p.relative_to(a) for p in a.rglob("*") if p.is_file() and p.name not in skip)
    assert files == sorted(p.relative_to(b) for p in b.rglob("*") if p.is_file() and p.name not in skip)
    for f in files:
        assert without_seconds(a / f) == without_seconds(b / f), f


@pytest.mark.parametrize("track", [["--track-steps", "1"], []], ids=["first-step", "tracked"])
def test_detect(tiny_sd_folder, prompts, tmp_path, track):
    whole, cut = tmp_path / "whole.jsonl", tmp_path / "cut.jsonl"
    args = ["detect", "--model", tiny_sd_folder, "--prompts", prompts, *track, *FAST]
    assert diffmem(*args, "--out", whole).returncode == 0
    assert diffmem(*args, "--out", cut, kill="detect.unit:2").returncode == -9
    assert diffmem(*args, "--out", cut, "--resume").returncode == 0
    assert cut.read_text() == whole.read_text()


def test_mitigate(tiny_sd_folder, prompts, tmp_path):
    args = ["mitigate", "--model", tiny_sd_folder, "--prompts", prompts, "--method", "embedding-opt",
            "--target-loss", "0", "--max-iters", "2", *FAST]
    assert diffmem(*args, "--out", tmp_path / "whole").returncode == 0
    assert diffmem(*args, "--out", tmp_path / "cut", kill="mitigate.unit:2").returncode == -9
    refused = diffmem(*args, "--out", tmp_path / "cut")
    assert refused.returncode == 2 and "--resume" in refused.stderr
    assert diffmem(*args, "--out", tmp_path / "cut", "--resume").returncode == 0
    same_files(tmp_path / "whole", tmp_path / "cut")


def test_evaluate(tiny_sd_folder, tmp_path):
    from PIL import Image

    data = tmp_path / "data"
    data.mkdir()
    for i, colour in enumerate(("red", "blue", "green")):
        Image.new("RGB", (32, 32), colour).save(data / f"{i:08d}.png")
        (data / f"{i:08d}.txt").write_text(f"a {colour} square")
    args = ["evaluate", "--model", tiny_sd_folder, "--dataset", data, "--mitigation", "none", "embedding-opt",
            "--target-loss", "0", "--max-iters", "1", *FAST]
    assert diffmem(*args, "--out", tmp_path / "whole").returncode == 0
    assert diffmem(*args, "--out", tmp_path / "cut", kill="evaluate.unit:2").returncode == -9
    assert diffmem(*args, "--out", tmp_path / "cut", "--resume").returncode == 0
    same_files(tmp_path / "whole", tmp_path / "cut", skip=("run.json", "summary.json", "tradeoff.png"))
    a, b = ({m: {k: {f: v for f, v in s.items() if f != "seconds_per_prompt"} for k, s in settings.items()}
             for m, settings in json.loads((tmp_path / d / "summary.json").read_text())["results"].items()}
            for d in ("whole", "cut"))
    assert a == b and a["embedding-opt"]  # everything but the wall time


def test_audit(tiny_sd_folder, prompts, tmp_path):
    ref = tmp_path / "ref.txt"
    ref.write_text("".join(f"an ordinary prompt {i}\n" for i in range(6)))
    args = ["audit", "--model", tiny_sd_folder, "--prompts", prompts, "--reference-prompts", ref, "--fpr", "0.2",
            "--detect-steps", "1", *FAST]
    assert diffmem(*args, "--out", tmp_path / "whole").returncode == 0
    assert diffmem(*args, "--out", tmp_path / "cut", kill="audit.stage:3").returncode == -9
    again = diffmem(*args, "--out", tmp_path / "cut")
    assert again.returncode == 0, again.stderr[-2000:]
    def rows(path):  # provenance times aside
        return [{k: v for k, v in json.loads(l).items() if k != "time"} for l in path.read_text().splitlines()]

    for name in ("results.jsonl", "explain.jsonl", "mitigate.jsonl", "copies.jsonl", "detect/prompts.jsonl"):
        if (tmp_path / "whole" / name).exists():
            assert rows(tmp_path / "cut" / name) == rows(tmp_path / "whole" / name), name
    assert (tmp_path / "cut" / "threshold.json").read_text() == (tmp_path / "whole" / "threshold.json").read_text()

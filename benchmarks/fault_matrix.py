"""Kill every long verb at each named point (SIGKILL via DIFFMEM_KILL_AT), resume it, and compare the
final outputs with an uninterrupted run's. Prints a Markdown table (verb, point, resumed equal?, seconds).

    OMP_NUM_THREADS=1 python benchmarks/fault_matrix.py [--out DIR]

Runs on a tiny random Stable Diffusion folder built offline (and a 40-step lab build), so it needs
no download; about 10 minutes on one CPU thread.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

FAST = ["--num-inference-steps", "3", "--num-generations", "2", "--batch-size", "4", "--no-progress"]
SKIP = {"meta.json", "run.json", "summary.json", "tradeoff.png", "stages.json", "index.html", "audit.json",
        "train_config.json", "train_log.jsonl", "lab_model.json", "table.json", "table.md"}  # times, seconds
TIME_KEYS = {"time", "started", "seconds", "finished", "elapsed_s"}


def diffmem(args, kill=None) -> int:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    env.pop("DIFFMEM_KILL_AT", None)
    if kill:
        env["DIFFMEM_KILL_AT"] = kill
    return subprocess.run([sys.executable, "-m", "diffmem.cli.main", *map(str, args)], env=env,
                          capture_output=True).returncode


def content(path: Path) -> dict:
    """Relative path -> comparable content of every output file (JSON without its 'time' fields)."""
    if path.is_file():
        files = {Path("output"): path}
    else:
        files = {p.relative_to(path): p for p in path.rglob("*") if p.is_file() and p.name not in SKIP
                 and not p.name.endswith(".meta.json") and ".lock" not in p.name
                 and "checkpoint-" not in str(p.relative_to(path))}
    out = {}
    for rel, p in files.items():
        if p.suffix in (".jsonl", ".json"):
            rows = [json.loads(l) for l in p.read_text().splitlines() if l.strip()] if p.suffix == ".jsonl" \
                else [json.loads(p.read_text())]
            out[str(rel)] = [{k: v for k, v in r.items() if k not in TIME_KEYS} if isinstance(r, dict) else r
                             for r in rows]
        elif p.suffix == ".csv":  # tables: the wall-time column left out
            import csv
            import io

            rows = list(csv.reader(io.StringIO(p.read_text())))
            keep = [i for i, name in enumerate(rows[0] if rows else []) if name not in TIME_KEYS]
            out[str(rel)] = [[r[i] for i in keep if i < len(r)] for r in rows]
        elif p.suffix == ".safetensors":
            from safetensors.torch import load_file

            out[str(rel)] = load_file(str(p))
        else:
            out[str(rel)] = p.read_bytes()
    return out


def same(a: dict, b: dict) -> bool:
    """Equal outputs; weights (safetensors) equal to 1e-5, as resumed training is (float reductions
    may run in another order after a restart)."""
    import torch

    if set(a) != set(b):
        return False
    for k in a:
        if isinstance(a[k], dict) and a[k] and all(isinstance(v, torch.Tensor) for v in a[k].values()):
            if set(a[k]) != set(b[k]) or not all(torch.allclose(a[k][n].float(), b[k][n].float(), rtol=1e-5, atol=1e-6)
                                                 for n in a[k]):
                return False
        elif a[k] != b[k]:
            return False
    return True


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default=None, help="where the runs go (default: a temporary folder)")
    args = p.parse_args()
    from PIL import Image

    from diffmem.testing import make_tiny_sd_folder

    root = Path(args.out or tempfile.mkdtemp())
    model = make_tiny_sd_folder(root / "model")
    prompts = root / "p.txt"
    prompts.write_text("".join(f"prompt number {i}\n" for i in range(6)))
    ref = root / "ref.txt"
    ref.write_text("".join(f"an ordinary prompt {i}\n" for i in range(6)))
    data = root / "data"
    data.mkdir(exist_ok=True)
    for i, colour in enumerate(("red", "blue", "green", "white")):
        Image.new("RGB", (32, 32), colour).save(data / f"{i:08d}.png")
        (data / f"{i:08d}.txt").write_text(f"a {colour} square")
    m = ["--model", model]
    train = ["train", *m, "--dataset", data, "--non-mem-dataset", data, "--end", "2", "--repeats", "2",
             "--train-batch-size", "2", "--max-train-steps", "6", "--learning-rate", "1e-3", "--resolution", "32",
             "--checkpointing-steps", "2"]
    verbs = {  # name: (command without --out, output flag, resume flag, kill points)
        "detect, first step": (["detect", *m, "--prompts", prompts, "--track-steps", "1", *FAST], "--out",
                               ["--resume"], ["detect.unit:1", "detect.unit:2"]),
        "detect, tracked": (["detect", *m, "--prompts", prompts, *FAST], "--out", ["--resume"], ["detect.unit:2"]),
        "mitigate": (["mitigate", *m, "--prompts", prompts, "--method", "embedding-opt", "--target-loss", "0",
                      "--max-iters", "2", *FAST], "--out", ["--resume"], ["mitigate.unit:1", "mitigate.unit:2"]),
        "evaluate": (["evaluate", *m, "--dataset", data, "--mitigation", "none", "embedding-opt", "--target-loss", "0",
                      "--max-iters", "1", *FAST], "--out", ["--resume"], ["evaluate.unit:1", "evaluate.unit:3"]),
        "audit": (["audit", *m, "--prompts", prompts, "--reference-prompts", ref, "--fpr", "0.2", *FAST], "--out", [],
                  [f"audit.stage:{k}" for k in (1, 2, 3, 4, 5)]),
        "train": (train, "--output-dir", ["--resume-from-checkpoint", "latest"],
                  ["train.checkpoint:1", "train.checkpoint:2", "train.step:5"]),
        "lab build": (["lab", "build", "--preset", "fast", "--max-train-steps", "40", "--no-anneal"], "--out", ["--resume"],
                      ["train.step:20"]),
        "bench detect": (["bench", "detect", *m, "--memorized", prompts, "--non-memorized", ref, "--methods",
                          "wen,ren-le,carlini", "--generations", "2", "--num-inference-steps", "3", "--bootstrap", "20",
                          "--no-progress"], "--out", [], ["detect.unit:1", "detect.unit:3"]),
    }
    print("| verb | killed at | killed | resumed | outputs equal an uninterrupted run's | seconds |")
    print("|---|---|---|---|---|---|")
    for name, (cmd, flag, resume, points) in verbs.items():
        slug = name.replace(", ", "-").replace(" ", "-")
        whole = root / f"{slug}-whole" if flag != "--out" or not cmd[0] == "detect" else root / f"{slug}-whole.jsonl"
        if diffmem([*cmd, flag, whole]) != 0:
            print(f"| {name} | (uninterrupted run failed) | | | | |")
            continue
        for point in points:
            t0 = time.time()
            cut = root / f"{slug}-{point.replace(':', '-')}" if cmd[0] != "detect" else root / f"{slug}-{point}.jsonl"
            killed = diffmem([*cmd, flag, cut], kill=point)
            resumed = diffmem([*cmd, flag, cut, *resume])
            equal = same(content(cut), content(whole))
            print(f"| {name} | `{point}` | {'yes' if killed == -9 else f'no ({killed})'} | "
                  f"{'yes' if resumed == 0 else f'failed ({resumed})'} | {'yes' if equal else 'NO'} | "
                  f"{time.time() - t0:.0f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

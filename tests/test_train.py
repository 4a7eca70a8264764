"""diffmem train: the seed's data recipe, fine-tuning a Stable Diffusion UNet, exact resume."""

import json

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.cli.main import main
from diffmem.train import FolderPairs, ImagePairs, memorization_mix


def write_pairs(folder, n, seed):
    folder.mkdir(parents=True)
    rng = np.random.default_rng(seed)
    for i in range(n):
        Image.fromarray(rng.integers(0, 255, (40, 48, 3), dtype=np.uint8)).save(folder / f"{i:08d}.jpg")
        (folder / f"{i:08d}.txt").write_text(f"caption {seed} {i}\n")
    return folder


def test_memorization_mix_counts():
    mem = ImagePairs(np.zeros((10, 3, 4, 4)), [f"m{i}" for i in range(10)])
    non = ImagePairs(np.zeros((7, 3, 4, 4)), [f"n{i}" for i in range(7)])
    mix = memorization_mix(mem, non, end=4, repeats=5, non_mem_ratio=3)
    caps = [mix[i][1] for i in range(len(mix))]
    assert len(caps) == 4 * 5 * 4
    assert sum(c.startswith("m") for c in caps) == 20 and set(c for c in caps if c.startswith("m")) == {"m0", "m1", "m2", "m3"}
    assert sum(c.startswith("n") for c in caps) == 60 and len(set(c for c in caps if c.startswith("n"))) == 7


def test_folder_pairs_errors(tmp_path):
    with pytest.raises(ValueError, match="nope: no such folder"):
        FolderPairs(tmp_path / "nope", 16)
    (tmp_path / "d").mkdir()
    Image.new("RGB", (8, 8)).save(tmp_path / "d" / "a.png")
    with pytest.raises(ValueError, match="image a.png has no caption file a.txt"):
        FolderPairs(tmp_path / "d", 16)


def train_args(model, mem, non, out, steps, *extra):
    return ["train", "--model", str(model), "--dataset", str(mem), "--non-mem-dataset", str(non), "--end", "2",
            "--repeats", "3", "--non-mem-ratio", "1", "--output-dir", str(out), "--train-batch-size", "2",
            "--max-train-steps", str(steps), "--learning-rate", "1e-3", "--resolution", "32", "--center-crop", *extra]


def test_finetune_sd_unet_and_exact_resume(tiny_sd_folder, tmp_path):
    from diffmem.adapters import load_model

    mem, non = write_pairs(tmp_path / "mem", 3, 0), write_pairs(tmp_path / "non", 4, 1)
    straight = tmp_path / "straight"
    assert main(train_args(tiny_sd_folder, mem, non, straight, 4)) == 0
    log = [json.loads(l) for l in (straight / "train_log.jsonl").read_text().splitlines()]
    assert log[-1]["step"] == 4 and log[-1]["left_out"] == 0.0
    tuned = load_model(str(tiny_sd_folder), unet=str(straight / "unet"))
    base = load_model(str(tiny_sd_folder))
    assert not torch.equal(next(tuned.unet.parameters()), next(base.unet.parameters()))

    # the same run with a checkpoint at step 2, its final model removed, resumed from the checkpoint
    part = tmp_path / "part"
    assert main(train_args(tiny_sd_folder, mem, non, part, 4, "--checkpointing-steps", "2")) == 0
    assert (part / "checkpoint-2" / "model" / "unet").is_dir()
    import shutil

    shutil.rmtree(part / "unet")
    assert main(train_args(tiny_sd_folder, mem, non, part, 4, "--checkpointing-steps", "2",
                           "--resume-from-checkpoint", "latest")) == 0
    a = load_model(str(tiny_sd_folder), unet=str(part / "unet")).unet.state_dict()
    b = tuned.unet.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)


def test_resume_without_checkpoint_is_an_error(tiny_sd_folder, tmp_path, capsys):
    mem, non = write_pairs(tmp_path / "mem", 2, 0), write_pairs(tmp_path / "non", 2, 1)
    assert main(train_args(tiny_sd_folder, mem, non, tmp_path / "o", 2, "--resume-from-checkpoint", "latest")) == 2
    assert "no checkpoint" in capsys.readouterr().err


def test_train_cli_defaults_are_the_config_defaults():
    """Options not given leave TrainConfig's defaults; given ones reach the config, parsed."""
    from diffmem.cli.main import build_parser
    from diffmem.cli.train import config_from_args
    from diffmem.train import TrainConfig

    parse = lambda *a: config_from_args(build_parser().parse_args(["train", "--output-dir", "o", *a]))
    assert parse() == TrainConfig(output_dir="o")
    given = parse("--learning-rate", "3e-4", "--use-ema", "--hard-threshold", "1,2", "--threads", "1")
    assert (given.learning_rate, given.use_ema, given.hard_threshold, given.num_threads) == (3e-4, True, (1.0, 2.0), 1)
    assert given.train_batch_size == TrainConfig(output_dir="o").train_batch_size


def test_killed_inside_a_checkpoint_write_resumes_from_the_last_complete_one(tiny_sd_folder, tmp_path):
    """SIGKILL while writing checkpoint-4 (after accelerate's state, before the model and the state
    file): 'latest' is checkpoint-2, the partial folder is ignored, and the resumed run ends with the
    weights of an uninterrupted one."""
    import os
    import subprocess
    import sys

    from diffmem.adapters import load_model

    mem, non = write_pairs(tmp_path / "mem", 3, 0), write_pairs(tmp_path / "non", 4, 1)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    run = lambda out, *extra, kill=None: subprocess.run(
        [sys.executable, "-m", "diffmem.cli.main", *train_args(tiny_sd_folder, mem, non, out, 6,
                                                                "--checkpointing-steps", "2", *extra)],
        env={**env, **({"DIFFMEM_KILL_AT": kill} if kill else {})}, capture_output=True, text=True)
    assert run(tmp_path / "straight").returncode == 0
    killed = run(tmp_path / "run", kill="train.checkpoint:2")
    assert killed.returncode == -9
    assert (tmp_path / "run" / "checkpoint-4.partial").is_dir() and not (tmp_path / "run" / "checkpoint-4").exists()
    resumed = run(tmp_path / "run", "--resume-from-checkpoint", "latest")
    assert resumed.returncode == 0, resumed.stderr[-2000:]
    assert "resumed from" in resumed.stdout and "checkpoint-2" in resumed.stdout
    a = load_model(str(tiny_sd_folder), unet=str(tmp_path / "run" / "unet")).unet.state_dict()
    b = load_model(str(tiny_sd_folder), unet=str(tmp_path / "straight" / "unet")).unet.state_dict()
    for k in b:
        torch.testing.assert_close(a[k], b[k], rtol=1e-5, atol=1e-6)
    # a folder named like a checkpoint but without its state file (an older diffmem's torn write) is passed over
    (tmp_path / "run" / "checkpoint-99").mkdir()
    from diffmem.train import complete_checkpoints

    assert [p.name for p in complete_checkpoints(tmp_path / "run")][-1] != "checkpoint-99"

"""diffmem detect: outputs, resume after a killed run, bad inputs, input formats, scale-out."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from diffmem.cli.main import main
from diffmem.files import read_rows
from diffmem.prompts import PromptFileError, read_prompts

FAST = ["--num-inference-steps", "3", "--num-generations", "2", "--no-progress"]


def detect(model, prompts, out, *extra):
    return main(["detect", "--model", str(model), "--prompts", str(prompts), "--out", str(out), *FAST, *extra])


@pytest.fixture()
def prompt_file(tmp_path):
    p = tmp_path / "prompts.jsonl"
    rows = [{"caption": f"prompt number {i} of a test", "index": 1000 + i, "url": f"http://x/{i}"} for i in range(6)]
    p.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return p


def test_output_rows_and_metadata(tiny_sd_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert detect(tiny_sd_folder, prompt_file, out, "--start", "2", "--end", "5") == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [2, 3, 4]
    assert rows[0]["source"] == {"index": 1002, "url": "http://x/2"}
    for r in rows:
        assert set(r) >= {"prompt", "index", "seed", "text_noise_norm", "uncond_noise_norm", "score"}
        assert len(r["text_noise_norm"]) == 2 and len(r["text_noise_norm"][0]) == 3
    meta = json.loads((tmp_path / "r.meta.json").read_text())
    assert meta["settings"]["num_generations"] == 2 and meta["diffmem_version"]
    assert meta["model"] == str(tiny_sd_folder)


def test_existing_output_is_not_overwritten(tiny_sd_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    out.write_text('{"keep": 1}\n')
    assert detect(tiny_sd_folder, prompt_file, out) == 2
    assert "--resume" in capsys.readouterr().err
    assert out.read_text() == '{"keep": 1}\n'


def test_resume_after_killed_run_equals_uninterrupted_run(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "many.txt"
    prompts.write_text("".join(f"a picture of thing {i}\n" for i in range(40)))
    # every run in a one-thread process: CPU kernels round differently with other thread counts (~1e-6)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    cmd = lambda out: [sys.executable, "-m", "diffmem.cli.main", "detect", "--model", str(tiny_sd_folder),
                       "--prompts", str(prompts), "--out", str(out), *FAST, "--batch-size", "4"]
    full = tmp_path / "full.jsonl"
    subprocess.run(cmd(full), env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    out = tmp_path / "killed.jsonl"
    proc = subprocess.Popen(cmd(out), env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 600  # generous: a loaded CI machine starts python slowly
    while time.time() < deadline and proc.poll() is None and (not out.exists() or len(out.read_bytes().splitlines()) < 3):
        time.sleep(0.05)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert out.exists(), "the detect subprocess wrote nothing before the deadline"
    partial = out.read_bytes()
    assert partial.endswith(b"\n")  # whole lines only
    n_done = len(read_rows(out))
    assert 3 <= n_done < 40, "the run should have been killed part-way"
    subprocess.run(cmd(out) + ["--resume"], env=env, check=True, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    assert read_rows(out) == read_rows(full)


def test_resume_repairs_a_torn_last_line(tiny_sd_folder, prompt_file, tmp_path):
    out = tmp_path / "r.jsonl"
    assert detect(tiny_sd_folder, prompt_file, out) == 0
    full = read_rows(out)
    data = out.read_bytes().splitlines(keepends=True)
    out.write_bytes(b"".join(data[:2]) + data[2][:25])  # a crash in the middle of a line
    assert detect(tiny_sd_folder, prompt_file, out, "--resume") == 0
    assert read_rows(out) == full


def test_resume_with_other_settings_is_refused(tiny_sd_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "r.jsonl"
    assert detect(tiny_sd_folder, prompt_file, out, "--end", "2") == 0
    before = out.read_bytes()
    assert detect(tiny_sd_folder, prompt_file, out, "--end", "2", "--resume", "--guidance-scale", "3") == 2
    assert "settings" in capsys.readouterr().err
    assert out.read_bytes() == before


@pytest.mark.parametrize("content,suffix,message", [
    ('{"caption": "ok"}\n{"caption": "broken\n', ".jsonl", ":2: invalid JSON"),
    ('{"caption": "ok"}\n{"text": "no caption key"}\n', ".jsonl", ":2: no key 'caption'"),
    ("", ".jsonl", "no prompts"),
    ("", ".txt", "no prompts"),
    ("a,b\n1,2\n", ".csv", "no column 'caption'"),
    ("whatever", ".xlsx", "unknown prompt file type '.xlsx'"),
])
def test_bad_prompt_files_name_the_problem(tiny_sd_folder, tmp_path, capsys, content, suffix, message):
    bad = tmp_path / f"bad{suffix}"
    bad.write_text(content)
    out = tmp_path / "r.jsonl"
    out.write_text('{"earlier": true}\n')
    assert detect(tiny_sd_folder, bad, out, "--resume") == 2
    err = capsys.readouterr().err
    assert str(bad) in err and message in err
    assert out.read_text() == '{"earlier": true}\n'


def test_model_folder_without_unet_is_an_error(tiny_sd_folder, prompt_file, tmp_path, capsys):
    import shutil

    broken = tmp_path / "broken_model"
    shutil.copytree(tiny_sd_folder, broken)
    shutil.rmtree(broken / "unet")
    assert detect(broken, prompt_file, tmp_path / "r.jsonl") == 2
    assert "unet/" in capsys.readouterr().err
    assert not (tmp_path / "r.jsonl").exists()


def test_long_prompts_are_truncated_and_counted(tiny_sd_folder, tmp_path, capsys):
    p = tmp_path / "long.txt"
    p.write_text("short prompt\n" + "a very long prompt " * 10 + "\n")  # the tiny tokenizer is per character
    out = tmp_path / "r.jsonl"
    assert detect(tiny_sd_folder, p, out) == 0
    assert "1 of 2 prompts" in capsys.readouterr().out
    assert [r["truncated"] for r in read_rows(out)] == [False, True]
    assert json.loads((tmp_path / "r.meta.json").read_text())["num_truncated"] == 1


def test_prompt_formats(tmp_path):
    import datasets
    import pandas as pd

    texts = ["first prompt", "second, with a comma", "third"]
    (tmp_path / "p.txt").write_text("\n".join(texts) + "\n\n")
    pd.DataFrame({"caption": texts, "n": [1, 2, 3]}).to_csv(tmp_path / "p.csv", index=False)
    pd.DataFrame({"text": texts}).to_parquet(tmp_path / "p.parquet")
    datasets.Dataset.from_dict({"Prompt": texts}).save_to_disk(str(tmp_path / "hf"))
    assert [r.prompt for r in read_prompts(tmp_path / "p.txt")] == texts
    csv = read_prompts(tmp_path / "p.csv")
    assert [r.prompt for r in csv] == texts and csv[1].source == {"n": 2}
    assert [r.prompt for r in read_prompts(tmp_path / "p.parquet", prompt_key="text")] == texts
    hf = read_prompts(tmp_path / "hf", prompt_key="Prompt", start=1)
    assert [(r.position, r.prompt) for r in hf] == [(1, texts[1]), (2, texts[2])]
    with pytest.raises(PromptFileError, match="selects none"):
        read_prompts(tmp_path / "p.txt", start=5)


@pytest.mark.slow
def test_accelerate_two_processes_equal_single_process(tiny_sd_folder, tmp_path):
    prompts = tmp_path / "p.txt"
    prompts.write_text("".join(f"prompt {i} for scale-out\n" for i in range(7)))
    single = tmp_path / "single.jsonl"
    methods = ["--method", "wen,ren-le,bright-ending,membench"]  # several detectors ride the pass on each process
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # as each accelerate process below: the same reductions, the same last digits
    try:
        assert detect(tiny_sd_folder, prompts, single, "--batch-size", "4", *methods) == 0
    finally:
        torch.set_num_threads(threads)
    multi = tmp_path / "multi.jsonl"
    import diffmem.cli.main as cli

    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", cli.__file__, "detect", "--model", str(tiny_sd_folder),
           "--prompts", str(prompts), "--out", str(multi), *FAST, "--batch-size", "4", *methods]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    assert res.returncode == 0, res.stderr[-3000:]
    assert not list(tmp_path.glob("multi.jsonl.part*"))
    a, b = read_rows(single), read_rows(multi)
    assert [r["index"] for r in b] == list(range(7))
    assert a == b
    assert json.loads((tmp_path / "multi.meta.json").read_text())["num_processes"] == 2


def seed_notebook_auc(mem_path, non_path, num_gens, start, end):
    """The seed's det_mem_viz.ipynb aggregation, as it reads det_outputs rows: every key but
    `prompt` sliced [:num_gens, start:end], averaged over generations, then over steps; the AUC of
    text_noise_norm_mean with memorized as the positive label."""
    from sklearn import metrics

    frames = []
    for path in (non_path, mem_path):
        frame = []
        for row in map(json.loads, open(path)):
            new_row = {}
            for key in row.keys():
                if key == "prompt":
                    continue
                data = np.array(row[key])[:num_gens, start:end]
                new_row[f"{key}_mean"] = np.mean(np.mean(data, axis=0))
            frame.append(new_row)
        frames.append(frame)
    preds = [r["text_noise_norm_mean"] for r in frames[1]] + [r["text_noise_norm_mean"] for r in frames[0]]
    labels = [1] * len(frames[1]) + [0] * len(frames[0])
    fpr, tpr, _ = metrics.roc_curve(labels, preds, pos_label=1)
    return metrics.auc(fpr, tpr)


def test_official_format_reads_in_the_seed_notebook_and_in_roc(tiny_sd_folder, tmp_path, capsys):
    sets = {"mem": ["a red square", "a blue circle", "a dog on a mat"],
            "non": ["a green triangle", "a cat", "two birds", "a house by a lake"]}
    for name, prompts in sets.items():
        (tmp_path / f"{name}.txt").write_text("\n".join(prompts) + "\n")
        assert detect(tiny_sd_folder, tmp_path / f"{name}.txt", tmp_path / f"{name}.jsonl", "--format", "official") == 0
        rows = [json.loads(l) for l in open(tmp_path / f"{name}.jsonl")]
        assert [list(r) for r in rows] == [["uncond_noise_norm", "text_noise_norm", "prompt"]] * len(prompts)
        full = read_rows(tmp_path / f"{name}.rows.jsonl")  # nothing lost: the full rows beside it
        assert [r["prompt"] for r in full] == [r["prompt"] for r in rows] == prompts
        assert [r["text_noise_norm"] for r in full] == [r["text_noise_norm"] for r in rows]
        assert {"index", "seed", "score", "wen"} <= set(full[0])
    for steps, gens in (("0:3", 2), ("1:2", 1)):
        js = tmp_path / f"roc{steps[0]}.json"
        assert main(["roc", "--memorized", str(tmp_path / "mem.jsonl"), "--non-memorized", str(tmp_path / "non.jsonl"),
                     "--steps", steps, "--generations", str(gens), "--json", str(js)]) == 0
        a, b = map(int, steps.split(":"))
        assert json.loads(js.read_text())["auc"] == pytest.approx(
            seed_notebook_auc(tmp_path / "mem.jsonl", tmp_path / "non.jsonl", gens, a, b))


def test_official_format_resumes_from_its_full_rows(tiny_sd_folder, prompt_file, tmp_path, capsys):
    out = tmp_path / "o.jsonl"
    assert detect(tiny_sd_folder, prompt_file, out, "--format", "official") == 0
    whole = out.read_text()
    # a run killed after its first work unit: the full rows hold that unit, the official file is not written yet
    rows_path = tmp_path / "o.rows.jsonl"
    rows_path.write_text("".join(rows_path.read_text().splitlines(keepends=True)[:4]))
    out.unlink()
    assert detect(tiny_sd_folder, prompt_file, out, "--format", "official") == 2  # exists: --resume needed
    assert "pass --resume" in capsys.readouterr().err
    assert detect(tiny_sd_folder, prompt_file, out, "--format", "official", "--resume") == 0
    assert out.read_text() == whole
    assert [r["index"] for r in read_rows(rows_path)] == list(range(6))


def test_random_prompt_set_is_the_originals(tiny_sd, tiny_sd_folder, tmp_path, capsys):
    """'random' draws what the original's get_dataset('random') draws after set_random_seed(seed):
    Python's generator at seed + 5, a length below the token limit, ids without replacement."""
    import random

    from diffmem.prompts import RANDOM_SET_SIZE

    records = read_prompts("random", model=tiny_sd, seed=3)
    random.seed(3 + 5)
    tok = tiny_sd.tokenizer
    expected = []
    for _ in range(RANDOM_SET_SIZE):
        k = random.randrange(tok.model_max_length)
        expected.append(tok.decode(random.sample(range(tok.vocab_size), k)))
    assert tok.model_max_length == tiny_sd.max_tokens == 77
    assert [r.prompt for r in records] == expected and [r.position for r in records] == list(range(RANDOM_SET_SIZE))
    assert "" in expected  # some are empty, as in the original
    with pytest.raises(PromptFileError, match="drawn from the model's tokenizer"):
        read_prompts("random")
    out = tmp_path / "r.jsonl"
    assert main(["detect", "--model", str(tiny_sd_folder), "--prompts", "random", "--start", "5", "--end", "7",
                 "--seed", "3", "--out", str(out), *FAST]) == 0
    assert [r["prompt"] for r in read_rows(out)] == expected[5:7]


def test_one_writer_per_output_and_a_killed_runs_lock_does_not_block_resume(tiny_sd_folder, prompt_file, tmp_path,
                                                                            capsys):
    import socket

    out = tmp_path / "r.jsonl"
    # a live process holds the output: refused, nothing written
    holder = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        (tmp_path / "r.jsonl.lock").write_text(f"{holder.pid}\n{socket.gethostname()}\n")
        assert detect(tiny_sd_folder, prompt_file, out) == 2
        assert f"another diffmem run (process {holder.pid}) is writing this output" in capsys.readouterr().err
        assert not out.exists()
    finally:
        holder.kill()
        holder.wait()
    # a run killed after its first work unit leaves its lock; --resume takes it over and completes
    (tmp_path / "r.jsonl.lock").unlink()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "DIFFMEM_KILL_AT": "detect.unit"}
    args = [sys.executable, "-m", "diffmem.cli.main", "detect", "--model", str(tiny_sd_folder), "--prompts",
            str(prompt_file), "--out", str(out), "--batch-size", "4", *FAST]
    assert subprocess.run(args, env=env, capture_output=True).returncode == -9
    assert (tmp_path / "r.jsonl.lock").exists() and 0 < len(read_rows(out)) < 6
    assert detect(tiny_sd_folder, prompt_file, out, "--batch-size", "4", "--resume") == 0
    assert [r["index"] for r in read_rows(out)] == list(range(6)) and not (tmp_path / "r.jsonl.lock").exists()

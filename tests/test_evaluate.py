"""Evaluation sets, the judge's known answers, the summary, and the mitigate/evaluate commands end to end."""

from __future__ import annotations

import json
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image

from diffmem.eval_sets import EvalPrompt, EvalSet, folder_eval_set, ground_truth_eval_set, lab_eval_set
from diffmem.evaluate import EvaluateConfig, run_evaluation, summarize
from diffmem.judge import Judge
from diffmem.mitigate import MitigatedPrompt, MitigationConfig
from diffmem.sampling import SamplingConfig
from diffmem.testing import MeanColourDescriptor, make_tiny_clip_folder


def save_png(path, rgb, size=32):
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size, size, 3), rgb, np.uint8)).save(path)


@pytest.fixture
def pair_folder(tmp_path):
    folder = tmp_path / "pairs"
    for i, (rgb, caption) in enumerate([((255, 0, 0), "a red thing"), ((0, 0, 255), "a blue thing"),
                                        ((200, 0, 0), "a red thing")]):
        save_png(folder / f"{i:08d}.png", rgb)
        (folder / f"{i:08d}.txt").write_text(caption + "\n")
    return folder


def test_folder_set_groups_a_captions_images(pair_folder):
    s = folder_eval_set(pair_folder, 16)
    assert [p.caption for p in s.prompts] == ["a red thing", "a blue thing"]
    assert s.prompts[0].training.shape == (2, 3, 16, 16)  # both red images, resized to the model's size
    np.testing.assert_allclose(s.prompts[1].training[0, :, 0, 0], [0, 0, 1], atol=1e-6)


def test_ground_truth_set_reads_gt_images_by_index(tmp_path):
    (tmp_path / "mem.jsonl").write_text(json.dumps({"caption": "a cat", "index": 7}) + "\n"
                                        + json.dumps({"caption": "a dog", "index": 9}) + "\n")
    save_png(tmp_path / "gt_images" / "7" / "0.png", (0, 255, 0))
    save_png(tmp_path / "gt_images" / "7" / "1.png", (0, 0, 0))
    save_png(tmp_path / "gt_images" / "9" / "0.png", (255, 255, 255))
    s = ground_truth_eval_set(tmp_path / "mem.jsonl", 16)
    assert [(p.caption, p.key, len(p.training)) for p in s.prompts] == [("a cat", "7", 2), ("a dog", "9", 1)]
    (tmp_path / "bad.jsonl").write_text(json.dumps({"caption": "a fox", "index": 3}) + "\n")
    with pytest.raises(FileNotFoundError, match="gt_images/3"):
        ground_truth_eval_set(tmp_path / "bad.jsonl", 16)


# -- the judge on the lab, with known answers -----------------------------------------------------

@pytest.fixture(scope="module")
def small_lab_data():
    from diffmem.lab.data import LabDataConfig, make_lab_data

    return make_lab_data(LabDataConfig(num_memorized=3, num_template=1, num_non_memorized=200, num_novel=4,
                                       num_out_of_style=2, num_title_words=400))


def mitigated(images, position=0):
    return MitigatedPrompt(position, "p", "p", torch.zeros(2, 2), 1.0, 0.5, 2.0, 1.0, 3, images, torch.zeros(len(images), 1))


def test_lab_judge_counts_training_images_as_copies_and_aligned(small_lab_data):
    s = lab_eval_set(small_lab_data, "memorized")
    judge = Judge(SimpleNamespace(device="cpu"), s, EvaluateConfig())
    own, other = s.prompts[0], s.prompts[1]
    row = judge.row(own, mitigated(own.training.repeat(3, 1, 1, 1)), MitigationConfig(method="none"))
    assert row["copies"] == 3 and row["aligned"] == 3 and row["num_generations"] == 3
    assert row["pixel_cosine"]["min"] == pytest.approx(1.0) and row["tiled_l2"]["max"] == pytest.approx(0.0)
    # another prompt's training image is neither a copy of this prompt's image nor (in general) its content
    row = judge.row(own, mitigated(other.training[:1].repeat(2, 1, 1, 1)), MitigationConfig(method="none"))
    assert row["copies"] == 0
    same_content = (own.colour, own.shape) == (other.colour, other.shape)
    assert row["aligned"] == (2 if same_content else 0)
    template = s.prompts[-1]  # a template caption: every variant is one of its training images
    assert len(template.training) == 4
    row = judge.row(template, mitigated(template.training), MitigationConfig(method="none"))
    assert row["copies"] == 4


def test_copy_threshold_turns_similarity_into_copies():
    train = torch.zeros(1, 3, 16, 16)
    gens = torch.stack([torch.zeros(3, 16, 16), torch.full((3, 16, 16), 0.2), torch.ones(3, 16, 16)])
    s = EvalSet("hand", [EvalPrompt("x", train)])
    judge = Judge(SimpleNamespace(device="cpu"), s, EvaluateConfig(copy_metric="tiled_l2", copy_threshold=0.5))
    row = judge.row(s.prompts[0], mitigated(gens), MitigationConfig(method="none"))
    assert row["copies"] == 2 and row["copies_by_threshold"] == 2  # distances 0, 0.2, 1 below 0.5


def test_summary_aggregates_per_method_and_setting():
    def row(method, setting, value, copies, aligned, sim):
        return {"method": method, "setting": setting, "value": value, "num_generations": 4, "copies": copies,
                "aligned": aligned, "pixel_cosine": {"mean": sim}, "initial_d": 1.0, "final_d": 0.5, "final_loss": 1.0, "iterations": 2}

    rows = [row("none", "default", None, 4, 4, 0.9), row("none", "default", None, 2, 3, 0.7),
            row("embedding-opt", "target_loss=0.2", 0.2, 0, 3, 0.1), row("embedding-opt", "target_loss=0.2", 0.2, 1, 1, 0.3)]
    s = summarize(rows)
    assert s["none"]["default"]["copy_rate"] == 6 / 8 and s["none"]["default"]["alignment_mean"] == 7 / 8
    e = s["embedding-opt"]["target_loss=0.2"]
    assert e["copy_rate"] == 1 / 8 and e["similarity_mean"]["pixel_cosine"] == pytest.approx(0.2)
    assert (e["num_prompts"], e["num_generations"], e["value"]) == (2, 8, 0.2)


# -- end to end on the tiny Stable Diffusion ------------------------------------------------------

def test_run_evaluation_writes_tables_summary_grids_and_plot(tiny_sd, pair_folder, tmp_path):
    sscd = tmp_path / "sscd.pt"
    torch.jit.script(MeanColourDescriptor()).save(str(sscd))
    clip = make_tiny_clip_folder(tmp_path / "clip")
    config = EvaluateConfig(methods=("none", "embedding-opt", "rand-word-add"), target_losses=(1e6, -1.0),
                            repeat_nums=(1, 2), mitigation=MitigationConfig(max_iters=2), sscd=str(sscd), clip=str(clip),
                            copy_threshold=0.5, sampling=SamplingConfig(num_inference_steps=2, num_generations=2))
    out = tmp_path / "eval"
    summary = run_evaluation(tiny_sd, folder_eval_set(pair_folder, 32), config, out, progress=False)
    res = summary["results"]
    assert set(res) == {"none", "embedding-opt", "rand-word-add"}
    assert set(res["embedding-opt"]) == {"target_loss=1e+06", "target_loss=-1"}
    assert set(res["rand-word-add"]) == {"repeat_num=1", "repeat_num=2"}
    for settings in res.values():
        for s in settings.values():
            assert (s["num_prompts"], s["num_generations"]) == (2, 4)
            assert set(s["similarity_mean"]) == {"sscd", "tiled_l2", "pixel_cosine"}
            assert 0 <= s["copy_rate"] <= 1 and "clip_score_mean" in s
    # a target above d changes nothing: same images, hence same numbers, as no mitigation
    assert res["embedding-opt"]["target_loss=1e+06"]["similarity_mean"] == res["none"]["default"]["similarity_mean"]
    assert res["embedding-opt"]["target_loss=-1"]["iterations_mean"] == 2
    rows = [json.loads(l) for l in (out / "per_prompt.jsonl").read_text().splitlines()]
    assert len(rows) == 2 * 5
    none_rows = [r for r in rows if r["method"] == "none"]
    assert res["none"]["default"]["similarity_mean"]["sscd"] == pytest.approx(np.mean([r["sscd"]["mean"] for r in none_rows]))
    assert all(r["sscd"]["min"] <= r["sscd"]["mean"] <= r["sscd"]["max"] for r in rows)
    assert (out / "per_prompt.csv").read_text().splitlines()[0].startswith("method,setting,value")
    # the training image against its own caption, beside the generations' CLIP score
    from diffmem.similarity import CLIPScorer

    eval_set = folder_eval_set(pair_folder, 32)
    by_caption = {p.caption: p for p in eval_set.prompts}
    scorer = CLIPScorer(str(clip))
    for r in rows:
        p = by_caption[r["prompt"]]
        assert r["gt_clip_score"] == pytest.approx(float(scorer.score(p.training, [p.caption] * len(p.training)).mean()),
                                                   abs=1e-6)
    assert res["none"]["default"]["gt_clip_score_mean"] == pytest.approx(np.mean([r["gt_clip_score"] for r in none_rows]))
    assert json.loads((out / "summary.json").read_text())["provenance"]["model"] == tiny_sd.name
    assert len(list((out / "grids").glob("*.png"))) == 5 and (out / "tradeoff.png").stat().st_size > 0


def test_mitigate_command_writes_images_d_iterations_and_embeddings(tiny_sd_folder, tmp_path):
    from safetensors.torch import load_file

    from diffmem.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("a cat on a mat\na dog in the fog\nthe red barn\n")
    out = tmp_path / "m"
    rc = main(["mitigate", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--method", "embedding-opt",
               "--target-loss", "-1", "--max-iters", "3", "--num-generations", "2", "--num-inference-steps", "2",
               "--batch-size", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    rows = [json.loads(l) for l in (out / "results.jsonl").read_text().splitlines()]
    assert [r["iterations"] for r in rows] == [3, 3, 3] and all(r["final_d"] < r["initial_d"] for r in rows)
    emb = load_file(str(out / "embeddings.safetensors"))
    assert sorted(emb) == ["prompt_00000", "prompt_00001", "prompt_00002"] and emb["prompt_00000"].shape == (77, 32)
    assert all((out / img).is_file() for r in rows for img in r["images"])
    out2 = tmp_path / "m2"
    assert main(["mitigate", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--method", "rand-word-repeat",
                 "--repeat-num", "2", "--num-generations", "1", "--num-inference-steps", "2", "--out", str(out2),
                 "--no-progress"]) == 0
    rows = [json.loads(l) for l in (out2 / "results.jsonl").read_text().splitlines()]
    assert all(len(r["modified_prompt"].split()) == len(r["prompt"].split()) + 2 for r in rows)
    assert main(["mitigate", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--method", "none",
                 "--out", str(out2), "--no-progress"]) == 2  # refuses to overwrite


@pytest.mark.slow
def test_evaluate_command_on_the_fast_lab(fast_lab_folder, tmp_path):
    from diffmem.cli.main import main

    out = tmp_path / "lab_eval"
    rc = main(["evaluate", "--model", str(fast_lab_folder), "--limit", "2", "--mitigation", "none", "embedding-opt",
               "rand-word-add", "--target-loss", "p50", "--repeat-num", "4", "--calibration-limit", "8",
               "--num-generations", "2", "--num-inference-steps", "4", "--out", str(out), "--no-progress"])
    assert rc == 0
    summary = json.loads((out / "summary.json").read_text())
    assert summary["target_loss_calibration"]["percentiles"]["50.0"] > 0
    for settings in summary["results"].values():
        for s in settings.values():
            assert 0 <= s["copy_rate"] <= 1 and 0 <= s["alignment_mean"] <= 1 and s["num_generations"] == 4


def test_best_setting_under_a_copy_rate():
    from diffmem.evaluate import best_under_copy_rate

    res = {"embedding-opt": {"a": {"copy_rate": 0.0, "alignment_mean": 0.6}, "b": {"copy_rate": 0.04, "alignment_mean": 0.8},
                             "c": {"copy_rate": 0.5, "alignment_mean": 0.9}},
           "rand-word-add": {"a": {"copy_rate": 0.3, "alignment_mean": 0.9}}}
    best = best_under_copy_rate(res, 0.05)["methods"]
    assert best == {"embedding-opt": {"setting": "b", "copy_rate": 0.04, "alignment_mean": 0.8}}

"""Every registered mitigation runs in batch through mitigate_unit on each model family the tests
can build offline (tiny Stable Diffusion, tiny v-prediction SD, tiny SDXL, tiny PixArt), and through
the ``mitigate`` command; methods that need a training set refuse the others in one line, and those
that need a UNet's layout refuse a transformer."""

from __future__ import annotations

import pytest
import torch

from diffmem.mitigate import METHODS, MitigationConfig, mitigate_unit
from diffmem.sampling import SamplingConfig

PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square"]
SAMPLING = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, seed=3)
# the cheapest setting at which each method does its work (optimizers, searches and triggers engaged)
CHEAP = {
    "embedding-opt": dict(target_loss=0.0, max_iters=1),
    "sail": dict(params={"loss_threshold": 0.0, "max_rounds": 1, "max_steps": 1, "num_candidates": 2}),
    "nemo": dict(params={"num_seeds": 2, "theta_min": 4.0, "threshold": 0.0, "prune_checks": 1}),
    "prss-reanchor": dict(params={"l_pr": 0.0, "M": 1.0}),
    "broken-memories": dict(params={"reference_prompts": "random", "tau_mild": 0.5}),
    "rand-word-add": dict(repeat_num=1),
    "rand-numb-add": dict(repeat_num=1),
    "rand-word-repeat": dict(repeat_num=1),
}
NEEDS_TRAINING_SET = {"amg"}
NEEDS_LORA = {"lora-scale"}  # tests/test_lora.py
REFUSED = {"pixart": {"nemo": "down and mid cross-attention", "clip-pad": "T5 encoder", "guard": "down and mid blocks"},
           "sdxl": {"clip-pad": "two text encoders"}}  # family -> {method: what its one line names}


@pytest.fixture(scope="module")
def families(tiny_sd, tiny_v_folder, tiny_pixart_folder, tmp_path_factory):
    from diffmem.adapters import load_model
    from diffmem.testing import make_tiny_sdxl_folder

    sdxl = make_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl") / "model")
    return {"sd": tiny_sd, "v-prediction": load_model(str(tiny_v_folder)), "sdxl": load_model(str(sdxl)),
            "pixart": load_model(str(tiny_pixart_folder))}


@pytest.mark.parametrize("family", ["sd", "v-prediction", "sdxl", "pixart"])
@pytest.mark.parametrize("method", [m for m in METHODS if m not in NEEDS_TRAINING_SET | NEEDS_LORA])
def test_every_method_runs_in_batch_on_every_family(families, family, method):
    torch.set_num_threads(1)
    model = families[family]
    config = MitigationConfig(method=method, seed=SAMPLING.seed, **CHEAP.get(method, {}))
    if method in REFUSED.get(family, {}):  # refused in one line naming the family, before any sampling
        from diffmem.model import count_unet_rows

        with count_unet_rows(model) as rows, pytest.raises(ValueError, match=f"cannot run on {model.family}") as e:
            mitigate_unit(model, PROMPTS, [0, 1], config, SAMPLING)
        assert REFUSED[family][method] in str(e.value) and "\n" not in str(e.value) and rows[0] == 0
        return
    out = mitigate_unit(model, PROMPTS, [0, 1], config, SAMPLING)
    assert [r.position for r in out] == [0, 1]
    for r in out:
        assert r.images.shape == (2, 3, model.image_size, model.image_size)
        assert torch.isfinite(r.images).all() and torch.isfinite(r.text_noise_norm).all()
        assert r.text_noise_norm.shape == (2, SAMPLING.num_inference_steps)
        assert r.unet_rows >= 2 * 2 * SAMPLING.num_inference_steps and r.seconds > 0


@pytest.mark.parametrize("method", sorted(NEEDS_TRAINING_SET))
def test_methods_that_need_a_training_set_refuse_other_models(tiny_sd, method):
    from diffmem.mitigations import get_mitigation

    with pytest.raises(ValueError, match="training set"):
        get_mitigation(method).check(tiny_sd)


def test_mitigate_command_takes_a_methods_parameters(tiny_sd_folder, tmp_path):
    import json

    from diffmem.cli.main import main

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    common = ["mitigate", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--num-inference-steps", "3",
              "--num-generations", "1", "--no-progress"]
    assert main([*common, "--method", "ren-attention", "--param", "c1=1.5", "--out", str(tmp_path / "a")]) == 0
    rows = [json.loads(l) for l in (tmp_path / "a" / "results.jsonl").read_text().splitlines()]
    assert [r["params"] for r in rows] == [{"c1": 1.5}] * 2
    assert main([*common, "--method", "ren-attention", "--param", "c2=1.5", "--out", str(tmp_path / "b")]) != 0
    assert main([*common, "--method", "ren-attention", "--param", "c1", "--out", str(tmp_path / "c")]) != 0
    assert not (tmp_path / "b").exists() and not (tmp_path / "c").exists()  # refused before anything was written


def test_unet_rows_are_counted_in_nested_blocks(tiny_sd):
    """count_unet_rows (one counter for bench detect's and the mitigations' costs): an inner block counts
    its own calls, the outer one all of them, and the model's own method is back afterwards."""
    from diffmem.model import count_unet_rows

    x = torch.zeros(3, *tiny_sd.latent_shape)
    cond = tiny_sd.encode_prompts(["a"]).expand(3)
    with count_unet_rows(tiny_sd) as outer:
        tiny_sd.predict_noise(x, 10, cond)
        with count_unet_rows(tiny_sd) as inner:
            tiny_sd.predict_noise(x[:2], 10, cond[:2])
        tiny_sd.predict_noise(x[:1], 10, cond[:1])
    assert (outer[0], inner[0]) == (6, 2)
    assert "model_output" not in vars(tiny_sd)


def test_bench_mitigate_on_tiny_sdxl(families, tmp_path):
    """bench mitigate (and so evaluate, which it runs per method) on an SDXL folder with a pair dataset."""
    import json

    from PIL import Image

    from diffmem.cli.main import main

    data = tmp_path / "pairs"
    data.mkdir()
    for i, colour in enumerate(("red", "blue")):
        Image.new("RGB", (32, 32), colour).save(data / f"{i:08d}.png")
        (data / f"{i:08d}.txt").write_text(f"a {colour} square")
    folder = str(families["sdxl"].folders[0])
    out = tmp_path / "bench"
    assert main(["bench", "mitigate", "--model", folder, "--dataset", str(data), "--methods", "none,gni,amg",
                 "--num-inference-steps", "2", "--num-generations", "1", "--batch-size", "4", "--no-progress",
                 "--out", str(out)]) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    ok = {(r["method"], r["setting"]) for r in rows if r["status"] == "ok"}
    assert ("none", "default") in ok and sum(m == "gni" for m, _ in ok) == 4
    amg = [r for r in rows if r["method"] == "amg"]
    assert len(amg) == 1 and amg[0]["status"] == "skipped" and "training set" in json.dumps(amg[0])
    assert (out / "tradeoff.png").is_file() and (out / "table.md").is_file()

"""LoRA adapters: --lora on a model (diffusers and kohya layouts), checked against merging the low-rank
update into the weights by hand; bad files refused in one line; train --lora-rank writes a file that
diffusers and --lora read."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from diffmem.adapters import load_model
from diffmem.adapters.lora import LORA_FILE, apply_loras, parse_lora, set_lora_scale
from diffmem.cli.main import main
from diffmem.testing import make_tiny_lora_file


def _merged_by_hand(folder, lora_file, scale: float, per_rank_alpha: float = 1.0, prefix: str = "unet"):
    """A fresh model whose UNet weights are W + scale * alpha / r * B @ A for every LoRA pair of the
    diffusers-layout file: the definition of a LoRA update (Hu et al. 2021), no peft involved."""
    model = load_model(str(folder))
    tensors = load_file(str(lora_file))
    params = dict(model.denoiser.named_parameters())
    with torch.no_grad():
        for key, a in tensors.items():
            if not key.endswith(".lora_A.weight"):
                continue
            module = key[len(prefix) + 1:-len(".lora_A.weight")]
            b = tensors[key.replace("lora_A", "lora_B")]
            params[module + ".weight"] += scale * per_rank_alpha * (b @ a)
    return model


def _outputs(model, seed: int = 0):
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(2, *model.latent_shape, generator=gen)
    cond = model.encode_prompts(["a red cat", "two dogs"])
    t = torch.tensor([1000.0, 300.0]) if model.prediction_type == "flow" else torch.tensor([900, 300])
    with torch.no_grad():
        return model.model_output(x, t, cond)


def test_lora_in_both_layouts_equals_the_hand_merged_weights(tiny_sd_folder, tmp_path):
    base = load_model(str(tiny_sd_folder))
    plain = make_tiny_lora_file(base.denoiser, tmp_path / "a.safetensors", rank=2, seed=1)
    kohya = make_tiny_lora_file(base.denoiser, tmp_path / "k.safetensors", rank=2, seed=1, layout="kohya", alpha=1.0)
    expected = _outputs(_merged_by_hand(tiny_sd_folder, plain, 0.5))
    assert not torch.allclose(expected, _outputs(base), atol=1e-3)  # the LoRA does change the output
    for file, spec in ((plain, f"{plain}:0.5"), (kohya, f"{kohya}:1.0")):  # kohya alpha 1 on rank 2: 0.5 x B A
        model = load_model(str(tiny_sd_folder))
        (record,) = apply_loras(model, [parse_lora(spec)])
        torch.testing.assert_close(_outputs(model), expected, rtol=1e-4, atol=1e-5)
        assert record["file"] == file.name and len(record["sha256_16"]) == 16
        assert model.identity()["loras"] == [record]
    set_lora_scale(model, 0.0)  # the scale knob: 0 is the base model
    torch.testing.assert_close(_outputs(model), _outputs(base), rtol=1e-5, atol=1e-6)
    assert "loras" not in base.identity()


def test_lora_on_an_sd3_transformer_equals_the_hand_merged_weights(tiny_sd3_folder, tmp_path):
    """The joint-attention transformer's q, k, v, out and text-stream projections, prefix "transformer"."""
    base = load_model(str(tiny_sd3_folder))
    targets = ("to_q", "to_k", "to_v", "to_out.0", "add_q_proj", "add_k_proj", "add_v_proj", "to_add_out")
    lora = make_tiny_lora_file(base.denoiser, tmp_path / "sd3.safetensors", seed=4, prefix="transformer", targets=targets)
    expected = _outputs(_merged_by_hand(tiny_sd3_folder, lora, 0.8, prefix="transformer"))
    assert not torch.allclose(expected, _outputs(base), atol=1e-3)
    model = load_model(str(tiny_sd3_folder))
    apply_loras(model, [parse_lora(f"{lora}:0.8")])
    torch.testing.assert_close(_outputs(model), expected, rtol=1e-4, atol=1e-5)


def test_lora_on_an_sdxl_unet_equals_the_hand_merged_weights(tmp_path):
    """SDXL: the UNet's attention projections, conditioned on both encoders and the pooled/time extras."""
    from diffmem.testing import make_tiny_sdxl_folder

    folder = make_tiny_sdxl_folder(tmp_path / "sdxl")
    base = load_model(str(folder))
    lora = make_tiny_lora_file(base.denoiser, tmp_path / "xl.safetensors", seed=5)
    kohya = make_tiny_lora_file(base.denoiser, tmp_path / "xlk.safetensors", seed=5, layout="kohya", alpha=1.0)
    expected = _outputs(_merged_by_hand(folder, lora, 0.5))
    assert not torch.allclose(expected, _outputs(base), atol=1e-3)
    for spec in (f"{lora}:0.5", f"{kohya}:1.0"):  # kohya alpha 1 on rank 2: 0.5 x B A
        model = load_model(str(folder))
        (record,) = apply_loras(model, [parse_lora(spec)])
        torch.testing.assert_close(_outputs(model), expected, rtol=1e-4, atol=1e-5)
        assert model.identity()["loras"] == [record] and model.family == "stable-diffusion-xl"


def test_lora_is_recorded_in_every_result_and_bad_files_are_refused(tiny_sd_folder, tiny_pixart_folder, tmp_path):
    base = load_model(str(tiny_sd_folder))
    lora = make_tiny_lora_file(base.denoiser, tmp_path / "style.safetensors", seed=2)
    (tmp_path / "p.txt").write_text("a red cat\n")
    args = ["detect", "--model", str(tiny_sd_folder), "--prompts", str(tmp_path / "p.txt"), "--num-inference-steps", "2",
            "--track-steps", "1", "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "d.jsonl"), "--lora", f"{lora}:0.7"]) == 0
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert meta["model_identity"]["loras"][0]["scale"] == 0.7
    assert parse_lora("C:/x/y.safetensors").scale == 1.0 and parse_lora("y.safetensors:2").scale == 2.0
    # bad files: one clear line naming the file, before any sampling
    (tmp_path / "x.bin").write_bytes(b"\0" * 10)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    save_file({"weight": torch.zeros(2, 2)}, str(tmp_path / "nolora.safetensors"))
    wrong = make_tiny_lora_file(base.denoiser, tmp_path / "wrong.safetensors", targets=("to_q",))
    t = load_file(str(wrong))
    save_file({k: (torch.zeros(v.shape[0], v.shape[1] + 3) if "lora_A" in k else v) for k, v in t.items()}, str(wrong))
    for name, message in (("missing.safetensors", "no such file"), ("x.bin", "expected a .safetensors"),
                          ("junk.safetensors", "not a readable safetensors file"),
                          ("nolora.safetensors", "no LoRA weights for the unet"), ("wrong.safetensors", "does not fit")):
        with pytest.raises((ValueError, FileNotFoundError), match=f"--lora .*{name}: .*{message}"):
            apply_loras(load_model(str(tiny_sd_folder)), [parse_lora(str(tmp_path / name))])
    with pytest.raises(ValueError, match="LoRA on a PixArtTransformer2DModel .pixart. is not supported"):
        apply_loras(load_model(str(tiny_pixart_folder)), [parse_lora(str(lora))])


def test_train_lora_rank_writes_an_adapter_that_diffusers_and_lora_read(tiny_sd_folder, tmp_path):
    from diffusers import StableDiffusionPipeline

    from diffmem.train import ImagePairs, TrainConfig, train

    model = load_model(str(tiny_sd_folder))
    before = {k: v.clone() for k, v in model.denoiser.state_dict().items()}
    images = torch.rand(4, 3, model.image_size, model.image_size)
    out = train(model, ImagePairs(images, ["a red cat", "two dogs", "a house", "a blue car"]),
                TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=3, train_batch_size=2, learning_rate=1e-2,
                            lora_rank=2, use_ema=True), progress=False)
    file = out / LORA_FILE
    state, _ = StableDiffusionPipeline.lora_state_dict(load_file(str(file)))
    assert state and all(k.startswith("unet.") and "lora" in k for k in state)
    ranks = {v.shape[0] for k, v in state.items() if "lora_A" in k or "lora.down" in k}  # diffusers scripts' layout
    assert ranks == {2}
    # only the adapter learned: the UNet's own weights are as loaded
    base_keys = {k: v for k, v in model.denoiser.state_dict().items() if "lora" not in k}
    for k, v in base_keys.items():
        torch.testing.assert_close(v, before[k.replace(".base_layer", "")])
    # the file reads back with --lora and moves the output (B is no longer 0 after 3 steps)
    fresh, adapted = load_model(str(tiny_sd_folder)), load_model(str(tiny_sd_folder))
    apply_loras(adapted, [parse_lora(str(file))])
    assert not torch.allclose(_outputs(adapted), _outputs(fresh), atol=1e-6)
    with pytest.raises(ValueError, match="--lora-rank 0: must be >= 1"):
        TrainConfig(output_dir="x", lora_rank=0)


def test_train_lora_rank_on_an_sd3_transformer(tiny_sd3_folder, tmp_path):
    """Flow-matching LoRA training: the adapter sits on the MMDiT's projections, under the "transformer"
    prefix the SD3 pipeline reads, and moves the velocity once read back."""
    from diffusers import StableDiffusion3Pipeline

    from diffmem.train import ImagePairs, TrainConfig, train

    model = load_model(str(tiny_sd3_folder))
    images = torch.rand(2, 3, model.image_size, model.image_size)
    out = train(model, ImagePairs(images, ["a red cat", "two dogs"]),
                TrainConfig(output_dir=str(tmp_path / "run"), max_train_steps=2, train_batch_size=2, learning_rate=1e-2,
                            lora_rank=2), progress=False)
    state = StableDiffusion3Pipeline.lora_state_dict(load_file(str(out / LORA_FILE)))
    state = state[0] if isinstance(state, tuple) else state  # (state, alphas) in some diffusers versions
    assert state and all(k.startswith("transformer.") and "lora" in k for k in state)
    fresh, adapted = load_model(str(tiny_sd3_folder)), load_model(str(tiny_sd3_folder))
    apply_loras(adapted, [parse_lora(str(out / LORA_FILE))])
    assert not torch.allclose(_outputs(adapted), _outputs(fresh), atol=1e-6)


def test_lora_scale_mitigation_goes_from_the_adapter_to_the_base_model(tiny_sd_folder, tmp_path):
    """lora-scale at 1 samples exactly as the adapter loaded (the method off); at 0 exactly as the base
    model without any adapter; it refuses a model without --lora, and restores the scale after sampling."""
    from diffmem.mitigate import MitigationConfig, mitigate_unit
    from diffmem.sampling import SamplingConfig

    sampling = SamplingConfig(num_inference_steps=3, num_generations=2, batch_size=8, seed=5)
    prompts = ["a red cat", "two dogs"]
    base = load_model(str(tiny_sd_folder))
    adapted = load_model(str(tiny_sd_folder))
    apply_loras(adapted, [parse_lora(str(make_tiny_lora_file(base.denoiser, tmp_path / "s.safetensors", seed=3)))])

    def images(model, method="none", **params):
        config = MitigationConfig(method=method, seed=sampling.seed, params=params)
        return torch.stack([r.images for r in mitigate_unit(model, prompts, [0, 1], config, sampling)])

    as_loaded, without = images(adapted), images(base)
    assert not torch.allclose(as_loaded, without, atol=1e-4)
    torch.testing.assert_close(images(adapted, "lora-scale", scale=1.0), as_loaded)
    torch.testing.assert_close(images(adapted, "lora-scale", scale=0.0), without, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(images(adapted), as_loaded)  # the scale is back after the unit
    with pytest.raises(ValueError, match="^--method lora-scale: cannot run on stable-diffusion .*: it has no LoRA adapter"):
        images(base, "lora-scale", scale=0.5)

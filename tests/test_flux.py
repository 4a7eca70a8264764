"""FLUX.1 (dev and schnell) on tiny offline folders: the family is recognised, the tracked pass
reproduces FluxPipeline's latents (packed latents, dynamic shift, guidance embedding, true CFG), d is
the velocity difference against the empty prompt, and the guidance-derivative estimator of dev is held
to its definition."""

from __future__ import annotations

import pytest
import torch

from diffmem.adapters import load_model, resolve_model_path
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit, schedule

PROMPT = "a red cat on a mat"


@pytest.fixture(scope="module")
def flux_folders(tmp_path_factory):
    from diffmem.testing import make_tiny_flux_folder

    root = tmp_path_factory.mktemp("flux")
    return {"dev": make_tiny_flux_folder(root / "dev"), "schnell": make_tiny_flux_folder(root / "schnell", seed=3, dev=False)}


@pytest.fixture(scope="module")
def dev(flux_folders):
    return load_model(str(flux_folders["dev"]))


def _pipeline(folder):
    from diffusers import FluxPipeline

    return FluxPipeline.from_pretrained(str(folder), torch_dtype=torch.float32)


def _pipeline_latents(folder, model, G, seed, steps, true_cfg=1.0):
    """FluxPipeline's final latents, unpacked, for one prompt and G images."""
    from diffmem.adapters.flux import unpack

    pipe = _pipeline(folder)
    kwargs = {"true_cfg_scale": true_cfg, "negative_prompt": ""} if true_cfg != 1.0 else {}
    out = pipe(PROMPT, num_images_per_prompt=G, num_inference_steps=steps, height=model.image_size,
               width=model.image_size, generator=torch.Generator("cpu").manual_seed(seed), output_type="latent",
               max_sequence_length=model.max_tokens, **({"guidance_scale": model.distilled_guidance}
                                                         if model.guidance_embeds else {}), **kwargs).images
    H = model.latent_shape[1]
    return unpack(out, H, H)


@pytest.mark.parametrize("variant", ["dev", "schnell"])
@pytest.mark.parametrize("w", [1.0, 2.5])
def test_pass_reproduces_flux_pipeline_latents(flux_folders, variant, w):
    """w = 1: the pipeline's default (no unconditional branch; the pass steps on v_u + (v_c - v_u));
    w = 2.5: the pipeline's true CFG with the empty negative prompt, the pass's null."""
    folder = flux_folders[variant]
    model = load_model(str(folder))
    assert resolve_model_path(str(folder))[0] == "flux" and model.variant == variant
    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, seed=5, guidance_scale=w, batch_size=8)
    (res,) = sample_unit(model, [PROMPT], [0], cfg)
    expected = _pipeline_latents(folder, model, 2, 5, 4, true_cfg=w)
    torch.testing.assert_close(res.latents, expected, rtol=1e-4, atol=1e-5)


def test_d_is_the_velocity_difference_against_the_empty_prompt_at_sigma_1(dev):
    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, seed=1, track_steps=1, batch_size=8)
    (res,) = sample_unit(dev, [PROMPT], [0], cfg)
    x = initial_noise(dev, 2, 1)
    t = schedule(dev, 4)[0]
    assert float(t) == 1000.0 and dev.null.name == "empty-prompt"
    with torch.no_grad():
        v_c = dev.model_output(x, t, dev.encode_prompts([PROMPT]).expand(2))
        v_u = dev.model_output(x, t, dev.encode_prompts([""]).expand(2))
    torch.testing.assert_close(res.text_noise_norm[:, 0].float(), (v_c - v_u).flatten(1).norm(dim=1), rtol=1e-4, atol=1e-6)
    assert dev.identity()["variant"] == "dev" and dev.identity()["distilled_guidance"] == 3.5


def _pipeline_velocity(pipe, x, t, prompt, g):
    """The velocity through the pipeline's own prompt encoding, packing and ids (not the adapter's)."""
    B, C, H, W = x.shape
    embeds, pooled, text_ids = pipe.encode_prompt(prompt, prompt_2=None, num_images_per_prompt=B, max_sequence_length=512)
    packed = pipe._pack_latents(x, B, C, H, W)
    ids = pipe._prepare_latent_image_ids(B, H // 2, W // 2, x.device, x.dtype)
    with torch.no_grad():
        out = pipe.transformer(hidden_states=packed, timestep=(t / 1000).expand(B), guidance=torch.full([B], g),
                               pooled_projections=pooled, encoder_hidden_states=embeds, txt_ids=text_ids, img_ids=ids,
                               return_dict=False)[0]
    return pipe._unpack_latents(out, H * 2, W * 2, 2)  # the tiny VAE's scale factor is 2


def test_guidance_derivative_and_its_linearity_residual(flux_folders, dev):
    from diffmem import detectors
    from diffmem.detect import detect_unit

    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, seed=4, track_steps=1, batch_size=8)
    fg, fw = detect_unit(dev, [detectors.get_detector("flux-guidance"), detectors.get_detector("wen")], [PROMPT], [0],
                         cfg)[1][0]
    f = {**fg, **fw}
    pipe = _pipeline(flux_folders["dev"])
    x, t = initial_noise(dev, 2, 4), schedule(dev, 4)[0]
    v1, v2, vm = (_pipeline_velocity(pipe, x, t, PROMPT, g).double() for g in (1.0, 3.5, 2.25))
    d_g = ((v2 - v1).flatten(1).norm(dim=1) / 2.5).numpy()
    residual = ((vm - (v1 + v2) / 2).flatten(1).norm(dim=1) / (v2 - v1).flatten(1).norm(dim=1)).numpy()
    assert f["flux_guidance_per_generation"] == pytest.approx(d_g.tolist(), rel=1e-4)
    assert f["flux_guidance_residual"] == pytest.approx(residual.tolist(), rel=1e-3, abs=1e-6)
    assert f["flux-guidance"] == pytest.approx(d_g.mean(), rel=1e-4) and f["wen"] > 0  # d_null beside it


def test_schnell_refuses_the_guidance_derivative_in_one_line(flux_folders):
    from diffmem import detectors

    schnell = load_model(str(flux_folders["schnell"]))
    with pytest.raises(ValueError, match=r"^flux-guidance cannot run on flux \([^\n]*\): it differentiates .*\(FLUX.1-dev\) has$"):
        detectors.check_model([detectors.get_detector("flux-guidance")], schnell)


def test_verbs_run_on_flux_with_a_lora(flux_folders, dev, tmp_path):
    """detect (both estimators, a LoRA in the identity), explain over T5 tokens, mitigate by embedding
    optimization; and the mitigations whose definition does not carry over refuse in one line."""
    import json

    from diffmem.cli.main import main
    from diffmem.files import read_rows
    from diffmem.mitigations import MITIGATIONS, check_model
    from diffmem.testing import make_tiny_lora_file

    folder = str(flux_folders["dev"])
    (tmp_path / "p.txt").write_text("a red cat\ntwo dogs\n")
    lora = make_tiny_lora_file(dev.denoiser, tmp_path / "l.safetensors", prefix="transformer")
    assert main(["detect", "--model", folder, "--lora", f"{lora}:0.5", "--prompts", str(tmp_path / "p.txt"),
                 "--method", "wen,flux-guidance", "--num-inference-steps", "3", "--out", str(tmp_path / "d.jsonl"),
                 "--no-progress"]) == 0
    rows = read_rows(tmp_path / "d.jsonl")
    assert all(r["wen"] > 0 and r["flux-guidance"] > 0 for r in rows)
    meta = json.loads((tmp_path / "d.meta.json").read_text())
    assert '"loras"' in json.dumps(meta) and "l.safetensors" in json.dumps(meta) and '"variant": "dev"' in json.dumps(meta)
    assert main(["explain", "--model", folder, "--prompt", "a red cat", "--num-inference-steps", "3", "--no-png",
                 "--json", str(tmp_path / "e.json")]) == 0
    words = {w["word"] for w in json.loads((tmp_path / "e.json").read_text())["words"]}
    assert {"red", "cat"} <= words
    assert main(["mitigate", "--model", folder, "--prompts", str(tmp_path / "p.txt"), "--method", "embedding-opt",
                 "--target-loss", "0.1", "--num-inference-steps", "3", "--out", str(tmp_path / "m"), "--no-progress"]) == 0
    runs = []
    for name in sorted(MITIGATIONS):
        try:
            check_model(name, dev)
            runs.append(name)
        except ValueError as e:
            assert str(e).startswith(f"--method {name}: cannot run on flux") and "\n" not in str(e)
    assert set(runs) == {"none", "embedding-opt", "rand-word-add", "rand-numb-add", "rand-word-repeat", "delayed-cfg",
                         "broken-memories"}


def test_memory_plan_the_vae_waits_for_a_decode_and_offloaded_encoders_visit_only_to_encode(flux_folders, dev):
    """Detection loads no VAE; the text encoders of an offloaded model are moved to the device around each
    encoding and back to the CPU after it, and encode exactly as when they stay."""
    from diffmem.adapters import load_model
    from diffmem.detect import detect_unit
    from diffmem import detectors

    folder = str(flux_folders["dev"])
    model = load_model(folder, offload="text-encoders")
    assert not model.vae_loaded and model.vae_config.scaling_factor == dev.vae.config.scaling_factor
    detect_unit(model, [detectors.get_detector("wen")], ["a red cat"], [0], SamplingConfig(num_inference_steps=2,
                                                                                           num_generations=1))
    assert not model.vae_loaded  # first-step detection decodes nothing
    moves = []
    for enc in model.text_encoders:
        original = enc.to
        enc.to = lambda *a, _o=original, **k: (moves.append(str(a[0])), _o(*a, **k))[1]
    got = model.encode_prompts(["a red cat", "two dogs"])
    assert moves == ["cpu", "cpu", "cpu", "cpu"] and all(next(m.parameters()).device.type == "cpu" for m in model.text_encoders)
    expected = dev.encode_prompts(["a red cat", "two dogs"])
    torch.testing.assert_close(got.embeddings, expected.embeddings)
    torch.testing.assert_close(model.decode(torch.zeros(1, *model.latent_shape)), dev.decode(torch.zeros(1, *dev.latent_shape)))
    assert model.vae_loaded


def test_offload_is_refused_for_families_without_a_memory_plan(tiny_sd_folder):
    from diffmem.adapters import load_model

    with pytest.raises(ValueError, match=r"^--offload text-encoders: offered for stable-diffusion-3 and flux folders"):
        load_model(str(tiny_sd_folder), offload="text-encoders")


def test_memory_plan_counts_the_parameters_from_the_headers(flux_folders, dev):
    from diffmem.adapters.memory import component_parameters, memory_plan

    counted = component_parameters(flux_folders["dev"])
    numel = lambda m: sum(p.numel() for p in m.parameters())
    assert counted["transformer"] == numel(dev.denoiser) and counted["vae"] == numel(dev.vae)
    assert [counted["text_encoder"], counted["text_encoder_2"]] == [numel(m) for m in dev.text_encoders]
    plan = memory_plan(flux_folders["dev"], torch.float32)
    gib = {c: n * 4 / 2**30 for c, n in counted.items()}
    assert plan["detection_gib"] == pytest.approx(gib["transformer"] + gib["text_encoder"] + gib["text_encoder_2"])
    assert plan["offloaded_sampling_gib"] == pytest.approx(gib["transformer"])
    assert plan["generation_gib"] == pytest.approx(sum(gib.values()))


def test_joint_capture_is_the_text_block_of_the_processors_own_softmax(dev, monkeypatch):
    """FLUX's image-to-text attention in its double- and single-stream blocks, against the full softmax
    recomputed in float64 from the very (normed, rotary) Q and K the diffusers processor handed to its
    attention call, and that softmax against the call's own output. Chunked over queries; a text mask
    zeroes padding."""
    import diffusers.models.transformers.transformer_flux as tf

    from diffmem.attention import JointAttentionRecorder, joint_attention_layers

    layers = joint_attention_layers(dev)
    assert layers == ["transformer_blocks.0.attn.processor", "single_transformer_blocks.0.attn.processor"]
    seen = []
    real = tf.dispatch_attention_fn

    def spy(query, key, value, **kwargs):  # (B, S, heads, D), as the processor calls it
        out = real(query, key, value, **kwargs)
        seen.append((query.detach().double(), key.detach().double(), value.detach().double(), out.detach().double()))
        return out

    monkeypatch.setattr(tf, "dispatch_attention_fn", spy)
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, track_steps=1, batch_size=4)
    with JointAttentionRecorder(dev, None, steps=[0], chunk=5) as rec:
        sample_unit(dev, [PROMPT], [0], cfg, recorders=[rec])
    first_call = seen[:2]  # step 0: the double-stream block, then the single-stream block
    T = rec.text_len
    for layer, (q, k, v, out) in zip(layers, first_call):
        q, k, v = (x.transpose(1, 2) for x in (q, k, v))  # (B, heads, S, D)
        p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)
        torch.testing.assert_close((p @ v).transpose(1, 2), out, atol=1e-5, rtol=1e-4)  # the call's own softmax
        B = q.shape[0]
        got = rec.maps[0][layer]
        assert got.shape == (B // 2, q.shape[1], q.shape[2] - T, T)
        torch.testing.assert_close(got.double(), p[B // 2:, :, T:, :T], atol=1e-6, rtol=1e-5)  # conditional rows
        assert (got.sum(-1) < 1).all()  # normalised over all keys: the text's share

    mask = torch.zeros(1, T, dtype=torch.bool)
    mask[0, :4] = True
    with JointAttentionRecorder(dev, layers[1:], steps=[0], keep_padding=False, text_mask=mask) as masked:
        sample_unit(dev, [PROMPT], [0], cfg, recorders=[masked])
    m = masked.maps[0][layers[1]]
    torch.testing.assert_close(m[..., :4], rec.maps[0][layers[1]][..., :4])
    assert (m[..., 4:] == 0).all()

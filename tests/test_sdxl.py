"""Stable Diffusion XL behind the one model interface: loading, sampling equal to diffusers'
StableDiffusionXLPipeline, d against the pipeline's own unconditional branch, and every verb end to end."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch

from diffmem.sampling import SamplingConfig, sample_prompts, schedule

torch.set_num_threads(1)
PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square", "an astronaut riding a horse"]
G, STEPS, SEED = 2, 5, 7


@pytest.fixture(scope="module")
def sdxl_folder(tmp_path_factory):
    from diffmem.testing import make_tiny_sdxl_folder

    return make_tiny_sdxl_folder(tmp_path_factory.mktemp("tiny_sdxl") / "model")


@pytest.fixture(scope="module")
def sdxl(sdxl_folder):
    from diffmem.adapters import load_model

    return load_model(str(sdxl_folder))


def _pipeline(folder):
    from diffusers import DDIMScheduler, StableDiffusionXLPipeline

    pipe = StableDiffusionXLPipeline.from_pretrained(folder, add_watermarker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # Frozen like the adapter's: on CPU, convolutions of weights that require grad take other kernels
    # even under no_grad (~1e-6 apart per call, ~1e-5 after five steps on latents of size ~20 here);
    # frozen on both sides, the latents agree bit for bit.
    for module in (pipe.unet, pipe.vae, pipe.text_encoder, pipe.text_encoder_2):
        module.requires_grad_(False)
    return pipe


@pytest.fixture(scope="module")
def pipe(sdxl_folder):
    return _pipeline(sdxl_folder)


# -- (a) loading ----------------------------------------------------------------------------------

def test_load_model_gives_an_sdxl_diffusion_model(sdxl, sdxl_folder, tmp_path, monkeypatch):
    import diffmem.adapters as adapters
    from diffmem.adapters import load_model, resolve_model_path
    from diffmem.model import DiffusionModel, ModelDefaults

    assert isinstance(sdxl, DiffusionModel)
    assert sdxl.family == "stable-diffusion-xl" and sdxl.prediction_type == "epsilon"
    assert resolve_model_path(str(sdxl_folder)) == ("stable-diffusion-xl", sdxl_folder)
    monkeypatch.setattr(adapters, "_cached_hub_snapshot", lambda repo_id: sdxl_folder)  # a cached hub id
    assert resolve_model_path("owner/tiny-sdxl") == ("stable-diffusion-xl", sdxl_folder)
    monkeypatch.undo()
    # guidance 5.0 as the pipeline; the embedding-opt budget and target stay Stable Diffusion's
    assert sdxl.defaults == ModelDefaults(guidance_scale=5.0) and sdxl.default_guidance_scale == 5.0
    assert SamplingConfig().guidance(sdxl) == 5.0
    assert sdxl.latent_shape == (4, 16, 16) and sdxl.image_size == 32 and sdxl.max_tokens == 77
    assert sdxl.frozen_token_positions == (0,)
    cond = sdxl.encode_prompts(PROMPTS[:2])
    assert cond.embeddings.shape == (2, 77, 16 + 32)
    assert cond.extra["text_embeds"].shape == (2, 24)
    assert cond.extra["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]] * 2
    empty = sdxl.empty_conditioning()  # force_zeros_for_empty_prompt: zeros, the same time ids
    assert torch.count_nonzero(empty.embeddings) == 0 and torch.count_nonzero(empty.extra["text_embeds"]) == 0
    assert empty.extra["time_ids"].tolist() == [[32, 32, 0, 0, 32, 32]]
    tokens = sdxl.tokens("a cat")
    assert len(tokens) == 77 and tokens[0].special and [t.text for t in tokens[1:5]] == ["a", "c", "a", "t"]
    assert sdxl.count_tokens("a cat") == 6
    assert sdxl.identity()["family"] == "stable-diffusion-xl" and sdxl.identity()["sha256_16"]
    # save() writes a UNet that --unet loads
    sdxl.save(tmp_path / "ft")
    again = load_model(str(sdxl_folder), unet=str(tmp_path / "ft" / "unet"))
    assert again.family == "stable-diffusion-xl" and len(again.folders) == 2
    # an SD 1.x folder is still Stable Diffusion
    from diffmem.testing import make_tiny_sd_folder

    assert resolve_model_path(str(make_tiny_sd_folder(tmp_path / "sd")))[0] == "stable-diffusion"


def test_a_folder_without_a_component_is_refused(sdxl_folder, tmp_path):
    from diffmem.adapters import load_model

    folder = tmp_path / "m"
    shutil.copytree(sdxl_folder, folder)
    shutil.rmtree(folder / "text_encoder_2")
    with pytest.raises(FileNotFoundError, match="text_encoder_2/ is missing"):
        load_model(str(folder))


# -- (b) sampling equals the pipeline -------------------------------------------------------------

def test_latents_and_images_equal_the_sdxl_pipeline(sdxl, pipe):
    cfg = SamplingConfig(num_inference_steps=5, guidance_scale=5.0, num_generations=G, seed=11, batch_size=2 * G)
    ours = sample_prompts(sdxl, PROMPTS, cfg, decode=True)
    for i, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, num_inference_steps=5, guidance_scale=5.0, num_images_per_prompt=G,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
        assert ref.shape == ours[i].latents.shape
        assert (ref - ours[i].latents).abs().max().item() <= 1e-5
        assert ours[i].seed == 11 + i and ours[i].text_noise_norm.shape == (G, 5)
    # decoding with SDXL's VAE scaling factor gives the pipeline's images
    images = pipe(PROMPTS[0], num_inference_steps=5, guidance_scale=5.0, num_images_per_prompt=G,
                  generator=torch.Generator("cpu").manual_seed(11), output_type="pt").images
    assert sdxl.vae.config.scaling_factor == pytest.approx(0.13025)
    assert (images - ours[0].images).abs().max().item() <= 1e-5
    assert not torch.allclose(ours[0].latents, ours[1].latents)  # different prompts: not vacuous


# -- (c) d against the pipeline's own unconditional branch ----------------------------------------

def _first_step_d(pipe, prompt, seed, t):
    """||eps_c - eps_u|| from the pipeline's UNet, its encode_prompt and zeros for the unconditional branch."""
    embeds, neg, pooled, neg_pooled = pipe.encode_prompt(prompt, device=torch.device("cpu"), num_images_per_prompt=G,
                                                         do_classifier_free_guidance=True)
    assert torch.count_nonzero(neg) == 0 and torch.count_nonzero(neg_pooled) == 0  # force_zeros_for_empty_prompt
    size = pipe.default_sample_size * pipe.vae_scale_factor
    time_ids = torch.tensor([[size, size, 0, 0, size, size]], dtype=embeds.dtype).repeat(G, 1)
    x = torch.randn((G, 4, pipe.default_sample_size, pipe.default_sample_size),
                    generator=torch.Generator("cpu").manual_seed(seed)) * pipe.scheduler.init_noise_sigma
    with torch.no_grad():
        eps_c = pipe.unet(x, t, encoder_hidden_states=embeds,
                          added_cond_kwargs={"text_embeds": pooled, "time_ids": time_ids}).sample
        eps_u = pipe.unet(x, t, encoder_hidden_states=torch.zeros_like(embeds),
                          added_cond_kwargs={"text_embeds": torch.zeros_like(pooled), "time_ids": time_ids}).sample
    return (eps_c.double() - eps_u.double()).flatten(1).norm(dim=1)


def test_first_step_d_is_the_noise_difference_against_zeros(sdxl, pipe):
    res = sample_prompts(sdxl, PROMPTS, SamplingConfig(num_inference_steps=STEPS, num_generations=G, seed=SEED,
                                                        track_steps=1), decode=False)
    pipe.scheduler.set_timesteps(STEPS)
    t = pipe.scheduler.timesteps[0]
    assert t == schedule(sdxl, STEPS)[0]
    for i, (prompt, r) in enumerate(zip(PROMPTS, res)):
        d = _first_step_d(pipe, prompt, SEED + i, t)
        torch.testing.assert_close(r.text_noise_norm[:, 0].double(), d, rtol=1e-5, atol=1e-6)
        assert (d > 0).all()


def test_unconditional_branch_is_the_encoded_empty_prompt_without_force_zeros(sdxl_folder, tmp_path):
    from diffmem.adapters import load_model

    folder = tmp_path / "m"
    shutil.copytree(sdxl_folder, folder)
    index = json.loads((folder / "model_index.json").read_text())
    (folder / "model_index.json").write_text(json.dumps({**index, "force_zeros_for_empty_prompt": False}))
    model = load_model(str(folder))
    pipe = _pipeline(folder)
    assert pipe.config.force_zeros_for_empty_prompt is False
    _, neg, _, neg_pooled = pipe.encode_prompt("a red cat", device=torch.device("cpu"), num_images_per_prompt=1,
                                               do_classifier_free_guidance=True)
    empty = model.empty_conditioning()
    assert torch.count_nonzero(neg) > 0
    torch.testing.assert_close(empty.embeddings, neg, rtol=0, atol=1e-6)
    torch.testing.assert_close(empty.extra["text_embeds"], neg_pooled, rtol=0, atol=1e-6)
    assert model.identity()["sha256_16"] != load_model(str(sdxl_folder)).identity()["sha256_16"]


# -- (d) every verb on SDXL -----------------------------------------------------------------------

def test_embedding_opt_moves_only_the_token_embeddings(sdxl):
    """mitigate_unit with embedding-opt samples with other token embeddings but the prompt's own pooled
    embedding and time ids (checked on every UNet call of the run)."""
    from diffmem.mitigate import MitigationConfig, mitigate_unit

    original = sdxl.encode_prompts(PROMPTS[:2])
    empty = sdxl.empty_conditioning()
    seen = []
    real = type(sdxl).model_output

    def spy(x_t, t, cond, denoiser=None):
        seen.append(cond.detach())
        return real(sdxl, x_t, t, cond, denoiser)

    sdxl.model_output = spy
    try:
        sampling = SamplingConfig(num_inference_steps=2, num_generations=1, seed=SEED, batch_size=4)
        out = mitigate_unit(sdxl, PROMPTS[:2], [0, 1], MitigationConfig("embedding-opt", target_loss=0, max_iters=2),
                            sampling, decode=False)
    finally:
        del sdxl.model_output
    assert [m.iterations for m in out] == [2, 2]
    for j, m in enumerate(out):
        assert not torch.equal(m.embedding, original.embeddings[j])  # the tokens moved ...
        torch.testing.assert_close(m.embedding[0], original.embeddings[j, 0], rtol=0, atol=0)  # ... not the start token
    pooled = torch.cat([original.extra["text_embeds"], empty.extra["text_embeds"]])
    for cond in seen:
        assert torch.equal(cond.extra["time_ids"], sdxl.time_ids(len(cond)))
        for row in cond.extra["text_embeds"]:  # each row: a prompt's own pooled embedding, or the zeros
            assert (row[None] == pooled).all(dim=1).any()
    assert len(seen) >= 4


def _run(argv):
    from diffmem.cli.main import main

    return main(argv + ["--num-inference-steps", "2", "--num-generations", "1", "--no-progress"])


def test_every_verb_runs_on_sdxl(sdxl_folder, tmp_path):
    from PIL import Image

    model = ["--model", str(sdxl_folder)]
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS[:2]) + "\n")

    assert _run(["detect", *model, "--prompts", str(prompts), "--out", str(tmp_path / "det.jsonl"),
                 "--track-steps", "1"]) == 0
    rows = [json.loads(line) for line in (tmp_path / "det.jsonl").read_text().splitlines()]
    assert [r["prompt"] for r in rows] == PROMPTS[:2] and all(r["score"] > 0 for r in rows)

    from diffmem.cli.main import main

    assert main(["explain", *model, "--prompt", PROMPTS[0], "--json", str(tmp_path / "ex.json"),
                 "--png", str(tmp_path / "ex.png"), "--num-inference-steps", "2", "--num-generations", "1"]) == 0
    explained = json.loads((tmp_path / "ex.json").read_text())
    assert explained["score"] == pytest.approx(rows[0]["score"], rel=1e-5)  # the same first-step d (explain runs with grad)
    assert (tmp_path / "ex.png").stat().st_size > 0

    assert _run(["mitigate", *model, "--prompts", str(prompts), "--method", "embedding-opt", "--target-loss", "0",
                 "--max-iters", "2", "--out", str(tmp_path / "mit")]) == 0
    mitigated = [json.loads(line) for line in (tmp_path / "mit" / "results.jsonl").read_text().splitlines()]
    assert [m["iterations"] for m in mitigated] == [2, 2]
    from safetensors.torch import load_file

    assert load_file(str(tmp_path / "mit" / "embeddings.safetensors"))["prompt_00000"].shape == (77, 48)
    assert all((tmp_path / "mit" / img).is_file() for m in mitigated for img in m["images"])

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, (rgb, caption) in enumerate([((255, 0, 0), "a red thing"), ((0, 0, 255), "a blue thing")]):
        Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(pairs / f"{i:08d}.png")
        (pairs / f"{i:08d}.txt").write_text(caption + "\n")
    assert _run(["evaluate", *model, "--dataset", str(pairs), "--mitigation", "none", "embedding-opt",
                 "--target-loss", "0", "--max-iters", "1", "--out", str(tmp_path / "eval")]) == 0
    summary = json.loads((tmp_path / "eval" / "summary.json").read_text())
    assert set(summary["results"]) == {"none", "embedding-opt"}

    assert _run(["audit", *model, "--threshold", "0", "--prompts", str(prompts), "--out", str(tmp_path / "audit")]) == 0
    audited = [json.loads(line) for line in (tmp_path / "audit" / "results.jsonl").read_text().splitlines()]
    assert len(audited) == 2 and all(r["flagged"] for r in audited)
    assert (tmp_path / "audit" / "index.html").is_file()


def test_every_detector_runs_in_one_pass_on_sdxl(sdxl_folder, tmp_path):
    """The detectors ride the same pass on SDXL (pooled embedding, time ids, its own attention layout)."""
    import math

    from diffmem.cli.main import main
    from diffmem.detectors import DETECTORS
    from diffmem.files import read_rows

    (tmp_path / "p.txt").write_text("a red square\nthe owl at night\n")
    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(sdxl_folder), "--prompts", str(tmp_path / "p.txt"), "--out", str(out),
                 "--method", ",".join(sorted(set(DETECTORS) - {"flux-guidance"})), "--num-inference-steps", "3", "--num-generations", "2",
                 "--asthana-weights", "1,1", "--reference-prompts", str(tmp_path / "p.txt"), "--no-progress"]) == 0
    for row in read_rows(out):
        assert all(math.isfinite(row[name]) for name in DETECTORS if name != "flux-guidance")
    # without weights asthana is refused before any sampling, naming what to give
    capsys_free = main(["detect", "--model", str(sdxl_folder), "--prompts", str(tmp_path / "p.txt"), "--out",
                        str(tmp_path / "e.jsonl"), "--method", "asthana", "--num-inference-steps", "3", "--no-progress"])
    assert capsys_free == 2 and not (tmp_path / "e.jsonl").exists()


def test_bench_detect_on_sdxl(sdxl_folder, tmp_path):
    import json

    from diffmem.cli.main import main

    (tmp_path / "m.txt").write_text("a red square\nthe owl at night\n")
    (tmp_path / "n.txt").write_text("a green bird\na cat\ntwo dogs\n")
    assert main(["bench", "detect", "--model", str(sdxl_folder), "--memorized", str(tmp_path / "m.txt"),
                 "--non-memorized", str(tmp_path / "n.txt"), "--generations", "2", "--num-inference-steps", "3",
                 "--bootstrap", "5", "--asthana-weights", "1,1", "--out", str(tmp_path / "b"), "--no-progress"]) == 0
    table = json.loads((tmp_path / "b" / "table.json").read_text())
    rows = table["rows"]
    assert table["skipped"]["broken-memories"] == "it calibrates on ordinary prompts: give --reference-prompts FILE"
    assert set(table["skipped"]) == {"broken-memories", "flux-guidance"}
    assert {r["method"] for r in rows} == {"asthana", "bright-ending", "carlini", "cond-jacobian", "early-dsm",
                                           "early-metric2", "jeon", "jeon-fd", "membench", "nemo-ssim", "ren-ae",
                                           "ren-le", "wen"}

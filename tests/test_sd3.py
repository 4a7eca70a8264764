"""Stable Diffusion 3 behind the one model interface: the family read from model_index.json, with and
without T5; sampling equal to ``StableDiffusion3Pipeline`` (joint prompt embeddings, pooled
projections, FlowMatchEuler with the folder's shift, guidance on the velocity); d on the velocity,
which at sigma = 1 is the difference of the predicted clean latents while the noise form is refused;
detect and explain on a tiny folder; the methods whose definition does not carry over refused in
one line before sampling."""

from __future__ import annotations

import json

import pytest
import torch

from diffmem.sampling import SamplingConfig, Step, predict_branches, sample_prompts, schedule

torch.set_num_threads(1)
PROMPTS = ["A red cat on a mat", "the velvet harbor: a blue square"]
G = 2


@pytest.fixture(scope="module")
def sd3(tiny_sd3_folder):
    from diffmem.adapters import load_model

    return load_model(str(tiny_sd3_folder))


@pytest.fixture(scope="module")
def sd3_no_t5(tiny_sd3_no_t5_folder):
    from diffmem.adapters import load_model

    return load_model(str(tiny_sd3_no_t5_folder))


def _pipeline(model):
    """diffusers' own pipeline on the adapter's (frozen) components, with a plain FlowMatchEuler scheduler
    built from the folder's config."""
    from diffusers import FlowMatchEulerDiscreteScheduler, StableDiffusion3Pipeline

    (te1, te2, te3), (tok1, tok2, tok3) = model.text_encoders, model.tokenizers
    pipe = StableDiffusion3Pipeline(
        transformer=model.denoiser, vae=model.vae, text_encoder=te1, tokenizer=tok1, text_encoder_2=te2,
        tokenizer_2=tok2, text_encoder_3=te3, tokenizer_3=tok3,
        scheduler=FlowMatchEulerDiscreteScheduler.from_config(model.scheduler.config))
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _write_prompts(tmp_path, prompts=PROMPTS):
    (tmp_path / "p.txt").write_text("\n".join(prompts) + "\n")
    return str(tmp_path / "p.txt")


@pytest.mark.parametrize("which", ["t5", "no_t5"])
def test_an_sd3_folder_loads_as_the_sd3_family_with_the_pipelines_conditioning(which, request, tmp_path):
    """Family, flow prediction, and the joint prompt_embeds / pooled_prompt_embeds and the null exactly as
    StableDiffusion3Pipeline.encode_prompt makes them (the null: "" through all encoders)."""
    from diffmem.adapters import load_model, resolve_model_path
    from diffmem.model import DiffusionModel

    folder = request.getfixturevalue("tiny_sd3_folder" if which == "t5" else "tiny_sd3_no_t5_folder")
    model = load_model(str(folder))
    assert isinstance(model, DiffusionModel)
    assert resolve_model_path(str(folder)) == ("stable-diffusion-3", folder)
    assert model.family == "stable-diffusion-3" and model.prediction_type == "flow" and model.sampler_prediction == "flow"
    assert (model.text_encoders[2] is None) == (which == "no_t5")
    assert model.latent_shape == (4, 8, 8) and model.image_size == 16 and model.max_tokens == 77
    assert model.default_guidance_scale == 7.0 and model.scheduler.config.shift == 3.0
    assert model.null.name == "empty-prompt" and model.identity()["null_conditioning"] == "empty-prompt"
    cond = model.encode_prompts(PROMPTS)
    assert cond.embeddings.shape == (2, 77 + 256, 32) and cond.mask is None
    assert cond.extra["pooled_prompt_embeds"].shape == (2, 16)
    pos, neg, pooled, neg_pooled = _pipeline(model).encode_prompt(PROMPTS, PROMPTS, PROMPTS, do_classifier_free_guidance=True)
    torch.testing.assert_close(cond.embeddings, pos, rtol=0, atol=1e-6)  # batch-size rounding only
    torch.testing.assert_close(cond.extra["pooled_prompt_embeds"], pooled, rtol=0, atol=1e-6)  # batch-size rounding only
    null = model.empty_conditioning()
    torch.testing.assert_close(null.embeddings, neg[:1], rtol=0, atol=1e-6)  # batch-size rounding only
    torch.testing.assert_close(null.extra["pooled_prompt_embeds"], neg_pooled[:1], rtol=0, atol=1e-6)  # batch-size rounding only
    if which == "no_t5":  # the pipeline's zeros, which embedding optimization must not move
        assert not cond.embeddings[:, 77:].any() and set(range(77, 77 + 256)) <= set(model.frozen_token_positions)
    tokens = model.tokens("a cat")
    assert len(tokens) == 77 + 256 and all(t.special for t in tokens[77:])
    assert [t.text for t in tokens[1:5]] == ["a", "c", "a", "t"]  # the character-level CLIP BPE
    assert tokens[0].special and not any(t.special for t in tokens[1:5]) and tokens[5].special
    assert model.count_tokens("a cat") == 6
    # save() writes a transformer that --unet loads
    model.save(tmp_path / "ft")
    again = load_model(str(folder), unet=str(tmp_path / "ft" / "transformer"))
    assert again.family == "stable-diffusion-3" and len(again.folders) == 2


@pytest.mark.parametrize("which", ["t5", "no_t5"])
def test_latents_and_images_equal_the_sd3_pipeline(which, request):
    """The tracked pass (FlowMatchEuler with the folder's shift, guidance on the velocity) reproduces
    StableDiffusion3Pipeline's latents and decoded images (the VAE's scaling and shift factors)."""
    model = request.getfixturevalue("sd3" if which == "t5" else "sd3_no_t5")
    pipe = _pipeline(model)
    cfg = SamplingConfig(num_inference_steps=3, guidance_scale=7.0, num_generations=G, seed=11, batch_size=2 * G)
    ours = sample_prompts(model, PROMPTS, cfg, decode=True)
    for i, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, num_inference_steps=3, guidance_scale=7.0, num_images_per_prompt=G, height=16, width=16,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
        assert ref.shape == ours[i].latents.shape
        assert (ref - ours[i].latents).abs().max().item() <= 1e-5
    images = pipe(PROMPTS[0], num_inference_steps=3, guidance_scale=7.0, num_images_per_prompt=G, height=16, width=16,
                  generator=torch.Generator("cpu").manual_seed(11), output_type="pt").images
    assert (images - ours[0].images).abs().max().item() <= 1e-5
    assert not torch.allclose(ours[0].latents, ours[1].latents)  # different prompts: not vacuous


def test_the_schedule_is_the_folders_shifted_flow_schedule(sd3, tiny_sd3_folder, tmp_path):
    """Detect rows record each tracked step's sigma, which are the pipeline scheduler's (shift 3: not the
    unshifted linspace), starting at sigma = 1."""
    from diffmem.cli.main import main

    pipe = _pipeline(sd3)
    pipe(PROMPTS[0], num_inference_steps=4, guidance_scale=7.0, height=16, width=16, output_type="latent",
         generator=torch.Generator("cpu").manual_seed(0))
    expected = pipe.scheduler.sigmas[:3].tolist()
    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(tiny_sd3_folder), "--prompts", _write_prompts(tmp_path, PROMPTS[:1]),
                 "--out", str(out), "--num-inference-steps", "4", "--num-generations", "1", "--track-steps", "3",
                 "--no-progress"]) == 0
    row = json.loads(out.read_text())
    assert row["sigmas"] == pytest.approx(expected, abs=1e-7) and row["sigmas"][0] == 1.0
    assert "timesteps" not in row and len(row["text_noise_norm"][0]) == 3
    # by hand: 4 sigmas evenly from 1 to the shifted 1/1000, then shifted, shift(s) = 3 s / (1 + 2 s)
    shift = lambda s: 3 * s / (1 + 2 * s)
    s = 1 - (1 - shift(1e-3)) / 3
    assert row["sigmas"][1] == pytest.approx(shift(s), abs=1e-6) and abs(shift(s) - s) > 0.1


def test_d_is_the_velocity_difference_and_at_sigma_1_the_clean_latent_difference(sd3):
    """First-step d on SD3 = ||v_c - v_u|| of the transformer's raw outputs at x_T; at sigma = 1,
    x0_hat = x - sigma v, so it equals ||x0_c - x0_u||; the noise form eps = x + (1 - sigma) v has
    identical branches there, so the pass refuses it (Step.eps_cond) and so does predict_noise."""
    cfg = SamplingConfig(num_inference_steps=4, num_generations=G, seed=5, track_steps=1)
    ours = sample_prompts(sd3, PROMPTS[:1], cfg, decode=False)[0]
    t = schedule(sd3, 4)[0]
    assert float(t) == 1000.0 and float(sd3.scheduler.sigmas[0]) == 1.0
    x = torch.randn((G, 4, 8, 8), generator=torch.Generator("cpu").manual_seed(5))
    cond, null = sd3.encode_prompts(PROMPTS[:1]), sd3.empty_conditioning()
    with torch.no_grad():
        v_c, v_u = [sd3.denoiser(hidden_states=x, timestep=torch.full((G,), 1000.0), encoder_hidden_states=c.embeddings.expand(G, -1, -1),
                                 pooled_projections=c.extra["pooled_prompt_embeds"].expand(G, -1)).sample for c in (cond, null)]
    d = (v_c - v_u).double().flatten(1).norm(dim=1)
    torch.testing.assert_close(ours.text_noise_norm[:, 0].double(), d, rtol=1e-5, atol=1e-6)
    x0_c, x0_u = x - 1.0 * v_c, x - 1.0 * v_u  # the clean latents the two branches predict at sigma = 1
    torch.testing.assert_close((x0_c - x0_u).double().flatten(1).norm(dim=1), d, rtol=1e-5, atol=1e-6)
    assert d.min() > 0
    eps_c, eps_u = x + (1 - 1.0) * v_c, x + (1 - 1.0) * v_u  # the noise form: identical at sigma = 1
    assert torch.equal(eps_c, eps_u)
    with torch.no_grad():
        p_c, p_u = predict_branches(sd3, x, t, cond.expand(G), null.expand(G))
        step = Step(0, t, x, p_c, p_u, None, cond.expand(G), sd3.sampler_prediction)
        with pytest.raises(ValueError, match="not the noise"):
            step.eps_cond
        with pytest.raises(ValueError, match="sigma = 1"):
            sd3.predict_noise(x, t, cond.expand(G))
        t1 = schedule(sd3, 4)[1]  # below sigma = 1 the noise exists, and its branches are (1 - sigma) dv apart
        sigma = float(sd3.scheduler.sigmas[1])
        e_c, e_u = sd3.predict_noise(x, t1, cond.expand(G)), sd3.predict_noise(x, t1, null.expand(G))
        w_c, w_u = predict_branches(sd3, x, t1, cond.expand(G), null.expand(G))
    assert 0 < sigma < 1
    torch.testing.assert_close(e_c - e_u, (1 - sigma) * (w_c - w_u), rtol=1e-4, atol=1e-6)


def test_detect_runs_first_step_and_tracked_on_sd3(tiny_sd3_folder, tmp_path):
    from diffmem.cli.main import main

    prompts = _write_prompts(tmp_path)
    for name, extra in (("first", ["--track-steps", "1"]), ("tracked", [])):
        out = tmp_path / f"{name}.jsonl"
        assert main(["detect", "--model", str(tiny_sd3_folder), "--prompts", prompts, "--out", str(out),
                     "--num-inference-steps", "2", "--num-generations", "1", "--no-progress", *extra]) == 0
        rows = [json.loads(line) for line in out.read_text().splitlines()]
        assert [r["prompt"] for r in rows] == PROMPTS and all(r["score"] > 0 for r in rows)
        assert all(len(r["sigmas"]) == len(r["text_noise_norm"][0]) == (1 if name == "first" else 2) for r in rows)
        meta = json.loads((tmp_path / f"{name}.meta.json").read_text())
        assert meta["model_identity"]["family"] == "stable-diffusion-3"
        assert meta["model_identity"]["prediction_type"] == "flow"
        assert meta["model_identity"]["null_conditioning"] == "empty-prompt"


def test_explain_runs_on_sd3_over_the_joint_tokens(sd3, tiny_sd3_folder, tmp_path):
    """Token significance over the 77 + 256 joint positions: words come from the CLIP tokens, the T5
    block is listed as special; the score equals the detection score at the same settings."""
    from diffmem.cli.main import main
    from diffmem.explain import prompt_scores, token_significance

    ex = token_significance(sd3, PROMPTS[0], steps=(0, 1), generations=1, num_inference_steps=2)
    assert len(ex.tokens) == 77 + 256 and all(t.special for t in ex.tokens[77:])
    assert any(t.score > 0 for t in ex.tokens[77:])  # T5 tokens receive gradient too (shown as special)
    assert [w.word for w in ex.words] == ["A", "red", "cat", "on", "a", "mat"] and all(w.score > 0 for w in ex.words)
    assert ex.score == pytest.approx(prompt_scores(sd3, PROMPTS[:1], steps=(0, 1), generations=1,
                                                   num_inference_steps=2)[0], rel=1e-5)
    out = tmp_path / "ex.jsonl"
    assert main(["explain", "--model", str(tiny_sd3_folder), "--prompt", PROMPTS[0], "--start-step", "0", "--end-step", "1",
                 "--num-generations", "1", "--num-inference-steps", "2", "--json", str(out), "--no-png"]) == 0
    rec = json.loads(out.read_text())
    assert rec["model_identity"]["family"] == "stable-diffusion-3" and len(rec["tokens"]) == 333


@pytest.mark.parametrize("method,reason", [("jeon", "noise prediction"), ("asthana", "noise prediction"),
                                           ("membench", "noise prediction"), ("jeon-fd", "noise prediction"),
                                           ("nemo-ssim", "noise prediction"), ("ren-le", "down blocks"),
                                           ("bright-ending", "down blocks"), ("ren-ae", "attn2")])
def test_detectors_whose_definition_does_not_carry_over_refuse_sd3_before_sampling(tiny_sd3_folder, tmp_path, capsys,
                                                                                    method, reason):
    from diffmem.cli.main import main

    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(tiny_sd3_folder), "--prompts", _write_prompts(tmp_path, PROMPTS[:1]),
                 "--out", str(out), "--method", f"wen,{method}", "--num-inference-steps", "2", "--no-progress"]) == 2
    err = [line for line in capsys.readouterr().err.splitlines() if "error" in line]
    assert len(err) == 1 and f"{method} cannot run on stable-diffusion-3" in err[0] and reason in err[0]
    assert not out.exists() and not (tmp_path / "d.meta.json").exists()


def test_every_detector_runs_on_sd3_or_refuses(tiny_sd3_folder, tmp_path):
    import math

    from diffmem.cli.main import main
    from diffmem.detectors import DETECTORS, flow_refusal
    from diffmem.files import read_rows

    runs = sorted(n for n, cls in DETECTORS.items() if flow_refusal(cls) is None and n != "flux-guidance")
    assert runs == ["broken-memories", "carlini", "cond-jacobian", "wen"]  # flux-guidance: FLUX.1-dev only
    out = tmp_path / "d.jsonl"
    reference = tmp_path / "ref.txt"
    reference.write_text("a quiet street\nan apple on a table\nsnow on a hill\n")
    assert main(["detect", "--model", str(tiny_sd3_folder), "--prompts", _write_prompts(tmp_path), "--out", str(out),
                 "--method", ",".join(runs), "--num-inference-steps", "2", "--num-generations", "2",
                 "--reference-prompts", str(reference), "--no-progress"]) == 0
    for row in read_rows(out):
        assert all(math.isfinite(row[name]) for name in runs)


def test_mitigations_whose_definition_does_not_carry_over_refuse_sd3(sd3):
    from diffmem.mitigations import MITIGATIONS, check_model

    runs = []
    for name in sorted(MITIGATIONS):
        try:
            check_model(name, sd3)
            runs.append(name)
        except ValueError as e:
            assert str(e).startswith(f"--method {name}: cannot run on stable-diffusion-3") and "\n" not in str(e)
    assert set(runs) == {"none", "embedding-opt", "rand-word-add", "rand-numb-add", "rand-word-repeat", "delayed-cfg",
                         "broken-memories"}


def test_detection_at_a_noise_level_scores_the_step_of_the_nearest_sigma(sd3, tiny_sd3_folder, tmp_path):
    """--at-sigma S: the score is d at the step whose sigma is nearest S; the steps up to it are tracked
    and recorded with their sigmas; a DDIM-sampled model refuses it."""
    import types

    from diffmem.cli.main import main
    from diffmem.sampling import step_at_sigma

    schedule(sd3, 4)
    sigmas = sd3.scheduler.sigmas[:4].tolist()  # 1, 0.858, ...
    assert step_at_sigma(sd3, 4, 0.9) == 1 and step_at_sigma(sd3, 4, 1.0) == 0
    out = tmp_path / "d.jsonl"
    assert main(["detect", "--model", str(tiny_sd3_folder), "--prompts", _write_prompts(tmp_path), "--out", str(out),
                 "--num-inference-steps", "4", "--num-generations", "2", "--at-sigma", "0.9", "--no-progress"]) == 0
    for line in out.read_text().splitlines():
        row = json.loads(line)
        assert row["sigmas"] == pytest.approx(sigmas[:2], abs=1e-7)
        assert row["score"] == pytest.approx(sum(g[1] for g in row["text_noise_norm"]) / 2, rel=1e-6)
        assert row["score"] != pytest.approx(sum(g[0] for g in row["text_noise_norm"]) / 2, rel=1e-3)
    settings = json.loads((tmp_path / "d.meta.json").read_text())["settings"]
    assert settings["at_sigma"] == 0.9 and settings["at_step"] == 1 and settings["track_steps"] == 2
    ddim = types.SimpleNamespace(sampler_prediction="epsilon", family="stable-diffusion", name="sd")
    with pytest.raises(ValueError, match="not a flow-matching model"):
        step_at_sigma(ddim, 50, 0.93)


def test_embedding_optimization_lowers_the_velocity_difference_on_sd3(sd3, tiny_sd3_folder, tmp_path):
    """Wen's mitigation on SD3: AdamW on the joint token embeddings lowers first-step d (on the velocity),
    whose starting value is the detection score of the same prompt and seed; the CLIP start token stays."""
    from safetensors.torch import load_file

    from diffmem.cli.main import main

    prompts = _write_prompts(tmp_path)
    out = tmp_path / "mit"
    assert main(["mitigate", "--model", str(tiny_sd3_folder), "--prompts", prompts, "--method", "embedding-opt",
                 "--out", str(out), "--num-inference-steps", "2", "--num-generations", "1", "--target-loss", "0.1",
                 "--max-iters", "3", "--no-progress"]) == 0
    rows = [json.loads(line) for line in (out / "results.jsonl").read_text().splitlines()]
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, seed=0, track_steps=1)
    first = [float(s.text_noise_norm[0, 0]) for s in sample_prompts(sd3, PROMPTS, cfg, decode=False)]
    for row, d0 in zip(rows, first):
        assert row["initial_d"] == pytest.approx(d0, rel=1e-5) and row["final_d"] < row["initial_d"]
    saved = load_file(str(out / "embeddings.safetensors"))
    original = sd3.encode_prompts(PROMPTS[:1]).embeddings[0]
    emb = next(v for k, v in saved.items() if k.endswith("00000"))
    assert emb.shape == original.shape and torch.equal(emb[0], original[0]) and not torch.allclose(emb, original)

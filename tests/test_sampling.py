"""Tracked sampling equals diffusers' pipeline, honours the seed contract and is batch-independent."""

import numpy as np
import pytest
import torch

from diffmem.model import Conditioning
from diffmem.detectors.wen import NoiseNormRecorder
from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts, sample_unit, tracked_pass

PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square", "an astronaut riding a horse"]


def test_latents_equal_stable_diffusion_pipeline(tiny_sd, tiny_sd_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    # one UNet call per step, as the pipeline makes (smaller calls differ by float rounding: ~2e-5 here)
    cfg = SamplingConfig(num_inference_steps=6, guidance_scale=7.5, num_generations=3, seed=11, batch_size=6)
    ours = sample_prompts(tiny_sd, PROMPTS, cfg, decode=True)
    for i, prompt in enumerate(PROMPTS):
        ref = pipe(prompt, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=3,
                   generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
        assert (ref - ours[i].latents).abs().max().item() <= 1e-5
        assert ours[i].seed == 11 + i
        assert ours[i].text_noise_norm.shape == (3, 6)
        assert ours[i].images.shape == (3, 3, 32, 32) and 0 <= ours[i].images.min() <= ours[i].images.max() <= 1


def test_seed_contract_initial_noise(tiny_sd):
    x = initial_noise(tiny_sd, 4, seed=7)
    expected = torch.randn((4, *tiny_sd.latent_shape), generator=torch.Generator("cpu").manual_seed(7))
    assert torch.equal(x, expected * tiny_sd.scheduler.init_noise_sigma)


def test_values_independent_of_batch_size_and_other_prompts(tiny_sd):
    base = dict(num_inference_steps=4, guidance_scale=5.0, num_generations=3, seed=3)
    small = sample_prompts(tiny_sd, PROMPTS, SamplingConfig(**base, batch_size=2), decode=False)
    large = sample_prompts(tiny_sd, PROMPTS, SamplingConfig(**base, batch_size=32), decode=False)
    alone = sample_unit(tiny_sd, [PROMPTS[2]], [2], SamplingConfig(**base, batch_size=6))[0]
    for a, b in zip(small, large):
        torch.testing.assert_close(a.text_noise_norm, b.text_noise_norm, rtol=1e-5, atol=1e-7)
        torch.testing.assert_close(a.uncond_noise_norm, b.uncond_noise_norm, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(alone.text_noise_norm, large[2].text_noise_norm, rtol=1e-5, atol=1e-7)
    # different prompts really give different values (the check above is not vacuous)
    assert not torch.allclose(large[0].text_noise_norm, large[1].text_noise_norm)


def test_track_steps_is_a_prefix_of_the_full_run(tiny_sd):
    base = dict(num_inference_steps=5, guidance_scale=7.5, num_generations=2, seed=0, batch_size=8)
    full = sample_prompts(tiny_sd, PROMPTS[:2], SamplingConfig(**base), decode=False)
    first = sample_prompts(tiny_sd, PROMPTS[:2], SamplingConfig(**base, track_steps=1), decode=False)
    for f, s in zip(full, first):
        assert s.text_noise_norm.shape == (2, 1)
        torch.testing.assert_close(s.text_noise_norm[:, 0], f.text_noise_norm[:, 0], rtol=1e-5, atol=1e-7)


class PromptBlindDenoiser:
    """An analytic fake: eps(x_t, t, e) = 0.5 x_t whatever the prompt, so d must be exactly 0."""

    sampler_prediction = "epsilon"

    def __init__(self, scheduler):
        self.scheduler = scheduler
        self.device, self.dtype = torch.device("cpu"), torch.float32
        self.latent_shape = (4, 8, 8)
        self.default_guidance_scale = 7.5

    def predict(self, x_t, t, cond):
        return 0.5 * x_t

    def encode_prompts(self, prompts):
        return Conditioning(torch.randn(len(prompts), 5, 3))

    def empty_conditioning(self):
        return Conditioning(torch.zeros(1, 5, 3))

    def decode(self, latents):
        return latents[:, :3].clamp(0, 1)


def test_prompt_blind_denoiser_gives_zero_metric(tiny_sd):
    from diffusers import DDIMScheduler

    fake = PromptBlindDenoiser(DDIMScheduler.from_config(tiny_sd.scheduler.config))
    res = sample_prompts(fake, ["anything", "something else"], SamplingConfig(num_inference_steps=4, num_generations=2),
                         decode=False)
    for r in res:
        assert torch.count_nonzero(r.text_noise_norm) == 0
        assert (r.uncond_noise_norm > 0).all()
    x = initial_noise(fake, 2, 0)
    fake.scheduler.set_timesteps(4)
    rec = NoiseNormRecorder()
    tracked_pass(fake, x, Conditioning(torch.zeros(2, 5, 3)), Conditioning(torch.ones(2, 5, 3)),
                 fake.scheduler.timesteps[:1], 7.5, [rec])
    torch.testing.assert_close(rec.uncond_noise_norm()[:, 0], (0.5 * x).flatten(1).norm(dim=1))


def test_track_steps_out_of_range_is_an_error(tiny_sd):
    with pytest.raises(ValueError, match="track-steps"):
        sample_prompts(tiny_sd, PROMPTS[:1], SamplingConfig(num_inference_steps=3, track_steps=4))


def _reference_detection(model, prompt, position, steps, gens, seed, guidance, track):
    """A straightforward re-implementation: one generation at a time, separate UNet calls per branch."""
    from diffusers import DDIMScheduler

    sched = DDIMScheduler.from_config(model.scheduler.config)
    sched.set_timesteps(steps)
    noise = torch.randn((gens, *model.latent_shape), generator=torch.Generator("cpu").manual_seed(seed + position))
    cond, uncond = model.encode_prompts([prompt]).embeddings, model.encode_prompts([""]).embeddings
    out = np.zeros((gens, track))
    for g in range(gens):
        x = noise[g:g + 1] * sched.init_noise_sigma
        for k, t in enumerate(sched.timesteps[:track]):
            with torch.no_grad():
                e_c = model.unet(x, t, encoder_hidden_states=cond).sample
                e_u = model.unet(x, t, encoder_hidden_states=uncond).sample
            out[g, k] = torch.sqrt(((e_c - e_u) ** 2).sum()).item()
            x = sched.step(e_u + guidance * (e_c - e_u), t, x).prev_sample
    return out


@pytest.mark.parametrize("track", [1, None])
def test_detect_cli_matches_reference_implementation(tiny_sd, tiny_sd_folder, tmp_path, track):
    from diffmem.cli.main import main
    from diffmem.files import read_rows

    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "r.jsonl"
    args = ["detect", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--out", str(out),
            "--num-inference-steps", "4", "--num-generations", "2", "--seed", "5", "--no-progress", "--batch-size", "6"]
    assert main(args + (["--track-steps", str(track)] if track else [])) == 0
    rows = read_rows(out)
    assert [r["index"] for r in rows] == [0, 1, 2] and [r["seed"] for r in rows] == [5, 6, 7]
    for r in rows:
        ref = _reference_detection(tiny_sd, r["prompt"], r["index"], 4, 2, 5, 7.5, track or 4)
        got = np.asarray(r["text_noise_norm"])
        assert got.shape == ref.shape
        np.testing.assert_allclose(got, ref, rtol=1e-4)
        assert r["score"] == pytest.approx(got.mean())


class _FirstLatents:
    def on_step(self, step):
        if step.index == 0:
            self.x_T = step.x_t.clone()


@pytest.mark.parametrize("same_noise", [True, False])
def test_same_noise_gives_every_prompt_the_one_x_T_per_generation(tiny_sd, same_noise):
    config = SamplingConfig(num_inference_steps=2, num_generations=2, seed=5, same_noise=same_noise, track_steps=1)
    first = _FirstLatents()
    res = sample_unit(tiny_sd, PROMPTS[:2], [0, 3], config, recorders=[first])  # two prompts, rows prompt-major
    x_a, x_b = first.x_T[:2], first.x_T[2:]
    assert torch.equal(x_a, x_b) == same_noise  # generation g of both prompts: one x_T, or two
    assert not torch.equal(x_a[0], x_a[1])  # the generations of a prompt differ either way
    assert torch.equal(x_a, initial_noise(tiny_sd, 2, 5))  # position 0: seed + 0 in both
    assert [r.seed for r in res] == ([5, 5] if same_noise else [5, 8])


def test_same_noise_on_the_command_line_of_every_sampling_verb(tiny_sd, tiny_sd_folder, tmp_path):
    import json

    from diffmem.cli.main import build_parser, main
    from diffmem.detect import meta_path
    from diffmem.files import read_rows

    for verb in (["detect"], ["mitigate", "--method", "gni", "--out", "o"], ["evaluate", "--out", "o"],
                 ["bench", "mitigate", "--out", "o"], ["bench", "detect", "--out", "o"]):
        module = __import__(f"diffmem.cli.{verb[0]}", fromlist=["x"])
        read = module.mitigate_config_from_args if verb[:2] == ["bench", "mitigate"] else module.config_from_args
        for flag in ([], ["--same-noise"]):
            config = read(build_parser().parse_args(verb + flag))
            config = config[1] if isinstance(config, tuple) else getattr(config, "sampling", config)
            assert config.same_noise == bool(flag), verb
    prompts = tmp_path / "p.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    out = tmp_path / "r.jsonl"
    assert main(["detect", "--model", str(tiny_sd_folder), "--prompts", str(prompts), "--out", str(out), "--same-noise",
                 "--num-inference-steps", "4", "--num-generations", "2", "--seed", "5", "--no-progress"]) == 0
    rows = read_rows(out)
    assert [r["seed"] for r in rows] == [5, 5, 5]
    assert json.loads(meta_path(out).read_text())["settings"]["same_noise"] is True
    for r in rows:  # every prompt from position 0's draw
        ref = _reference_detection(tiny_sd, r["prompt"], 0, 4, 2, 5, 7.5, 4)
        np.testing.assert_allclose(np.asarray(r["text_noise_norm"]), ref, rtol=1e-4)


def test_a_guidance_schedule_equals_a_hand_written_loop(tiny_sd):
    """guidance_scale as a schedule (index, eps_c, eps_u) -> w: no guidance (w = 1) before step 2,
    7.5 from there (static delayed guidance), against the DDIM loop written out with the switch."""
    from diffmem.sampling import predict_branches, schedule

    ts = schedule(tiny_sd, 5)
    x = initial_noise(tiny_sd, 2, 3)
    cond = tiny_sd.encode_prompts(["a red cat"]).expand(2)
    unc = tiny_sd.empty_conditioning().expand(2)
    ours = tracked_pass(tiny_sd, x, cond, unc, ts, lambda k, e_c, e_u: 1.0 if k < 2 else 7.5)
    latents = x
    with torch.no_grad():
        for k, t in enumerate(ts):
            e_c, e_u = predict_branches(tiny_sd, latents, t, cond, unc)
            w = 1.0 if k < 2 else 7.5
            latents = tiny_sd.scheduler.step(e_u + w * (e_c - e_u), t, latents, return_dict=False)[0]
    torch.testing.assert_close(ours, latents)
    # one w per row, from the branches themselves: rows whose d is above a level get no guidance
    per_row = lambda k, e_c, e_u: torch.where((e_c - e_u).flatten(1).norm(dim=1) > 0.5, 1.0, 7.5)
    mixed = tracked_pass(tiny_sd, x, cond, unc, ts[:1], per_row)
    with torch.no_grad():
        e_c, e_u = predict_branches(tiny_sd, x, ts[0], cond, unc)
        w = per_row(0, e_c, e_u).view(-1, 1, 1, 1)
        expected = tiny_sd.scheduler.step(e_u + w * (e_c - e_u), ts[0], x, return_dict=False)[0]
    torch.testing.assert_close(mixed, expected)
    assert tracked_pass(tiny_sd, x, cond, unc, ts, 7.5).allclose(tracked_pass(tiny_sd, x, cond, unc, ts, lambda *a: 7.5))

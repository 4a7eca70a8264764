"""The 2025-2026 detectors, each against an independent computation: a replica of the official
code's own steps where code exists (Early Detection's ``src/detect_all_metrics.py``), a float64
finite difference where it does not (the condition Jacobian)."""

import re

import numpy as np
import pytest
import torch

from diffmem import detectors
from diffmem.detect import detect_unit
from diffmem.model import Conditioning
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit, schedule

PROMPT = "a red cat on a mat"


@pytest.fixture(scope="module", params=["epsilon", "v_prediction"])
def model_and_folder(request, tiny_sd, tiny_sd_folder, tiny_v_folder):
    if request.param == "epsilon":
        return tiny_sd, tiny_sd_folder
    from diffmem.adapters import load_model

    return load_model(str(tiny_v_folder)), tiny_v_folder


def _official_epsilon(scheduler, prediction_type, out, t, latents):
    """Their ``get_epsilon``: the raw UNet output as the noise (v: sqrt(a) v + sqrt(1 - a) x_t)."""
    if prediction_type == "epsilon":
        return out
    a = scheduler.alphas_cumprod[int(t)]
    return a ** 0.5 * out + (1 - a) ** 0.5 * latents


def _official_scores(model, folder, prompt, x_T, num_inference_steps, guidance_scale):
    """A replica of the official per-prompt loop, one x_T row at a time: separate conditional and
    unconditional UNet calls, two ``autograd.grad`` calls for Metric 2, the guided steps taken by a
    DDIM scheduler in the model's own prediction type on the raw outputs."""
    from diffusers import DDIMScheduler

    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    ptype = scheduler.config.prediction_type
    scheduler.set_timesteps(num_inference_steps)
    t0, t1, t2 = scheduler.timesteps[:3]
    unet = model.unet
    text_emb = model.encode_prompts([prompt]).embeddings
    uncond_emb = model.empty_conditioning().embeddings
    out = {"metric2": [], "dsm_01": [], "dsm_12": []}
    for g in range(len(x_T)):
        latents = x_T[g:g + 1].clone().requires_grad_(True)
        pred_c = unet(latents, t0, encoder_hidden_states=text_emb).sample
        eps_c = _official_epsilon(scheduler, ptype, pred_c, t0, latents)
        pred_u = unet(latents, t0, encoder_hidden_states=uncond_emb).sample
        eps_u = _official_epsilon(scheduler, ptype, pred_u, t0, latents)
        grad_c = torch.autograd.grad(0.5 * torch.sum(eps_c ** 2), latents, retain_graph=True)[0]
        grad_u = torch.autograd.grad(0.5 * torch.sum(eps_u ** 2), latents, retain_graph=True)[0]
        out["metric2"].append(torch.sum((grad_c - grad_u) ** 2).item())
        with torch.no_grad():
            latents = latents.detach()
            pred_c, pred_u, eps_c = pred_c.detach(), pred_u.detach(), eps_c.detach()
            latents_1 = scheduler.step(pred_u + guidance_scale * (pred_c - pred_u), t0, latents).prev_sample
            pred_c_1 = unet(latents_1, t1, encoder_hidden_states=text_emb).sample
            eps_c_1 = _official_epsilon(scheduler, ptype, pred_c_1, t1, latents_1)
            pred_u_1 = unet(latents_1, t1, encoder_hidden_states=uncond_emb).sample
            out["dsm_01"].append(torch.sum((eps_c_1 - eps_c) ** 2).item())
            latents_2 = scheduler.step(pred_u_1 + guidance_scale * (pred_c_1 - pred_u_1), t1, latents_1).prev_sample
            pred_c_2 = unet(latents_2, t2, encoder_hidden_states=text_emb).sample
            eps_c_2 = _official_epsilon(scheduler, ptype, pred_c_2, t2, latents_2)
            out["dsm_12"].append(torch.sum((eps_c_2 - eps_c_1) ** 2).item())
    return {k: np.array(v) for k, v in out.items()}


def test_early_detection_equals_a_replica_of_the_official_code(model_and_folder):
    model, folder = model_and_folder
    cfg = SamplingConfig(num_inference_steps=5, num_generations=2, batch_size=8, track_steps=1, seed=3)
    dets = [detectors.get_detector("early-metric2"), detectors.get_detector("early-dsm")]
    (m2, dsm), = detect_unit(model, dets, [PROMPT], [0], cfg)[1]
    official = _official_scores(model, folder, PROMPT, initial_noise(model, 2, 3), 5, cfg.guidance(model))
    np.testing.assert_allclose(m2["early_metric2_per_generation"], official["metric2"], rtol=1e-4)
    np.testing.assert_allclose(dsm["early_dsm_per_generation"], official["dsm_12"], rtol=1e-4)
    np.testing.assert_allclose(dsm["early_dsm_01_per_generation"], official["dsm_01"], rtol=1e-4)
    assert m2["early-metric2"] == pytest.approx(official["metric2"].mean(), rel=1e-4)
    assert dsm["early-dsm"] == pytest.approx(official["dsm_12"].mean(), rel=1e-4)
    assert min(official["metric2"].min(), official["dsm_12"].min()) > 0


def test_early_dsm_steps_are_the_pass_trajectory(tiny_sd):
    """The two extra steps DSM takes from x_T are exactly the pass's own second and third steps."""

    class Conditional:
        def __init__(self):
            self.eps = []

        def on_step(self, step):
            self.eps.append(step.eps_cond.detach().double())

    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, seed=7)
    seen = Conditional()
    sample_unit(tiny_sd, [PROMPT], [0], cfg, recorders=[seen])
    (f,) = detect_unit(tiny_sd, [detectors.get_detector("early-dsm")], [PROMPT], [0], cfg)[1][0]
    np.testing.assert_allclose(f["early_dsm_per_generation"],
                               (seen.eps[2] - seen.eps[1]).flatten(1).pow(2).sum(1).numpy(), rtol=1e-5)
    np.testing.assert_allclose(f["early_dsm_01_per_generation"],
                               (seen.eps[1] - seen.eps[0]).flatten(1).pow(2).sum(1).numpy(), rtol=1e-5)


def test_early_dsm_needs_three_steps(tiny_sd):
    with pytest.raises(ValueError, match=r"^--method early-dsm .* needs --num-inference-steps >= 3, not 2$"):
        detectors.get_detector("early-dsm").prepare(tiny_sd, SamplingConfig(num_inference_steps=2))


# -- cond-jacobian: our reading of an abstract, against float64 finite differences ----------------

def _noise64(model, folder):
    """eps(x, t, embeddings) of a float64 copy of the UNet, the velocity converted by hand."""
    import copy

    from diffusers import DDIMScheduler

    unet = copy.deepcopy(model.unet).double()
    scheduler = DDIMScheduler.from_pretrained(folder / "scheduler")
    v_model = scheduler.config.prediction_type == "v_prediction"

    def eps(x, t, embeddings):
        out = unet(x, t, encoder_hidden_states=embeddings).sample
        if not v_model:
            return out
        a = scheduler.alphas_cumprod[int(t)].double()
        return a.sqrt() * out + (1 - a).sqrt() * x

    return eps


def test_cond_jacobian_equals_a_float64_central_difference(model_and_folder):
    """||d/dh eps(x_T, t_1, e_p + h (e_p - e_null))|| at h = 0, by a central difference in float64."""
    model, folder = model_and_folder
    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, track_steps=1, seed=2)
    (f,) = detect_unit(model, [detectors.get_detector("cond-jacobian")], [PROMPT], [0], cfg)[1][0]
    eps = _noise64(model, folder)
    t = schedule(model, 4)[0]
    x = initial_noise(model, 2, 2).double()
    e_p = model.encode_prompts([PROMPT]).embeddings.double().expand(2, -1, -1)
    e_null = model.empty_conditioning().embeddings.double().expand(2, -1, -1)
    h = 1e-4
    with torch.no_grad():
        fd = (eps(x, t, e_p + h * (e_p - e_null)) - eps(x, t, e_p - h * (e_p - e_null))) / (2 * h)
    expected = fd.flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(f["cond_jacobian_per_generation"], expected, rtol=1e-3)
    assert f["cond-jacobian"] == pytest.approx(expected.mean(), rel=1e-3) and expected.min() > 0


def test_cond_jacobian_integrates_to_the_guidance_difference(tiny_sd):
    """The abstract's identity: the derivative along e_p - e_null, integrated over the straight path
    (a 16-point midpoint rule), is eps(x, e_p) - eps(x, e_null)."""
    from diffmem.detectors.common import guided_branches
    from diffmem.detectors.condition_jacobian import condition_directional_derivative, prompt_direction

    model = tiny_sd
    t = schedule(model, 4)[0]
    x = initial_noise(model, 2, 1)
    cond = model.encode_prompts([PROMPT]).expand(2)
    null = model.empty_conditioning()
    direction = prompt_direction(cond, null)
    K = 16
    total = 0
    for k in range(K):
        lam = (k + 0.5) / K
        point = cond.with_embeddings(null.embeddings.expand(2, -1, -1) + lam * direction.embeddings)
        total = total + condition_directional_derivative(model, x, t, point, direction).double() / K
    with torch.no_grad():
        eps_c, eps_u = guided_branches(model, x, t, cond)
    delta = (eps_c - eps_u).double()
    assert float((total - delta).norm() / delta.norm()) < 1e-2


def test_cond_jacobian_on_a_flow_model_is_the_velocity_derivative(tiny_sd3_folder):
    """On a flow model the derivative is of the velocity (the noise form is x_t at sigma = 1): against a
    float64 central difference of a float64 copy of the transformer, at the first step."""
    import copy

    from diffmem.adapters import load_model

    model = load_model(str(tiny_sd3_folder))
    cfg = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, track_steps=1, seed=2)
    (f,) = detect_unit(model, [detectors.get_detector("cond-jacobian")], [PROMPT], [0], cfg)[1][0]
    den64 = copy.deepcopy(model.denoiser).double()
    t = schedule(model, 4)[0]
    x = initial_noise(model, 2, 2).double()
    cond = model.encode_prompts([PROMPT]).expand(2).to(dtype=torch.float64)
    null = model.empty_conditioning().expand(2).to(dtype=torch.float64)
    h = 1e-4
    along = lambda s: Conditioning(cond.embeddings + s * (cond.embeddings - null.embeddings),
                                   {k: v + s * (v - null.extra[k]) for k, v in cond.extra.items()}, cond.mask)
    with torch.no_grad():
        fd = (model.predict(x, t, along(h), den64) - model.predict(x, t, along(-h), den64)) / (2 * h)
    expected = fd.flatten(1).norm(dim=1).numpy()
    np.testing.assert_allclose(f["cond_jacobian_per_generation"], expected, rtol=1e-3)
    assert expected.min() > 0


@pytest.mark.parametrize("method", ["early-metric2", "early-dsm"])
def test_flow_models_are_refused_in_one_line_naming_the_family(method, tiny_sd3_folder):
    from diffmem.adapters import load_model

    model = load_model(str(tiny_sd3_folder))
    det = detectors.get_detector(method)
    with pytest.raises(ValueError, match=rf"^{method} cannot run on stable-diffusion-3 \([^\n]*\): "
                                         rf"{re.escape(det.flow_refusal)}$"):
        detectors.check_model([det], model)
    assert "sigma = 1" in det.flow_refusal or "velocity" in det.flow_refusal


# -- broken-memories: per-step norms against a hand-written DDIM loop -----------------------------

def _hand_norms(model, prompts, seed0, steps, w):
    """(N, S, 3) ||x_next||, ||x_next - x||, ||x0_hat|| with DDIM written out, one generation per prompt
    (seed0 + position), x0_hat read from diffusers' own DDIMScheduler.step (pred_original_sample)."""
    from diffmem.sampling import predict_branches

    out = []
    for i, prompt in enumerate(prompts):
        x = initial_noise(model, 1, seed0 + i)
        c, u = model.encode_prompts([prompt]), model.empty_conditioning()
        rows = []
        with torch.no_grad():
            for t in schedule(model, steps):
                e_c, e_u = predict_branches(model, x, t, c, u)
                res = model.scheduler.step(e_u + w * (e_c - e_u), t, x)
                nxt, x0 = res.prev_sample, res.pred_original_sample
                rows.append([float(nxt.double().norm()), float((nxt - x).double().norm()), float(x0.double().norm())])
                x = nxt
        out.append(rows)
    return torch.tensor(out, dtype=torch.float64)


def test_broken_memories_z_scores_and_score_by_hand(tiny_sd):
    """Calibration: per-step mean and std of the three norms over the reference generations; score: per
    generation max over steps of min(z_update, z_clean), as a hand computation from a DDIM loop."""
    reference = ["a cat on a mat", "two dogs", "the red barn at dawn", "a bowl of fruit", "snow on a hill"]
    prompts = ["a blue car", "an old oak tree"]
    cfg = SamplingConfig(num_inference_steps=5, num_generations=1, seed=11, batch_size=8)
    det = detectors.get_detector("broken-memories", reference_prompts=reference)
    _, fields = detect_unit(tiny_sd, [det], prompts, [0, 1], cfg)
    w = cfg.guidance(tiny_sd)
    ref = _hand_norms(tiny_sd, reference, 11, 5, w)
    mean, std = ref.mean(0), ref.std(0)
    z = (_hand_norms(tiny_sd, prompts, 11, 5, w) - mean).abs() / std
    expected = torch.minimum(z[..., 1], z[..., 2]).max(1).values
    got = [f["broken_memories_per_generation"][0] for (f,) in fields]
    np.testing.assert_allclose(got, expected.numpy(), rtol=1e-4)
    flags = [f["broken_memories_first_flag"][0] for (f,) in fields]
    for k, row in zip(flags, torch.minimum(z[..., 1], z[..., 2])):
        hits = (row > 3).nonzero().flatten()
        assert k == (int(hits[0]) if len(hits) else -1)


def test_broken_memories_needs_reference_prompts_off_the_lab(tiny_sd):
    with pytest.raises(ValueError, match=r"^broken-memories calibrates on ordinary prompts and .*--reference-prompts FILE"):
        detectors.get_detector("broken-memories").prepare(tiny_sd, SamplingConfig(num_inference_steps=3))


def test_broken_memories_runs_on_a_flow_model_with_x0_from_the_velocity(tiny_sd3_folder):
    """On a flow model x0_hat = x - sigma v of the guided velocity; the norms follow the Euler loop."""
    from diffmem.adapters import load_model
    from diffmem.detectors.broken_memories import NormRecorder

    model = load_model(str(tiny_sd3_folder))
    cfg = SamplingConfig(num_inference_steps=3, num_generations=1, seed=2, batch_size=8)
    rec = NormRecorder(model)
    sample_unit(model, [PROMPT], [0], cfg, recorders=[rec])
    x = initial_noise(model, 1, 2)
    c, u = model.encode_prompts([PROMPT]), model.empty_conditioning()
    w = cfg.guidance(model)
    schedule(model, 3)
    sigmas = model.scheduler.sigmas
    expected = []
    with torch.no_grad():
        for k in range(3):
            t = sigmas[k] * 1000
            v = model.predict(x, t, u) + w * (model.predict(x, t, c) - model.predict(x, t, u))
            nxt = x + (sigmas[k + 1] - sigmas[k]) * v
            expected.append([float(nxt.double().norm()), float((nxt - x).double().norm()),
                             float((x - sigmas[k] * v).double().norm())])
            x = nxt
    np.testing.assert_allclose(rec.norms()[0].numpy(), np.array(expected), rtol=1e-4)

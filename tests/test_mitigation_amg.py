"""Anti-memorization guidance (``diffmem.mitigations.amg``): the similarity and its gradient, one
guided step against an independent computation, the off setting, the effect on memorized lab
prompts, the UNet rows it adds, and the refusal of models without a training set."""

from __future__ import annotations

import copy

import numpy as np
import pytest
import torch

from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.mitigations import get_mitigation, make_params
from diffmem.mitigations.amg import (REFUSAL, AntiMemorizationGuidance, guidance_strengths, lab_pixels,
                                     lambda_schedule, nearest_training, predicted_x0, similarity)
from diffmem.sampling import SamplingConfig, sample_unit, schedule

FAST = SamplingConfig(num_inference_steps=20, num_generations=2, batch_size=16)


def _rmse(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    return np.sqrt(((a - b) ** 2).reshape(len(a), -1).mean(1))


def _guidance(model, prompts, G, **params):
    amg = get_mitigation("amg")
    cond = model.encode_prompts(prompts).repeat_interleave(G)
    return AntiMemorizationGuidance(model, cond, model.empty_conditioning().expand(len(cond)), amg.training_set(model),
                                    model.default_guidance_scale, make_params("amg", params), G)


# -- the pieces ------------------------------------------------------------------------------

def test_similarity_and_its_gradient_match_finite_differences():
    """σ = 1 - RMSE / (2 τ) of x̂0 (read as a lab image) against a fixed neighbour, and ∇_{x_t} σ with
    the noise held fixed, against numpy and central differences in float64."""
    g = torch.Generator().manual_seed(0)
    x_t = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64) * 0.8 - 0.4
    eps = torch.randn(3, 3, 4, 4, generator=g, dtype=torch.float64) * 0.1
    nb = torch.rand(3, 3, 4, 4, generator=g, dtype=torch.float64)
    ab, tau = 0.7, 0.15

    def sigma(x):
        return similarity(lab_pixels(predicted_x0(x, eps, ab)), nb, tau)

    x0 = (x_t.numpy() - np.sqrt(1 - ab) * eps.numpy()) / np.sqrt(ab)
    expected = 1 - _rmse(np.clip(x0 / 2 + 0.5, 0, 1), nb.numpy()) / (2 * tau)
    assert np.allclose(sigma(x_t).numpy(), expected, atol=1e-12)
    # an exact copy has σ 1, the copy rule's threshold σ 0.5
    img = torch.rand(1, 3, 4, 4, dtype=torch.float64)
    assert float(similarity(img, img + tau, tau)) == pytest.approx(0.5)
    assert float(similarity(img, img, tau)) == 1.0
    assert torch.autograd.gradcheck(sigma, (x_t.clone().requires_grad_(True),), eps=1e-6, atol=1e-7)


def test_nearest_training_image_is_the_copy_rules(fast_lab):
    """The chunked torch search finds the same nearest training image and RMSE as the judge's numpy rule."""
    from diffmem.lab.judge import rmse_to_all

    train = get_mitigation("amg").training_set(fast_lab)
    images = torch.rand(5, *train.images.shape[1:], generator=torch.Generator().manual_seed(1))
    images[0] = train.images[7] * 0.9 + 0.05
    idx, dist = nearest_training(images, train.images, chunk=37)  # several chunks
    d = rmse_to_all(images.numpy(), train.images.cpu().numpy())
    assert idx.tolist() == d.argmin(1).tolist() and int(idx[0]) == 7
    assert np.allclose(dist.numpy(), d.min(1), atol=1e-5)
    assert 0 < train.threshold < 0.5
    assert torch.equal(lab_pixels(images * 2 - 1), fast_lab.decode(images * 2 - 1))


def test_threshold_schedule_and_strengths():
    assert lambda_schedule(1000, 1000, 0.3, 0.6) == pytest.approx(0.3)
    assert lambda_schedule(0, 1000, 0.3, 0.6) == pytest.approx(0.6)
    assert lambda_schedule(500, 1000, 0.3, 0.7) == pytest.approx(0.3 + 0.4 * 0.25)  # parabolic in t
    assert lambda_schedule(250, 1000, 0.55, 0.45) == pytest.approx(0.55 - 0.1 * 0.75 ** 2)  # either direction
    sigma = torch.tensor([0.1, 0.5, 0.9, 2.0])
    s1, s2 = guidance_strengths(sigma, 2.0, 1.0, 2.0)
    assert s1.tolist() == pytest.approx([0.1, 0.5, 0.9, 1.0])  # clip(c1 σ, 0, s0 - 1)
    assert s2.tolist() == pytest.approx([0.2, 0.5, 0.1, 0.0])  # clip(c2 σ, 0, s0 - s1 - 1)
    s1, s2 = guidance_strengths(sigma, 1.0, 1.0, 1.0)  # no guidance above 1: nothing to take away
    assert s1.abs().sum() == 0 and s2.abs().sum() == 0


def test_params_are_checked_and_swept(fast_lab):
    for bad, name in (({"c1": -1}, "c1"), ({"scale": float("nan")}, "scale"), ({"sim_grad": "sscd"}, "sim_grad"),
                      ({"lambda_end": float("inf")}, "lambda_end")):
        with pytest.raises(ValueError, match=name):
            make_params("amg", bad)
    amg = get_mitigation("amg")
    assert amg.knob == "scale" and amg.off == {"scale": 0.0}
    assert [s["scale"] for s in amg.sweep(fast_lab, FAST)] == [0.5, 1.0, 2.0, 4.0]


def test_check_refuses_a_model_without_its_training_set(tiny_sd):
    with pytest.raises(ValueError, match="^" + REFUSAL + "$"):
        get_mitigation("amg").check(tiny_sd)
    with pytest.raises(ValueError, match=REFUSAL):
        mitigate_unit(tiny_sd, ["a cat"], [0], MitigationConfig(method="amg", params={"scale": 1.0}), FAST)


# -- one guided step -------------------------------------------------------------------------

@pytest.mark.parametrize("sim_grad", ["unet", "x0"])
def test_one_step_equals_an_independent_computation(fast_lab, sim_grad):
    """G_spe + G_dup + G_sim of a gated step, rebuilt from the formulas with the judge's numpy RMSE,
    the neighbour's caption encoded afresh and autograd through a hand-written x̂0."""
    from diffmem.lab.judge import TrainingImages, rmse_to_all

    m = fast_lab
    data = m.training_data()
    prompts = [data.memorized[0].caption, data.non_memorized[0].caption]
    G = 2
    t = schedule(m, 20)[10]
    # noised training images of the two prompts (a step where x̂0 is close to a training image)
    from diffmem.lab.data import render_all

    clean = torch.from_numpy(render_all([data.memorized[0].spec, data.non_memorized[0].spec])).repeat_interleave(G, 0)
    ab_t = float(m.scheduler.alphas_cumprod[int(t)])
    noise = torch.randn(clean.shape, generator=torch.Generator().manual_seed(3))
    x_t = ab_t ** 0.5 * (clean * 2 - 1) + (1 - ab_t) ** 0.5 * noise
    cond = m.encode_prompts(prompts).repeat_interleave(G)
    uncond = m.empty_conditioning().expand(len(cond))
    with torch.no_grad():
        e_c, e_u = m.predict_noise(x_t, t, cond), m.predict_noise(x_t, t, uncond)
    params = dict(scale=1.5, c1=0.2, c2=0.4, c3=300.0, lambda_start=-10, lambda_end=-10, sim_grad=sim_grad)
    g = _guidance(m, prompts, G, **params)
    out = g.guided(10, t, x_t, e_c, e_u)

    # independently
    s0 = m.default_guidance_scale
    train = TrainingImages.of(data)
    tau = get_mitigation("amg").training_set(m).threshold
    ab = float(m.scheduler.alphas_cumprod[int(t)])
    cfg = e_u + s0 * (e_c - e_u)
    x0 = (x_t - (1 - ab) ** 0.5 * cfg) / ab ** 0.5
    img = ((x0 / 2 + 0.5).clamp(0, 1)).numpy()
    d = rmse_to_all(img, train.images)
    nn = d.argmin(1)
    sigma = 1 - d[np.arange(len(nn)), nn] / (2 * tau)
    s1 = np.clip(1.5 * 0.2 * sigma, 0, s0 - 1)
    s2 = np.clip(1.5 * 0.4 * sigma, 0, s0 - s1 - 1)
    assert (s2 > 0).all()
    e_n = m.predict_noise(x_t, t, m.encode_prompts([train.captions[j] for j in nn]))
    nb = torch.from_numpy(train.images[nn]).float()

    def sigma_of(x):
        if sim_grad == "unet":
            eps = m.predict_noise(x, t, uncond) + s0 * (m.predict_noise(x, t, cond) - m.predict_noise(x, t, uncond))
        else:
            eps = cfg
        img = ((x - (1 - ab) ** 0.5 * eps) / ab ** 0.5 / 2 + 0.5).clamp(0, 1)
        return (1 - (img - nb).pow(2).mean((1, 2, 3)).sqrt() / (2 * tau)).sum()

    grad = torch.autograd.functional.vjp(sigma_of, x_t)[1]
    v = lambda a: torch.as_tensor(a, dtype=torch.float32).view(-1, 1, 1, 1)
    expected = (cfg - v(s1) * (e_c - e_u) - v(s2) * (e_n - e_u) + 1.5 * 300.0 * (1 - ab) ** 0.5 * grad)
    assert torch.allclose(out, expected, atol=2e-5, rtol=1e-4)
    assert (out - cfg).abs().max() > 1e-2  # the terms are not negligible here
    assert g.gated_steps.tolist() == [1] * 4
    assert [r["amg_extra_unet_rows"] for r in g.info] == [G * (3 if sim_grad == "unet" else 1)] * 2


def test_a_closed_gate_is_plain_guidance_exactly(fast_lab):
    m = fast_lab
    prompts = [m.training_data().memorized[0].caption]
    t = schedule(m, 20)[5]
    x_t = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(4))
    e_c, e_u = torch.randn_like(x_t), torch.randn_like(x_t)
    g = _guidance(m, prompts, 2, lambda_start=5.0, lambda_end=5.0)
    assert torch.equal(g.guided(5, t, x_t, e_c, e_u), e_u + m.default_guidance_scale * (e_c - e_u))
    assert g.gated_steps.sum() == 0 and g.info[0]["amg_extra_unet_rows"] == 0


def test_gradient_through_the_unet_matches_finite_differences_in_float64(fast_lab):
    """∇_{x_t} σ through both branches of the UNet (sim_grad="unet"), float64 copy of the lab model,
    against a central difference along a random direction (the neighbour fixed)."""
    m = copy.copy(fast_lab)
    m.unet = copy.deepcopy(fast_lab.unet).double()
    m.dtype = torch.float64
    m._alphas = None
    data = m.training_data()
    prompts = [data.memorized[1].caption]
    cond = m.encode_prompts(prompts).to(dtype=torch.float64).repeat_interleave(2)
    uncond = m.empty_conditioning().to(dtype=torch.float64).expand(2)
    g = AntiMemorizationGuidance(m, cond, uncond, get_mitigation("amg").training_set(fast_lab), m.default_guidance_scale,
                                 make_params("amg", {}), 2)
    t = schedule(m, 20)[12]
    x_t = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(5), dtype=torch.float64) * 0.5
    nb = g.train.images[torch.tensor([3, 9])].double()
    rows = torch.arange(2)
    grad = g.sigma_gradient(t, x_t, rows, nb, None)

    def sigma(x):
        with torch.no_grad():
            e_c, e_u = m.predict_noise(x, t, cond), m.predict_noise(x, t, uncond)
            x0 = predicted_x0(x, e_u + m.default_guidance_scale * (e_c - e_u), m.alpha_bar(t).double())
            return similarity(lab_pixels(x0), nb, g.train.threshold)

    direction = torch.randn(x_t.shape, generator=torch.Generator().manual_seed(6), dtype=torch.float64)
    h = 1e-5
    fd = (sigma(x_t + h * direction) - sigma(x_t - h * direction)) / (2 * h)
    assert torch.allclose((grad * direction).flatten(1).sum(1), fd, rtol=1e-5, atol=1e-8)


# -- whole runs ------------------------------------------------------------------------------

def test_off_reproduces_unmitigated_sampling(fast_lab, tiny_sd):
    data = fast_lab.training_data()
    prompts = [p.caption for p in data.memorized] + [data.non_memorized[0].caption]
    ref = mitigate_unit(fast_lab, prompts, list(range(len(prompts))), MitigationConfig(method="none"), FAST)
    off = mitigate_unit(fast_lab, prompts, list(range(len(prompts))), MitigationConfig(method="amg", params={"scale": 0.0}),
                        FAST)
    for a, b in zip(ref, off):
        assert torch.equal(a.images, b.images) and torch.equal(a.text_noise_norm, b.text_noise_norm)
        assert a.unet_rows == b.unet_rows
    # a model without its training set is refused before sampling, whatever the scale
    with pytest.raises(ValueError, match="training set"):
        mitigate_unit(tiny_sd, ["a red bus"], [0], MitigationConfig(method="amg", params={"scale": 0.0}), FAST)
    # the guidance object itself at scale 0 is plain guidance too
    positions = list(range(len(prompts)))
    plain = sample_unit(fast_lab, prompts, positions, FAST)
    guided = sample_unit(fast_lab, prompts, positions, FAST, guidance=_guidance(fast_lab, prompts, 2, scale=0.0))
    assert all(torch.equal(a.latents, b.latents) for a, b in zip(plain, guided))


def test_strong_amg_moves_memorized_samples_away_from_their_training_image(fast_lab):
    """Two memorized lab prompts, 2 generations each: at a strong scale every sample ends farther (RMSE)
    from its prompt's training image than unmitigated sampling from the same x_T, and the UNet rows
    exceed plain sampling's by exactly the extra rows the guidance counted. The fast lab's samples stay
    noisy (σ under 0.5 throughout), so the gate is lowered to open on them."""
    from diffmem.eval_sets import load_eval_set

    ev = load_eval_set(fast_lab, None)
    assert ev.name == "lab:memorized" and len(ev.prompts) >= 2
    ev = ev.prompts[:2]
    prompts = [p.caption for p in ev]
    params = {"scale": 4.0, "lambda_start": 0.0, "lambda_end": 0.2}
    ref = mitigate_unit(fast_lab, prompts, [0, 1], MitigationConfig(method="none"), FAST)
    amg = mitigate_unit(fast_lab, prompts, [0, 1], MitigationConfig(method="amg", params=params), FAST)
    for p, r, a in zip(ev, ref, amg):
        train = p.training.numpy()
        d_ref = np.array([_rmse(img[None].numpy(), train).min() for img in r.images])
        d_amg = np.array([_rmse(img[None].numpy(), train).min() for img in a.images])
        assert (d_amg > d_ref).all(), (d_ref, d_amg)
        assert a.info["amg_gated_steps"] > 0
    extra = sum(a.info["amg_extra_unet_rows"] for a in amg)
    assert extra > 0
    assert sum(a.unet_rows for a in amg) == pytest.approx(sum(r.unet_rows for r in ref) + extra)  # each: unit total / P

"""Mitigations that change the starting noise x_T: SAIL (Jeon et al. 2025) and Han et al.'s (2025)
initial-noise adjustment, checked against independent computations on tiny models."""

from __future__ import annotations

import copy
import math
from dataclasses import replace

import numpy as np
import pytest
import torch

from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.mitigations import Unit, count_unet_rows, derived_generator, get_mitigation, make_params
from diffmem.mitigations.han_noise import EarlyGuidance, default_rho
from diffmem.mitigations.sail import (KAPPA, LAB_PERCENTILE, SD1_SWEEP, optimize_initial_noise, published_constants,
                                      reference_terms, sail_loss, sail_terms)
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit, schedule, tracked_pass, unit_inputs

PROMPTS = ["a cat on a mat", "a dog in the fog"]
SAMPLING = SamplingConfig(num_inference_steps=10, num_generations=2, batch_size=16)


def delta_eps(model, x, t, cond, uncond):
    """Δε by direct ``predict_noise`` calls, one branch per call."""
    x_in = model.scheduler.scale_model_input(x, t)
    return model.predict_noise(x_in, t, cond) - model.predict_noise(x_in, t, uncond)


def first_step(model, prompts=PROMPTS, sampling=SAMPLING):
    """x_T (P, G, C, H, W), the first timestep, the prompts' conditioning (P rows) and uncond (P*G rows)."""
    t = schedule(model, sampling.num_inference_steps)[0]
    x, _, uncond = unit_inputs(model, list(range(len(prompts))), sampling, prompts)
    return x.view(len(prompts), sampling.num_generations, *x.shape[1:]), t, model.encode_prompts(prompts), uncond


def make_unit(model, prompts=PROMPTS, sampling=SAMPLING, seed=0):
    t_all = schedule(model, sampling.num_inference_steps)
    cond = model.encode_prompts(prompts)
    positions = list(range(len(prompts)))
    x, _, uncond = unit_inputs(model, positions, sampling, conditioning=cond)
    P, G = len(prompts), sampling.num_generations
    return Unit(list(prompts), positions, cond, uncond, x, t_all, sampling, sampling.guidance(model),
                MitigationConfig(method="none", seed=seed), torch.zeros(P, G), x, torch.zeros_like(x))


def run(model, method, params=None, prompts=PROMPTS, sampling=SAMPLING):
    return mitigate_unit(model, prompts, list(range(len(prompts))), MitigationConfig(method=method, params=params or {}),
                         sampling)


def assert_same_sampling(a, b):
    for x, y in zip(a, b):
        assert torch.equal(x.images, y.images)
        assert torch.equal(x.text_noise_norm, y.text_noise_norm)


@pytest.fixture(scope="module")
def tiny64(tiny_sd):
    """tiny_sd in float64, for finite differences."""
    m = copy.deepcopy(tiny_sd)
    m.unet.double()
    m.dtype = torch.float64
    return m


# -- SAIL ------------------------------------------------------------------------------------------

def test_sail_loss_equals_the_formula_and_its_gradient_matches_central_differences(tiny64):
    m = tiny64
    t = schedule(m, 10)[0]
    cond = m.encode_prompts(PROMPTS).to(dtype=torch.float64)
    uncond = m.empty_conditioning().to(dtype=torch.float64).expand(2)
    x = torch.randn(2, *m.latent_shape, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    alpha = 0.2
    # the formula, with Δε from direct UNet calls
    with torch.no_grad():
        d = delta_eps(m, x, t, cond, uncond)
        v = d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected = delta_eps(m, x + v, t, cond, uncond).flatten(1).norm(dim=1) + alpha * x.flatten(1).norm(dim=1)
    xg = x.clone().requires_grad_(True)
    loss = sail_loss(m, xg, t, cond, uncond, alpha)
    assert loss.dtype == torch.float64
    torch.testing.assert_close(loss.detach(), expected, rtol=1e-10, atol=1e-10)
    (grad,) = torch.autograd.grad(loss.sum(), xg)
    assert grad.abs().sum() > 0
    gen = torch.Generator().manual_seed(4)
    h = 1e-5
    for _ in range(3):
        u = torch.randn(x.shape, generator=gen, dtype=torch.float64)
        u /= u.norm()
        with torch.no_grad():
            fd = (sail_loss(m, x + h * u, t, cond, uncond, alpha).sum()
                  - sail_loss(m, x - h * u, t, cond, uncond, alpha).sum()) / (2 * h)
        assert float((grad * u).sum()) == pytest.approx(float(fd), rel=1e-5, abs=1e-8)
    # each sample's loss depends on its own latents only
    (g0,) = torch.autograd.grad(sail_loss(m, xg, t, cond, uncond, alpha)[0], xg)
    assert g0[1].abs().max() == 0 and g0[0].abs().max() > 0


def test_sail_optimisation_lowers_the_loss_and_reports_it(tiny_sd):
    x, t, cond, _ = first_step(tiny_sd)
    r = optimize_initial_noise(tiny_sd, x, t, cond, [0, 1], seed=0, alpha=0.2, threshold=-1.0, max_steps=4,
                               num_candidates=2, max_rounds=1)
    assert r.steps.tolist() == [4, 4] and r.rounds.tolist() == [1, 1]
    assert not r.accepted.any()
    assert (r.loss < 0.95 * r.initial_loss.min(1, keepdim=True).values).all()  # every output beats every input
    with torch.no_grad():  # the reported loss is the loss at the returned latents
        again = sail_loss(tiny_sd, r.x_T.flatten(0, 1), t, cond.repeat_interleave(2),
                          tiny_sd.empty_conditioning().expand(4), 0.2).view(2, 2)
    torch.testing.assert_close(again.double(), r.loss, rtol=1e-4, atol=1e-4)
    with torch.no_grad():  # the initial loss is x_T's
        at_x = sail_loss(tiny_sd, x.flatten(0, 1), t, cond.repeat_interleave(2),
                         tiny_sd.empty_conditioning().expand(4), 0.2).view(2, 2)
    torch.testing.assert_close(at_x.double(), r.initial_loss, rtol=1e-5, atol=1e-5)


def test_sail_keeps_accepted_x_T_bit_for_bit_and_replaces_the_others(tiny_sd):
    """Frozen at acceptance, an x_T that passes at once is sampled bit for bit; under the official rule it
    keeps moving until the round ends, unless the round ends at once (both x_T pass)."""
    x, t, cond, _ = first_step(tiny_sd, PROMPTS[:1])
    probe = optimize_initial_noise(tiny_sd, x, t, cond, [0], seed=0, alpha=0.2, threshold=math.inf, max_steps=0)
    lo, hi = probe.initial_loss[0].tolist()
    low_g = 0 if lo < hi else 1
    thr = min(lo, hi) + 1e-4  # only one of the two x_T passes at once
    kw = dict(seed=0, alpha=0.2, threshold=thr, max_steps=3, num_candidates=8, max_rounds=2)
    r = optimize_initial_noise(tiny_sd, x, t, cond, [0], acceptance="at_acceptance", **kw)
    assert torch.equal(r.x_T[0, low_g], x[0, low_g])
    assert bool(r.kept[0, low_g]) and bool(r.accepted[0, low_g])
    other = 1 - low_g
    assert not torch.equal(r.x_T[0, other], x[0, other])
    if r.accepted[0, other]:
        assert float(r.loss[0, other]) <= float(r.threshold[0])
    official = optimize_initial_noise(tiny_sd, x, t, cond, [0], **kw)
    assert bool(official.kept[0, low_g]) and bool(official.accepted[0, low_g])
    if official.steps[0] > 0:  # the round went on after x_T[low_g] passed: it moved with it
        assert not torch.equal(official.x_T[0, low_g], x[0, low_g])
    both = optimize_initial_noise(tiny_sd, x, t, cond, [0], **{**kw, "threshold": max(lo, hi) + 1e-4})
    assert torch.equal(both.x_T, x) and both.steps[0] == 0


def official_sail(model, x_T, t, cond, position, seed, *, alpha, threshold, max_steps, num_candidates, max_rounds,
                  lr=0.05, threshold_step=0.1, max_batch=None):
    """SAIL's search for one prompt written as the official loop (``local_model/pipe.py``, mitigation
    block): per round one (B, C, H, W) latent tensor under Adam; at each check the indices newly at
    or under the threshold are appended as ``lat[i].detach()``, views that Adam's in-place steps keep
    moving, until G are found (then the round stops before any step); else the summed loss of all B,
    accepted ones included, is back-propagated and Adam steps; every 3 failed rounds the threshold
    grows. With diffmem's documented choices: round 0's first G candidates are x_T (G, C, H, W), each
    round draws new candidates from ``derived_generator``, one more check after the last step, and
    generation g takes its own x_T's descendant when it was accepted. Returns the (G, C, H, W) latents
    (None when G were not found), whether an accepted latent moved after its acceptance, and the
    rounds run."""
    G, B = len(x_T), max(num_candidates, len(x_T))
    empty = model.empty_conditioning()
    found, moved, failed = [], False, 0
    for r in range(max_rounds):
        draw = torch.randn((B if r else B - G, *x_T.shape[1:]), generator=derived_generator(seed, position, r))
        lat = torch.cat(([x_T.float()] if r == 0 else []) + [draw]).requires_grad_(True)
        optimizer = torch.optim.Adam([lat], lr=lr)
        indice_record = []
        for step in range(max_steps + 1):
            loss = sail_loss(model, lat, t, cond[[0] * B], empty.expand(B), alpha, max_batch)
            new = [i for i in torch.where(loss <= threshold)[0].tolist() if i not in indice_record]
            found += [(r, i, lat[i].detach()) for i in new]
            indice_record += new
            if len(found) >= G or step == max_steps:
                break
            moved = moved or bool(indice_record)
            optimizer.zero_grad()
            loss.sum().backward()
            optimizer.step()
        if len(found) >= G:
            break
        failed += 1
        if failed % 3 == 0:
            threshold += threshold_step
    if len(found) < G:
        return None, moved, r + 1
    slots, others = [None] * G, []
    for r, i, latent in found:
        if r == 0 and i < G and slots[i] is None:
            slots[i] = latent
        else:
            others.append(latent)
    return torch.stack([s if s is not None else others.pop(0) for s in slots]), moved, r + 1


@pytest.mark.parametrize("max_steps, rounds", [(6, 1), (2, 3)])
def test_sail_accepted_latents_are_their_state_at_the_round_end_as_in_the_official_loop(tiny_sd, max_steps, rounds):
    """At the first threshold where an accepted candidate goes on moving (within one round), or where
    the search takes several rounds (acceptances accumulate, the threshold grows after 3 failures)."""
    torch.set_num_threads(1)
    x, t, cond, _ = first_step(tiny_sd, PROMPTS[:1])
    kw = dict(alpha=0.2, max_steps=max_steps, num_candidates=4, max_rounds=4, max_batch=16)
    for thr in np.linspace(5.4, 7.4, 21):
        expected, moved, ran = official_sail(tiny_sd, x[0], t, cond, 0, 0, threshold=float(thr), **kw)
        if expected is not None and ran >= rounds and (moved or rounds > 1):
            break
    else:
        pytest.fail("no threshold where an accepted candidate is optimised further")
    assert ran >= rounds
    got = optimize_initial_noise(tiny_sd, x, t, cond, [0], seed=0, threshold=float(thr), **kw)
    assert got.accepted.all()
    torch.testing.assert_close(got.x_T[0], expected, rtol=0, atol=1e-6)
    assert got.rounds[0] == ran
    if moved:  # frozen at acceptance, the latents differ
        frozen = optimize_initial_noise(tiny_sd, x, t, cond, [0], seed=0, threshold=float(thr),
                                        acceptance="at_acceptance", **kw)
        assert (frozen.x_T[0] - expected).abs().max() > 1e-4
    with torch.no_grad():  # the recorded loss is the returned latents'
        again = sail_loss(tiny_sd, got.x_T[0], t, cond[[0, 0]], tiny_sd.empty_conditioning().expand(2), 0.2)
    torch.testing.assert_close(again.double(), got.loss[0], rtol=1e-5, atol=1e-5)


def test_sail_records_and_bench_report_accepted_versus_fallback_prompts(tiny_sd):
    from diffmem.bench import format_mitigation_table, mitigation_rows

    params = {"loss_threshold": -1.0, "alpha": 0.2, "max_steps": 1, "max_rounds": 1, "num_candidates": 2}
    fell = run(tiny_sd, "sail", params)
    assert [(r.info["sail_accepted"], r.info["sail_fallback"]) for r in fell] == [(0, 2), (0, 2)]
    passed = run(tiny_sd, "sail", {**params, "loss_threshold": 1e6})
    assert [(r.info["sail_accepted"], r.info["sail_fallback"]) for r in passed] == [(2, 0), (2, 0)]
    rows = [{"method": "sail", "setting": key, "sail_fallback": r.info["sail_fallback"]}
            for key, res in (("loss_threshold=-1.0", fell), ("loss_threshold=1000000.0", passed)) for r in res]
    rows.append({"method": "sail", "setting": "loss_threshold=8.2", "sail_fallback": 0})
    rows.append({"method": "sail", "setting": "loss_threshold=8.2", "sail_fallback": 1})
    setting = dict(value=0.0, num_prompts=2, num_generations=4, copy_rate=None, final_d_mean=0.0, iterations_mean=0.0)
    summary = {"results": {"sail": {k: setting for k in ("loss_threshold=-1.0", "loss_threshold=1000000.0",
                                                         "loss_threshold=8.2")}}}
    table_rows = mitigation_rows("sail", [summary], rows, None)
    assert [(r["prompts_accepted"], r["prompts_fell_back"]) for r in table_rows] == [(0, 2), (2, 0), (1, 1)]
    results = {"rows": table_rows, "similarity_metric": None, "x_axis": "final_d_mean", "model": "m", "dataset": "d",
               "num_prompts": 2, "config": {"sampling": {"num_generations": 2, "num_inference_steps": 3, "seed": 0}}}
    table = format_mitigation_table(results)
    assert "- sail loss_threshold=-1.0: 0 accepted, 2 fell back" in table
    assert "- sail loss_threshold=8.2: 1 accepted, 1 fell back" in table
    none = mitigation_rows("none", [{"results": {"none": {"default": setting}}}],
                           [{"method": "none", "setting": "default"}], None)
    assert "prompts_fell_back" not in none[0] and "fell back" not in format_mitigation_table({**results, "rows": none})


def test_sail_batched_equals_one_prompt_at_a_time(tiny_sd):
    x, t, cond, _ = first_step(tiny_sd)
    kw = dict(alpha=0.2, threshold=6.5, max_steps=2, num_candidates=3, max_rounds=2)
    joint = optimize_initial_noise(tiny_sd, x, t, cond, [0, 1], seed=5, **kw)
    for j in range(2):
        alone = optimize_initial_noise(tiny_sd, x[j:j + 1], t, cond[j], [j], seed=5, **kw)
        assert alone.rounds[0] == joint.rounds[j] and alone.steps[0] == joint.steps[j]
        torch.testing.assert_close(alone.x_T[0], joint.x_T[j], rtol=1e-4, atol=1e-5)


def test_sail_off_reproduces_unmitigated_sampling_without_unet_calls(tiny_sd):
    none = run(tiny_sd, "none")
    off = run(tiny_sd, "sail", get_mitigation("sail").off)
    assert_same_sampling(none, off)
    assert [r.unet_rows for r in off] == [r.unet_rows for r in none]


def test_sail_through_mitigate_unit_is_deterministic_and_records_its_search(tiny_sd):
    x, t, cond, _ = first_step(tiny_sd)
    initial = optimize_initial_noise(tiny_sd, x, t, cond, [0, 1], seed=0, alpha=0.2, threshold=math.inf,
                                     max_steps=0).initial_loss
    thr = float(initial.median())  # some x_T pass at once, the others are searched for
    params = {"loss_threshold": thr, "alpha": 0.2, "max_steps": 2, "max_rounds": 2, "num_candidates": 4}
    a, b = run(tiny_sd, "sail", params), run(tiny_sd, "sail", params)
    assert_same_sampling(a, b)
    none = run(tiny_sd, "none")
    assert any(not torch.equal(r.images, n.images) for r, n in zip(a, none))
    for r, r0 in zip(a, b):
        assert r.info == r0.info and r.iterations == r0.iterations == r.info["sail_steps"]
        assert 1 <= r.info["sail_rounds"] <= 2 and len(r.info["sail_loss"]) == 2
        assert r.info["sail_initial_loss"] == pytest.approx(initial[r.position].tolist(), rel=1e-5)
        assert r.info["sail_acceptance"] == "round_end"
        assert r.info["sail_accepted"] + r.info["sail_fallback"] == 2


def test_sail_defaults_and_sweep_on_an_sd_like_model(tiny_sd):
    sail = get_mitigation("sail")
    alpha, thr, step = sail.resolve(tiny_sd, SAMPLING, make_params("sail", {}))
    assert alpha == pytest.approx(0.05 * math.sqrt(4 * 64 * 64 / (4 * 16 * 16)))  # α ||x_T|| as on SD 1.x
    assert (thr, step) == (8.2, 0.1)
    assert sail.sweep(tiny_sd, SAMPLING) == [{"loss_threshold": v} for v in SD1_SWEEP]
    v_model = copy.copy(tiny_sd)
    v_model.prediction_type = "v_prediction"
    assert published_constants(v_model)[:2] == (pytest.approx(0.01 * math.sqrt(4 * 96 * 96 / 1024)), 5.0)
    with pytest.raises(ValueError, match="lr"):
        MitigationConfig(method="sail", params={"lr": 0})
    with pytest.raises(ValueError, match="num_candidates"):
        MitigationConfig(method="sail", params={"num_candidates": 0})


def test_sail_on_the_lab_calibrates_on_its_reference_prompts(fast_lab):
    from diffmem.lab.prompts import own_reference_prompts

    sampling = replace(SAMPLING, num_inference_steps=20)
    sail = get_mitigation("sail")
    cal = sail.calibration(fast_lab, sampling)
    refs = own_reference_prompts(fast_lab)
    assert len(cal.sharpness) == len(refs) * sampling.num_generations
    # the first reference prompt's terms at its own x_T (seed + 0), computed again
    t = schedule(fast_lab, sampling.num_inference_steps)[0]
    x0 = initial_noise(fast_lab, sampling.num_generations, sampling.seed)
    with torch.no_grad():
        s0, g0 = sail_terms(fast_lab, x0, t, fast_lab.encode_prompts(refs[:1]).repeat_interleave(2),
                            fast_lab.empty_conditioning().expand(2))
    np.testing.assert_allclose(cal.sharpness[:2], s0.double().numpy(), rtol=1e-4)
    np.testing.assert_allclose(cal.gaussianity[:2], g0.double().numpy(), rtol=1e-5)
    assert cal.alpha == pytest.approx(KAPPA * np.median(cal.sharpness) / np.median(cal.gaussianity))
    assert cal.threshold == pytest.approx(np.percentile(cal.sharpness + cal.alpha * cal.gaussianity, LAB_PERCENTILE))
    sweep = [s["loss_threshold"] for s in sail.sweep(fast_lab, sampling)]
    assert len(sweep) == 4 and sweep == sorted(sweep, reverse=True)  # mildest (highest) first
    assert sail.calibration(fast_lab, sampling) is cal  # cached
    np.testing.assert_allclose(reference_terms(fast_lab, refs[:1], sampling)[0], cal.sharpness[:2], rtol=1e-5)
    # two memorized prompts, G = 2, through mitigate_unit: deterministic, at the calibrated threshold
    mem = [p.caption for p in fast_lab.training_data().memorized[:2]]
    params = {"max_steps": 2, "max_rounds": 1}
    a = run(fast_lab, "sail", params, mem, sampling)
    b = run(fast_lab, "sail", params, mem, sampling)
    assert_same_sampling(a, b)
    assert all(r.info["sail_alpha"] == pytest.approx(cal.alpha) for r in a)
    assert all(r.info["sail_threshold"] >= cal.threshold for r in a)
    assert all(r.info == r0.info for r, r0 in zip(a, b))


# -- Han et al. -----------------------------------------------------------------------------------

def test_han_one_update_equals_the_formula(tiny_sd):
    unit = make_unit(tiny_sd)
    han = get_mitigation("han-noise")
    gamma, rho = 0.7, 9.0
    plan = han.plan(tiny_sd, unit, make_params("han-noise", {"gamma": gamma, "rho": rho, "iterations": 1}))
    t = unit.timesteps[0]
    cond, uncond, x = unit.cond.repeat_interleave(2), unit.uncond, unit.x_T
    with torch.no_grad():
        d = delta_eps(tiny_sd, x, t, cond, uncond)
        probe = x + rho * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)  # per-sample norm
        expected = x - gamma * (delta_eps(tiny_sd, probe, t, cond, uncond) - d)
    assert not torch.equal(expected, x)
    torch.testing.assert_close(plan.x_T, expected, rtol=1e-5, atol=1e-5)
    # two iterations: the formula applied to the first one's result
    two = han.plan(tiny_sd, unit, make_params("han-noise", {"gamma": gamma, "rho": rho, "iterations": 2}))
    with torch.no_grad():
        d = delta_eps(tiny_sd, expected, t, cond, uncond)
        probe = expected + rho * d / d.flatten(1).norm(dim=1).view(-1, 1, 1, 1)
        expected2 = expected - gamma * (delta_eps(tiny_sd, probe, t, cond, uncond) - d)
    torch.testing.assert_close(two.x_T, expected2, rtol=1e-5, atol=1e-5)


def test_han_default_rho_keeps_sd_relative_size():
    assert default_rho((4, 64, 64)) == 50.0
    assert default_rho((3, 16, 16)) == pytest.approx(50 * math.sqrt(768 / 16384))  # the lab: ≈ 10.8
    assert default_rho((4, 16, 16)) == 12.5


def test_han_first_steps_are_unconditional_then_guided(tiny_sd):
    sampling = replace(SAMPLING, num_inference_steps=50)
    unit = make_unit(tiny_sd, sampling=sampling)
    plan = get_mitigation("han-noise").plan(tiny_sd, unit, make_params("han-noise", {}))
    w = unit.guidance_scale
    assert [plan.guidance(k, None, None) for k in range(7)] == [0.0] * 5 + [w, w]  # 50 steps: the official's 0-4
    assert plan.info[0]["han_cfg_step"] == 5
    cond, uncond = unit.cond.repeat_interleave(2), unit.uncond
    ts = unit.timesteps
    sched = tiny_sd.scheduler

    def hand(x, early_w):
        with torch.no_grad():
            for k, t in enumerate(ts):
                x_in = sched.scale_model_input(x, t)
                e_c, e_u = tiny_sd.predict_noise(x_in, t, cond), tiny_sd.predict_noise(x_in, t, uncond)
                ww = early_w if t > 900 else w  # the official's window: t = 981 ... 901
                x = sched.step(e_u + ww * (e_c - e_u), t, x, return_dict=False)[0]
                if k == 4:
                    after5 = x
        return after5, x

    after5, final = hand(plan.x_T, 0.0)
    got5 = tracked_pass(tiny_sd, plan.x_T, cond, uncond, ts[:5], plan.guidance)
    torch.testing.assert_close(got5, after5, rtol=1e-5, atol=1e-5)
    got = sample_unit(tiny_sd, PROMPTS, [0, 1], sampling, conditioning=unit.cond, x_T=plan.x_T, guidance=plan.guidance)
    torch.testing.assert_close(torch.cat([s.latents for s in got]), final, rtol=1e-4, atol=1e-4)
    conditional5, _ = hand(plan.x_T, 1.0)  # the conditional-only reading of "no CFG" is another trajectory
    assert not torch.allclose(got5, conditional5, atol=1e-4)


@pytest.mark.parametrize("steps, unguided", [(50, 5), (25, 2), (10, 1), (5, 0)])
def test_han_unguided_window_is_a_range_of_timesteps_not_a_count_of_steps(tiny_sd, steps, unguided):
    unit = make_unit(tiny_sd, sampling=replace(SAMPLING, num_inference_steps=steps))
    plan = get_mitigation("han-noise").plan(tiny_sd, unit, make_params("han-noise", {"gamma": 0}))
    ts = unit.timesteps.tolist()
    assert sum(t > 900 for t in ts) == unguided  # DDIM "leading": 50 steps 981 ... 901; 25: 961, 921; 10: 901
    w = unit.guidance_scale
    got = [plan.guidance(k, None, None) for k in range(len(ts))] if plan.guidance is not None else [w] * len(ts)
    assert got == [0.0 if t > 900 else w for t in ts]
    assert plan.info[0]["han_cfg_step"] == unguided
    half = get_mitigation("han-noise").plan(tiny_sd, unit, make_params("han-noise", {"gamma": 0, "cfg_from_t": 500}))
    assert half.guidance(0, None, None) == 0.0 and half.info[0]["han_cfg_step"] == sum(t > 500 for t in ts)


def test_han_costs_8G_rows_per_prompt(tiny_sd):
    unit = make_unit(tiny_sd)
    with count_unet_rows(tiny_sd) as rows:
        get_mitigation("han-noise").plan(tiny_sd, unit, make_params("han-noise", {}))
    P, G = len(PROMPTS), SAMPLING.num_generations
    assert rows[0] == 2 * 2 * 2 * P * G  # iterations x two evaluations of Δε x two branches, per generation
    han, none = run(tiny_sd, "han-noise"), run(tiny_sd, "none")
    assert [h.unet_rows - n.unet_rows for h, n in zip(han, none)] == [8 * G] * P
    assert any(not torch.equal(h.images, n.images) for h, n in zip(han, none))


def test_han_off_reproduces_unmitigated_sampling(tiny_sd):
    han = get_mitigation("han-noise")
    off = run(tiny_sd, "han-noise", han.off)
    none = run(tiny_sd, "none")
    assert_same_sampling(none, off)
    assert [r.unet_rows for r in off] == [r.unet_rows for r in none]
    assert han.sweep(tiny_sd, SAMPLING) == [{"gamma": 0.35}, {"gamma": 0.7}, {"gamma": 1.4}]
    with pytest.raises(ValueError, match="gamma"):
        MitigationConfig(method="han-noise", params={"gamma": -1})
    with pytest.raises(ValueError, match="rho"):
        MitigationConfig(method="han-noise", params={"rho": 0})
    assert isinstance(han.plan(tiny_sd, make_unit(tiny_sd), make_params("han-noise", {"gamma": 0})).guidance,
                      EarlyGuidance)

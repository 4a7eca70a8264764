"""Guidance-side mitigations on the tiny SD: delayed CFG (Jain et al. 2025), prompt re-anchoring with
semantic search (Chen et al. 2025, PRSS) and Gaussian noise injection (Somepalli et al. 2023), each
against a hand-written DDIM loop or an independent computation of its formula."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch

from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.mitigations import count_unet_rows, derived_generator, get_mitigation
from diffmem.model import Conditioning
from diffmem.sampling import SamplingConfig, initial_noise, predict_branches, sample_prompts, sample_unit, schedule

PROMPTS = ["a cat on a mat", "a dog in the fog", "the red barn at dawn"]
POSITIONS = [0, 1, 2]
SAMPLING = SamplingConfig(num_inference_steps=6, num_generations=2, seed=7)


def run(model, method, params=None, sampling=SAMPLING, prompts=PROMPTS, positions=POSITIONS):
    return mitigate_unit(model, prompts, positions, MitigationConfig(method=method, params=params or {}), sampling)


def hand_loop(model, cond: Conditioning, positions, sampling, combine):
    """DDIM written out: x_T per position (seed + p), both branches per step, then
    ``combine(k, t, x, e_c, e_u) -> eps`` and ``scheduler.step``. Returns (images, d (N, S))."""
    G = sampling.num_generations
    x = torch.cat([initial_noise(model, G, sampling.seed + p) for p in positions])
    c = cond.repeat_interleave(G)
    u = model.empty_conditioning().expand(len(x))
    ds = []
    with torch.no_grad():
        for k, t in enumerate(schedule(model, sampling.num_inference_steps)):
            e_c, e_u = predict_branches(model, x, t, c, u, max_batch=sampling.batch_size)
            ds.append((e_c - e_u).flatten(1).norm(dim=1))
            x = model.scheduler.step(combine(k, t, x, e_c, e_u), t, x, return_dict=False)[0]
        return model.decode(x), torch.stack(ds, 1)


def cfg_with(w_of_step):
    def combine(k, t, x, e_c, e_u):
        w = w_of_step(k, e_c, e_u)
        w = w.view(-1, 1, 1, 1) if isinstance(w, torch.Tensor) else w
        return e_u + w * (e_c - e_u)
    return combine


def images(results):
    return torch.cat([r.images for r in results])


def assert_off_is_unmitigated(model, method, off, **kw):
    none = run(model, "none", **kw)
    off_run = run(model, method, off, **kw)
    for a, b in zip(none, off_run):
        assert torch.equal(a.images, b.images)
        assert torch.equal(a.text_noise_norm, b.text_noise_norm)
        assert a.unet_rows == b.unet_rows


# -- delayed CFG ----------------------------------------------------------------------------------

def test_delayed_cfg_static_equals_a_hand_written_loop_with_the_switch(tiny_sd):
    ts = schedule(tiny_sd, SAMPLING.num_inference_steps)
    cond = tiny_sd.encode_prompts(PROMPTS)
    for params, early, k in (({"switch_t": float(ts[3])}, 0.0, 3),  # t <= switch_t: full from step 3
                             ({"mode": "opposite"}, -2.0, int((ts <= 650).nonzero()[0])),
                             ({"switch_t": float(ts[1]) + 1, "early_scale": 0.5}, 0.5, 1)):
        res = run(tiny_sd, "delayed-cfg", params)
        assert all(r.info["switch_step"] == [k, k] and r.unet_rows == res[0].unet_rows for r in res)
        expected, _ = hand_loop(tiny_sd, cond, POSITIONS, SAMPLING, cfg_with(lambda i, *_: early if i < k else 7.5))
        torch.testing.assert_close(images(res), expected, atol=1e-5, rtol=1e-5)
    # the published default switches at t = 500 of 1,000 with guidance 0 before it
    res = run(tiny_sd, "delayed-cfg")
    assert res[0].info["switch_step"][0] == int((ts <= 500).nonzero()[0])
    assert run(tiny_sd, "none")[0].unet_rows == res[0].unet_rows  # no extra UNet rows


def test_delayed_cfg_off_is_unmitigated_sampling(tiny_sd):
    method = get_mitigation("delayed-cfg")
    assert_off_is_unmitigated(tiny_sd, "delayed-cfg", method.off)
    first = float(schedule(tiny_sd, SAMPLING.num_inference_steps)[0])
    assert_off_is_unmitigated(tiny_sd, "delayed-cfg", {"switch_t": first})  # switch at the first step


class Dipped:
    """tiny_sd with a prompt-dependent term that grows as t falls below 700, so that each row's d
    first falls, then rises: a first local minimum, at a step that differs between rows."""

    def __init__(self, model):
        self._m = model
        self.name = "tiny-dipped"

    def __getattr__(self, k):
        return getattr(self._m, k)

    def predict_noise(self, x, t, cond, denoiser=None):
        s = cond.embeddings.float().abs().mean(dim=(1, 2)).view(-1, 1, 1, 1)
        return self._m.predict_noise(x, t, cond) + 3.0 * max(0.0, 1 - float(t) / 700) * s * x

    predict = predict_noise  # the pass's call (an epsilon-sampled model)


def test_delayed_cfg_dynamic_switches_each_row_at_its_own_first_local_minimum(tiny_sd):
    model = Dipped(tiny_sd)
    sampling = SamplingConfig(num_inference_steps=10, num_generations=2, seed=7)
    res = run(model, "delayed-cfg", {"mode": "dynamic"}, sampling=sampling)
    d = torch.cat([r.text_noise_norm for r in res])  # (N, S) recorded on the mitigated pass
    # the switch read off the recorded d: the first k with d[k-2] > d[k-1] < d[k]
    expected = []
    for row in d.tolist():
        hits = [k for k in range(2, len(row)) if row[k - 2] > row[k - 1] < row[k]]
        expected.append(hits[0] if hits else -1)
    got = [k for r in res for k in r.info["switch_step"]]
    assert got == expected
    assert len(set(got)) > 1 and -1 not in got  # rows switch, not all at one step
    # the hand-written loop with guidance 1 before each row's own switch and 7.5 from it
    switch = torch.tensor(got)
    combine = cfg_with(lambda k, e_c, e_u: torch.where(torch.tensor(k) >= switch, 7.5, 1.0))
    expected_images, hand_d = hand_loop(model, model.encode_prompts(PROMPTS), POSITIONS, sampling, combine)
    torch.testing.assert_close(images(res), expected_images, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(d, hand_d, atol=1e-5, rtol=1e-5)


def test_delayed_cfg_rejects_bad_parameters(tiny_sd):
    with pytest.raises(ValueError, match="mode"):
        MitigationConfig(method="delayed-cfg", params={"mode": "late"})
    with pytest.raises(ValueError, match="switch_t"):
        MitigationConfig(method="delayed-cfg", params={"mode": "dynamic", "switch_t": 500})
    with pytest.raises(ValueError, match="early_scale"):
        MitigationConfig(method="delayed-cfg", params={"early_scale": "x"})
    sweep = get_mitigation("delayed-cfg").sweep(tiny_sd, SAMPLING)
    assert [s.get("switch_t") for s in sweep] == [800.0, 650.0, 500.0, 300.0, None] and sweep[-1]["mode"] == "dynamic"


# -- PRSS: prompt re-anchoring and semantic search ------------------------------------------------

def pr_formula(e_prime, e_u, e_p, s, l_pr, M):
    """PR for one row, with Python floats for the scalars: (C, H, W) tensors."""
    mag = float((e_prime - e_u).norm())
    if mag <= l_pr:
        return e_u + s * (e_prime - e_u)
    k = (s * l_pr - M) / (s - 1)
    s_pr = min((mag - k) / (M - k) * s, s)
    return e_p + s_pr * (e_prime - e_p) + (s - s_pr) * (e_prime - e_u)


def test_prss_guided_prediction_equals_the_formula(tiny_sd):
    from diffmem.mitigations.prss import PromptReanchoring

    ts = schedule(tiny_sd, 5)
    t = ts[2]
    g = torch.Generator().manual_seed(3)
    N = 4
    x = torch.randn(N, *tiny_sd.latent_shape, generator=g)
    e_u = torch.randn(N, *tiny_sd.latent_shape, generator=g)
    scale = torch.tensor([0.01, 0.3, 0.6, 2.0]).view(-1, 1, 1, 1)  # mag below l_pr, between, above M
    e_prime = e_u + scale * torch.randn(N, *tiny_sd.latent_shape, generator=g)
    original = tiny_sd.encode_prompts(["a cat on a mat", "a dog in the fog"]).repeat_interleave(2)
    mags = (e_prime - e_u).flatten(1).norm(dim=1)
    l_pr, M, s = float(mags[0]) + 1e-3, float(mags[2]) * 0.9, 7.5  # rows: CFG, PR, PR, PR with s_pr = s
    triggered = torch.tensor([True, True, True, False])
    differs = torch.tensor([True, True, False, True])  # row 2: e' = e_p (no paraphrase)
    pr = PromptReanchoring(tiny_sd, original, triggered, differs, s, l_pr, M)
    with count_unet_rows(tiny_sd) as n:
        got = pr.guided(2, t, x, e_prime, e_u)
    assert n[0] == 1  # eps(e_p) for row 1 only: row 0 is under l_pr, row 2 has e' = e_p, row 3 is not triggered
    with torch.no_grad():
        e_p1 = tiny_sd.unet(tiny_sd.scheduler.scale_model_input(x[1:2], t), t,
                            encoder_hidden_states=original.embeddings[1:2]).sample[0]
    expected = [pr_formula(e_prime[0], e_u[0], None, s, l_pr, M),
                pr_formula(e_prime[1], e_u[1], e_p1, s, l_pr, M),
                pr_formula(e_prime[2], e_u[2], e_prime[2], s, l_pr, M),
                e_u[3] + s * (e_prime[3] - e_u[3])]
    torch.testing.assert_close(got, torch.stack(expected), atol=1e-5, rtol=1e-5)
    assert torch.equal(got[0], e_u[0] + s * (e_prime[0] - e_u[0]))
    # with e' = e_p the formula is CFG at scale 1 + s - s_pr; at mag >= M the conditional branch alone
    assert mags[3] > M
    torch.testing.assert_close(pr_formula(e_prime[3], e_u[3], e_prime[3], s, l_pr, M), e_prime[3])


def test_prss_without_paraphrases_is_cfg_at_the_reduced_scale_and_adds_no_rows(tiny_sd):
    l_pr, M, s = 0.3, 0.9, 7.5
    res = run(tiny_sd, "prss-reanchor", {"l_pr": l_pr, "M": M, "lambda_ss": 0.0})
    none = run(tiny_sd, "none")
    assert all(r.info["semantic_search"].startswith("skipped") and r.info["triggered"] for r in res)
    assert sum(r.unet_rows for r in res) == sum(r.unet_rows for r in none)
    assert any(k > 0 for r in res for k in r.info["reanchored_steps"])

    def w(k, e_c, e_u):
        mag = (e_c - e_u).flatten(1).norm(dim=1).double()
        kk = (s * l_pr - M) / (s - 1)
        s_pr = torch.clamp((mag - kk) / (M - kk) * s, max=s)
        return torch.where(mag > l_pr, 1 + s - s_pr, s).float()

    expected, _ = hand_loop(tiny_sd, tiny_sd.encode_prompts(PROMPTS), POSITIONS, SAMPLING, cfg_with(w))
    torch.testing.assert_close(images(res), expected, atol=1e-5, rtol=1e-5)


def test_prss_semantic_search_and_reanchoring_rows(tiny_sd, tmp_path):
    """The first paraphrase with d <= λ is sampled (here the empty prompt, d = 0); PR then adds one
    eps(e_p) row per step and generation; SS adds one per generation and paraphrase tried."""
    path = tmp_path / "para.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0], "paraphrases": ["a dog in the fog", "", "a cat"]}) + "\n"
                    + json.dumps({PROMPTS[1]: [""]}) + "\n")
    G, S = SAMPLING.num_generations, SAMPLING.num_inference_steps
    params = {"l_pr": -1.0, "M": 1.0, "lambda_ss": 1e-4, "paraphrases": str(path)}  # PR at every step
    res = run(tiny_sd, "prss-reanchor", params)
    none = run(tiny_sd, "none")
    assert [r.modified_prompt for r in res] == ["", "", PROMPTS[2]]
    assert res[0].info["semantic_search"] == "2 paraphrases tried" and res[0].info["paraphrase_d"][1] <= 1e-4
    assert res[2].info["semantic_search"] == "no paraphrases for this prompt"
    torch.testing.assert_close(res[0].embedding, tiny_sd.encode_prompts([""]).embeddings[0])
    extra = sum(r.unet_rows for r in res) - sum(r.unet_rows for r in none)
    assert extra == (2 + 1) * G + 2 * S * G  # SS: 3 paraphrases x G; PR: prompts 0 and 1, every step
    assert all(r.info["reanchored_steps"] == [S] * G for r in res)
    # the same pass written out: e' = "" for prompts 0-1, eps(e_p) from the original prompts
    original = tiny_sd.encode_prompts(PROMPTS).repeat_interleave(G)
    sampled = tiny_sd.encode_prompts(["", "", PROMPTS[2]])

    def combine(k, t, x, e_c, e_u):
        out = []
        for i in range(len(x)):
            e_p = e_c[i] if i >= 2 * G else tiny_sd.predict_noise(
                tiny_sd.scheduler.scale_model_input(x[i:i + 1], t), t, original[i])[0]
            out.append(pr_formula(e_c[i], e_u[i], e_p, 7.5, -1.0, 1.0))
        return torch.stack(out)

    expected, _ = hand_loop(tiny_sd, sampled, POSITIONS, SAMPLING, combine)
    torch.testing.assert_close(images(res), expected, atol=1e-5, rtol=1e-5)


def test_prss_off_is_unmitigated_sampling(tiny_sd, tmp_path):
    path = tmp_path / "para.jsonl"
    path.write_text(json.dumps({"prompt": PROMPTS[0], "paraphrases": [""]}) + "\n")
    off = get_mitigation("prss-reanchor").off
    assert_off_is_unmitigated(tiny_sd, "prss-reanchor", off)
    assert_off_is_unmitigated(tiny_sd, "prss-reanchor", {**off, "paraphrases": str(path)})
    assert_off_is_unmitigated(tiny_sd, "prss-reanchor", {"l_pr": math.inf, "M": 5.0, "lambda_ss": 1.0})


def test_prss_constants_are_derived_from_the_models_reference_prompts(tiny_sd, monkeypatch):
    import diffmem.lab.prompts as lab_prompts
    from diffmem.mitigations.prss import PRSS

    assert PRSS().constants(tiny_sd, SAMPLING) == {"l_pr": 3.0, "M": 5.0, "lambda_ss": 1.0}  # SD: the published
    reference = ["a green square", "a red circle", "a blue triangle", "a small house"]
    monkeypatch.setattr(lab_prompts, "own_reference_prompts", lambda model: reference)
    got = PRSS().constants(tiny_sd, SAMPLING)
    d = torch.stack([r.text_noise_norm for r in sample_prompts(tiny_sd, reference, SAMPLING, decode=False)]).double()
    assert got["lambda_ss"] == pytest.approx(float(np.percentile(d[:, :, 0].mean(1).numpy(), 95)))
    assert got["l_pr"] == pytest.approx(float(np.percentile(d.numpy(), 95)))
    assert got["M"] == pytest.approx(float(np.percentile(d.numpy(), 99.5))) and got["M"] > got["l_pr"]


def test_prss_rejects_bad_parameters(tiny_sd, tmp_path):
    with pytest.raises(ValueError, match="M=1.0: must be above l_pr"):
        run(tiny_sd, "prss-reanchor", {"l_pr": 2.0, "M": 1.0, "lambda_ss": 0.0})
    with pytest.raises(ValueError, match="paraphrases=.*no such file"):
        run(tiny_sd, "prss-reanchor", {"paraphrases": str(tmp_path / "missing.jsonl")})
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"prompt": "x", "paraphrases": "not a list"}\n')
    with pytest.raises(ValueError, match="line 1"):
        run(tiny_sd, "prss-reanchor", {"paraphrases": str(bad)})
    with pytest.raises(ValueError, match="guidance scale > 1"):
        run(tiny_sd, "prss-reanchor", {"l_pr": 0.1, "M": 1.0, "lambda_ss": 0.0},
            sampling=SamplingConfig(num_inference_steps=2, num_generations=1, guidance_scale=1.0))


# -- GNI ------------------------------------------------------------------------------------------

def test_gni_official_protocol_equals_a_hand_written_loop_with_per_image_noise_on_both_branches(tiny_sd):
    cfg = MitigationConfig(method="gni", params={"scale": 0.25}, seed=11)  # the default protocol: official
    res = mitigate_unit(tiny_sd, PROMPTS, [4, 5, 6], cfg, SAMPLING)
    G = SAMPLING.num_generations
    clean, empty = tiny_sd.encode_prompts(PROMPTS).embeddings, tiny_sd.empty_conditioning().embeddings[0]
    # the official pipeline, one image at a time: a fresh draw on the (uncond, cond) pair of every image
    c_rows, u_rows = [], []
    for j, p in enumerate([4, 5, 6]):
        gen = derived_generator(11, p, 1)
        for _ in range(G):
            u_rows.append(empty + 0.25 * torch.randn(empty.shape, generator=gen))
            c_rows.append(clean[j] + 0.25 * torch.randn(clean.shape[1:], generator=gen))
    c, u = Conditioning(torch.stack(c_rows)), Conditioning(torch.stack(u_rows))
    x = torch.cat([initial_noise(tiny_sd, G, SAMPLING.seed + p) for p in [4, 5, 6]])

    def loop(u):
        y = x
        with torch.no_grad():
            for t in schedule(tiny_sd, SAMPLING.num_inference_steps):
                y_in = tiny_sd.scheduler.scale_model_input(y, t)
                e_u, e_c = tiny_sd.predict_noise(torch.cat([y_in, y_in]), t, Conditioning.cat([u, c])).chunk(2)
                y = tiny_sd.scheduler.step(e_u + 7.5 * (e_c - e_u), t, y, return_dict=False)[0]
            return tiny_sd.decode(y)

    torch.testing.assert_close(images(res), loop(u), atol=1e-5, rtol=1e-5)
    for j, r in enumerate(res):
        torch.testing.assert_close(r.embedding, c.embeddings[j * G:(j + 1) * G])  # (G, T, D): one per image
        assert not torch.equal(r.embedding[0], r.embedding[1])  # a fresh draw per image
        assert r.info["protocol"] == "official" and r.info["sigma"] == 0.25
    # the unconditional branch is perturbed too: with it clean the images differ
    assert not torch.allclose(images(res), loop(tiny_sd.empty_conditioning().expand(len(x))), atol=1e-3)
    assert run(tiny_sd, "none")[0].unet_rows == run(tiny_sd, "gni")[0].unet_rows


def test_gni_per_prompt_protocol_keeps_one_draw_on_the_conditional_branch(tiny_sd):
    cfg = MitigationConfig(method="gni", params={"scale": 0.25, "protocol": "per-prompt"}, seed=11)
    res = mitigate_unit(tiny_sd, PROMPTS, [4, 5, 6], cfg, SAMPLING)
    clean = tiny_sd.encode_prompts(PROMPTS).embeddings
    for j, (r, p) in enumerate(zip(res, [4, 5, 6])):
        z = torch.randn(clean.shape[1:], generator=derived_generator(11, p, 0))
        torch.testing.assert_close(r.embedding, clean[j] + 0.25 * z)  # every position, the start token included
        assert r.info["sigma"] == 0.25  # SD (CLIP): the scale as it is
    direct = sample_unit(tiny_sd, PROMPTS, [4, 5, 6], SAMPLING, decode=True,
                         conditioning=Conditioning(torch.stack([r.embedding for r in res])))
    for r, s in zip(res, direct):
        torch.testing.assert_close(r.images, s.images)
        assert r.info["protocol"] == "per-prompt"
    assert run(tiny_sd, "none")[0].unet_rows == run(tiny_sd, "gni", {"protocol": "per-prompt"})[0].unet_rows


@pytest.mark.parametrize("protocol", ["official", "per-prompt"])
def test_gni_noise_depends_on_the_position_not_the_batch(tiny_sd, protocol):
    a = run(tiny_sd, "gni", {"scale": 0.5, "protocol": protocol}, prompts=[PROMPTS[0], PROMPTS[0]], positions=[0, 1])
    b = run(tiny_sd, "gni", {"scale": 0.5, "protocol": protocol}, prompts=[PROMPTS[1], PROMPTS[0]], positions=[3, 1])
    assert not torch.equal(a[0].embedding, a[1].embedding)  # same prompt, two positions: two draws
    assert torch.equal(a[1].embedding, b[1].embedding)  # same prompt and position in another unit: the same draw
    assert torch.equal(a[1].images, b[1].images)


def test_gni_off_is_unmitigated_sampling(tiny_sd):
    assert_off_is_unmitigated(tiny_sd, "gni", get_mitigation("gni").off)
    assert_off_is_unmitigated(tiny_sd, "gni", {**get_mitigation("gni").off, "protocol": "per-prompt"})
    sweep = get_mitigation("gni").sweep(tiny_sd, SAMPLING)
    assert [s["scale"] for s in sweep] == [0.05, 0.1, 0.25, 0.5]
    assert {s["protocol"] for s in sweep} == {"official"}  # named, so that the benchmark's table says which ran
    with pytest.raises(ValueError, match="scale"):
        MitigationConfig(method="gni", params={"scale": -1})
    with pytest.raises(ValueError, match="protocol"):
        MitigationConfig(method="gni", params={"protocol": "per-image"})


def test_gni_records_sigma_against_the_embedding_std_and_warns_when_far_off(tiny_sd, capsys):
    from diffmem.mitigations.gni import GaussianNoiseInjection

    std = float(tiny_sd.encode_prompts(PROMPTS).embeddings.double().std())
    res = run(tiny_sd, "gni", {"scale": 0.25})
    assert all(r.info["sigma_to_std"] == pytest.approx(0.25 / std) for r in res)
    assert "warning" not in capsys.readouterr().err
    method = GaussianNoiseInjection()
    emb = tiny_sd.encode_prompts(PROMPTS).embeddings
    for sigma, word in ((50 * std, "huge"), (std / 500, "tiny")):
        assert method.check_scale(tiny_sd, sigma, emb) == pytest.approx(sigma / std)
        method.check_scale(tiny_sd, sigma, emb)  # once per model and sigma
        err = capsys.readouterr().err.strip().splitlines()
        assert len(err) == 1 and err[0].startswith("warning: gni") and word in err[0]


def test_gni_scale_is_relative_to_the_embedding_std_off_clip(tiny_sd, monkeypatch):
    import diffmem.lab.prompts as lab_prompts
    from diffmem.mitigations.gni import GaussianNoiseInjection

    reference = ["a green square", "a red circle", "a blue triangle"]
    monkeypatch.setattr(lab_prompts, "own_reference_prompts", lambda model: reference)
    monkeypatch.setattr(tiny_sd, "family", "lab")
    std = float(tiny_sd.encode_prompts(reference).embeddings.double().std())
    assert GaussianNoiseInjection().sigma(tiny_sd, 0.1) == pytest.approx(0.1 * std)

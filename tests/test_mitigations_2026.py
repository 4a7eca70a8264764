"""GUARD and Broken Memories' mitigation against hand-written loops: GUARD as its official pipeline runs it
(three row groups in one UNet call, spikes attenuated with explicit bmm attention on the positive group,
its orthogonalization and cosine schedule), Broken Memories as the reimplementation's algorithm reads
(DDIM written out, x0_hat from diffusers' own scheduler step)."""

from __future__ import annotations

import math

import pytest
import torch

from diffmem.files import read_rows
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.sampling import SamplingConfig, initial_noise, schedule
from test_detectors_2026 import _hand_norms  # the DDIM loop that holds the detector's norms

PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square"]


def _unmitigated(model, sampling):
    return mitigate_unit(model, PROMPTS, [0, 1], MitigationConfig(method="none", seed=sampling.seed), sampling)


# -- GUARD ----------------------------------------------------------------------------------------

class _ReplicaAttention:
    """Cross-attention as the official GUARD processor computes it: heads folded into the batch, bmm
    logits, spikes found and scaled on the positive rows [n_u, n_u + n_p) only, softmax, bmm."""

    def __init__(self, n_u, n_p, tau, alpha):
        self.n_u, self.n_p, self.tau, self.alpha = n_u, n_p, tau, alpha

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, temb=None, **kw):
        q = attn.head_to_batch_dim(attn.to_q(hidden_states))
        k = attn.head_to_batch_dim(attn.to_k(encoder_hidden_states))
        v = attn.head_to_batch_dim(attn.to_v(encoder_hidden_states))
        scores = torch.bmm(q, k.transpose(1, 2)) * (1.0 / math.sqrt(q.shape[-1]))
        H = attn.heads
        lo, hi = self.n_u * H, (self.n_u + self.n_p) * H
        target = scores[lo:hi]
        token_max = target.max(dim=1).values
        content = token_max[:, 1:]
        z = (token_max - content.mean(dim=-1, keepdim=True)) / (content.std(dim=-1, keepdim=True) + 1e-6)
        spike = z > self.tau
        spike[:, 0] = False
        scores[lo:hi] = torch.where(spike.unsqueeze(1), target * self.alpha, target)
        out = attn.batch_to_head_dim(torch.bmm(scores.softmax(dim=-1), v))
        return attn.to_out[1](attn.to_out[0](out))


def _official_guard(model, prompt, seed, G, steps, s, r0, tau, alpha):
    """The official loop for one prompt: rows [uncond x G | positive x G | negative x G] in one UNet call."""
    unet = model.unet
    early = [n for n in unet.attn_processors if n.endswith("attn2.processor")
             and n.startswith(("down_blocks.", "mid_block."))]
    saved = unet.attn_processors
    unet.set_attn_processor({n: (_ReplicaAttention(G, G, tau, alpha) if n in early else p) for n, p in saved.items()})
    try:
        e_p = model.encode_prompts([prompt]).embeddings.expand(G, -1, -1)
        e_u = model.empty_conditioning().embeddings.expand(G, -1, -1)
        latents = initial_noise(model, G, seed)
        timesteps = schedule(model, steps)
        with torch.no_grad():
            for i, t in enumerate(timesteps):
                x_in = model.scheduler.scale_model_input(torch.cat([latents] * 3), t)
                out = unet(x_in, t, encoder_hidden_states=torch.cat([e_u, e_p, e_p])).sample
                u, pos, neg = out.split(G)
                v_gt, v_nb = neg - u, pos - u
                a, b = v_nb.float().reshape(G, -1), v_gt.float().reshape(G, -1)
                dot = (a * b).sum(1, keepdim=True)
                coef = (dot / ((b * b).sum(1, keepdim=True) + 1e-8)).clamp(-2.0, 2.0)
                cos = (dot / (torch.sqrt((a * a).sum(1, keepdim=True) + 1e-8)
                              * torch.sqrt((b * b).sum(1, keepdim=True) + 1e-8))).clamp(-1, 1)
                mask = (cos > 0.9).float().view(G, 1, 1, 1)
                v_eff = v_nb - mask * (coef.view(G, 1, 1, 1) * v_gt)
                w_neg = r0 * math.cos(i / len(timesteps) * math.pi / 2)
                latents = model.scheduler.step(u + s * v_eff - w_neg * v_gt, t, latents, eta=0.0).prev_sample
    finally:
        unet.set_attn_processor(saved)
    return model.decode(latents)


def test_guard_equals_a_replica_of_the_official_loop(tiny_sd):
    """Both prompts in one batch, each against the official loop alone from its own seed."""
    torch.set_num_threads(1)
    sampling = SamplingConfig(num_inference_steps=4, num_generations=2, batch_size=8, seed=5)
    params = {"r0": 2.0, "tau": 0.1, "alpha": 0.3}
    out = mitigate_unit(tiny_sd, PROMPTS, [0, 1], MitigationConfig(method="guard", seed=5, params=params), sampling)
    s = sampling.guidance(tiny_sd)
    for j, r in enumerate(out):
        expected = _official_guard(tiny_sd, PROMPTS[j], 5 + j, 2, 4, s, 2.0, 0.1, 0.3)
        torch.testing.assert_close(r.images, expected, atol=2e-4, rtol=0)
        assert r.info["guard_orthogonalized_steps"] == [4, 4]  # eps+ and eps- share the prompt: always parallel
    plain = _unmitigated(tiny_sd, sampling)
    assert out[0].unet_rows - plain[0].unet_rows == 2 * 4  # one extra row per generation and step


def test_guard_attenuation_changes_the_positive_branch_only_where_tokens_spike(tiny_sd):
    from diffmem.attention import spike_tokens

    logits = torch.zeros(1, 2, 3, 5)
    logits[0, 0, 1, 3] = 4.0  # head 0: token 3 stands out at one query
    logits[0, 1, :, 0] = 9.0  # head 1: only the start token, which never counts
    spikes = spike_tokens(logits, 1.0)
    assert spikes[0, 0].tolist() == [False, False, False, True, False]
    assert not spikes[0, 1].any()


def test_guard_off_reproduces_unmitigated_sampling_and_refuses_a_transformer(tiny_sd, tiny_pixart_folder):
    from diffmem.adapters import load_model
    from diffmem.mitigations import check_model, get_mitigation

    sampling = SamplingConfig(num_inference_steps=3, num_generations=1, batch_size=8, seed=2)
    off = mitigate_unit(tiny_sd, PROMPTS, [0, 1], MitigationConfig(method="guard", seed=2,
                                                                   params=get_mitigation("guard").off), sampling)
    for a, b in zip(off, _unmitigated(tiny_sd, sampling)):
        assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match=r"^--method guard: cannot run on pixart .*down and mid blocks"):
        check_model("guard", load_model(str(tiny_pixart_folder)))


# -- Broken Memories ------------------------------------------------------------------------------

def _rescale(v, target):
    n = v.flatten(1).double().norm(dim=1).clamp_min(1e-8)
    return v * (target / n).float().view(-1, 1, 1, 1)


def _project(v, lo, hi):
    n = v.flatten(1).double().norm(dim=1).clamp_min(1e-8)
    return v * (n.clamp(min=max(lo, 0.0), max=hi) / n).float().view(-1, 1, 1, 1)


def _official_broken_memories(model, prompt, seed, G, steps, w, mean, std, tau_mild, tau_strong, gamma, mild_steps):
    """The reimplementation's algorithm 2 (kind 0/1/2 per sample; correct while z_delta > tau_mild for strong
    samples, before `mild_steps` for mild ones), on DDIM written out."""
    from diffmem.sampling import predict_branches

    sch = model.scheduler
    x = initial_noise(model, G, seed)
    c, u = model.encode_prompts([prompt]).expand(G), model.empty_conditioning().expand(G)
    kind = torch.zeros(G, dtype=torch.long)
    timesteps = schedule(model, steps)
    with torch.no_grad():
        for k, t in enumerate(timesteps):
            e_c, e_u = predict_branches(model, x, t, c, u)
            res = sch.step(e_u + w * (e_c - e_u), t, x)
            prop, x0 = res.prev_sample, res.pred_original_sample
            prev = int(t) - sch.config.num_train_timesteps // sch.num_inference_steps
            a_next = sch.alphas_cumprod[prev] if prev >= 0 else sch.final_alpha_cumprod
            n = lambda v: v.flatten(1).double().norm(dim=1)
            z_d = ((n(prop - x) - mean[k, 1]) / std[k, 1]).abs()
            z_0 = ((n(x0) - mean[k, 2]) / std[k, 2]).abs()
            for g in range(G):
                if kind[g] == 0 and z_d[g] > tau_mild and z_0[g] > tau_mild:
                    kind[g] = 2 if z_0[g] > tau_strong else 1
            for g in range(G):
                if not (z_d[g] > tau_mild and (kind[g] == 2 or (kind[g] == 1 and k < mild_steps))):
                    continue
                fixed = prop[g:g + 1] + a_next.sqrt() * (_rescale(x0[g:g + 1], mean[k, 2]) - x0[g:g + 1])
                if kind[g] == 2:
                    fixed = x[g:g + 1] + _project(fixed - x[g:g + 1], float(mean[k, 1] - gamma * std[k, 1]),
                                                  float(mean[k, 1] + gamma * std[k, 1]))
                prop[g:g + 1] = _project(fixed, float(mean[k, 0] - gamma * std[k, 0]), float(mean[k, 0] + gamma * std[k, 0]))
            x = prop
    return model.decode(x), kind


def test_broken_memories_mitigation_equals_the_algorithm_written_out(tiny_sd, tmp_path):
    """Thresholds low enough on the tiny model that mild and strong flags both occur and corrections act."""
    torch.set_num_threads(1)
    reference = ["a cat on a mat", "two dogs", "the red barn at dawn", "a bowl of fruit", "snow on a hill"]
    (tmp_path / "ref.txt").write_text("\n".join(reference) + "\n")
    sampling = SamplingConfig(num_inference_steps=5, num_generations=3, batch_size=8, seed=11)
    w = sampling.guidance(tiny_sd)
    ref = _hand_norms(tiny_sd, reference, 11, 5, w)  # the calibration's generations: seeds from the run's seed
    mean, std = ref.mean(0), ref.std(0).clamp_min(1e-5)
    params = {"tau_mild": 0.3, "tau_strong": 1.0, "gamma": 0.5, "mild_steps": 2, "reference_prompts": str(tmp_path / "ref.txt")}
    out = mitigate_unit(tiny_sd, PROMPTS, [0, 1], MitigationConfig(method="broken-memories", seed=11, params=params),
                        sampling)
    kinds = []
    for j, r in enumerate(out):
        images, kind = _official_broken_memories(tiny_sd, PROMPTS[j], 11 + j, 3, 5, w, mean, std, 0.3, 1.0, 0.5, 2)
        torch.testing.assert_close(r.images, images, atol=1e-4, rtol=0)
        assert r.info["broken_memories_flag"] == [("none", "mild", "strong")[k] for k in kind.tolist()]
        kinds += kind.tolist()
    assert {1, 2} <= set(kinds), kinds  # mild and strong flags both exercised
    assert sum(sum(r.info["broken_memories_corrected_steps"]) for r in out) > 0
    plain = _unmitigated(tiny_sd, sampling)
    assert any(not torch.allclose(a.images, b.images, atol=1e-3) for a, b in zip(out, plain))


def test_broken_memories_off_and_its_refusal_without_reference_prompts(tiny_sd):
    from diffmem.mitigations import get_mitigation

    sampling = SamplingConfig(num_inference_steps=3, num_generations=1, batch_size=8, seed=2)
    off = mitigate_unit(tiny_sd, PROMPTS, [0, 1], MitigationConfig(
        method="broken-memories", seed=2, params=get_mitigation("broken-memories").off), sampling)
    for a, b in zip(off, _unmitigated(tiny_sd, sampling)):
        assert torch.equal(a.images, b.images)
    with pytest.raises(ValueError, match=r"^--method broken-memories cannot run on stable-diffusion .*reference_prompts=FILE\)$"):
        mitigate_unit(tiny_sd, PROMPTS, [0, 1], MitigationConfig(method="broken-memories", seed=2), sampling)


def test_broken_memories_signal_coefficient_on_a_flow_model_is_one_minus_the_next_sigma(tiny_sd3_folder):
    """The scheduler's own Euler step splits as x_next = c x0_hat + (1 - c) eps_hat, with x0_hat = x - sigma v and
    eps_hat = x + (1 - sigma) v: c is the clean part's coefficient the correction moves x0_hat with."""
    from diffmem.adapters import load_model
    from diffmem.mitigations.broken_memories import signal_coefficient

    model = load_model(str(tiny_sd3_folder))
    timesteps = schedule(model, 4)
    gen = torch.Generator().manual_seed(0)
    for k, t in enumerate(timesteps):
        sigma = float(model.scheduler.sigmas[k])
        x, v = torch.randn(1, 4, 4, 4, generator=gen), torch.randn(1, 4, 4, 4, generator=gen)
        nxt = model.scheduler.step(v, t, x, return_dict=False)[0]
        c = signal_coefficient(model, timesteps, k)
        torch.testing.assert_close(nxt, c * (x - sigma * v) + (1 - c) * (x + (1 - sigma) * v), atol=1e-5, rtol=0)
    assert signal_coefficient(model, timesteps, 3) == 1.0  # the last step lands on the clean latent



# -- the DoRI attack on a mitigated model ----------------------------------------------------------

def test_dori_under_a_mitigation_attacks_the_edited_model_then_samples_with_it(tiny_sd):
    """ren-attention's edits are in place both while the attack optimizes and while sampling from its embedding."""
    from diffmem.dori import DoriConfig, dori_attack
    from diffmem.mitigations.ren_attention import padding_mask, prompt_lengths, ren_edits
    from diffmem.sampling import sample_unit

    torch.set_num_threads(1)
    sampling = SamplingConfig(num_inference_steps=3, num_generations=2, batch_size=8, seed=4)
    training = [torch.rand(1, 3, 32, 32, generator=torch.Generator().manual_seed(i)) for i in range(2)]
    config = MitigationConfig(method="ren-attention", seed=4, dori_steps=2)
    out = mitigate_unit(tiny_sd, PROMPTS, [0, 1], config, sampling, training=training)
    T = tiny_sd.encode_prompts(PROMPTS).embeddings.shape[1]
    for j, r in enumerate(out):
        L = prompt_lengths(tiny_sd, [PROMPTS[j]])
        with ren_edits(tiny_sd, 1.25, padding_mask(L, T, 8)):  # the attack: 8 rows a call, unconditional rows first
            x0 = tiny_sd.encode_images(training[j] * 2 - 1, generator=torch.Generator().manual_seed(4 + j))
            attack, _ = dori_attack(tiny_sd, x0, tiny_sd.encode_prompts([PROMPTS[j]]), DoriConfig(steps=2, seed=4 + j),
                                    uncond=tiny_sd.empty_conditioning().expand(8))
        with ren_edits(tiny_sd, 1.25, padding_mask(L, T, 2)):
            (expected,) = sample_unit(tiny_sd, [PROMPTS[j]], [j], sampling, decode=True, conditioning=attack)
        torch.testing.assert_close(r.images, expected.images, atol=1e-5, rtol=0)
        assert torch.allclose(r.embedding, attack.embeddings[0])
    with pytest.raises(ValueError, match="training image"):
        mitigate_unit(tiny_sd, PROMPTS, [0, 1], config, sampling)
    with pytest.raises(ValueError, match="--method rand-word-add: the DoRI attack tests mitigations that change the model"):
        MitigationConfig(method="rand-word-add", dori_steps=2)


def test_bench_mitigate_resume_adds_methods_and_the_dori_runs(tiny_sd_folder, tmp_path, capsys):
    import json

    import numpy as np
    from PIL import Image

    from diffmem.cli.main import main

    pairs = tmp_path / "pairs"
    pairs.mkdir()
    for i, (rgb, caption) in enumerate([((255, 0, 0), "a red thing"), ((0, 0, 255), "a blue thing")]):
        Image.fromarray(np.full((32, 32, 3), rgb, np.uint8)).save(pairs / f"{i:08d}.png")
        (pairs / f"{i:08d}.txt").write_text(caption + "\n")
    out = tmp_path / "bench"
    fast = ["--model", str(tiny_sd_folder), "--dataset", str(pairs), "--num-generations", "1", "--num-inference-steps",
            "2", "--batch-size", "4", "--copy-threshold", "0.9", "--no-progress", "--out", str(out)]
    assert main(["bench", "mitigate", "--methods", "rand-word-add", *fast]) == 0
    before = json.loads((out / "plan.json").read_text())["methods"]
    none_rows = (out / "none" / "per_prompt.jsonl").read_text()
    assert main(["bench", "mitigate", "--methods", "rand-word-add,ren-attention", "--dori", "1", "--resume", *fast]) == 0
    plan = json.loads((out / "plan.json").read_text())["methods"]
    assert [e["method"] for e in plan] == ["none", "rand-word-add", "ren-attention"]
    assert plan[1] == before[1]  # a prompt-changing method is not attacked
    assert plan[0]["dori_folder"] == "none/dori" and "published_folder" not in plan[0]
    assert plan[2]["published_folder"] == "ren-attention/published"  # its sweep lacks the published default
    assert (out / "none" / "per_prompt.jsonl").read_text() == none_rows  # finished work is kept
    results = json.loads((out / "results.json").read_text())
    dori = {r["method"]: r for r in results["dori"]}
    assert set(dori) == {"none", "ren-attention"} and all(r["dori_steps"] == 1 for r in dori.values())
    for r in dori.values():
        assert r["copy_rate_prompts"] is not None and r["copy_rate_dori"] is not None
    rows = read_rows(out / "ren-attention" / "dori" / "per_prompt.jsonl")
    assert {r["setting"] for r in rows} == {"default,dori=1"}
    assert "| ren-attention | default |" in (out / "table.md").read_text().split("Under the DoRI attack")[1]
    capsys.readouterr()
    assert main(["bench", "mitigate", "--methods", "rand-word-add", "--resume", *fast[:-3], "--num-generations", "2",
                 "--no-progress", "--out", str(out)]) != 0  # other settings still cannot resume it
    assert "cannot resume" in capsys.readouterr().err

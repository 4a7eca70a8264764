"""Mitigations inside the UNet: Ren et al.'s attention edit (``ren-attention``) and NeMo's value-neuron
deactivation (``nemo``), on the tiny random SD and the fast lab."""

from __future__ import annotations

import copy
import math
import weakref
from types import SimpleNamespace

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from diffmem.attention import CrossAttentionRecorder, cross_attention_layers
from diffmem.detectors.common import end_token_index
from diffmem.detectors.nemo import max_pairwise_similarity, scaled_noise_difference
from diffmem.mitigate import MitigationConfig, mitigate_unit
from diffmem.mitigations import get_mitigation, make_params
from diffmem.mitigations.nemo import ValueChannelMask, check_noise, layer_masks, ordinary_captions, value_layers
from diffmem.sampling import SamplingConfig, initial_noise, sample_unit

SHORT, LONG = "a cat", "the red barn at dawn on a hill"  # different token lengths on both tokenizers


def _plan(model, method, prompts, G, **params):
    unit = SimpleNamespace(prompts=prompts, cond=model.encode_prompts(prompts), num_generations=G)
    return get_mitigation(method).plan(model, unit, make_params(method, params))


def _same(a, b):
    return all(torch.equal(x.images, y.images) and torch.equal(x.text_noise_norm, y.text_noise_norm)
               for x, y in zip(a, b))


# -- ren-attention ---------------------------------------------------------------------------------

def test_ren_edit_is_the_softmax_of_scaled_bos_and_masked_padding(tiny_sd):
    prompts, G, c1 = [SHORT, LONG], 2, 1.25
    lengths = [end_token_index(tiny_sd, p) + 1 for p in prompts]
    assert lengths[0] < lengths[1] < tiny_sd.max_tokens
    plan = _plan(tiny_sd, "ren-attention", prompts, G, c1=c1)
    layers = cross_attention_layers(tiny_sd)
    calls = {n: [] for n in layers}
    hooks = []
    for name in layers:
        module = tiny_sd.unet.get_submodule(name[:-len(".processor")])
        hooks.append(module.register_forward_hook(
            lambda mod, args, kwargs, out, name=name: calls[name].append(
                (mod, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"], out)),
            with_kwargs=True))
    cfg = SamplingConfig(num_inference_steps=2, num_generations=G, seed=3, batch_size=4)  # 2 UNet calls per step
    try:
        with plan.context(), CrossAttentionRecorder(tiny_sd, steps={0}) as rec:
            sample_unit(tiny_sd, prompts, [0, 1], cfg, recorders=[rec])
    finally:
        for h in hooks:
            h.remove()
    L = torch.tensor(lengths).repeat_interleave(G)  # pass rows, prompt-major
    for name in layers:
        probs, unedited = [], []
        for call, (mod, hs, ehs, out) in enumerate(calls[name][:2]):  # step 0's two calls: pass rows 2c, 2c + 1
            B, H, T = hs.shape[0], mod.heads, ehs.shape[1]
            with torch.no_grad():
                q, k, v = (x.reshape(B, x.shape[1], H, -1).permute(0, 2, 1, 3)
                           for x in (mod.to_q(hs), mod.to_k(ehs), mod.to_v(ehs)))
            logits = q @ k.transpose(-1, -2) / math.sqrt(q.shape[-1])  # (B, heads, HW, T)
            rows_L = L[2 * call:2 * call + 2].repeat(2)  # [uncond rows, cond rows] of the same prompts
            edited = logits.clone()
            edited[B // 2:, ..., 0] *= c1  # conditional rows: BOS logit times c1
            edited = edited.masked_fill(torch.arange(T)[None, None, None, :] >= rows_L[:, None, None, None],
                                        float("-inf"))  # padding masked on both halves
            p = edited.softmax(-1)
            probs.append(p[B // 2:])
            unedited.append(logits.softmax(-1)[B // 2:])
            with torch.no_grad():  # the layer's whole output, unconditional rows included
                expected = mod.to_out[0]((p @ v).permute(0, 2, 1, 3).reshape(B, hs.shape[1], -1))
            torch.testing.assert_close(out, expected, rtol=0, atol=1e-5)
        probs, unedited = torch.cat(probs), torch.cat(unedited)
        got = rec.maps[0][name]
        torch.testing.assert_close(got, probs, rtol=0, atol=1e-5)
        for r in range(len(L)):
            assert torch.count_nonzero(got[r, ..., L[r]:]) == 0 and got[r, ..., :L[r]].min() > 0
        assert (got - unedited).abs().max() > 1e-3  # it changed the probabilities


def test_ren_off_reproduces_unmitigated_sampling_and_the_default_changes_it(tiny_sd):
    cfg = SamplingConfig(num_inference_steps=3, num_generations=2, seed=7)
    none = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], MitigationConfig(method="none"), cfg)
    off = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1],
                        MitigationConfig(method="ren-attention", params=get_mitigation("ren-attention").off), cfg)
    assert _same(none, off)
    for params in ({}, {"mask_padding": False}, {"c1": 1.0}):
        on = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], MitigationConfig(method="ren-attention", params=params), cfg)
        assert all((a.images - b.images).abs().max() > 1e-4 for a, b in zip(none, on))
        assert all(r.unet_rows == n.unet_rows for r, n in zip(on, none))  # no extra rows


@pytest.mark.parametrize("model_name", ["tiny_sd", "fast_lab"])
def test_ren_in_batch_equals_each_prompt_alone(model_name, request):
    model = request.getfixturevalue(model_name)
    cfg = SamplingConfig(num_inference_steps=3, num_generations=2, seed=5, batch_size=4)
    config = MitigationConfig(method="ren-attention", params={"c1": 1.5})
    both = mitigate_unit(model, [SHORT, LONG], [0, 1], config, cfg)
    lengths = [r.info["ren_prompt_length"] for r in both]
    assert lengths == [end_token_index(model, p) + 1 for p in (SHORT, LONG)] and lengths[0] < lengths[1]
    for j, p in enumerate((SHORT, LONG)):  # each row got its own prompt's mask
        alone = mitigate_unit(model, [p], [j], config, cfg)[0]
        torch.testing.assert_close(both[j].images, alone.images, rtol=0, atol=1e-5)


def test_ren_refuses_a_bad_c1():
    with pytest.raises(ValueError, match="c1"):
        MitigationConfig(method="ren-attention", params={"c1": -1.0})


# -- nemo -----------------------------------------------------------------------------------------

@pytest.mark.parametrize("rows", ["all", "cond"])
def test_value_mask_zeros_exactly_the_chosen_channels_of_the_chosen_rows(tiny_sd, rows):
    layers = value_layers(tiny_sd)
    assert layers == ["down_blocks.1.attentions.0.transformer_blocks.0.attn2",
                      "mid_block.attentions.0.transformer_blocks.0.attn2"]
    blocked = [[[1, 5], []], [[0], [2, 3]]]  # prompt -> layer -> channels
    G = 2
    masks = layer_masks(tiny_sd, layers, blocked, G)
    seen = {n: [] for n in layers}
    cfg = SamplingConfig(num_inference_steps=2, num_generations=G, seed=1, batch_size=4)
    with ValueChannelMask(tiny_sd, masks, layout="pass", rows=rows):
        hooks = [tiny_sd.unet.get_submodule(n).to_v.register_forward_hook(  # runs after the mask's hook
            lambda mod, args, out, n=n: seen[n].append((mod, args[0], out.clone()))) for n in layers]
        try:
            sample_unit(tiny_sd, [SHORT, LONG], [0, 1], cfg)
        finally:
            for h in hooks:
                h.remove()
    for j, name in enumerate(layers):
        assert len(seen[name]) == 4  # 2 steps x 2 calls, call c = pass rows 2c, 2c + 1 = prompt c
        for call, (mod, x, out) in enumerate(seen[name]):
            prompt = call % 2
            plain = F.linear(x, mod.weight, mod.bias)  # to_v's output without the hook
            chosen = blocked[prompt][j]
            zero = torch.zeros(out.shape[0], out.shape[-1], dtype=torch.bool)
            zero[out.shape[0] // 2:, chosen] = True  # conditional rows
            if rows == "all":
                zero[:out.shape[0] // 2, chosen] = True
            assert torch.equal(out, plain.masked_fill(zero[:, None, :], 0.0))
            assert torch.count_nonzero(plain[..., chosen]) == plain[..., chosen].numel()  # zeroed, not zero already
    # outside the context nothing is hooked
    assert all(not tiny_sd.unet.get_submodule(n).to_v._forward_hooks for n in layers)


def test_nemo_off_reproduces_unmitigated_sampling(tiny_sd):
    cfg = SamplingConfig(num_inference_steps=3, num_generations=2, seed=7)
    none = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], MitigationConfig(method="none"), cfg)
    config = MitigationConfig(method="nemo", params=get_mitigation("nemo").off)
    off = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], config, cfg)
    assert _same(none, off)
    assert [r.info["nemo_neurons"] for r in off] == [0, 0]
    assert all(r.unet_rows == n.unet_rows for r, n in zip(off, none))  # nothing localized, no extra rows


def test_nemo_blocks_per_prompt_in_batch_on_tiny_sd(tiny_sd, tmp_path):
    """A threshold below any SSIM makes every prompt 'memorized': the whole search and pruning run, and
    each prompt in the batch is sampled exactly as alone with its own channels off."""
    stats = tmp_path / "ordinary.txt"
    stats.write_text("a photo of a dog\nblue sky over the sea\ntwo chairs\na bowl of fruit on a table\nrain\n")
    cfg = SamplingConfig(num_inference_steps=3, num_generations=2, seed=7, batch_size=4)
    config = MitigationConfig(method="nemo", params={"threshold": -1.0, "num_seeds": 3, "prune_checks": 4,
                                                    "stats_prompts": str(stats)})
    both = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], config, cfg)
    none = mitigate_unit(tiny_sd, [SHORT, LONG], [0, 1], MitigationConfig(method="none"), cfg)
    # never under a threshold of -1: the official loop stops when k reaches the widest layer (8 channels
    # here; 1280 on SD), after theta 5 -> 3.25 with k 0 -> 7
    assert all(r.iterations == 8 for r in both)
    assert all(r.info["nemo_search"][-1][:2] == [3.25, 7] for r in both)
    assert all(r.info["nemo_statistics"] == f"file {stats}, 5 prompts" for r in both)
    assert all(r.info["nemo_neurons"] == sum(map(len, r.info["nemo_blocked"].values())) > 0 for r in both)
    for j, p in enumerate((SHORT, LONG)):
        alone = mitigate_unit(tiny_sd, [p], [j], config, cfg)[0]
        assert alone.info["nemo_blocked"] == both[j].info["nemo_blocked"]
        torch.testing.assert_close(both[j].images, alone.images, rtol=0, atol=1e-5)
        assert (both[j].images - none[j].images).abs().max() > 1e-5


def test_nemo_refuses_bad_parameters():
    for bad in ({"num_seeds": 1}, {"check": "original"}, {"rows": "uncond"}, {"max_neurons": -1},
                {"theta_min": 0.5}, {"ssim_convention": "skimage"}, {"search_threshold": "high"}):
        with pytest.raises(ValueError, match=next(iter(bad))):
            MitigationConfig(method="nemo", params=bad)


def test_nemo_selection_does_not_depend_on_the_prompts_beside_it(tiny_sd):
    """The z-score statistics come from diffmem's own ordinary captions, never from the unit: a prompt
    gets the same neurons alone (a unit of one prompt works) and beside any other prompts."""
    params = {"threshold": 0.02, "num_seeds": 4}  # every prompt memorized on tiny_sd: search and refinement run
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, seed=3, batch_size=4)

    def run(prompts, positions):
        out = mitigate_unit(tiny_sd, prompts, positions, MitigationConfig(method="nemo", params=params), cfg,
                            decode=False)
        return {r.position: r.info for r in out}

    alone = run([LONG], [5])[5]
    assert alone["nemo_neurons"] > 0
    assert alone["nemo_statistics"] == "diffmem's ordinary_captions.txt, 200 prompts"
    for prompts, positions in (([LONG, SHORT], [5, 6]), (["two chairs", LONG, "rain on a roof"], [7, 5, 8])):
        beside = run(prompts, positions)[5]
        assert beside["nemo_blocked"] == alone["nemo_blocked"]
        np.testing.assert_allclose(beside["nemo_search"], alone["nemo_search"], rtol=0, atol=1e-6)


# -- a replica of the official selection (3_detect_memorized_neurons.py, utils/activation_detection.py) --

_STATISTICS = weakref.WeakKeyDictionary()


def _official_statistics(model):
    """``1_compute_activations_statistics.py`` on diffmem's ordinary captions: each prompt alone, the mean
    over its tokens of |to_v(text embedding)| per layer; then per channel the mean and unbiased std."""
    if model not in _STATISTICS:
        layers = [model.unet.get_submodule(n) for n in value_layers(model)]
        collected = [[] for _ in layers]
        with torch.no_grad():
            for p in ordinary_captions():
                emb = model.encode_prompts([p]).embeddings
                for l, attn in enumerate(layers):
                    collected[l].append(attn.to_v(emb)[0].abs().mean(dim=0))
        _STATISTICS[model] = ([torch.stack(c).mean(dim=0) for c in collected],
                                  [torch.stack(c).std(dim=0) for c in collected])
    return _STATISTICS[model]


def _official_nemo(model, prompt, position, seed, S, t, threshold, search_threshold, theta_min):
    """NeMo's localization of one prompt written out as the official code does it, step for step:
    the statistics of ``_official_statistics``, the prompt's activations collected by hooks on ``to_v``
    during a UNet call (``collect_activations``), blocking by hooks that multiply the chosen outputs
    by 0 (``RescaleLinearActivations``), noise differences min-max scaled per channel
    (``compute_noise_diff``), the seeds looked at from the per-seed largest pairwise SSIM
    (``calculate_max_pairwise_ssim``), the ``while ssim > threshold`` loop with its theta / k updates
    and its ``if theta == 1 or k >= 1280`` stop, and ``neuron_refinement`` (whole layers, then each
    listed neuron, each kept off unless the check stays strictly under the threshold; every check
    recomputed). Differences from the official, as diffmem documents them: the check noises come
    from ``check_noise`` (the official: one seed for all prompts), single-scale SSIM with sigma 1
    (latents of 16 pixels), and k's limit is the widest layer's width (1280 on SD)."""
    from diffmem.similarity import ssim

    layers = [model.unet.get_submodule(n) for n in value_layers(model)]
    width = max(a.to_v.out_features for a in layers)
    mean_list, std_list = _official_statistics(model)
    cond = model.encode_prompts([prompt])
    x = check_noise(model, seed, position, S)

    def noise_diff(blocked_indices=None, activations=None):
        hooks = []
        for l, attn in enumerate(layers):
            def hook(mod, args, out, l=l):
                if activations is not None:
                    activations[l] = out
                if blocked_indices:
                    out = out.clone()
                    out[:, :, blocked_indices[l]] *= 0.0
                return out
            hooks.append(attn.to_v.register_forward_hook(hook))
        try:
            with torch.no_grad():
                eps = model.predict_noise(model.scheduler.scale_model_input(x, t), t, cond.repeat_interleave(S))
        finally:
            for h in hooks:
                h.remove()
        diff = (eps - x).double()
        lo, hi = diff.amin(dim=[2, 3], keepdim=True), diff.amax(dim=[2, 3], keepdim=True)
        return (diff - lo) / (hi - lo)

    outputs = [None] * len(layers)
    unblocked = noise_diff(activations=outputs)
    activations_list = [o[0].abs().mean(dim=0) for o in outputs]  # the prompt's first sample, as the official
    pairs = torch.combinations(torch.arange(S), r=2)
    pairwise = ssim(unblocked[pairs[:, 0]], unblocked[pairs[:, 1]], sigma=1.0)
    max_ssims = torch.stack([pairwise[(pairs == i).any(-1)].max() for i in range(S)])
    look = max_ssims > threshold
    unblocked = unblocked[look]
    assert look.any(), "the test wants a memorized prompt"

    def check(blocked_indices):
        return float(ssim(unblocked, noise_diff(blocked_indices)[look], sigma=1.0).max())

    ssim_value, theta, k, rounds = 1.0, 5.0, 0, 0
    refinement_threshold = search_threshold
    while ssim_value > search_threshold:
        blocking_indices = []
        for l in range(len(layers)):
            diff = (activations_list[l] - mean_list[l]).abs() / std_list[l]
            indices = (diff > theta).nonzero().flatten().tolist()
            indices += activations_list[l].abs().topk(k=min(k, len(mean_list[l]))).indices.tolist()
            blocking_indices.append(indices)
        ssim_value = check(blocking_indices)
        rounds += 1
        last_theta = theta
        if ssim_value > search_threshold:
            if theta > theta_min:
                theta -= 0.25
            k += 1
        if theta == 1 or k >= width:
            refinement_threshold = ssim_value
            break
    blocking = copy.deepcopy(blocking_indices)
    for l in reversed(range(len(blocking))):
        if blocking[l]:
            current = copy.deepcopy(blocking)
            current[l] = []
            if check(current) < refinement_threshold:
                blocking[l] = []
    for l in reversed(range(len(blocking))):
        for neuron in copy.deepcopy(blocking[l]):
            current = copy.deepcopy(blocking)
            current[l].remove(neuron)
            if check(current) < refinement_threshold:
                blocking[l].remove(neuron)
    return [sorted(set(b)) for b in blocking], rounds, last_theta


@pytest.fixture(scope="module")
def wide_sd(tmp_path_factory):
    """tiny SD with 24 value channels per layer (k stays under the width until theta reaches 1)."""
    from diffmem.adapters import load_model
    from diffmem.testing import make_tiny_sd_folder

    return load_model(str(make_tiny_sd_folder(tmp_path_factory.mktemp("wide_sd") / "model", unet_channels=(4, 24))))


@pytest.mark.parametrize("theta_min", [1.0, 4.0])
def test_nemo_selects_the_neurons_of_a_replica_of_the_official_code(wide_sd, theta_min):
    from diffmem.detectors.nemo import scaled_noise_difference
    from diffmem.mitigations.nemo import per_seed_max_similarity

    torch.set_num_threads(1)
    model, S, seed = wide_sd, 4, 3
    prompts, positions = [LONG, SHORT], [0, 1]
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, seed=seed, batch_size=S)  # one prompt a call
    t = torch.tensor(961)  # NeMo's check timestep: tiny SD has SD 1.x's noise schedule
    # a seed threshold under which some seeds are looked at and others not
    cond = model.encode_prompts(prompts)
    with torch.no_grad():
        per_seed = []
        for j, pos in enumerate(positions):
            x = check_noise(model, seed, pos, S)
            eps = model.predict_noise(model.scheduler.scale_model_input(x, t), t, cond[[j] * S])
            per_seed.append(per_seed_max_similarity(scaled_noise_difference(eps, x)))
    threshold = float(min(s.median() for s in per_seed)) - 1e-6

    def compare(search_threshold):
        params = {"threshold": threshold, "search_threshold": search_threshold, "num_seeds": S, "theta_min": theta_min}
        got = mitigate_unit(model, prompts, positions, MitigationConfig(method="nemo", seed=seed, params=params), cfg,
                            decode=False)
        for r, p, pos in zip(got, prompts, positions):
            blocked, rounds, theta = _official_nemo(model, p, pos, seed, S, t, threshold, search_threshold, theta_min)
            assert r.info["nemo_timestep"] == 961
            assert (r.iterations, r.info["nemo_theta"]) == (rounds, theta)
            assert [r.info["nemo_blocked"].get(n, []) for n in value_layers(model)] == blocked
        assert any(r.info["nemo_seeds_flagged"] < S for r in got)
        return got

    # never passed: theta 5 -> 1.25 with k 0 -> 15 (theta = 1 is never checked); with a floor of 4 theta
    # stays there and k grows to the widest layer's 24
    never = compare(-1.0)
    assert all(r.iterations == (16 if theta_min == 1.0 else 24) for r in never)
    # passed in the middle of the search by some prompt: its refinement is held to the threshold itself
    checks = sorted(v for r in never for *_, v in r.info["nemo_search"][1:])
    middle = checks[len(checks) // 2]
    got = compare(middle)
    assert any(r.info["nemo_refinement_threshold"] == middle and r.iterations < 16 for r in got)


def _nemo_ssim(model, prompt, x, t, masks=None):
    """NeMo-SSIM of one prompt at x (G, C, H, W) and t, with optional per-row channel masks (layout 'rows')."""
    cond = model.encode_prompts([prompt]).repeat_interleave(len(x))
    with torch.no_grad(), ValueChannelMask(model, masks or {}, layout="rows"):
        eps = model.predict_noise(model.scheduler.scale_model_input(x, t), t, cond)
    return max_pairwise_similarity(scaled_noise_difference(eps, x))


def test_nemo_localizes_neurons_of_a_memorized_lab_prompt_and_lowers_its_nemo_ssim(fast_lab):
    from diffmem.eval_sets import load_eval_set

    memorized = load_eval_set(fast_lab, None).prompts[0].caption
    novel = fast_lab.training_data().prompt_set("novel")[-1].caption  # not among the reference prompts
    cfg = SamplingConfig(num_inference_steps=10, num_generations=2, seed=0)
    res = mitigate_unit(fast_lab, [memorized, novel], [0, 1], MitigationConfig(method="nemo"), cfg)
    none = mitigate_unit(fast_lab, [memorized, novel], [0, 1], MitigationConfig(method="none"), cfg)
    mem, nov = res[0].info, res[1].info
    assert 650 <= mem["nemo_timestep"] <= 750  # SD's signal level at t = 961, on the lab's linear schedule
    assert mem["nemo_ssim_initial"] > mem["nemo_threshold"] >= nov["nemo_ssim_initial"]
    assert mem["nemo_neurons"] > 0 and res[0].iterations >= 1
    assert mem["nemo_check_final"] <= mem["nemo_refinement_threshold"]  # blocked z moved away from the unblocked
    assert mem["nemo_statistics"].startswith("the lab's reference prompts")
    assert nov["nemo_neurons"] == 0 and res[1].iterations == 0  # not memorized: nothing blocked
    assert all(r.unet_rows > n.unet_rows for r, n in zip(res, none))  # the localization's checks
    # independently: the seed contract's own x_T, the blocked channels off -> lower NeMo-SSIM
    layers = value_layers(fast_lab)
    blocked = [[mem["nemo_blocked"].get(n, []) for n in layers]]
    x = initial_noise(fast_lab, 6, 0)
    t = torch.tensor(mem["nemo_timestep"])
    before = _nemo_ssim(fast_lab, memorized, x, t)
    after = _nemo_ssim(fast_lab, memorized, x, t, layer_masks(fast_lab, layers, blocked, len(x)))
    assert after < before
    assert (res[0].images - none[0].images).abs().max() > 1e-3
    torch.testing.assert_close(res[1].images, none[1].images, rtol=0, atol=1e-6)  # its rows untouched

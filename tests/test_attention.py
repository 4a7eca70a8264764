"""Cross-attention recording and editing through the tracked pass (diffmem.attention)."""

import math

import pytest
import torch

from diffmem.attention import (AttentionEdit, CrossAttentionProcessor, CrossAttentionRecorder, attention_edit,
                               cross_attention_layers, select_layers)
from diffmem.sampling import SamplingConfig, sample_prompts, sample_unit

torch.set_num_threads(1)

PROMPTS = ["a red cat on a mat", "the velvet harbor: a blue square", "an astronaut riding a horse"]
# one UNet call per prompt and step ([uncond; cond], G rows each), as the pipeline makes
CFG = SamplingConfig(num_inference_steps=6, guidance_scale=7.5, num_generations=3, seed=11, batch_size=6)


def _processors(model):
    return dict(model.unet.attn_processors)


def test_recording_and_identity_edit_keep_pipeline_latents(tiny_sd, tiny_sd_folder):
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(tiny_sd_folder, safety_checker=None, requires_safety_checker=False)
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    refs = [pipe(p, num_inference_steps=6, guidance_scale=7.5, num_images_per_prompt=3,
                 generator=torch.Generator("cpu").manual_seed(11 + i), output_type="latent").images
            for i, p in enumerate(PROMPTS)]
    before = _processors(tiny_sd)
    layers = cross_attention_layers(tiny_sd)
    with CrossAttentionRecorder(tiny_sd) as rec:  # every cross-attention layer, every step
        recorded = sample_unit(tiny_sd, PROMPTS, [0, 1, 2], CFG, recorders=[rec])
    with attention_edit(tiny_sd, AttentionEdit(token=0, scale=1.0)):
        assert all(isinstance(tiny_sd.unet.attn_processors[n], CrossAttentionProcessor) for n in layers)
        edited = sample_prompts(tiny_sd, PROMPTS, CFG, decode=False)
    for i, ref in enumerate(refs):
        assert (ref - recorded[i].latents).abs().max().item() <= 1e-5
        assert (ref - edited[i].latents).abs().max().item() <= 1e-5
    assert sorted(rec.maps) == list(range(6)) and all(sorted(m) == sorted(layers) for m in rec.maps.values())
    for name in layers:
        info = rec.layer_info[name]
        h, w = info.resolution
        assert rec.maps[0][name].shape == (9, info.heads, h * w, info.tokens)
    assert rec.layer_info[layers[0]].block == "down_blocks.1" and rec.layer_info[layers[0]].resolution == (8, 8)
    after = _processors(tiny_sd)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)


def test_recorded_probabilities_equal_softmax_of_the_layer_projections(tiny_sd):
    layers = cross_attention_layers(tiny_sd)
    inputs = {n: [] for n in layers}
    hooks = []
    for name in layers:
        module = tiny_sd.unet.get_submodule(name[:-len(".processor")])
        hooks.append(module.register_forward_pre_hook(
            lambda mod, args, kwargs, name=name: inputs[name].append(
                (mod, args[0] if args else kwargs["hidden_states"], kwargs["encoder_hidden_states"])),
            with_kwargs=True))
    cfg = SamplingConfig(num_inference_steps=3, guidance_scale=7.5, num_generations=3, seed=2, batch_size=6)
    try:
        with CrossAttentionRecorder(tiny_sd, steps={1}) as rec:
            sample_unit(tiny_sd, PROMPTS, [0, 1, 2], cfg, recorders=[rec])
    finally:
        for h in hooks:
            h.remove()
    assert list(rec.maps) == [1]  # only the step asked for
    calls_per_step = 3  # one per prompt
    for name in layers:
        assert len(inputs[name]) == 3 * calls_per_step
        expected = []
        for mod, hs, ehs in inputs[name][calls_per_step:2 * calls_per_step]:  # step 1's calls
            assert not mod.norm_cross  # SD 1.x: the text states go to to_k/to_v as they are
            with torch.no_grad():
                q, k = mod.to_q(hs), mod.to_k(ehs)
            B, L, T, H = hs.shape[0], hs.shape[1], ehs.shape[1], mod.heads
            d = q.shape[-1] // H
            q = q.reshape(B, L, H, d).permute(0, 2, 1, 3)
            k = k.reshape(B, T, H, d).permute(0, 2, 1, 3)
            p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(d), dim=-1)
            expected.append(p[B // 2:])  # the conditional rows
        expected = torch.cat(expected)
        got = rec.maps[1][name]
        info = rec.layer_info[name]
        assert got.shape == expected.shape == (9, info.heads, math.prod(info.resolution), info.tokens)
        torch.testing.assert_close(got, expected, rtol=0, atol=1e-5)
        torch.testing.assert_close(got.sum(-1), torch.ones(got.shape[:-1]), rtol=0, atol=1e-5)


def test_real_edits_change_the_result(tiny_sd):
    cfg = SamplingConfig(num_inference_steps=3, guidance_scale=7.5, num_generations=2, seed=4, batch_size=4)
    base = sample_prompts(tiny_sd, PROMPTS[:2], cfg, decode=False)
    with attention_edit(tiny_sd, AttentionEdit(token=0, scale=0.5)):
        scaled = sample_prompts(tiny_sd, PROMPTS[:2], cfg, decode=False)
    for a, b in zip(base, scaled):
        assert (a.latents - b.latents).abs().max().item() > 1e-4
    # masked keys get probability 0, the rest still sums to 1
    with attention_edit(tiny_sd, AttentionEdit(mask_keys=[5, 6, 7])), CrossAttentionRecorder(tiny_sd) as rec:
        masked = sample_unit(tiny_sd, PROMPTS[:2], [0, 1], cfg, recorders=[rec])
    assert (masked[0].latents - base[0].latents).abs().max().item() > 1e-4
    for step_maps in rec.maps.values():
        for p in step_maps.values():
            assert torch.count_nonzero(p[..., 5:8]) == 0 and p[..., 4].min() > 0
            torch.testing.assert_close(p.sum(-1), torch.ones(p.shape[:-1]), rtol=0, atol=1e-5)
    # a mask per conditional row (N = 4 rows over two UNet calls per step)
    T = rec.layer_info[cross_attention_layers(tiny_sd)[0]].tokens
    per_row = torch.zeros(4, T, dtype=torch.bool)
    for r, key in enumerate([10, 11, 12, 13]):
        per_row[r, key] = True
    with attention_edit(tiny_sd, AttentionEdit(mask_keys=per_row)), CrossAttentionRecorder(tiny_sd) as rec:
        sample_unit(tiny_sd, PROMPTS[:2], [0, 1], cfg, recorders=[rec])
    for step_maps in rec.maps.values():
        for p in step_maps.values():
            zero = (p == 0).all(dim=(1, 2))  # (N, T): keys no query of a row attends
            assert torch.equal(zero, per_row)


def test_edit_touches_only_the_chosen_rows(tiny_sd):
    name = cross_attention_layers(tiny_sd)[0]
    module = tiny_sd.unet.get_submodule(name[:-len(".processor")])
    hs, ehs = torch.randn(4, 64, module.to_q.in_features), torch.randn(4, 10, module.to_k.in_features)
    with torch.no_grad():
        plain = module(hs, encoder_hidden_states=ehs)
        with attention_edit(tiny_sd, AttentionEdit(token=0, scale=3.0, mask_keys=[9]), layers=[name]):
            cond = module(hs, encoder_hidden_states=ehs)
        with attention_edit(tiny_sd, AttentionEdit(token=0, scale=3.0, rows="all"), layers=[name]):
            every = module(hs, encoder_hidden_states=ehs)
    torch.testing.assert_close(cond[:2], plain[:2], rtol=0, atol=1e-6)  # unconditional rows untouched
    assert (cond[2:] - plain[2:]).abs().amax(dim=(1, 2)).min() > 1e-4
    assert (every - plain).abs().amax(dim=(1, 2)).min() > 1e-4


def test_processors_restored_and_nothing_installed_when_nothing_requested(tiny_sd):
    before = _processors(tiny_sd)
    layers = cross_attention_layers(tiny_sd)
    assert len(layers) == 4 and all(n.endswith("attn2.processor") for n in layers)
    # nothing requested: diffusers' own (fused) processors stay
    for kwargs in (dict(layers=[]), dict(steps=set()), dict(layers=lambda n: False)):
        with CrossAttentionRecorder(tiny_sd, **kwargs):
            now = _processors(tiny_sd)
            assert all(now[k] is before[k] for k in before)
    # chosen layers only, by name (with or without ".processor") or predicate
    assert select_layers(tiny_sd, [layers[1][:-len(".processor")]]) == [layers[1]]
    with CrossAttentionRecorder(tiny_sd, layers=lambda n: n.startswith("up_blocks")):
        now = _processors(tiny_sd)
        changed = {k for k in before if now[k] is not before[k]}
        assert changed == {n for n in layers if n.startswith("up_blocks")}
    # nested contexts join on a layer, and exits (even by an exception) restore the originals
    with pytest.raises(KeyError):
        with attention_edit(tiny_sd, AttentionEdit(scale=2.0)):
            with CrossAttentionRecorder(tiny_sd, layers=layers[:1]):
                proc = tiny_sd.unet.attn_processors[layers[0]]
                assert len(proc.edits) == 1 and len(proc.sinks) == 1
                raise KeyError("boom")
    after = _processors(tiny_sd)
    assert after.keys() == before.keys() and all(after[k] is before[k] for k in before)
    with pytest.raises(ValueError, match="not a cross-attention layer"):
        select_layers(tiny_sd, ["down_blocks.1.attentions.0.transformer_blocks.0.attn1"])


class _Sink:
    """Stands in for a recorder: keeps what the processor hands over."""

    active = True

    def __init__(self):
        self.got = []

    def capture(self, layer, attn, probs, tokens):
        self.got.append(probs)


@pytest.mark.parametrize("spatial", [False, True])
def test_processor_matches_diffusers_on_a_layer_with_norms_residual_and_rescale(spatial):
    from diffusers.models.attention_processor import Attention, AttnProcessor2_0

    torch.manual_seed(1)
    attn = Attention(query_dim=16, cross_attention_dim=12, heads=2, dim_head=8, cross_attention_norm="layer_norm",
                     residual_connection=True, rescale_output_factor=2.0).eval()
    assert attn.norm_cross is not None and attn.scale == 8 ** -0.5
    hs = torch.randn(4, 16, 3, 5) if spatial else torch.randn(4, 15, 16)
    ehs = torch.randn(4, 7, 12)
    sink = _Sink()
    with torch.no_grad():
        attn.set_processor(AttnProcessor2_0())
        ref = attn(hs, encoder_hidden_states=ehs)
        attn.set_processor(CrossAttentionProcessor("x.attn2.processor", sinks=[sink]))
        out = attn(hs, encoder_hidden_states=ehs)
        # the probabilities from scratch: tokens-major queries, normed text states, 1/sqrt(d_head)
        x = hs.flatten(2).transpose(1, 2) if spatial else hs
        q = attn.to_q(x).reshape(4, 15, 2, 8).permute(0, 2, 1, 3)
        k = attn.to_k(attn.norm_cross(ehs)).reshape(4, 7, 2, 8).permute(0, 2, 1, 3)
        p = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
    torch.testing.assert_close(out, ref, rtol=0, atol=1e-6)
    assert len(sink.got) == 1 and sink.got[0].shape == (2, 2, 15, 7)
    torch.testing.assert_close(sink.got[0], p[2:], rtol=0, atol=1e-6)


# -- joint attention (SD3) --------------------------------------------------------------------------

def test_joint_capture_is_the_text_block_of_the_processors_own_softmax(tiny_sd3_folder):
    """The captured image-to-text attention, against the full softmax recomputed in float64 from the very
    projections the diffusers processor used (forward hooks), checked in turn against the processor's own
    attention output (the input of its to_out projection). Chunked over queries; a text mask zeroes padding."""
    from diffmem.adapters import load_model
    from diffmem.attention import JointAttentionRecorder, joint_attention_layers
    from diffmem.sampling import SamplingConfig, sample_unit

    model = load_model(str(tiny_sd3_folder))
    layer = joint_attention_layers(model)[0]
    attn = model.denoiser.get_submodule(layer[:-len(".processor")])
    seen = {}
    # the last call of each projection is the processor's (the capture's own calls come before it)
    hooks = [getattr(attn, n).register_forward_hook(lambda m, i, o, n=n: seen.__setitem__(n, o.detach().double()))
             for n in ("to_q", "to_k", "to_v", "add_k_proj", "add_v_proj")]
    hooks.append(attn.to_out[0].register_forward_pre_hook(lambda m, i: seen.__setitem__("out", i[0].detach().double())))
    cfg = SamplingConfig(num_inference_steps=2, num_generations=1, track_steps=1, batch_size=4)
    try:
        with JointAttentionRecorder(model, [layer], steps=[0], chunk=7) as rec:
            sample_unit(model, ["a red cat"], [0], cfg, recorders=[rec])
    finally:
        for h in hooks:
            h.remove()
    B, H = seen["to_q"].shape[0], attn.heads
    split = lambda x: x.view(B, x.shape[1], H, -1).transpose(1, 2)  # noqa: E731
    q, k, v = split(seen["to_q"]), split(torch.cat([seen["to_k"], seen["add_k_proj"]], 1)), \
        split(torch.cat([seen["to_v"], seen["add_v_proj"]], 1))
    assert attn.norm_q is None and attn.norm_added_k is None  # the tiny model's layer: raw projections
    p = torch.softmax(q @ k.transpose(-1, -2) / q.shape[-1] ** 0.5, dim=-1)  # (B, H, L, L + T)
    L = seen["to_q"].shape[1]
    out = (p @ v).transpose(1, 2).reshape(B, -1, H * v.shape[-1])[:, :L]
    torch.testing.assert_close(out, seen["out"], atol=1e-5, rtol=1e-4)  # the processor's own attention
    got = rec.maps[0][layer]
    torch.testing.assert_close(got.double(), p[B // 2:, :, :, L:], atol=1e-6, rtol=1e-5)  # conditional rows
    assert (got.sum(-1) < 1).all()  # normalised over all keys: the text's share

    mask = torch.zeros(1, got.shape[-1], dtype=torch.bool)
    mask[0, :5] = True
    with JointAttentionRecorder(model, [layer], steps=[0], keep_padding=False, text_mask=mask) as rec:
        sample_unit(model, ["a red cat"], [0], cfg, recorders=[rec])
    masked = rec.maps[0][layer]
    torch.testing.assert_close(masked[..., :5], got[..., :5])
    assert (masked[..., 5:] == 0).all()


def test_joint_capture_refuses_a_model_without_joint_attention(tiny_sd):
    from diffmem.attention import JointAttentionRecorder

    with pytest.raises(ValueError, match=r"has no joint-attention layer \(SD3's MMDiT blocks, FLUX's"):
        JointAttentionRecorder(tiny_sd)

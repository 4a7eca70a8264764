"""Ren et al. (ECCV 2024): cross-attention entropy, LE at the first step and AE over the last steps.

Both read the conditional rows' cross-attention probabilities, averaged over query pixels, through
the one pass (``diffmem.attention.CrossAttentionRecorder``); as Ren et al.'s code (``detect.py``),
higher means memorized and the entropy runs over every key position, padding included.

- ``ren-le``: at step 0, in one layer, heads averaged: LE = -sum_j a_j log a_j. The published layer
  is SD 1.x's ``down_blocks.1.attentions.1``, the last layer of the second down block with
  cross-attention; on any UNet the same role is taken (the first such block when there is one).
- ``ren-ae``: every cross-attention layer and head averaged per step: AE = mean over the last 10
  steps of E_t + (mean over them of E^end_t - E^end_0), E^end the entropy terms of the end token
  and the positions after it, not renormalised (the code's form, with no absolute value). With
  fewer than 10 steps, all but the first.
"""

from __future__ import annotations

import torch

from diffmem.attention import CrossAttentionRecorder, require_down_cross_attention
from diffmem.detectors.registry import register
from diffmem.detectors.common import PerGeneration, end_positions, entropy


def le_layer(model) -> str:
    groups = require_down_cross_attention(model, "ren-le")
    return (groups[1] if len(groups) > 1 else groups[0])[-1]


class _LERecorder(CrossAttentionRecorder):
    def __init__(self, model):
        self.layer = le_layer(model)
        super().__init__(model, [self.layer], steps=[0], reduce=lambda p: p.mean(2))  # (n, heads, T)


@register
class RenLE(PerGeneration):
    name = "ren-le"
    flow_refusal = ("it reads the cross-attention of a UNet's down blocks, and this denoiser (an MMDiT with "
                    "joint attention) has none")
    per_generation_key = "ren_le_per_generation"
    first_step_only = True

    def prepare(self, model, config) -> None:
        le_layer(model)  # refused before any sampling on a denoiser without down blocks

    def recorder(self, model, config, prompts):
        return _LERecorder(model)

    def values(self, recorder: _LERecorder) -> torch.Tensor:
        return entropy(recorder.maps[0][recorder.layer].double().cpu().mean(1))  # (N,): heads averaged


def ae_steps(num_inference_steps: int) -> list[int]:
    last = list(range(max(num_inference_steps - 10, 1), num_inference_steps))
    return [0, *last]


class _AERecorder(CrossAttentionRecorder):
    def __init__(self, model, config, prompts):
        self.steps_used = ae_steps(config.num_inference_steps)
        super().__init__(model, None, steps=self.steps_used, reduce=lambda p: p.mean(2).mean(1))  # (n, T)
        self.ends = end_positions(model, prompts, config.num_generations)


@register
class RenAE(PerGeneration):
    name = "ren-ae"
    flow_refusal = ("it reads the cross-attention (attn2) maps of a UNet or PixArt, and this MMDiT has joint "
                    "attention only")
    per_generation_key = "ren_ae_per_generation"
    all_steps = True

    def recorder(self, model, config, prompts):
        return _AERecorder(model, config, prompts)

    def values(self, recorder: _AERecorder) -> torch.Tensor:
        per_step = {k: torch.stack([m.double().cpu() for m in recorder.maps[k].values()]).mean(0)
                    for k in recorder.steps_used}  # step -> (N, T), layers averaged
        T = per_step[0].shape[-1]
        after = (torch.arange(T)[None, :] >= recorder.ends[:, None]).double()  # the end token and what follows

        def end_entropy(a):
            return -(a * torch.log(a.clamp_min(1e-300)) * after).sum(-1)

        last = recorder.steps_used[1:]
        e = torch.stack([entropy(per_step[k]) for k in last]).mean(0)
        e_end = torch.stack([end_entropy(per_step[k]) for k in last]).mean(0) - end_entropy(per_step[0])
        return e + e_end  # (N,)

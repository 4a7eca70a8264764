"""Bright Ending (Chen et al., ICLR 2025): the noise difference weighted by the end token's attention.

At the last step, the conditional rows' cross-attention to the end token in the highest-resolution
down-block layers (SD 1.x: ``down_blocks.0.attentions.{0,1}``, 64x64 queries; on any UNet the first
down block with cross-attention), heads then layers averaged, is a mask m (raw probabilities, no
threshold) over the latent grid (nearest-neighbour upsampled where that block is coarser than the
latents), shared by the channels. BE = mean over steps of ||delta_eps_t * m||_2 / mean(m), then the
mean over generations; higher means memorized. The official code runs the generation twice (the
mask, then the score); here one pass keeps delta_eps_t of every step and applies the mask at the end.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmem.attention import CrossAttentionRecorder, require_down_cross_attention
from diffmem.detectors.registry import register
from diffmem.detectors.common import PerGeneration, end_positions


class _BERecorder(CrossAttentionRecorder):
    def __init__(self, model, config, prompts):
        groups = require_down_cross_attention(model, "bright-ending")
        self.last = config.num_inference_steps - 1
        super().__init__(model, groups[0], steps=[self.last], reduce=lambda p: p.mean(1))  # (n, HW, T)
        self.ends = end_positions(model, prompts, config.num_generations)
        self.delta: list[torch.Tensor] = []  # (N, C, H, W) per step, on the CPU

    def on_step(self, step) -> None:
        super().on_step(step)
        self.delta.append((step.eps_cond - step.eps_uncond).detach().double().cpu())

    def mask(self) -> torch.Tensor:
        """(N, 1, H, W): the end token's attention at the last step, on the latent grid."""
        maps = self.maps[self.last]
        info = self.layer_info[next(iter(maps))]
        probs = torch.stack([m.double().cpu() for m in maps.values()]).mean(0)  # (N, HW, T)
        m = probs[torch.arange(len(probs)), :, self.ends]  # (N, HW)
        h, w = info.resolution
        m = m.view(-1, 1, h, w)
        size = self.delta[0].shape[-2:]
        return m if m.shape[-2:] == size else F.interpolate(m, size=size, mode="nearest")


@register
class BrightEnding(PerGeneration):
    name = "bright-ending"
    flow_refusal = ("it reads the cross-attention of a UNet's down blocks, and this denoiser (an MMDiT with "
                    "joint attention) has none")
    per_generation_key = "bright_ending_per_generation"
    all_steps = True

    def prepare(self, model, config) -> None:
        require_down_cross_attention(model, self.name)  # refused before any sampling

    def recorder(self, model, config, prompts):
        return _BERecorder(model, config, prompts)

    def values(self, recorder: _BERecorder) -> torch.Tensor:
        m = recorder.mask()  # (N, 1, H, W)
        delta = torch.stack(recorder.delta)  # (S, N, C, H, W)
        return ((delta * m).flatten(2).norm(dim=-1) / m.flatten(1).mean(-1)).mean(0)  # (N,)

"""``gni``: Gaussian noise injection into the text embedding at inference (Somepalli et al., NeurIPS
2023, "Understanding and mitigating copying in diffusion models", sec. 5; official code
``somepago/DCR``, ``sd_mitigation.py``, Apache-2.0, read to check, not copied).

The conditional embedding the UNet's cross-attention reads is perturbed once per prompt before
sampling, at every token position (the official code adds the noise to the whole encoder output,
start token, end token and padding included, so no position is kept fixed here either):

    e' = e + σ · z,   z ~ N(0, I) of the shape of e (T, D)

Published: σ = 0.1 (``--rand_noise_lam 0.1``) on Stable Diffusion's CLIP embeddings. The parameter
``scale`` is given on that scale (default 0.1) and is mapped to each model:

- Stable Diffusion families (CLIP text encoders): σ = scale, the published value as it is;
- other models (the lab's MiniLM encoder): σ = scale · std_model / ``CLIP_EMBEDDING_STD``, with
  std_model the standard deviation of all elements of the model's encoded reference prompts (lab:
  ``own_reference_prompts``; a model without them: the unit's own prompts) and
  ``CLIP_EMBEDDING_STD`` = 1.0, the per-element std of CLIP's embeddings as read from its final
  LayerNorm (unit variance per token before a gain near 1: token norms near sqrt(768)). That value
  was not measured here (no CLIP weights offline); so on the lab ``scale`` is in units of the
  embedding's std, 0.1 the published relative size. The lab's std is about 0.44 (σ ≈ 0.044 at 0.1).

The draw of the prompt at position p comes from ``derived_generator(config.seed, p, GNI_STREAM)``
(float32 on the CPU, then moved to the model): the same prompt at two positions gets two draws, the
same position the same draw in every run and batch. Differences from the official code, imposed by
the plan's one conditional row per prompt: the official pipeline adds fresh noise per generated image
and, because diffusers' ``_encode_prompt`` of its time returns the unconditional and conditional
embeddings concatenated, to the unconditional (empty-prompt) branch as well; here one draw per
prompt is shared by its G generations and the unconditional branch is left clean (d stays the
distance to the unperturbed empty prompt). Off: scale = 0. Adds no UNet rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.mitigations import Plan, Unit, derived_generator, register

PUBLISHED_SCALE = 0.1  # Somepalli et al.'s rand_noise_lam on SD's CLIP embeddings
CLIP_EMBEDDING_STD = 1.0  # per-element std of CLIP's text embeddings (final LayerNorm, gain ~1): not measured here
CLIP_FAMILIES = ("stable-diffusion", "stable-diffusion-xl")
GNI_STREAM = 0  # derived_generator stream of this method's draws


def embedding_noise(shape: tuple[int, ...], seed: int, position: int, stream: int = GNI_STREAM) -> torch.Tensor:
    """z ~ N(0, I) of `shape` (T, D) for the prompt at `position`: float32 on the CPU, from
    ``derived_generator(seed, position, stream)``."""
    return torch.randn(shape, generator=derived_generator(seed, position, stream), dtype=torch.float32)


def inject_noise(embeddings: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """e + sigma * z at every position: (P, T, D) and (P, T, D) -> (P, T, D) in the embeddings' dtype."""
    return (embeddings.float() + sigma * noise.to(embeddings.device)).to(embeddings.dtype)


def embedding_std(embeddings: torch.Tensor) -> float:
    """Standard deviation of all elements of encoded prompts (P, T, D)."""
    return float(embeddings.double().std())


@register
class GaussianNoiseInjection:
    name = "gni"
    knob = "scale"
    off = {"scale": 0.0}

    @dataclass
    class Params:
        scale: float = PUBLISHED_SCALE  # σ on SD's CLIP scale (elsewhere in units of the embedding's std)

        def __post_init__(self):
            if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
                raise ValueError(f"--param scale={self.scale!r}: must be a finite number >= 0 (0.1 is the published)")

    def __init__(self):
        self._std: tuple[object, float] | None = None  # (model, std of its reference embeddings)

    def sweep(self, model, sampling) -> list[dict]:
        """scale 0.05, 0.1 (published), 0.25, 0.5: mildest first."""
        return [{"scale": s} for s in (0.05, 0.1, 0.25, 0.5)]

    def sigma(self, model, scale: float, unit_embeddings: torch.Tensor | None = None) -> float:
        """σ for `model`: `scale` as it is on CLIP models, scaled by the model's embedding std elsewhere."""
        if model.family in CLIP_FAMILIES or scale == 0:
            return float(scale)
        if self._std is None or self._std[0] is not model:
            from diffmem.lab.prompts import own_reference_prompts

            prompts = own_reference_prompts(model)
            if prompts:
                with torch.no_grad():
                    self._std = (model, embedding_std(model.encode_prompts(prompts[:256]).embeddings))
            elif unit_embeddings is not None:
                return float(scale) * embedding_std(unit_embeddings) / CLIP_EMBEDDING_STD
            else:
                raise ValueError(f"gni on {model.name}: no reference prompts to measure the embedding std on")
        return float(scale) * self._std[1] / CLIP_EMBEDDING_STD

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        if params.scale == 0:
            return Plan()
        emb = unit.cond.embeddings  # (P, T, D)
        sigma = self.sigma(model, params.scale, emb)
        noise = torch.stack([embedding_noise(tuple(emb.shape[1:]), unit.config.seed, p) for p in unit.positions])
        info = [{"sigma": sigma} for _ in unit.prompts]
        return Plan(cond=unit.cond.with_embeddings(inject_noise(emb, noise, sigma)), info=info)

"""``gni``: Gaussian noise injection into the text embedding at inference (Somepalli et al., NeurIPS
2023, "Understanding and mitigating copying in diffusion models", sec. 5; official code
``somepago/DCR``, ``sd_mitigation.py``, Apache-2.0, read to check, not copied).

The embeddings the UNet's cross-attention reads are perturbed before sampling, at every token
position (the official code adds the noise to the whole encoder output, start token, end token and
padding included, so no position is kept fixed here either):

    e' = e + σ · z,   z ~ N(0, I) of the shape of e (T, D)

``protocol`` says where and how often z is drawn:

- ``"official"`` (default), the official code's: a fresh z for every generated image, on both
  guidance branches. Its pipeline draws ``randn_like`` inside every call of one image, on the output
  of diffusers' ``_encode_prompt`` of its time, which under guidance is the unconditional and
  conditional embeddings concatenated. Here generation g of the prompt at position p draws z_u
  (the empty prompt's shape) then z_c, generation after generation, from ``derived_generator(seed,
  p, GNI_OFFICIAL_STREAM)``; the plan has one conditional and one unconditional row per generation.
  d is then the distance between the two perturbed branches.
- ``"per-prompt"``, diffmem's earlier variant: one z per prompt, from ``derived_generator(seed, p,
  GNI_STREAM)``, shared by its G generations, on the conditional branch only; the unconditional
  branch stays clean (d is the distance to the unperturbed empty prompt). With guidance w the
  unconditional noise enters the guided prediction with weight 1 − w (−6.5 at 7.5) beside the
  conditional one's w, so this is the weaker intervention at the same σ; and its G images share one
  draw, so maxima over the generations are not comparable with the official protocol.

Both draw in float32 on the CPU, then move to the model: the same prompt at two positions gets two
draws, the same position the same draws in every run and batch.

Published: σ = 0.1 (``--rand_noise_lam 0.1``) on Stable Diffusion 1.4's CLIP embeddings. The parameter
``scale`` is given on that scale (default 0.1) and is mapped to each model:

- Stable Diffusion families (CLIP text encoders): σ = scale, the published value as it is;
- other models (the lab's MiniLM encoder): σ = scale · std_model / ``CLIP_EMBEDDING_STD``, with
  std_model the standard deviation of all elements of the model's encoded reference prompts (lab:
  ``own_reference_prompts``; a model without them: the unit's own prompts) and
  ``CLIP_EMBEDDING_STD`` = 1.0, the per-element std of CLIP's embeddings as read from its final
  LayerNorm (unit variance per token before a gain near 1: token norms near sqrt(768)). That value
  was not measured here (no CLIP weights offline); so on the lab ``scale`` is in units of the
  embedding's std, 0.1 the published relative size. The lab's std is about 0.44 (σ ≈ 0.044 at 0.1).

The scale is checked on every model: each result row carries ``sigma`` and ``sigma_to_std``, σ over
the standard deviation of all elements of the unit's encoded prompts, and a one-line warning goes to
stderr when that ratio is outside ``SIGMA_TO_STD_RANGE`` (a tenth to ten times the published relative
size). SDXL's embeddings, penultimate hidden states of two encoders without the final LayerNorm, are
not on SD 1.4's scale, so σ = scale there is a guess this check makes visible. Off: scale = 0. Adds
no UNet rows.
"""

from __future__ import annotations

import math
import sys
from dataclasses import dataclass

import torch

from diffmem.mitigations import Plan, Unit, derived_generator, register

PUBLISHED_SCALE = 0.1  # Somepalli et al.'s rand_noise_lam on SD's CLIP embeddings
CLIP_EMBEDDING_STD = 1.0  # per-element std of CLIP's text embeddings (final LayerNorm, gain ~1): not measured here
CLIP_FAMILIES = ("stable-diffusion", "stable-diffusion-xl")
GNI_STREAM = 0  # derived_generator stream of the per-prompt draws
GNI_OFFICIAL_STREAM = 1  # derived_generator stream of the official protocol's per-image draws
PROTOCOLS = ("official", "per-prompt")
SIGMA_TO_STD_RANGE = (0.01, 1.0)  # σ / std(e) outside this: warn (published: 0.1 on CLIP, std taken as 1)


def embedding_noise(shape: tuple[int, ...], seed: int, position: int, stream: int = GNI_STREAM) -> torch.Tensor:
    """z ~ N(0, I) of `shape` (T, D) for the prompt at `position`: float32 on the CPU, from
    ``derived_generator(seed, position, stream)``."""
    return torch.randn(shape, generator=derived_generator(seed, position, stream), dtype=torch.float32)


def per_image_noise(cond_shape: tuple[int, ...], uncond_shape: tuple[int, ...], num_generations: int, seed: int,
                    position: int) -> tuple[torch.Tensor, torch.Tensor]:
    """The official protocol's draws for the prompt at `position`: (z_c, z_u), (G, T, D) and (G, T_u, D_u),
    float32 on the CPU; generation by generation z_u then z_c, from ``derived_generator(seed, position,
    GNI_OFFICIAL_STREAM)``."""
    gen = derived_generator(seed, position, GNI_OFFICIAL_STREAM)
    z_u, z_c = [], []
    for _ in range(num_generations):
        z_u.append(torch.randn(uncond_shape, generator=gen, dtype=torch.float32))
        z_c.append(torch.randn(cond_shape, generator=gen, dtype=torch.float32))
    return torch.stack(z_c), torch.stack(z_u)


def inject_noise(embeddings: torch.Tensor, noise: torch.Tensor, sigma: float) -> torch.Tensor:
    """e + sigma * z at every position: (P, T, D) and (P, T, D) -> (P, T, D) in the embeddings' dtype."""
    return (embeddings.float() + sigma * noise.to(embeddings.device)).to(embeddings.dtype)


def embedding_std(embeddings: torch.Tensor) -> float:
    """Standard deviation of all elements of encoded prompts (P, T, D)."""
    return float(embeddings.double().std())


@register
class GaussianNoiseInjection:
    name = "gni"
    flow_refusal = ("its noise scale is calibrated on CLIP token embeddings, and SD3's joint embedding (zero-padded "
                    "CLIP features beside the T5 block) has no published scale")
    knob = "scale"
    off = {"scale": 0.0}

    @dataclass
    class Params:
        scale: float = PUBLISHED_SCALE  # σ on SD's CLIP scale (elsewhere in units of the embedding's std)
        protocol: str = "official"  # official: fresh noise per image on both branches; per-prompt: one draw, cond only

        def __post_init__(self):
            if not isinstance(self.scale, (int, float)) or not math.isfinite(self.scale) or self.scale < 0:
                raise ValueError(f"--param scale={self.scale!r}: must be a finite number >= 0 (0.1 is the published)")
            if self.protocol not in PROTOCOLS:
                raise ValueError(f"--param protocol={self.protocol!r}: expected one of {', '.join(PROTOCOLS)}")

    def __init__(self):
        self._std: tuple[object, float] | None = None  # (model, std of its reference embeddings)
        self._warned: set = set()  # (model name, sigma) already warned about

    def sweep(self, model, sampling) -> list[dict]:
        """scale 0.05, 0.1 (published), 0.25, 0.5: mildest first, under the official protocol (named, so
        that the benchmark's table says which protocol ran)."""
        return [{"scale": s, "protocol": "official"} for s in (0.05, 0.1, 0.25, 0.5)]

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

    def check_scale(self, model, sigma: float, embeddings: torch.Tensor) -> float:
        """σ / std of all elements of `embeddings` (P, T, D); warns once per model and σ, in one line on
        stderr, when the ratio is outside ``SIGMA_TO_STD_RANGE``."""
        ratio = sigma / max(embedding_std(embeddings), 1e-12)
        low, high = SIGMA_TO_STD_RANGE
        if not low <= ratio <= high and (model.name, sigma) not in self._warned:
            self._warned.add((model.name, sigma))
            print(f"warning: gni on {model.name}: sigma {sigma:.4g} is {ratio:.3g} x the std of its text embeddings "
                  f"({'tiny' if ratio < low else 'huge'} against the published 0.1; expected {low:g} to {high:g})",
                  file=sys.stderr)
        return ratio

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        if params.scale == 0:
            return Plan()
        emb = unit.cond.embeddings  # (P, T, D)
        sigma = self.sigma(model, params.scale, emb)
        info = [{"sigma": sigma, "sigma_to_std": self.check_scale(model, sigma, emb), "protocol": params.protocol}
                for _ in unit.prompts]
        if params.protocol == "per-prompt":
            noise = torch.stack([embedding_noise(tuple(emb.shape[1:]), unit.config.seed, p) for p in unit.positions])
            return Plan(cond=unit.cond.with_embeddings(inject_noise(emb, noise, sigma)), info=info)
        # official: one conditional and one unconditional row per generation, each with its own draw
        G, uncond = unit.num_generations, unit.uncond.embeddings  # uncond (P*G, T_u, D_u)
        draws = [per_image_noise(tuple(emb.shape[1:]), tuple(uncond.shape[1:]), G, unit.config.seed, p)
                 for p in unit.positions]
        z_c = torch.cat([c for c, _ in draws])  # (P*G, T, D)
        z_u = torch.cat([u for _, u in draws])  # (P*G, T_u, D_u)
        cond = unit.cond.repeat_interleave(G)
        return Plan(cond=cond.with_embeddings(inject_noise(cond.embeddings, z_c, sigma)),
                    uncond=unit.uncond.with_embeddings(inject_noise(uncond, z_u, sigma)), info=info)

"""``guard``: GUARD (Zhao, Triantafillou, Triantafillou; ICML 2026, arXiv 2603.00133): cross-attention
attenuation inside an attractive/repulsive guidance. Official code ``kairanzhao/GUARD`` (MIT; read to check
the formula and constants, not copied).

Each step combines three predictions at x_t:

    eps = eps_u + s (eps_plus - eps_u) - r(k) (eps_minus - eps_u),   r(k) = r0 cos(pi/2 * k / S)

- eps_minus = eps(x_t, e_p), the plain prompt (the pass's conditional branch): repulsive;
- eps_plus = eps(x_t, e_p) with the cross-attention of the UNet's early layers (the down blocks and the
  mid block) attenuated (``diffmem.attention.spike_tokens``): per row and head, the logits of the tokens
  whose largest logit over the queries stands out (z > tau over positions 1..76) are multiplied by alpha;
- s is the run's guidance scale, k the step index, S the number of steps.

Where we followed the code rather than the paper: the spike statistic is on the pre-softmax logits (the
paper speaks of attention mass); the positive prompt is the prompt itself (the code's paraphrase is only
logged); and the code's default orthogonalization is on: with v+ = eps_plus - eps_u and v- = eps_minus - eps_u,
per image, when cos(v+, v-) > 0.9, v+ <- v+ - clip(<v+, v-> / ||v-||^2, +-2) v-. The paper's formula as
published has no orthogonalization (``orthogonalize=false``). The released code does not run as published
(its logger reads an attribute it never sets; its attenuation-only command passes arguments the pipeline
does not take), so nothing here was compared with its outputs.

Constants: the README's CA-in-GUARD command (tau 0.1, alpha 0.3, r0 2.0, s the guidance scale). Costs one
extra denoiser row per generation and step (eps_plus), 1.5x a CFG run, when alpha != 1. UNet models with
cross-attention in the down or mid blocks only; refused elsewhere. Off: r0 = 0, alpha = 1, no
orthogonalization (then eps_plus = eps_minus and the combination is plain CFG).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.attention import AttentionEdit, attention_edit, cross_attention_layers
from diffmem.model import Conditioning
from diffmem.mitigations import Plan, Unit, per_prompt, register


def early_layers(model) -> list[str]:
    """GUARD's intervention layers: the cross-attention layers of the down blocks and the mid block."""
    return [n for n in cross_attention_layers(model) if n.startswith(("down_blocks.", "mid_block."))]


# -- the math: small functions over tensors -----------------------------------------------------

def repulsive_scale(r0: float, index: int, num_steps: int) -> float:
    """r(k) = r0 cos(pi/2 * k / S), the code's cosine decay of the repulsive term."""
    return r0 * math.cos(math.pi / 2 * index / num_steps)


def orthogonalized(v_plus: torch.Tensor, v_minus: torch.Tensor, cos_threshold: float = 0.9,
                   clip: float = 2.0, eps: float = 1e-8) -> tuple[torch.Tensor, torch.Tensor]:
    """(v_plus with its v_minus component removed where cos(v_plus, v_minus) > cos_threshold, the coefficient
    clipped to +-clip; (N,) bool where it was): v_plus, v_minus (N, ...)."""
    a, b = v_plus.flatten(1).float(), v_minus.flatten(1).float()
    dot = (a * b).sum(1)
    coef = (dot / ((b * b).sum(1) + eps)).clamp(-clip, clip)
    cos = (dot / (((a * a).sum(1) + eps).sqrt() * ((b * b).sum(1) + eps).sqrt())).clamp(-1, 1)
    hit = cos > cos_threshold
    shape = (-1, *[1] * (v_plus.ndim - 1))
    return v_plus - (hit.float() * coef).view(shape).to(v_plus.dtype) * v_minus, hit


def guard_prediction(eps_u: torch.Tensor, eps_plus: torch.Tensor, eps_minus: torch.Tensor, s: float, r: float,
                     orthogonalize: bool = True, cos_threshold: float = 0.9, clip: float = 2.0):
    """(eps_u + s v+ - r v-, (N,) bool: rows orthogonalized), v+- = eps_plus/minus - eps_u; all (N, C, H, W)."""
    v_plus, v_minus = eps_plus - eps_u, eps_minus - eps_u
    hit = torch.zeros(len(eps_u), dtype=torch.bool, device=eps_u.device)
    if orthogonalize:
        v_plus, hit = orthogonalized(v_plus, v_minus, cos_threshold, clip)
    return eps_u + s * v_plus - r * v_minus, hit


class GuardGuidance:
    """``guided(index, t, x_t, eps_c, eps_u) -> eps`` for the pass: eps_c is eps_minus; eps_plus is computed
    here on `cond` (N rows) under the attenuation, `max_batch` rows per call. With `info` (one dict per prompt,
    rows prompt-major) each dict's ``guard_orthogonalized_steps`` counts its generations' orthogonalized steps."""

    def __init__(self, model, cond: Conditioning, params, scale: float, num_steps: int, max_batch: int,
                 info: list[dict] | None = None):
        self.model, self.cond, self.p, self.scale, self.num_steps = model, cond, params, scale, num_steps
        self.max_batch, self.info = max_batch, info
        self.layers = early_layers(model)
        self.hits = torch.zeros(len(cond), dtype=torch.long)

    def positive(self, t, x_t: torch.Tensor, eps_c: torch.Tensor) -> torch.Tensor:
        if self.p.alpha == 1.0:
            return eps_c
        x_in = self.model.scheduler.scale_model_input(x_t, t)
        edit = AttentionEdit(rows="all", spike_tau=float(self.p.tau), spike_scale=float(self.p.alpha))
        with attention_edit(self.model, edit, self.layers):
            parts = [self.model.predict(x_in[i:i + self.max_batch], t, self.cond[i:i + self.max_batch])
                     for i in range(0, len(x_in), self.max_batch)]
        return torch.cat(parts).to(eps_c.dtype)

    def guided(self, index: int, t, x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        if index == 0:
            self.hits.zero_()
        r = repulsive_scale(self.p.r0, index, self.num_steps)
        eps, hit = guard_prediction(eps_u, self.positive(t, x_t, eps_c), eps_c, self.scale, r,
                                    self.p.orthogonalize, self.p.cos_threshold, self.p.coef_clip)
        self.hits += hit.cpu().long()
        per_prompt(self.info, guard_orthogonalized_steps=self.hits)
        return eps


@register
class Guard:
    name = "guard"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "r0"
    off = {"r0": 0.0, "alpha": 1.0, "orthogonalize": False}

    @dataclass
    class Params:
        r0: float = 2.0  # the repulsive scale at the first step (README command; the CLI's default is 3.0)
        tau: float = 0.1  # z-score above which a token's logits are attenuated
        alpha: float = 0.3  # the attenuated tokens' logit factor (1: no attenuation, no extra rows)
        orthogonalize: bool = True  # the code's default (not in the paper's formula)
        cos_threshold: float = 0.9
        coef_clip: float = 2.0

        def __post_init__(self):
            for name in ("r0", "tau", "alpha", "cos_threshold", "coef_clip"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
                    raise ValueError(f"--param {name}={v!r}: must be a finite number")
            if self.r0 < 0 or self.alpha <= 0:
                raise ValueError(f"--param r0={self.r0}, alpha={self.alpha}: need r0 >= 0 and alpha > 0")
            if not isinstance(self.orthogonalize, bool):
                raise ValueError(f"--param orthogonalize={self.orthogonalize!r}: must be true or false")

    def check(self, model):
        if not early_layers(model):
            return (f"cannot run on {model.family} ({model.name}): it attenuates the cross-attention of a UNet's down "
                    "and mid blocks, and this denoiser has none")
        return None

    def sweep(self, model, sampling) -> list[dict]:
        """The attenuation alone (the README's second command: tau 0.01, r0 0), then the repulsive scale
        r0 = 1, 2 (published), 3 (the CLI's default) with the attenuation."""
        return [{"r0": 0.0, "tau": 0.01}, *({"r0": r} for r in (1.0, 2.0, 3.0))]

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        if params.r0 == 0 and params.alpha == 1.0 and not params.orthogonalize:
            return Plan()
        G = unit.num_generations
        cond = unit.cond if len(unit.cond) == len(unit.x_T) else unit.cond.repeat_interleave(G)
        info = [{"guard_r0": float(params.r0)} for _ in unit.prompts]
        guidance = GuardGuidance(model, cond, params, unit.guidance_scale, unit.sampling.num_inference_steps,
                                 max(unit.sampling.batch_size // 2, 1), info)
        return Plan(guidance=guidance, info=info)

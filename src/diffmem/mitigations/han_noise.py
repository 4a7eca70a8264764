"""``han-noise``: adjusting the initial noise, batch-wise variant (Han, Kim, Joo, Hong & Lee, NeurIPS
2025, "Adjusting Initial Noise to Mitigate Memorization in Text-to-Image Diffusion Models",
arXiv 2510.08625; official code ``hygnhan/init_noise_diffusion_memorization``,
``local_sd_pipeline.py``, ``adj_init_noise_batch_wise`` and the denoising loop).

Each generation's starting latents take `iterations` sharpness-descent steps at the first timestep t,
with Δε(x) = ε(x, c) − ε(x, ∅):

    x ← x − γ [Δε(x + ρ Δε(x)/||Δε(x)||) − Δε(x)]

(norms per sample over C·H·W, as the official ``sum(dim=(1, 2, 3))``; no gradients), and then the
noisiest denoising steps use only the unconditional prediction: the official loop replaces the guided
prediction by ``noise_pred_uncond`` for ``i <= apply_cfg_step`` (= 4) of its 50 DDIM steps, i.e. w = 0
(not the conditional prediction, w = 1) at t = 981, 961, 941, 921, 901. That window is a range of
timesteps, and is kept as one: w = ``early_guidance`` while t > ``cfg_from_t`` (900 of SD's 1,000
training timesteps, rescaled to the model's ``num_train_timesteps``), the run's w from the first step
with t <= cfg_from_t. On a 50-step schedule that is the official's steps 0-4; on another it is the
same stretch of the trajectory, not the same count of steps (10 steps: step 0, t = 901; 25 steps:
steps 0-1). Here that is the guidance schedule ``(index, eps_c, eps_u) -> w`` of ``Plan.guidance``;
``early_guidance = 1`` gives the conditional-only variant. Result rows carry ``han_cfg_step``, the
first guided step.

Published constants (SD v1.4, 512 px, 4x64x64 latents, ``--batch_wise``): iterations 2, ρ = 50,
γ = 0.7, CFG from step 5 of 50 on (``--apply_cfg_step 4``), guidance 7 (here the run's w).

Units on other models. ρ is a distance in latent space: on SD 1.x ||x_T|| ≈ √16384 = 128, so the
probe point sits 50 / 128 ≈ 0.39 of the noise's norm away. ``rho = None`` keeps that relative size at
the model's latent size D = C·H·W: ρ = 50 · √(D / 16384) (lab, 3x16x16 = 768: ρ ≈ 10.8; SD 2 at
768 px: 75). γ multiplies a difference of noise predictions, in the latents' own units, and is kept.
Δε is the noise prediction's (``model.predict_noise``: ε also on v-prediction models; the official
code runs SD 1.4 only).

Off: ``gamma = 0`` and ``cfg_from_t = inf`` (no UNet call, sampling unchanged). Cost: each iteration
is two UNet calls on both branches of the G generations: 4G rows, so +8G rows per prompt with the
published 2 iterations; the unconditional-only steps cost nothing extra (both branches are computed
anyway).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.mitigations import Plan, Unit, register
from diffmem.mitigations.delayed_cfg import static_switch_index
from diffmem.mitigations.sail import noise_gap, unit_direction
from diffmem.model import Conditioning

SD1_LATENT_DIM = 4 * 64 * 64  # SD v1.4 at 512 px, where rho = 50 was set
SD1_RHO = 50.0
CFG_FROM_T = 900.0  # on SD's 1,000-step scale: the official's unguided steps 0-4 of 50 are t = 981 ... 901
GAMMA_SWEEP = (0.35, 0.7, 1.4)  # half, the published and twice gamma, mildest first


def default_rho(latent_shape) -> float:
    """ρ with the same size relative to ||x_T|| as SD 1.x's 50 on 4x64x64: 50 · √(D / 16384)."""
    return SD1_RHO * math.sqrt(math.prod(latent_shape) / SD1_LATENT_DIM)


def adjust_step(model, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning, rho: float, gamma: float,
                max_batch: int | None = None) -> torch.Tensor:
    """One update x − γ [Δε(x + ρ Δε(x)/||Δε(x)||) − Δε(x)]: x (N, C, H, W) unscaled latents at the
    first timestep t, cond and uncond N rows; 4N UNet rows (``max_batch`` rows per call). Returns
    (N, C, H, W) in x's dtype."""
    with torch.no_grad():
        gap = noise_gap(model, x, t, cond, uncond, max_batch)
        probe = x + rho * unit_direction(gap).to(x.dtype)
        moved = noise_gap(model, probe, t, cond, uncond, max_batch)
        return (x - gamma * (moved - gap)).to(x.dtype)


def adjust_initial_noise(model, x_T: torch.Tensor, t, cond: Conditioning, uncond: Conditioning, rho: float,
                         gamma: float, iterations: int = 2, max_batch: int | None = None) -> torch.Tensor:
    """`iterations` of ``adjust_step`` from x_T (N, C, H, W); cond, uncond N rows. 4N rows per iteration."""
    x = x_T
    for _ in range(iterations):
        x = adjust_step(model, x, t, cond, uncond, rho, gamma, max_batch)
    return x


@dataclass
class EarlyGuidance:
    """The guidance schedule: w = `early` for the first `steps` steps (index < steps: those with t >
    cfg_from_t), then `w`."""

    steps: int
    w: float
    early: float = 0.0

    def __call__(self, index: int, eps_cond: torch.Tensor, eps_uncond: torch.Tensor) -> float:
        return self.early if index < self.steps else self.w


@register
class HanNoise:
    name = "han-noise"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "gamma"
    off = {"gamma": 0.0, "cfg_from_t": math.inf}  # every timestep is <= inf: guided from the first step

    @dataclass
    class Params:
        gamma: float = 0.7  # step size of the adjustment
        rho: float | None = None  # probe distance; None: 50 · √(D / 16384) (50 on SD 1.x, ≈ 10.8 on the lab)
        iterations: int = 2  # adjustment steps
        cfg_from_t: float = CFG_FROM_T  # unguided while t > this (1,000-step scale): the official's steps 0-4 of 50
        early_guidance: float = 0.0  # w in those steps: 0 = the unconditional prediction (the official), 1 = conditional

        def __post_init__(self):
            if not self.gamma >= 0 or math.isinf(self.gamma):
                raise ValueError(f"gamma {self.gamma}: must be a finite number >= 0")
            if self.rho is not None and not (self.rho > 0 and math.isfinite(self.rho)):
                raise ValueError(f"rho {self.rho}: must be a finite number > 0")
            if self.iterations < 0:
                raise ValueError(f"iterations {self.iterations}: must be >= 0")
            if not isinstance(self.cfg_from_t, (int, float)) or math.isnan(self.cfg_from_t):
                raise ValueError(f"cfg_from_t {self.cfg_from_t!r}: must be a number (a timestep on a 1,000-step scale)")
            if not math.isfinite(self.early_guidance):
                raise ValueError(f"early_guidance {self.early_guidance}: must be a finite number")

    def sweep(self, model, sampling) -> list[dict]:
        """γ at half, once and twice the published 0.7 (cfg_from_t stays 900)."""
        return [{"gamma": g} for g in GAMMA_SWEEP]

    def plan(self, model, unit: Unit, params) -> Plan:
        x_T = None
        rho = default_rho(model.latent_shape) if params.rho is None else float(params.rho)
        if params.gamma and params.iterations:
            cond = unit.cond.repeat_interleave(unit.num_generations)
            x_T = adjust_initial_noise(model, unit.x_T, unit.timesteps[0], cond, unit.uncond, rho, params.gamma,
                                       params.iterations, unit.sampling.batch_size)
        guidance = None
        cfg_from_t = params.cfg_from_t * model.scheduler.config.num_train_timesteps / 1000.0  # on the model's scale
        cfg_step = static_switch_index(unit.timesteps, cfg_from_t)  # the first guided step
        if cfg_step:
            guidance = EarlyGuidance(cfg_step, float(unit.guidance_scale), float(params.early_guidance))
        G = unit.num_generations
        shift = torch.zeros(len(unit.prompts)) if x_T is None else \
            (x_T - unit.x_T).flatten(1).norm(dim=1).view(-1, G).mean(1).float().cpu()  # mean ||x_T' - x_T||
        info = [{"han_rho": rho, "han_shift": float(v), "han_cfg_step": cfg_step} for v in shift]
        return Plan(x_T=x_T, guidance=guidance, info=info)

"""``broken-memories``: Huang et al. (KDD 2026, "Broken Memories", arXiv 2605.22050), the mitigation half.
No official code exists; this follows METHODS-2026.md's reading of the paper's algorithm 2 (through a
third-party reimplementation for unconditional models). The detection half and its calibration are
``diffmem.detectors.broken_memories``; both use the same per-step statistics (mean mu_k and standard
deviation s_k of ||x_{k+1}||, ||delta_k|| and ||x0_hat_k|| over ordinary generations under the run's
sampler, steps and guidance).

At each step k, per generation, after the sampler's guided update x_{k+1}:

1. detection: the first step whose update z and clean-latent z both exceed tau_mild flags the generation,
   *strong* if the clean latent's z exceeds tau_strong there, else *mild*;
2. while the update's z exceeds tau_mild, a strong generation is corrected at every step, a mild one only
   at steps k < mild_steps:
   - the clean latent is rescaled to the calibrated mean norm: x' = x_{k+1} + c (x0_hat mu_x0 / ||x0_hat||
     - x0_hat), with c the clean signal's coefficient in x_{k+1} (sqrt(alpha_bar) of the next timestep
     under DDIM, 1 - sigma_next on a flow model);
   - strong only: the update's norm ||x' - x_k|| is projected into mu_delta +- gamma s_delta;
   - the latent's norm ||x'|| is projected into mu_x +- gamma s_x.

Published constants (tau_mild, tau_strong, gamma, mild_steps) = (3, 14, 3, 10) at 50 steps. Our choices:
x0_hat is the current step's (as in the detector; the reimplementation's look-ahead needs the next step's
call), so the method adds no denoiser rows beyond the calibration's (at most 50 reference generations,
once per model and settings). The calibration prompts are the model's own (a lab model) or a prompt file
(``--param reference_prompts=FILE``). Off: tau_mild = inf (nothing is flagged).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

import torch

from diffmem.detectors.broken_memories import (STD_FLOOR, TAU_MILD, TAU_STRONG, BrokenMemories, predicted_clean,
                                               step_norms, z_scores)
from diffmem.mitigations import Plan, Unit, per_prompt, register

GAMMA, MILD_STEPS = 3.0, 10

NONE, MILD, STRONG = 0, 1, 2


# -- the math: small functions over tensors -----------------------------------------------------

def project_norm(v: torch.Tensor, low: torch.Tensor, high: torch.Tensor) -> torch.Tensor:
    """v (N, ...) rescaled per row so that its norm lies in [max(low, 0), high] (rows inside unchanged)."""
    norm = v.flatten(1).double().norm(dim=1).clamp_min(1e-8)
    target = norm.clamp(min=float(max(low, 0.0)), max=float(high))
    return v * (target / norm).to(v.dtype).view(-1, *[1] * (v.ndim - 1))


def rescaled_clean(x_next: torch.Tensor, x0_hat: torch.Tensor, target_norm: float, c: float) -> torch.Tensor:
    """x_next with its clean part x0_hat (N, ...) rescaled to norm `target_norm`: x_next + c (x0_hat' - x0_hat)."""
    return x_next + c * (project_norm(x0_hat, target_norm, target_norm) - x0_hat)


def signal_coefficient(model, timesteps: torch.Tensor, index: int) -> float:
    """c with x_{k+1} = c x0 + (noise part) after step `index` of `timesteps` (the whole schedule): 1 - sigma of
    the next step on a flow model; under DDIM sqrt(alpha_bar) of the next timestep (the scheduler's final
    alpha_bar after the last)."""
    if model.sampler_prediction == "flow":
        return float(1 - model.scheduler.sigmas[index + 1])
    if index + 1 < len(timesteps):
        return float(model.alpha_bar(timesteps[index + 1]).sqrt())
    return float(torch.as_tensor(model.scheduler.final_alpha_cumprod).sqrt())


class StabilityCorrection:
    """The guidance handed to the pass: plain CFG (``guided``), then the correction of the update
    (``after_update``). `mean`, `std` (S, 3): the calibration's per-step statistics (proposal, update, clean
    latent). ``kind`` (N,) each row's flag (0 none, 1 mild, 2 strong) and ``corrected`` (N,) its corrected
    steps; with `info` (one dict per prompt, rows prompt-major) each dict gets its generations' values."""

    def __init__(self, model, timesteps, scale: float, mean: torch.Tensor, std: torch.Tensor, params,
                 info: list[dict] | None = None):
        self.model, self.timesteps, self.scale, self.params, self.info = model, timesteps, scale, params, info
        self.mean, self.std = mean.double(), std.double().clamp_min(STD_FLOOR)
        self.kind = self.corrected = None

    def guided(self, index: int, t, x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        return eps_u + self.scale * (eps_c - eps_u)  # bit for bit the pass's own combination

    def after_update(self, index: int, t, x_t: torch.Tensor, guided: torch.Tensor, x_next: torch.Tensor) -> torch.Tensor:
        p = self.params
        if self.kind is None or index == 0:
            self.kind = torch.zeros(len(x_t), dtype=torch.long)
            self.corrected = torch.zeros(len(x_t), dtype=torch.long)
        x0 = predicted_clean(self.model, x_t, t, guided)
        z = z_scores(step_norms(x_t, x_next, x0).cpu(), self.mean[index], self.std[index])  # (N, 3)
        z_update, z_clean = z[:, 1], z[:, 2]
        first = (self.kind == NONE) & (z_update > p.tau_mild) & (z_clean > p.tau_mild)
        self.kind[first] = torch.where(z_clean[first] > p.tau_strong, STRONG, MILD)
        active = (z_update > p.tau_mild) & ((self.kind == STRONG) | ((self.kind == MILD) & (index < p.mild_steps)))
        if active.any():
            x_next = self.corrected_update(index, x_t, x_next, x0, active)
            self.corrected += active.long()
        per_prompt(self.info, broken_memories_flag=[("none", "mild", "strong")[k] for k in self.kind.tolist()],
                   broken_memories_corrected_steps=self.corrected)
        return x_next

    def corrected_update(self, index, x_t, x_next, x0, active):
        gamma = self.params.gamma
        (mu_x, mu_d, mu_c), (s_x, s_d, _) = self.mean[index].tolist(), self.std[index].tolist()
        c = signal_coefficient(self.model, self.timesteps, index)
        out = rescaled_clean(x_next, x0, mu_c, c)
        strong = (active & (self.kind == STRONG)).to(x_t.device).view(-1, *[1] * (x_t.ndim - 1))
        out = torch.where(strong, x_t + project_norm(out - x_t, mu_d - gamma * s_d, mu_d + gamma * s_d), out)
        out = project_norm(out, mu_x - gamma * s_x, mu_x + gamma * s_x)
        return torch.where(active.to(x_t.device).view(-1, *[1] * (x_t.ndim - 1)), out, x_next)


@register
class BrokenMemoriesMitigation:
    name = "broken-memories"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "tau_mild"
    off = {"tau_mild": math.inf}
    flow_refusal = None  # the norms and the clean latent exist on every sampler

    @dataclass
    class Params:
        tau_mild: float = TAU_MILD  # flag and correct where the update's z exceeds it
        tau_strong: float = TAU_STRONG  # a flag is strong where the clean latent's z exceeds it
        gamma: float = GAMMA  # the norms are projected into mean +- gamma std
        mild_steps: int = MILD_STEPS  # a mild flag is corrected only before this step
        reference_prompts: str | None = None  # a prompt file to calibrate on (None: the model's own)

        def __post_init__(self):
            for name in ("tau_mild", "tau_strong", "gamma"):
                v = getattr(self, name)
                if isinstance(v, bool) or not isinstance(v, (int, float)) or not v > 0:
                    raise ValueError(f"--param {name}={v!r}: must be a number > 0")
            if isinstance(self.mild_steps, bool) or not isinstance(self.mild_steps, int) or self.mild_steps < 0:
                raise ValueError(f"--param mild_steps={self.mild_steps!r}: must be a whole number >= 0")

    def sweep(self, model, sampling) -> list[dict]:
        """The published thresholds scaled: tau_mild 6, 3 (published), 2, 1 (tau_strong 14 throughout)."""
        return [{"tau_mild": t} for t in (6.0, 3.0, 2.0, 1.0)]

    def reference(self, model, params) -> list[str]:
        """The calibration prompts: the file `reference_prompts` (or the built-in "random" set), else the
        model's own; refused in one line where there are none."""
        from diffmem.lab.prompts import own_reference_prompts
        from diffmem.prompts import read_prompts

        if params.reference_prompts is not None:
            return [r.prompt for r in read_prompts(params.reference_prompts, model=model)]
        own = own_reference_prompts(model)
        if not own:
            raise ValueError(f"--method {self.name} cannot run on {model.family} ({model.name}) as it is: it calibrates "
                             "on ordinary prompts and this model has none of its own (--param reference_prompts=FILE)")
        return own

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        if math.isinf(params.tau_mild):
            return Plan()
        detector = BrokenMemories(self.reference(model, params))
        detector.prepare(model, replace(unit.sampling, guidance_scale=unit.guidance_scale))
        mean, std = detector.stats
        info = [{} for _ in unit.prompts]
        return Plan(guidance=StabilityCorrection(model, unit.timesteps, unit.guidance_scale, mean, std, params, info),
                    info=info)

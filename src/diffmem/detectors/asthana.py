"""Asthana & Belagiannis (ICLR 2026): anisotropy of the log-probability, on the initial noise.

M = g1 * norm + g2 * cos, per generation, then the mean over generations; higher means memorized.
norm = ||delta_eps(x_T, t_1)||_2 at the first DDIM step (Wen's first-step d); cos comes from a
second guided call on the same x_T at t = timesteps[-3] of the schedule (t = 41 of DDIM-50): the
cosine between eps_u and delta_eps over the channel axis at each pixel, averaged over the pixels.

Weights: the published (g1, g2) = (1, 2) for SD 1.x and (1, 0.1) for SD 2.x (v-prediction). A model
without published weights gets its own from its reference prompts (the lab's novel captions),
putting both terms on the same spread: g1 = 1, g2 = std(norm) / std(cos) over those prompts; a model
with neither needs ``asthana_weights`` given (``detect --asthana-weights G1,G2``).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from diffmem.detectors.registry import register
from diffmem.detectors.common import FirstStepRecorder, PerGeneration, guided_branches

PUBLISHED = {("stable-diffusion", "epsilon"): (1.0, 2.0), ("stable-diffusion", "v_prediction"): (1.0, 0.1)}
_derived: dict[tuple, tuple[float, float]] = {}


def second_timestep(model, num_inference_steps: int):
    from diffmem.sampling import schedule

    ts = schedule(model, num_inference_steps)
    if len(ts) < 3:
        raise ValueError(f"asthana takes its second call at timesteps[-3]: needs >= 3 steps, not {len(ts)}")
    return ts[-3]


def channel_cosine(eps_u: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """(N,) cosine of eps_u and delta_eps over the channel axis at each pixel, averaged over pixels."""
    return F.cosine_similarity(eps_u.double(), delta.double(), dim=1).flatten(1).mean(1)


def norm_and_cosine(model, step, t2) -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) x 2: the first step's ||delta_eps||_2, and the channel cosine of a second call on x_T at t2."""
    norm = (step.eps_cond - step.eps_uncond).detach().flatten(1).double().norm(dim=1).cpu()
    eps_c, eps_u = guided_branches(model, step.x_t.detach(), t2, step.cond.detach())
    return norm, channel_cosine(eps_u, eps_c - eps_u).cpu()


@register
class Asthana(PerGeneration):
    name = "asthana"
    per_generation_key = "asthana_per_generation"
    first_step_only = True

    def __init__(self, asthana_weights: tuple[float, float] | None = None):
        self.given = tuple(asthana_weights) if asthana_weights is not None else None
        self.weights: tuple[float, float] | None = self.given

    def resolve_weights(self, model, config) -> tuple[float, float]:
        if self.given is not None:
            if len(self.given) != 2:
                raise ValueError(f"--asthana-weights {self.given}: expected two numbers, g1,g2")
            return self.given
        key = (model.family, model.prediction_type)
        if key in PUBLISHED:
            return PUBLISHED[key]
        from diffmem.lab.prompts import own_reference_prompts

        reference = own_reference_prompts(model)
        if not reference:
            raise ValueError(f"asthana has no published weights for {model.family} and {model.name} has no "
                             "reference prompts to derive them from: give asthana_weights=(g1, g2)")
        cache = (model.name, model.identity()["sha256_16"], config.num_inference_steps, config.num_generations,
                 config.seed)
        if cache not in _derived:
            from dataclasses import replace

            from diffmem.sampling import plan_units, sample_unit

            cfg = replace(config, track_steps=1)
            t2 = second_timestep(model, cfg.num_inference_steps)
            norms, coss = [], []
            for unit in plan_units(list(range(len(reference))), cfg.num_generations, cfg.batch_size):
                probe = FirstStepRecorder(lambda step: norm_and_cosine(model, step, t2))
                sample_unit(model, [reference[p] for p in unit], unit, cfg, recorders=[probe])
                norms += probe.value[0].tolist()
                coss += probe.value[1].tolist()
            spread = lambda v: float(torch.tensor(v, dtype=torch.float64).std())
            _derived[cache] = (1.0, spread(norms) / max(spread(coss), 1e-12))
        return _derived[cache]

    def prepare(self, model, config) -> None:
        """Resolve the weights before any sampling (a model without them is refused here)."""
        self.weights = self.resolve_weights(model, config)

    def recorder(self, model, config, prompts):
        if self.weights is None:
            self.prepare(model, config)
        t2 = second_timestep(model, config.num_inference_steps)
        return FirstStepRecorder(lambda step: norm_and_cosine(model, step, t2))

    def values(self, recorder: FirstStepRecorder) -> torch.Tensor:
        (g1, g2), (norm, cos) = self.weights, recorder.value
        return g1 * norm + g2 * cos

    def fields(self, recorder: FirstStepRecorder, rows: slice) -> dict:
        norm, cos = recorder.value
        return {**super().fields(recorder, rows), "asthana_norm": norm[rows].tolist(),
                "asthana_cos": cos[rows].tolist(), "asthana_weights": list(self.weights)}

"""Asthana & Belagiannis (ICLR 2026): anisotropy of the log-probability, on the initial noise.

M = g1 * norm + g2 * cos, per generation, then the mean over generations; higher means memorized.
norm = ||delta_eps(x_T, t_1)||_2 at the first DDIM step (Wen's first-step d); cos comes from a
second guided call on the same x_T at t = timesteps[-3] of the schedule (t = 41 of DDIM-50): the
cosine between eps_u and delta_eps over the channel axis at each pixel, averaged over the pixels.

On v-prediction models (SD 2.x) the official code (``local_model/pipe.py``, its ``sd_ver == 2``
path) takes both terms in the UNet's own output space, and its published g2 = 0.1 was tuned there:
cos(v_u, v_c - v_u) on the raw velocities of the second call, and norm = sqrt(a) ||v_c - v_u|| /
sigma^2 = ||delta_eps|| / sigma^2 at t_1 (a = alpha_bar_t1, sigma^2 = 1 - a; its ``(beta * v - x) /
beta_prod**2``). ``asthana_space="official"`` (the default) does the same; ``"noise"`` takes both
terms on the noise on every model (cos(eps_u, delta_eps), norm = Wen's d), the paper's equations
read in noise space. On epsilon models the two are the same.

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
from diffmem.model import Conditioning

PUBLISHED = {("stable-diffusion", "epsilon"): (1.0, 2.0), ("stable-diffusion", "v_prediction"): (1.0, 0.1)}
SPACES = ("official", "noise")  # where both terms are taken on v-prediction models (see the module docstring)
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


def raw_branches(model, x: torch.Tensor, t, cond: Conditioning) -> tuple[torch.Tensor, torch.Tensor]:
    """(out_cond, out_uncond): the UNet's raw outputs (the velocity on a v-prediction model) at x_T
    (N rows, unscaled) and t, `cond` against the empty prompt, in one call in the pass's layout."""
    x_in = model.scheduler.scale_model_input(x, t)
    uncond = model.empty_conditioning().expand(len(x))
    out_u, out_c = model.model_output(torch.cat([x_in, x_in]), t, Conditioning.cat([uncond, cond])).chunk(2)
    return out_c, out_u


def norm_and_cosine(model, step, t2, space: str = "official") -> tuple[torch.Tensor, torch.Tensor]:
    """(N,) x 2: the first step's norm and the channel cosine of a second call on x_T at t2; in the
    UNet's output space on a v-prediction model with ``space="official"``, else on the noise."""
    native = space == "official" and model.prediction_type == "v_prediction"
    norm = (step.eps_cond - step.eps_uncond).detach().flatten(1).double().norm(dim=1)
    if native:  # sqrt(a) ||delta_v|| / sigma^2, the official SD 2 norm: delta_eps = sqrt(a) delta_v
        norm = norm / (1 - model.alpha_bar(step.t).double())
    branches = raw_branches if native else guided_branches
    out_c, out_u = branches(model, step.x_t.detach(), t2, step.cond.detach())
    return norm.cpu(), channel_cosine(out_u, out_c - out_u).cpu()


@register
class Asthana(PerGeneration):
    name = "asthana"
    per_generation_key = "asthana_per_generation"
    first_step_only = True

    def __init__(self, asthana_weights: tuple[float, float] | None = None, asthana_space: str = "official"):
        if asthana_space not in SPACES:
            raise ValueError(f"--asthana-space {asthana_space!r}: expected one of {', '.join(SPACES)}")
        self.given = tuple(asthana_weights) if asthana_weights is not None else None
        self.weights: tuple[float, float] | None = self.given
        self.space = asthana_space

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
                 config.seed, self.space)
        if cache not in _derived:
            from dataclasses import replace

            from diffmem.sampling import plan_units, sample_unit

            cfg = replace(config, track_steps=1)
            t2 = second_timestep(model, cfg.num_inference_steps)
            norms, coss = [], []
            for unit in plan_units(list(range(len(reference))), cfg.num_generations, cfg.batch_size):
                probe = FirstStepRecorder(lambda step: norm_and_cosine(model, step, t2, self.space))
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
        return FirstStepRecorder(lambda step: norm_and_cosine(model, step, t2, self.space))

    def values(self, recorder: FirstStepRecorder) -> torch.Tensor:
        (g1, g2), (norm, cos) = self.weights, recorder.value
        return g1 * norm + g2 * cos

    def fields(self, recorder: FirstStepRecorder, rows: slice) -> dict:
        norm, cos = recorder.value
        return {**super().fields(recorder, rows), "asthana_norm": norm[rows].tolist(),
                "asthana_cos": cos[rows].tolist(), "asthana_weights": list(self.weights), "asthana_space": self.space}

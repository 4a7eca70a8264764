"""``delayed-cfg``: classifier-free guidance switched on late (Jain et al., CVPR 2025, "Classifier-free
guidance inside the attraction basin may cause memorization"; official code
``anubhav1997/mitigating_memorization``, no license, read to check the constants, not copied).

Memorized generations are pulled into an "attraction basin" by guidance early in sampling; the paper
keeps guidance off (or reversed) until past it, then applies the full scale s (the run's guidance
scale: 7.5 on Stable Diffusion). Each step's prediction is ``eps_u + w_k (eps_c - eps_u)`` with

- ``static`` (the static transition point, ``generate_test_dataset_stp.py``): w = ``early_scale``
  (published 0: the unconditional prediction only) while t > ``switch_t`` (published 500 of SD's
  1,000 training timesteps), w = s from the first step with t <= switch_t on;
- ``opposite`` (opposite guidance with a static transition, the README's second command):
  the same switch with early_scale -2 and switch_t 650;
- ``dynamic`` (the dynamic transition point, ``generate_test_dataset_dtp.py``): per generation,
  w = ``early_scale`` (published 1: the conditional prediction only) until d = ||eps_c - eps_u||
  has passed its first local minimum over the steps, then w = s. As in the official loop, the
  minimum at step k-1 is seen at step k, when d_k > d_{k-1} < d_{k-2} (strict, first possible at
  k = 2), and full guidance starts at that step k. The official script measures d on a batch of one
  image; here each generation (row) has its own d and its own switch.

Constants on other models: ``switch_t`` is on a 1,000-step scale and is rescaled to the model's
``num_train_timesteps`` (the lab uses 1,000 too, so unchanged). On a flow-matching model (SD3, the
flow lab; our port, no published flow version) the switch is the noise level with the signal-to-noise
ratio of SD's timestep switch_t (``diffmem.adapters.flow.sd_sigma_at``: t = 500 is sigma 0.618, 650
is 0.733), guidance combines the velocities and the dynamic switch watches d on the velocity; guidance scales are the model's
own (``early_scale`` 0, 1 and -2 are scale-free: none, conditional only, reversed). Off: the
switch at the first step (``switch_t`` = inf), i.e. full guidance everywhere. Not reproduced: the
official script samples with DPM-Solver (diffmem with the run's DDIM schedule), and when the switch
timestep is exactly on its schedule it re-samples the rest of the trajectory on a 200-step DPM-Solver
schedule. On DDIM's 50-step schedule (timesteps 1 + 20 j) neither 500 nor 650 occurs, but DPM-Solver's
default "linspace" spacing, used when the checkpoint's scheduler config names none, gives
round(linspace(0, 999, 51)) = ..., 519, 500, 480, ...: with the published static switch at 500 the
official continues the second half of the trajectory on the finer 200-step sampler (not at 650, and
not under a saved "leading" spacing). The guidance logic is the same; image quality after the switch
may differ from the official's. Adds no UNet rows.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from diffmem.metrics import text_noise_norm
from diffmem.mitigations import Plan, Unit, per_prompt, register

MODES = ("static", "dynamic", "opposite")
DEFAULT_SWITCH_T = {"static": 500.0, "opposite": 650.0, "dynamic": None}  # on SD's 1,000-step scale
DEFAULT_EARLY_SCALE = {"static": 0.0, "opposite": -2.0, "dynamic": 1.0}


# -- the math: small functions over tensors -----------------------------------------------------

def switch_index(model, timesteps: torch.Tensor, switch_t: float) -> int:
    """The schedule position where guidance becomes full for a switch at SD's timestep `switch_t`: on a
    DDIM-sampled model the first timestep <= switch_t (rescaled to its ``num_train_timesteps``), on a flow
    model the first step whose sigma is at or below the sigma of the same SNR (``sd_sigma_at``)."""
    if model.sampler_prediction == "flow":
        from diffmem.adapters.flow import sd_sigma_at

        if math.isinf(switch_t):
            return 0
        sigmas = torch.as_tensor([model.scheduler.sigma_of(t) for t in timesteps], dtype=torch.float64)
        return static_switch_index(sigmas, sd_sigma_at(min(max(switch_t, 0.0), 999.0)) + 1e-9)
    return static_switch_index(timesteps, switch_t * model.scheduler.config.num_train_timesteps / 1000.0)


def static_switch_index(timesteps: torch.Tensor, switch_t: float) -> int:
    """First schedule position k with timesteps[k] <= switch_t (len(timesteps) when none is):
    guidance is full from there on. timesteps (S,) noisiest first, switch_t on the model's scale."""
    below = (timesteps.float() <= switch_t).nonzero().flatten()
    return int(below[0]) if len(below) else len(timesteps)


def first_local_minimum_passed(d_prev2: torch.Tensor, d_prev1: torch.Tensor, d: torch.Tensor) -> torch.Tensor:
    """(N,) bool: the step before was a local minimum of d (d_prev2 > d_prev1 < d), per row.
    NaN entries (no step there yet) compare False, as the official -1 initial values do."""
    return (d > d_prev1) & (d_prev2 > d_prev1)


def dynamic_switch_steps(d: torch.Tensor) -> torch.Tensor:
    """(N,) the step at which each row's guidance switches, from its d (N, S) over the steps: the
    first k >= 2 with d[k-2] > d[k-1] < d[k]; S (never) where d has no such minimum."""
    N, S = d.shape
    out = torch.full((N,), S, dtype=torch.long)
    for k in range(2, S):
        hit = first_local_minimum_passed(d[:, k - 2], d[:, k - 1], d[:, k]) & (out == S)
        out[hit] = k
    return out


# -- the schedules handed to the pass -----------------------------------------------------------

class StaticSwitch:
    """``(index, eps_c, eps_u) -> w``: early_scale before schedule position `switch_index`, the full
    scale from there (one number for every row)."""

    def __init__(self, switch_index: int, early_scale: float, full_scale: float):
        self.switch_index, self.early_scale, self.full_scale = switch_index, early_scale, full_scale

    def __call__(self, index: int, eps_c: torch.Tensor, eps_u: torch.Tensor) -> float:
        return self.full_scale if index >= self.switch_index else self.early_scale


class DynamicSwitch:
    """``(index, eps_c, eps_u) -> w (N,)``: each row at early_scale until its d has passed its first
    local minimum, then at the full scale. Keeps the last two steps' d; a call at an index not
    after the previous one starts a new pass. ``switch_step`` (N,) holds each row's switch step
    (-1: not switched); with `info` (one dict per prompt, rows prompt-major), each dict's
    ``switch_step`` gets its prompt's generations' steps after every call."""

    def __init__(self, early_scale: float, full_scale: float, info: list[dict] | None = None):
        self.early_scale, self.full_scale, self.info = early_scale, full_scale, info
        self.switch_step: torch.Tensor | None = None
        self._last = None

    def __call__(self, index: int, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        d = text_noise_norm(eps_c, eps_u).cpu()  # (N,) as the pass records it
        if self._last is None or index != self._last + 1 or len(d) != len(self.switch_step):
            nan = torch.full_like(d, float("nan"))
            self._prev2, self._prev1 = nan, nan.clone()
            self.switch_step = torch.full((len(d),), -1, dtype=torch.long)
        hit = first_local_minimum_passed(self._prev2, self._prev1, d) & (self.switch_step < 0)
        self.switch_step[hit] = index
        self._prev2, self._prev1, self._last = self._prev1, d, index
        per_prompt(self.info, switch_step=self.switch_step)
        on = self.switch_step >= 0
        w = torch.where(on, torch.tensor(self.full_scale, dtype=torch.float64),
                        torch.tensor(self.early_scale, dtype=torch.float64))
        return w.to(eps_c.device)


@register
class DelayedCFG:
    name = "delayed-cfg"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "switch_t"
    flow_refusal = None  # on a flow model the switch is the noise level of SD's switch_t (sd_sigma_at)
    off = {"mode": "static", "switch_t": math.inf}  # every timestep is <= inf: full guidance from the first step

    @dataclass
    class Params:
        mode: str = "static"  # "static" (guidance 0 until t <= 500), "opposite" (-2 until 650), "dynamic"
        switch_t: float | None = None  # static/opposite: the switch timestep on a 1,000-step scale (None: 500 / 650)
        early_scale: float | None = None  # guidance before the switch (None: 0 static, -2 opposite, 1 dynamic)

        def __post_init__(self):
            if self.mode not in MODES:
                raise ValueError(f"--param mode={self.mode!r}: expected one of {', '.join(MODES)}")
            if self.switch_t is not None:
                if not isinstance(self.switch_t, (int, float)) or math.isnan(self.switch_t):
                    raise ValueError(f"--param switch_t={self.switch_t!r}: must be a number (a timestep on a 1,000-step scale)")
                if self.mode == "dynamic":
                    raise ValueError(f"--param switch_t={self.switch_t}: mode=dynamic finds its own switch "
                                     "(leave switch_t out, or use mode=static)")
            if self.early_scale is not None and (not isinstance(self.early_scale, (int, float))
                                                 or not math.isfinite(self.early_scale)):
                raise ValueError(f"--param early_scale={self.early_scale!r}: must be a finite number")

    def sweep(self, model, sampling) -> list[dict]:
        """The static switch at t = 800, 650, 500, 300 (mildest first: guidance off over ever more
        of the trajectory), then the dynamic switch."""
        return [*({"mode": "static", "switch_t": float(t)} for t in (800, 650, 500, 300)), {"mode": "dynamic"}]

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        early = DEFAULT_EARLY_SCALE[params.mode] if params.early_scale is None else float(params.early_scale)
        full = unit.guidance_scale
        P, G = len(unit.prompts), unit.num_generations
        if params.mode == "dynamic":
            info = [{"mode": "dynamic", "early_scale": early, "switch_step": [-1] * G} for _ in range(P)]
            return Plan(guidance=DynamicSwitch(early, full, info), info=info)
        switch_t = DEFAULT_SWITCH_T[params.mode] if params.switch_t is None else float(params.switch_t)
        k = switch_index(model, unit.timesteps, switch_t)
        if k == 0:
            return Plan()  # full guidance from the first step: unmitigated sampling
        info = [{"mode": params.mode, "switch_t": switch_t, "early_scale": early, "switch_step": [k] * G}
                for _ in range(P)]
        return Plan(guidance=StaticSwitch(k, early, full), info=info)

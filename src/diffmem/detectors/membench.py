"""MemBench (Hong et al., TMLR 2025): D = ||eps(x_T, 999, p) - eps(x_T, 999, empty)||^2.

One extra conditional and unconditional UNet call per generation on the initial noise at t = 999
(the training schedule's last timestep, not the first DDIM step's 981), made by the recorder at the
pass's first step; the mean over generations; higher means memorized. The square is kept as
published (it does not change the ranking of one generation, but it does change a mean over several).
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register
from diffmem.detectors.common import FirstStepRecorder, PerGeneration, guided_branches


def t999_difference(model, step) -> torch.Tensor:
    """(N,) ||eps(x_T, 999, c) - eps(x_T, 999, empty)||^2 of the pass rows."""
    t = torch.tensor(model.scheduler.config.num_train_timesteps - 1, device=step.x_t.device)
    eps_c, eps_u = guided_branches(model, step.x_t.detach(), t, step.cond.detach())
    return (eps_c - eps_u).flatten(1).double().pow(2).sum(1).cpu()


@register
class MemBench(PerGeneration):
    name = "membench"
    per_generation_key = "membench_per_generation"
    first_step_only = True

    def recorder(self, model, config, prompts):
        return FirstStepRecorder(lambda step: t999_difference(model, step))

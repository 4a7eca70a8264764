"""jeon-fd, diffmem's own detector (not a published method): the finite-difference sharpness of
Jeon et al.'s SAIL loss, used as a score.

At the first step, with delta(x) = eps(x, c) - eps(x, empty) and v = delta(x_T) / ||delta(x_T)||
(a unit vector per generation), the score is ||delta(x_T + v) - delta(x_T)||_2, the mean over
generations: how fast the text-conditional noise changes along its own direction, the quantity
Jeon et al.'s Hessian score measures with a Jacobian-vector product, here by one extra guided
UNet call per generation and no autograd. Higher means memorized.
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register
from diffmem.detectors.common import FirstStepRecorder, PerGeneration, guided_branches


def finite_difference_sharpness(model, step) -> torch.Tensor:
    """(N,) ||delta(x_T + v) - delta(x_T)||_2, v = delta(x_T) / ||delta(x_T)||, of the pass rows."""
    delta = (step.eps_cond - step.eps_uncond).detach()
    norm = delta.flatten(1).norm(dim=1).clamp_min(1e-12).view(-1, *[1] * (delta.ndim - 1))
    eps_c, eps_u = guided_branches(model, step.x_t.detach() + delta / norm, step.t, step.cond.detach())
    return ((eps_c - eps_u) - delta).flatten(1).double().norm(dim=1).cpu()


@register
class JeonFD(PerGeneration):
    name = "jeon-fd"
    per_generation_key = "jeon_fd_per_generation"
    first_step_only = True

    def recorder(self, model, config, prompts):
        return FirstStepRecorder(lambda step: finite_difference_sharpness(model, step))

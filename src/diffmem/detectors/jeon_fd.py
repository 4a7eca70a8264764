"""jeon-fd, diffmem's own detector (not a published method): a finite-difference sharpness along
the unit direction of the text-conditional noise, used as a score.

At the first step, with delta(x) = eps(x, c) - eps(x, empty), d = ||delta(x_T)|| (Wen et al.'s
first-step d) and v = delta(x_T) / d (a unit vector per generation), the score is
||delta(x_T + v) - delta(x_T)||_2, the mean over generations, by one extra guided UNet call per
generation and no autograd. To first order it is ||J v||, J the Jacobian of delta at x_T, while
Jeon et al.'s Hessian score (``jeon``) is ||J delta|| / sigma_t^2 = d ||J v|| / sigma_t^2; so

    jeon-fd ≈ jeon · sigma_t^2 / d:

not the same sharpness by another method, but Jeon's score with Wen's d, its strongest memorization
signal, divided out (the sharpness along a unit step, whatever the size of delta). Nor is it SAIL's
loss, ||delta(x + v)|| without the subtraction. Higher means memorized.
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

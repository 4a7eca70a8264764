"""Jeon et al. (ICML 2025): the Hessian score, by a Jacobian-vector product at the first step.

With the score function s(x, c) = -eps(x, c) / sigma_t (sigma_t = sqrt(1 - alpha_bar_t)) and
v = s(x_T, c) - s(x_T, empty) = -delta_eps / sigma_t at the first DDIM step, the score is
||J_c v - J_u v||_2 per generation (J the Jacobians of s with respect to x, by one forward-mode
product ``torch.func.jvp`` through both branches), then the mean over generations; higher means
memorized. As in their code (not their paper) it is not squared. On v-prediction models the UNet's
velocity is first turned into the noise (``DiffusionModel.predict_noise``), which their code does up
to a factor that depends only on t. Attention runs on PyTorch's math kernel, the one forward-mode
differentiation supports.
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register
from diffmem.detectors.common import FirstStepRecorder, PerGeneration


def hessian_score(model, x_t: torch.Tensor, t, cond, uncond) -> torch.Tensor:
    """(N,) ||J_c v - J_u v||_2 at x_t (N, C, H, W; unscaled), v = -delta_eps / sigma_t."""
    from torch.nn.attention import SDPBackend, sdpa_kernel

    alpha_bar = model.scheduler.alphas_cumprod.to(x_t.device)[int(t)].to(torch.float64)
    sigma = float((1 - alpha_bar).sqrt())
    x_in = model.scheduler.scale_model_input(x_t.detach(), t)

    def delta(x):
        eps = model.predict_noise(torch.cat([x, x]), t, type(cond).cat([uncond, cond]))
        e_u, e_c = eps.chunk(2)
        return e_c - e_u

    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        d = delta(x_in)
        v = -d / sigma
        _, jvp = torch.func.jvp(delta, (x_in,), (v,))  # J_delta_eps v
    return (jvp / sigma).flatten(1).double().norm(dim=1).cpu()  # J_s = -J_eps / sigma; the norm drops the sign


@register
class Jeon(PerGeneration):
    name = "jeon"
    per_generation_key = "jeon_per_generation"
    first_step_only = True

    def recorder(self, model, config, prompts):
        return FirstStepRecorder(lambda step: hessian_score(model, step.x_t, step.t, step.cond.detach(),
                                                            model.empty_conditioning().expand(len(step.x_t))))

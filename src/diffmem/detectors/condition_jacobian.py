"""cond-jacobian: diffmem's reading of the "Condition Jacobian" detector (OpenReview pY2P28M9Iv),
from its abstract only; no code was published, so this is our construction, not the paper's.

The abstract writes the guidance signal as a line integral along the straight path from the null
embedding to the prompt's, e_lambda = e_null + lambda (e_p - e_null):

    eps(x, e_p) - eps(x, e_null) = int_0^1 J^e eps(x, e_lambda) (e_p - e_null) dlambda,

J^e the Jacobian of the noise prediction with respect to the conditioning, and says that for
memorized prompts the integrand spikes near lambda = 1, which the condition Jacobian at the prompt
embedding measures. diffmem takes the integrand at lambda = 1:

    score = ||J^e eps(x_T, t_1, e_p) (e_p - e_null)||_2

per generation, at the first step on x_T, by one forward-mode Jacobian-vector product
(``torch.func.jvp``) through the conditional branch alone; then the mean over the generations;
higher means memorized. Our choices where the abstract is silent: the directional derivative (not
a Frobenius norm over all directions), the first step, the prediction Wen's d is measured on (the
noise on DDIM-sampled families, where the score -eps/sigma_t differs by a constant factor at a fixed
t; the velocity on flow-matching ones, where the same line integral gives v(x, e_p) - v(x, e_null)
and the noise form would be 0 at sigma = 1), e_null the model's named null conditioning (the one
Wen's d is measured against: SD's encoded "", SDXL's zeros), and, where a family conditions on
more than token embeddings (SDXL's pooled embedding), the path runs through those too. Attention
runs on PyTorch's math kernel, the one forward-mode differentiation supports.
"""

from __future__ import annotations

import torch

from diffmem.detectors.common import FirstStepRecorder, PerGeneration
from diffmem.detectors.registry import register
from diffmem.model import Conditioning


def condition_directional_derivative(model, x_t: torch.Tensor, t, cond: Conditioning,
                                     direction: Conditioning) -> torch.Tensor:
    """(N, C, H, W): J^e eps(x_t, t, cond) applied to `direction`, the derivative of the prediction
    guidance combines (``model.predict``: the noise, or a flow model's velocity) along a change of the
    conditioning, at latents x_t (N, C, H, W; unscaled).

    cond, direction: N rows; the direction's token embeddings and floating-point extras are the
    tangents (its mask is unused: the derivative is taken under cond's mask).
    """
    from torch.nn.attention import SDPBackend, sdpa_kernel

    x_in = model.scheduler.scale_model_input(x_t.detach(), t)
    moving = sorted(k for k, v in cond.extra.items() if v.is_floating_point())
    fixed = {k: v for k, v in cond.extra.items() if k not in moving}

    def eps(embeddings, *extras):
        return model.predict(x_in, t, Conditioning(embeddings, {**fixed, **dict(zip(moving, extras))}, cond.mask))

    primals = (cond.embeddings.detach(), *(cond.extra[k].detach() for k in moving))
    tangents = (direction.embeddings.to(primals[0]), *(direction.extra[k].to(cond.extra[k]) for k in moving))
    with sdpa_kernel(SDPBackend.MATH), torch.no_grad():
        _, derivative = torch.func.jvp(eps, primals, tangents)
    return derivative


def prompt_direction(cond: Conditioning, null: Conditioning) -> Conditioning:
    """e_p - e_null per row (N rows; `null` one row, broadcast): embeddings and floating extras."""
    extra = {k: v - null.extra[k].to(v) if v.is_floating_point() else v for k, v in cond.extra.items()}
    return Conditioning(cond.embeddings - null.embeddings.to(cond.embeddings), extra, cond.mask)


def condition_jacobian_norm(model, x_t: torch.Tensor, t, cond: Conditioning) -> torch.Tensor:
    """(N,) ||J^e eps(x_t, t, e_p) (e_p - e_null)||_2, e_null the model's null conditioning."""
    direction = prompt_direction(cond, model.empty_conditioning())
    return condition_directional_derivative(model, x_t, t, cond, direction).flatten(1).double().norm(dim=1).cpu()


@register
class ConditionJacobian(PerGeneration):
    name = "cond-jacobian"
    per_generation_key = "cond_jacobian_per_generation"
    first_step_only = True
    flow_refusal = None  # on a flow model, the derivative of the velocity (the prediction d is measured on)

    def recorder(self, model, config, prompts):
        return FirstStepRecorder(lambda step: condition_jacobian_norm(model, step.x_t, step.t, step.cond.detach()))

"""Early detection of memorization ("Early Detection of Memorization in Diffusion Models", code
``randomnameforicml/icml-2026``, ``src/detect_all_metrics.py``): Metric 2 and the Dynamical
Singularity Metric, both at the start of sampling.

- ``early-metric2`` ("Hessian difference"): at the first DDIM step, with the Jacobians
  J_c = d eps(x_T, c) / d x_T and J_u = d eps(x_T, empty) / d x_T,

      Metric2 = ||J_c^T eps_c - J_u^T eps_u||_2^2  = ||grad_x (1/2 ||eps_c||^2) - grad_x (1/2 ||eps_u||^2)||^2,

  on the noise prediction (no 1 / sigma_t), squared, as their code. diffmem takes both
  vector-Jacobian products in one backward pass through one batched [empty, c] call, with the
  cotangent [-eps_u, eps_c]; their code takes two ``autograd.grad`` calls through two separate
  calls (the same quantity).
- ``early-dsm`` (DSM 1->2): the change of the *conditional* noise prediction from the second to
  the third step of the guided trajectory,

      DSM = ||eps(x_{t2}, t2, c) - eps(x_{t1}, t1, c)||_2^2,

  x_{t1}, x_{t2} the latents after one and two guided DDIM steps (eta 0) from x_T (t1 = 961,
  t2 = 941 of DDIM-50); both the point and the timestep change. Rows also keep DSM 0->1,
  ||eps(x_{t1}, t1, c) - eps(x_T, t0, c)||^2, under ``early_dsm_01_per_generation``.

Both are taken per generation, then averaged over the generations (their code draws one x_T per
prompt); higher means memorized. On v-prediction models the velocity is turned into the noise
first, as their ``get_epsilon`` does (the conversion's x_t term is differentiated too).
"""

from __future__ import annotations

import torch

from diffmem.detectors.common import FLOW_NOISE_AT_SIGMA_1, FirstStepRecorder, PerGeneration, guided_branches
from diffmem.detectors.registry import register
from diffmem.model import Conditioning


def jacobian_transposed_difference(model, x_t: torch.Tensor, t, cond: Conditioning,
                                   uncond: Conditioning) -> torch.Tensor:
    """(N,) ||J_c^T eps_c - J_u^T eps_u||_2^2 at latents x_t (N, C, H, W; unscaled) and timestep t,
    the Jacobians of the noise prediction with respect to x_t; cond, uncond N rows. One batched
    denoiser call of 2N rows with its graph, and one backward pass."""
    x = x_t.detach().requires_grad_(True)
    with torch.enable_grad():
        x_in = model.scheduler.scale_model_input(x, t)
        eps = model.predict_noise(torch.cat([x_in, x_in]), t, Conditioning.cat([uncond, cond]))  # (2N, C, H, W)
        eps_u, eps_c = eps.chunk(2)
        cotangent = torch.cat([-eps_u, eps_c]).detach()  # x feeds both halves: the gradients add
        (vjp,) = torch.autograd.grad(eps, x, cotangent)  # (N, C, H, W) = J_c^T eps_c - J_u^T eps_u
    return vjp.detach().flatten(1).double().pow(2).sum(1).cpu()


def conditional_prediction_changes(model, step, t1, t2, guidance_scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """((N,), (N,)): ||eps_c(x_{t1}, t1) - eps_c(x_T, t0)||^2 and ||eps_c(x_{t2}, t2) - eps_c(x_{t1}, t1)||^2,
    from the pass's first step (x_T, both branches at t0) by two guided DDIM steps (eta 0): both
    branches at t1, the conditional one alone at t2."""
    scheduler = model.scheduler
    x0, cond = step.x_t.detach(), step.cond.detach()
    eps_c0, eps_u0 = step.eps_cond.detach(), step.eps_uncond.detach()
    # 1. x_T -> x_{t1}, guided as the pass guides
    x1 = scheduler.step(eps_u0 + guidance_scale * (eps_c0 - eps_u0), step.t, x0, eta=0.0, return_dict=False)[0]
    # 2. both branches at t1, then x_{t1} -> x_{t2}
    eps_c1, eps_u1 = guided_branches(model, x1, t1, cond)
    x2 = scheduler.step(eps_u1 + guidance_scale * (eps_c1 - eps_u1), t1, x1, eta=0.0, return_dict=False)[0]
    # 3. the conditional branch alone at t2
    eps_c2 = model.predict_noise(scheduler.scale_model_input(x2, t2), t2, cond)
    squared = lambda a, b: (a - b).flatten(1).double().pow(2).sum(1).cpu()
    return squared(eps_c1, eps_c0), squared(eps_c2, eps_c1)


@register
class EarlyMetric2(PerGeneration):
    name = "early-metric2"
    per_generation_key = "early_metric2_per_generation"
    first_step_only = True
    flow_refusal = FLOW_NOISE_AT_SIGMA_1 + ", so J_c^T eps_c - J_u^T eps_u is identically 0"

    def recorder(self, model, config, prompts):
        def measure(step):
            uncond = model.empty_conditioning().expand(len(step.x_t))
            return jacobian_transposed_difference(model, step.x_t, step.t, step.cond.detach(), uncond)

        return FirstStepRecorder(measure)


@register
class EarlyDSM(PerGeneration):
    name = "early-dsm"
    per_generation_key = "early_dsm_per_generation"
    first_step_only = True  # its extra steps start from the first step's x_T and predictions
    flow_refusal = ("DSM compares noise predictions along DDIM's noise-predicting trajectory, and a flow model's "
                    "sampler steps on the velocity")

    def prepare(self, model, config) -> None:
        if config.num_inference_steps < 3:
            raise ValueError(f"--method early-dsm compares the second and third steps of the schedule: needs "
                             f"--num-inference-steps >= 3, not {config.num_inference_steps}")

    def recorder(self, model, config, prompts):
        from diffmem.sampling import schedule

        self.prepare(model, config)
        t1, t2 = schedule(model, config.num_inference_steps)[1:3]
        w = config.guidance(model)
        return FirstStepRecorder(lambda step: conditional_prediction_changes(model, step, t1, t2, w))

    def values(self, recorder: FirstStepRecorder) -> torch.Tensor:
        return recorder.value[1]

    def fields(self, recorder: FirstStepRecorder, rows: slice) -> dict:
        return {**super().fields(recorder, rows), "early_dsm_01_per_generation": recorder.value[0][rows].tolist()}

"""NeMo-SSIM (Hintersdorf et al., NeurIPS 2024): a memorized prompt's single-step noise predictions
look alike across seeds.

For each of the prompt's G initial noises x_T (NeMo uses 10 seeds: ``--num-generations 10``), the
conditional prediction at the second timestep of the schedule with no step taken before it (t = 961
of DDIM-50, as NeMo's code) gives z = eps(x_T, t, c) - x_T, each channel min-max scaled to [0, 1];
the score is the largest structural similarity over the pairs of generations (NeMo flags a prompt
above 0.428); higher means memorized. NeMo measures MS-SSIM (three scales, window 11, as
torchmetrics computes it), which needs latent sides over 40 pixels (SD: 64); smaller latents (the
lab: 16) use single-scale SSIM with a Gaussian window of sigma 1.0 (side 9) instead. One extra
conditional UNet row per generation.
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register
from diffmem.detectors.common import FirstStepRecorder


def scaled_noise_difference(eps: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W): eps - x, each channel of each row min-max scaled to [0, 1]."""
    z = (eps - x).double()
    lo, hi = z.amin(dim=(2, 3), keepdim=True), z.amax(dim=(2, 3), keepdim=True)
    return (z - lo) / (hi - lo).clamp_min(1e-12)


def max_pairwise_similarity(z: torch.Tensor) -> float:
    """The largest (MS-)SSIM over pairs of a prompt's (G, C, H, W) scaled differences."""
    from diffmem.similarity import ms_ssim, ssim

    pairs = torch.combinations(torch.arange(len(z)), r=2)
    a, b = z[pairs[:, 0]], z[pairs[:, 1]]
    values = ms_ssim(a, b) if min(z.shape[-2:]) > 40 else ssim(a, b, sigma=1.0)
    return float(values.max())


def single_step_differences(model, step, t) -> torch.Tensor:
    """(N, C, H, W): the scaled eps(x_T, t, c) - x_T of the pass rows (conditional calls only)."""
    x = step.x_t.detach()
    eps = model.predict_noise(model.scheduler.scale_model_input(x, t), t, step.cond.detach())
    return scaled_noise_difference(eps, x).cpu()


@register
class NemoSSIM:
    name = "nemo-ssim"
    higher_is_memorized = True
    first_step_only = True
    min_generations = 2

    def recorder(self, model, config, prompts):
        if config.num_inference_steps < 2:
            raise ValueError("nemo-ssim takes the second timestep of the schedule: needs >= 2 steps")
        from diffmem.sampling import schedule

        t = schedule(model, config.num_inference_steps)[1]
        return FirstStepRecorder(lambda step: single_step_differences(model, step, t))

    def fields(self, recorder: FirstStepRecorder, rows: slice) -> dict:
        return {self.name: max_pairwise_similarity(recorder.value[rows])}

    def score_of(self, row, steps=None, generations=None):
        if steps is not None or generations is not None:
            raise ValueError("nemo-ssim is taken over all its generations at one step: no window")
        return row[self.name]

"""NeMo-SSIM (Hintersdorf et al., NeurIPS 2024): a memorized prompt's single-step noise predictions
look alike across seeds.

For each of the prompt's G initial noises x_T (NeMo uses 10 seeds: ``--num-generations 10``), the
conditional prediction at the second timestep of the schedule with no step taken before it (t = 961
of DDIM-50, as NeMo's code) gives z = eps(x_T, t, c) - x_T, each channel min-max scaled to [0, 1];
the score is the largest structural similarity over the pairs of generations (NeMo flags a prompt
above 0.428); higher means memorized. NeMo measures MS-SSIM (three scales, betas 0.33, window 11),
which needs latent sides over 40 pixels (SD: 64); smaller latents (the lab: 16) use single-scale
SSIM with a Gaussian window of sigma 1.0 (side 9) instead, averaged over the whole map (diffmem's
own choice; its thresholds are derived, never NeMo's). One extra conditional UNet row per generation.

MS-SSIM convention (``ssim_convention``). NeMo's code pins torchmetrics 1.3.2, whose SSIM term (the
last scale's) is averaged without the window's 5-pixel border; torchmetrics 1.5 and later average it
over the whole reflect-padded map. At 64x64 latents the last scale is 16x16, so NeMo averaged its
central 6x6 and the two differ by about 0.01. ``"nemo"`` (the default, under which NeMo's 0.428 was
set) follows 1.3.2; ``"torchmetrics"`` the current torchmetrics. The CS terms of the other scales
are cropped in both.
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


SSIM_CONVENTIONS = ("nemo", "torchmetrics")  # MS-SSIM's last-scale SSIM map: cropped (1.3.2, NeMo's) or whole


def paired_similarity(a: torch.Tensor, b: torch.Tensor, convention: str = "nemo") -> torch.Tensor:
    """(MS-)SSIM of matching rows of two (N, C, H, W) scaled differences, as NeMo-SSIM picks it: (N,).
    MS-SSIM (sides over 40) under `convention` (module docstring); else single-scale SSIM, sigma 1."""
    from diffmem.similarity import ms_ssim, ssim

    if convention not in SSIM_CONVENTIONS:
        raise ValueError(f"ssim_convention {convention!r}: expected one of {', '.join(SSIM_CONVENTIONS)}")
    if min(a.shape[-2:]) > 40:
        return ms_ssim(a, b, crop_ssim_map=convention == "nemo")
    return ssim(a, b, sigma=1.0)


def max_pairwise_similarity(z: torch.Tensor, convention: str = "nemo") -> float:
    """The largest (MS-)SSIM over pairs of a prompt's (G, C, H, W) scaled differences (one batch of
    all pairs, as NeMo's ``calculate_max_pairwise_ssim``: the data range is the batch's)."""
    pairs = torch.combinations(torch.arange(len(z)), r=2)
    return float(paired_similarity(z[pairs[:, 0]], z[pairs[:, 1]], convention).max())


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

    def __init__(self, ssim_convention: str = "nemo"):
        if ssim_convention not in SSIM_CONVENTIONS:
            raise ValueError(f"nemo-ssim: ssim_convention {ssim_convention!r}: expected one of "
                             f"{', '.join(SSIM_CONVENTIONS)}")
        self.ssim_convention = ssim_convention

    def recorder(self, model, config, prompts):
        if config.num_inference_steps < 2:
            raise ValueError("nemo-ssim takes the second timestep of the schedule: needs >= 2 steps")
        from diffmem.sampling import schedule

        t = schedule(model, config.num_inference_steps)[1]
        return FirstStepRecorder(lambda step: single_step_differences(model, step, t))

    def fields(self, recorder: FirstStepRecorder, rows: slice) -> dict:
        return {self.name: max_pairwise_similarity(recorder.value[rows], self.ssim_convention)}

    def score_of(self, row, steps=None, generations=None):
        if steps is not None or generations is not None:
            raise ValueError("nemo-ssim is taken over all its generations at one step: no window")
        return row[self.name]

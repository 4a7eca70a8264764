"""broken-memories: Huang et al. (KDD 2026, "Broken Memories", arXiv 2605.22050), the detection half.
No official code exists; this follows METHODS-2026.md's reading of the paper's algorithms (through a
third-party reimplementation for unconditional models) and marks our own choices.

Memorized prompts make guided sampling numerically unusual. Per step k of a generation, three norms
over the whole latent:

    ||x_{k+1}||            the proposal (the latent after the step's update),
    ||delta_k||            = ||x_{k+1} - x_k||, the latent update,
    ||x0_hat_k||           the clean latent the step's guided prediction implies
                           ((x_k - sqrt(1 - alpha_bar) eps) / sqrt(alpha_bar); x_k - sigma v on a flow model).

Their per-step mean mu_k and standard deviation s_k (floored at 1e-5) are calibrated on ordinary
generations under the same sampler, steps and guidance, and a generation's z-scores are
z_k = |norm_k - mu_k| / s_k. The paper flags a generation at the first step where the update's and the
clean latent's z both exceed tau_mild = 3, strongly when the clean latent's exceeds tau_strong = 14.

Our choices where the paper is silent or we did not read it:
- the prompt score for ROC (not published): per generation max_k min(z_delta_k, z_x0_k), the largest
  level both z-scores pass together, so that the paper's flag is "score > tau_mild"; then the mean over
  generations (higher means memorized);
- x0_hat of the current step's guided prediction, not the reimplementation's look-ahead to the
  proposal (which needs the next step's call);
- the calibration: the model's reference prompts (the lab's own, or those given), at most 50 of them
  (the paper's number), one generation each, seeds from the run's seed.
Rows also keep, per generation, the first flagged step (-1: none) and whether the flag is strong.
The mitigation half (rescaling x0_hat, clamping the norms) is ``diffmem.mitigations.broken_memories``.
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register

TAU_MILD, TAU_STRONG = 3.0, 14.0  # the published thresholds at 50 steps
STD_FLOOR = 1e-5
NUM_REFERENCE = 50


# -- the math: small functions over tensors -----------------------------------------------------

def predicted_clean(model, x_t: torch.Tensor, t, pred: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) x0_hat implied by the guided prediction `pred` at latents x_t (unscaled) and timestep t:
    the noise form on DDIM-sampled families, x_t - sigma v on flow models."""
    if model.sampler_prediction == "flow":
        return x_t - model.sigma(t).to(x_t) * pred
    a = model.alpha_bar(t).to(x_t)
    return (x_t - (1 - a).sqrt() * pred) / a.sqrt()


def step_norms(x_t: torch.Tensor, x_next: torch.Tensor, x0_hat: torch.Tensor) -> torch.Tensor:
    """(N, 3) per row: ||x_next||, ||x_next - x_t||, ||x0_hat|| over the whole latent, in float64."""
    flat = lambda v: v.detach().flatten(1).double()
    return torch.stack([flat(x_next).norm(dim=1), (flat(x_next) - flat(x_t)).norm(dim=1), flat(x0_hat).norm(dim=1)], 1)


def z_scores(norms: torch.Tensor, mean: torch.Tensor, std: torch.Tensor) -> torch.Tensor:
    """|norms - mean| / max(std, 1e-5): norms (N, S, 3), mean and std (S, 3) -> (N, S, 3)."""
    return (norms - mean).abs() / std.clamp_min(STD_FLOOR)


def prompt_scores(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """From z (N, S, 3) (proposal, update, clean latent): per row the score max_k min(z_update, z_clean),
    the first step with both above TAU_MILD (-1: none) and whether the clean latent's z there is above
    TAU_STRONG."""
    both = torch.minimum(z[..., 1], z[..., 2])  # (N, S)
    score = both.max(1).values
    flagged = both > TAU_MILD
    first = torch.where(flagged.any(1), flagged.float().argmax(1), torch.full_like(score, -1, dtype=torch.long))
    strong = torch.tensor([bool(k >= 0 and z[i, k, 2] > TAU_STRONG) for i, k in enumerate(first.tolist())])
    return score, first, strong


# -- the recorder and the detector ----------------------------------------------------------------

class NormRecorder:
    """The three norms of every advanced step: ``norms()`` (N, S, 3)."""

    def __init__(self, model):
        self.model, self.rows = model, []

    def on_step(self, step) -> None:
        if step.next_latents is None:
            return
        with torch.no_grad():
            x0 = predicted_clean(self.model, step.x_t.detach(), step.t, step.pred_guided)
            self.rows.append(step_norms(step.x_t, step.next_latents, x0).cpu())

    def norms(self) -> torch.Tensor:
        return torch.stack(self.rows, 1)


_calibrated: dict = {}  # (model, weights, settings, reference) -> (mean, std), each (S, 3)


@register
class BrokenMemories:
    name = "broken-memories"
    higher_is_memorized = True
    all_steps = True  # the norms of every step of the trajectory
    flow_refusal = None  # the norms of the latents and the clean latent exist on every sampler
    needs_reference_prompts = True  # calibrated on ordinary prompts (a lab model's own, or given)

    def __init__(self, reference_prompts: list[str] | None = None):
        self.reference = reference_prompts
        self.stats: tuple[torch.Tensor, torch.Tensor] | None = None

    def reference_prompts(self, model) -> list[str]:
        from diffmem.lab.prompts import own_reference_prompts

        reference = self.reference or own_reference_prompts(model)
        if not reference:
            raise ValueError(f"broken-memories calibrates on ordinary prompts and {model.name} has no reference "
                             "prompts of its own: give some (--reference-prompts FILE)")
        return list(reference)[:NUM_REFERENCE]

    def prepare(self, model, config) -> None:
        """The per-step statistics of ordinary generations under `config`'s sampler settings (cached)."""
        from dataclasses import replace

        from diffmem.sampling import plan_units, sample_unit

        reference = self.reference_prompts(model)
        key = (model.name, model.identity()["sha256_16"], config.num_inference_steps, config.guidance(model),
               config.seed, config.eta, tuple(reference))
        if key not in _calibrated:
            cfg = replace(config, num_generations=1, track_steps=None, same_noise=False)
            norms = []
            for unit in plan_units(list(range(len(reference))), 1, cfg.batch_size):
                rec = NormRecorder(model)
                sample_unit(model, [reference[p] for p in unit], unit, cfg, recorders=[rec], decode=False)
                norms.append(rec.norms())
            norms = torch.cat(norms)  # (R, S, 3)
            _calibrated[key] = (norms.mean(0), norms.std(0) if len(norms) > 1 else torch.zeros_like(norms[0]))
        self.stats = _calibrated[key]

    def recorder(self, model, config, prompts):
        if self.stats is None:
            self.prepare(model, config)
        return NormRecorder(model)

    def fields(self, recorder: NormRecorder, rows: slice) -> dict:
        norms = recorder.norms()[rows]
        score, first, strong = prompt_scores(z_scores(norms, *self.stats))
        return {self.name: float(score.mean()), "broken_memories_per_generation": score.tolist(),
                "broken_memories_first_flag": first.tolist(), "broken_memories_strong": strong.tolist()}

    def score_of(self, row, steps=None, generations=None):
        from diffmem.detectors.common import per_generation_score

        return per_generation_score(row, "broken_memories_per_generation", self.name, steps, generations)

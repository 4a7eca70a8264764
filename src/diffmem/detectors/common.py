"""What several detectors share: token positions of a prompt, attention entropy, extra UNet calls."""

from __future__ import annotations

import torch


def end_token_index(model, prompt: str) -> int:
    """Position of the prompt's end token (the first special token after the start token): with the
    start token, the prompt's length L in Ren et al.'s and Bright Ending's sense is this + 1."""
    tokens = model.tokens(prompt)
    return next((j for j in range(1, len(tokens)) if tokens[j].special), len(tokens) - 1)


def end_positions(model, prompts: list[str], generations: int) -> torch.Tensor:
    """(N,) the end token's position of each pass row (prompt-major, `generations` rows each)."""
    return torch.tensor([end_token_index(model, p) for p in prompts]).repeat_interleave(generations)


class FirstStepRecorder:
    """Keeps ``measure(step)`` of the pass's first step, computed without gradients, in ``value``; the
    measure may make UNet calls of its own on x_T (``guided_branches``)."""

    def __init__(self, measure):
        self.measure = measure
        self.value = None

    def on_step(self, step) -> None:
        if step.index == 0:
            with torch.no_grad():
                self.value = self.measure(step)


def guided_branches(model, x: torch.Tensor, t, cond) -> tuple[torch.Tensor, torch.Tensor]:
    """(eps_cond, eps_uncond) at latents x (N rows, unscaled) and timestep t: `cond` (N rows)
    against the empty prompt, in the pass's layout."""
    from diffmem.sampling import predict_branches

    return predict_branches(model, x, t, cond, model.empty_conditioning().expand(len(x)))


FLOW_NOISE_AT_SIGMA_1 = "a flow model's noise prediction at the first step (sigma = 1) is x_t for every prompt"


def entropy(p: torch.Tensor) -> torch.Tensor:
    """-sum p log p over the last axis, with 0 log 0 = 0 (no renormalisation): (..., T) -> (...)."""
    p = p.double()
    return -(p * torch.log(p.clamp_min(1e-300))).sum(-1)


def per_generation_score(row: dict, key: str, method: str, steps=None, generations: int | None = None) -> float:
    """Mean of a row's per-generation values under `key` over the first `generations`; a detector
    taken at fixed steps refuses a step window."""
    if steps is not None:
        raise ValueError(f"{method} is taken at fixed steps: no step window")
    values = row[key][:generations] if generations else row[key]
    return float(sum(values) / len(values))


class PerGeneration:
    """Base of the detectors whose value is one number per generation and whose score is their mean:
    a subclass gives ``name``, ``per_generation_key`` and ``values(recorder) -> (N,)`` over the pass rows."""

    higher_is_memorized = True
    per_generation_key: str

    def values(self, recorder) -> torch.Tensor:
        """(N,) over the pass rows; by default what a ``FirstStepRecorder`` measured."""
        return recorder.value

    def fields(self, recorder, rows: slice) -> dict:
        v = self.values(recorder)[rows].detach().double().cpu()
        return {self.name: float(v.mean()), self.per_generation_key: v.tolist()}

    def score_of(self, row, steps=None, generations=None):
        return per_generation_score(row, self.per_generation_key, self.name, steps, generations)

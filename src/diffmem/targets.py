"""embedding-opt's target in the score's unit, and the mitigations that fall short of it.

``--target-loss`` keeps the original code's unit (``--target-unit batch``: ``||eps_c - eps_u||_2``
over all G generations at once, ``sqrt(sum_g d_g^2)``), while scores and thresholds are a mean d.
Every display shows the target as a mean first-step d, the score's unit: a batch loss at most T
means a mean d at most T / sqrt(G) (power-mean inequality), the bound shown; ``mean`` needs no
conversion.
"""

from __future__ import annotations

from dataclasses import dataclass

SCORE_UNIT = "mean first-step d, the score's unit"


def target_as_score(target_loss: float, unit: str = "batch", num_generations: int = 1) -> float:
    """The target loss as a mean first-step d (the score's unit): T / sqrt(G) for the batch unit."""
    if unit == "batch":
        return float(target_loss) / max(int(num_generations), 1) ** 0.5
    if unit == "mean":
        return float(target_loss)
    raise ValueError(f"--target-unit {unit!r}: expected batch or mean")


def describe_target(target_loss: float, unit: str = "batch", num_generations: int = 1) -> str:
    """'d <= 0.305 (mean first-step d, the score's unit; --target-loss 0.4308 in the batch unit, 2 generations)'."""
    score = target_as_score(target_loss, unit, num_generations)
    if unit == "mean":
        return f"d <= {score:.3f} ({SCORE_UNIT}; --target-unit mean)"
    return (f"d <= {score:.3f} ({SCORE_UNIT}; --target-loss {target_loss:.4g} in the original code's batch unit "
            f"over {num_generations} generation{'s' if num_generations != 1 else ''})")


@dataclass
class Shortfall:
    kind: str  # "iteration_limit": a prompt stopped above its target; "no_iterations": the target is above every prompt
    text: str  # one line, with what to change
    index: int | None = None  # the prompt's position (iteration_limit)


def mitigation_shortfalls(rows: list[dict], target_loss: float | None, unit: str = "batch", num_generations: int = 1,
                          max_iters: int | None = None, lr: float | None = None,
                          flags: tuple[str, str] = ("--max-iters", "--lr")) -> list[Shortfall]:
    """Where embedding-opt fell short, one line per case.

    rows: one dict per prompt with ``iterations`` and ``initial_loss``/``final_loss`` (in `unit`), or,
    without them, ``initial_d``/``final_d`` (mean d); ``index`` or ``position`` and ``prompt`` name it.
    `flags` name the options to raise (``serve``: --mitigation-max-iters, --mitigation-lr).
    A prompt that stopped at `max_iters` with its loss above the target is one case each; a run in
    which no prompt took a step because every prompt started at or below the target is one case.
    """
    if target_loss is None or not rows:
        return []
    goal = target_as_score(target_loss, unit, num_generations)

    def above(r: dict, when: str) -> bool:
        if f"{when}_loss" in r:
            return r[f"{when}_loss"] > target_loss * (1 + 1e-6)
        return r[f"{when}_d"] > goal * (1 + 1e-6)

    def d(r: dict, when: str) -> float:
        return r.get(f"{when}_d", float("nan"))

    out = []
    if all(r.get("iterations", 0) == 0 for r in rows) and not any(above(r, "initial") for r in rows):
        top = max(d(r, "initial") for r in rows)
        out.append(Shortfall("no_iterations", f"no prompt was optimized (0 iterations): the target {describe_target(target_loss, unit, num_generations)} "
                             f"is above every prompt's first-step d (highest {top:.3f}), so the images are the "
                             "unmitigated ones; give a lower --target-loss (e.g. the median first-step loss of "
                             "normal prompts on this model)"))
        return out
    for r in rows:
        if above(r, "final") and (max_iters is None or r.get("iterations", 0) >= max_iters):
            i = r.get("index", r.get("position"))
            text = (f"#{i} stopped at the iteration limit ({r.get('iterations')}) with first-step d {d(r, 'final'):.3f}, "
                    f"above its target d <= {goal:.3f} ({SCORE_UNIT}): raise {flags[0]}"
                    + (f" (now {max_iters})" if max_iters is not None else "")
                    + f" or {flags[1]}" + (f" (now {lr:g})" if lr is not None else "")
                    + f"; prompt: {str(r.get('prompt', ''))[:60]}")
            out.append(Shortfall("iteration_limit", text, i))
    return out

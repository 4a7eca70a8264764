"""``sail``: SAIL, sharpness-aware initialization for latent diffusion (Jeon et al., ICML 2025,
"Understanding and Mitigating Memorization in Generative Models via Sharpness of Probability
Landscapes", arXiv 2412.04140, Algorithm 2; official code ``Dongjae0324/sharpness_memorization_diffusion``,
``local_model/pipe.py``). The prompt is kept; its starting noise is replaced by one in a flat region.

For a candidate x_T (unscaled latents, as the tracked pass starts from them), at the first timestep t:

    Δε(x) = ε(x, c) − ε(x, ∅),   v̂ = Δε(x) / ||Δε(x)||   (per sample, over C·H·W)
    loss(x) = ||Δε(x + v̂)|| + α ||x / σ_init||

(σ_init = the scheduler's ``init_noise_sigma``, 1 for DDIM, so the second term is the official
``||lat||`` of the standard-normal draw). Gradients flow through both UNet calls (v̂ included). B
candidates per prompt are optimised at once with Adam (lr 0.05, at most ``max_steps`` = 10 steps); the
loss is checked before each step and after the last, and a candidate is accepted the first time its
loss is <= ℓ_thres. The prompt's round ends at the check where it has G accepted candidates (no step
after it), or at the last check. A round that ends without them is failed: a new round starts from
B fresh draws, and after every 3 failed rounds ℓ_thres grows by ``threshold_step`` (0.1).

Acceptance (``acceptance``). ``"round_end"`` (default, the official code's behaviour): an accepted
candidate stays in the batch, its loss in the summed loss, and keeps being optimised until its
prompt's round ends; the latent used is its state then (the official appends views
``lat[i].detach()`` of the optimised tensor to its list, and Adam's in-place step moves them). Its
loss then is what ``sail_loss`` records, and may be above ℓ_thres. ``"at_acceptance"``: the latent is
frozen at the check that accepted it (the paper's Algorithm 2 read literally); accepted candidates
are not evaluated again.

Published constants (SD v1.4, 512 px, 4x64x64 latents): B = 8, α = 0.05, ℓ_thres = 8.2 (swept
7.6-9), lr 0.05, 10 steps; SD 2 (v-prediction, 4x96x96): α = 0.01, ℓ_thres swept 4-6.

What the official code does, and what this module does differently (documented choices):

- Candidates: the official draws B = 8 fresh latents per prompt from its own seed and keeps the first
  G accepted, in acceptance order. Here the first G candidates of the first round are the prompt's
  x_T under the seed contract (``unit.x_T``) and the other B − G (B = max(num_candidates, G)) are
  drawn from ``derived_generator(seed, position, 0)``; round r >= 1 draws all B from stream r.
  Generation g keeps (the optimised descendant of) its own x_T[g] when that candidate is accepted;
  the remaining generations take the other accepted candidates in acceptance order (round, step,
  index). A prompt whose x_T all pass at once is sampled exactly as without mitigation.
- Rounds: the official reseeds only every third failed round, so the two rounds in between redraw the
  very same latents (and re-add those already accepted, which can fill G with duplicates); here
  every round draws new candidates, and the threshold still grows every 3 failed rounds.
- The official feeds the first UNet call the latents of the round's start at every step (its input
  tensor is built once before the loop), so its v̂ never moves; here Δε and v̂ are recomputed at the
  current x at every step, as Algorithm 2 states.
- The official loops until G candidates are accepted (no limit). Here at most ``max_rounds`` rounds;
  generations still unfilled then take the lowest-loss states seen among the candidates never
  accepted (``sail_fallback`` in the result rows counts them).
- Δε is the noise prediction's (``model.predict_noise``: ε, also on v-prediction models, where the
  official converts v with its own formula; the magnitude agrees at t = 981 up to 0.2 %, the
  direction of v̂ is flipped there).
- Checks: the official checks the loss before each of its 10 steps only; here once more after the
  last step (a candidate accepted there ends the round in its state after 10 steps).

What is the official's, exactly: the loss (sharpness at x + v̂ plus α ||x||) and its gradient through
both UNet calls, B, α, ℓ_thres, lr, the steps per round, acceptance in candidate order at each check,
the G-th acceptance ending the round before any further step, accepted candidates kept in the summed
loss until the round ends (``acceptance="round_end"``), acceptances accumulating over rounds, and the
threshold's growth every 3 failed rounds. The result rows say per prompt how many generations took
an accepted latent (``sail_accepted``) and how many the lowest-loss fallback (``sail_fallback``).

Constants on other models. On SD 1.x α ||x_T|| ≈ 0.05 · √16384 = 6.4 of the 8.2 threshold, so at the
threshold the sharpness term is 1.8 and the Gaussianity term is κ = 6.4 / 1.8 ≈ 3.56 times it.

- Lab models (their own non-memorized reference prompts, ``diffmem.lab.prompts.own_reference_prompts``):
  the two terms are measured at each reference prompt's own x_T (prompt j at seed + j, the run's G
  and schedule); α = κ · median(sharpness) / median(||x_T||) keeps SD 1.x's balance of the two terms,
  ℓ_thres = the 50th percentile of their loss (a typical ordinary prompt passes at its own x_T with
  even odds; SD's 8.2 sits at α√D + a typical non-memorized sharpness the same way), the sweep is the
  90th, 50th, 25th and 10th percentile, and threshold_step = 0.1 · ℓ_thres / 8.2. Cached per model,
  seed, G and schedule.
- Other epsilon models: α = 0.05 · √(16384 / D) (α ||x_T|| stays 6.4), ℓ_thres = 8.2, sweep 9, 8.6,
  8.2, 7.6; v-prediction models: α = 0.01 · √(36864 / D), ℓ_thres = 5 (the middle of the paper's
  4-6), sweep 6, 5, 4.5, 4. The perturbation v̂ keeps unit norm everywhere (the paper's definition).

Off: ``loss_threshold = inf`` (no optimisation, no UNet call, x_T unchanged). Cost: each evaluated
candidate is 4 UNet rows (two calls, both branches) with a backward pass through both; at most
max_rounds · (max_steps + 1) · 4B rows per prompt.
"""

from __future__ import annotations

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.mitigations import Plan, Unit, derived_generator, register
from diffmem.model import Conditioning
from diffmem.sampling import predict_branches

SD1_LATENT_DIM = 4 * 64 * 64  # SD 1.x at 512 px
SD2_LATENT_DIM = 4 * 96 * 96  # SD 2 at 768 px
SD1_ALPHA, SD2_ALPHA = 0.05, 0.01  # weight of ||x|| (pipe.py: 0.05 for sd_ver 1, 0.01 otherwise)
SD1_THRESHOLD, SD2_THRESHOLD = 8.2, 5.0  # ℓ_thres: 8.2 (mitigate_mem.py); SD 2: the middle of the paper's 4-6
SD1_SWEEP, SD2_SWEEP = (9.0, 8.6, 8.2, 7.6), (6.0, 5.0, 4.5, 4.0)  # mildest first (the paper's ranges)
THRESHOLD_STEP = 0.1  # ℓ_thres grows by this ...
ROUNDS_PER_RAISE = 3  # ... after every this many failed rounds
# Gaussianity / sharpness at SD 1.x's threshold: 6.4 / 1.8
KAPPA = SD1_ALPHA * math.sqrt(SD1_LATENT_DIM) / (SD1_THRESHOLD - SD1_ALPHA * math.sqrt(SD1_LATENT_DIM))
LAB_PERCENTILE = 50  # the default threshold on models with reference prompts
LAB_SWEEP_PERCENTILES = (90, 50, 25, 10)  # mildest first


# -- the loss -------------------------------------------------------------------------------------

def _wide(x: torch.Tensor) -> torch.Tensor:
    return x.to(torch.promote_types(x.dtype, torch.float32))


def noise_gap(model, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning,
              max_batch: int | None = None) -> torch.Tensor:
    """Δε(x) = ε(x, c) − ε(x, ∅) at timestep t: (N, C, H, W), at least float32, differentiable in x.

    x (N, C, H, W) unscaled latents (the scheduler's ``scale_model_input`` is applied, as in the
    tracked pass); cond, uncond N rows; one UNet call per `max_batch` rows (both branches count).
    """
    eps_c, eps_u = predict_branches(model, x.to(model.dtype), t, cond, uncond, max_batch=max_batch)
    return _wide(eps_c) - _wide(eps_u)


def unit_direction(v: torch.Tensor) -> torch.Tensor:
    """v / ||v|| per sample (norm over all but the first axis); a zero row stays zero. (N, ...) -> (N, ...)."""
    norm = v.flatten(1).norm(dim=1).view(-1, *[1] * (v.ndim - 1))
    return v / norm.clamp_min(torch.finfo(v.dtype).tiny)


def sail_terms(model, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning,
               max_batch: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """SAIL's two terms per sample: sharpness ||Δε(x + v̂)|| with v̂ = Δε(x)/||Δε(x)||, and Gaussianity
    ||x / init_noise_sigma||. x (N, C, H, W) unscaled latents at the first timestep t; cond, uncond N
    rows. Returns two (N,) tensors (at least float32), differentiable in x through both UNet calls."""
    x = _wide(x)
    v = unit_direction(noise_gap(model, x, t, cond, uncond, max_batch))
    sharp = noise_gap(model, x + v, t, cond, uncond, max_batch).flatten(1).norm(dim=1)
    gauss = (x / float(model.scheduler.init_noise_sigma)).flatten(1).norm(dim=1)
    return sharp, gauss


def sail_loss(model, x: torch.Tensor, t, cond: Conditioning, uncond: Conditioning, alpha: float,
              max_batch: int | None = None) -> torch.Tensor:
    """loss(x) = ||Δε(x + v̂)|| + α ||x / init_noise_sigma|| per sample: (N, C, H, W) -> (N,)."""
    sharp, gauss = sail_terms(model, x, t, cond, uncond, max_batch)
    return sharp + alpha * gauss


# -- the search -----------------------------------------------------------------------------------

@dataclass
class SailResult:
    x_T: torch.Tensor  # (P, G, C, H, W) the starting latents to sample from (model dtype)
    loss: torch.Tensor  # (P, G) SAIL loss of each returned latent (at the check whose state it is)
    initial_loss: torch.Tensor  # (P, G) SAIL loss of the input x_T
    accepted: torch.Tensor  # (P, G) bool: the latent passed the threshold (else: lowest-loss fallback)
    kept: torch.Tensor  # (P, G) bool: generation g starts from its own x_T[g], optimised or not
    rounds: torch.Tensor  # (P,) rounds run
    steps: torch.Tensor  # (P,) Adam steps taken, over all rounds
    threshold: torch.Tensor  # (P,) ℓ_thres at the end (raised after failed rounds)


ACCEPTANCE = ("round_end", "at_acceptance")  # which state of an accepted candidate is used


@dataclass
class _Found:
    key: tuple  # (round, step, candidate): acceptance order
    latent: torch.Tensor  # (C, H, W) the master copy's dtype
    loss: float  # the loss of `latent`
    accepted: bool = False
    at: tuple = (0, 0)  # (round, step) of the check whose state `latent` is


def optimize_initial_noise(model, x_T: torch.Tensor, t, cond: Conditioning, positions: list[int], seed: int, *,
                           alpha: float, threshold: float, lr: float = 0.05, max_steps: int = 10,
                           num_candidates: int = 8, max_rounds: int = 6, threshold_step: float = THRESHOLD_STEP,
                           acceptance: str = "round_end", max_batch: int | None = None) -> SailResult:
    """SAIL's search for starting latents (Algorithm 2), all prompts of a unit at once.

    x_T (P, G, C, H, W) the seed contract's starting latents (unscaled, ``initial_noise``); t the
    first timestep; cond P rows; positions the prompts' input positions (extra draws come from
    ``derived_generator(seed, position, round)``). B = max(num_candidates, G) candidates per prompt;
    round 0's first G are x_T. Each check evaluates the loss of the candidates of the prompts still
    in the round (4 UNet rows each, ``max_batch`` rows per call; with ``acceptance="at_acceptance"``
    only those not yet accepted) and, unless it is the last check, takes one Adam step on them;
    candidates at or below the prompt's threshold are accepted then. With ``"round_end"`` an accepted
    latent is its candidate's state when the prompt's round ends, else its state when accepted. See
    the module docstring for the generations' assignment and the fallback.
    """
    if acceptance not in ACCEPTANCE:
        raise ValueError(f"acceptance {acceptance!r}: expected one of {', '.join(ACCEPTANCE)}")
    if x_T.ndim != 5 or len(cond) != len(x_T) or len(positions) != len(x_T):
        raise ValueError(f"expected x_T (P, G, C, H, W), cond and positions for the same P; got {tuple(x_T.shape)}, "
                         f"{len(cond)} and {len(positions)}")
    P, G = x_T.shape[:2]
    shape = tuple(x_T.shape[2:])
    B = max(int(num_candidates), G)
    device, sigma = x_T.device, float(model.scheduler.init_noise_sigma)
    master = torch.promote_types(x_T.dtype, torch.float32)  # Adam's moments underflow in half precision
    per_call = max((max_batch or 4 * B * P) // 2, 1)  # candidates per UNet call (each call has both branches)
    empty = model.empty_conditioning()
    thr = torch.full((P,), float(threshold), dtype=torch.float64)
    rounds = torch.zeros(P, dtype=torch.long)
    steps = torch.zeros(P, dtype=torch.long)
    found: list[list[_Found]] = [[] for _ in range(P)]
    best: list[dict] = [{} for _ in range(P)]  # (round, candidate) -> _Found with its lowest loss
    initial = torch.zeros(P, G, dtype=torch.float64)
    active = list(range(P))
    for r in range(max_rounds):
        if not active:
            break
        # 1. This round's candidates (A, B, C, H, W), master copies.
        start = []
        for p in active:
            fresh = B if r else B - G
            draw = torch.randn((fresh, *shape), generator=derived_generator(seed, positions[p], r)) * sigma
            parts = [x_T[p].to(master)] if r == 0 else []
            start.append(torch.cat(parts + [draw.to(device, master)]) if fresh else parts[0])
        lat = torch.stack(start).requires_grad_(True)
        rounds[active] += 1
        optimizer = torch.optim.Adam([lat], lr=lr)
        running = torch.ones(len(active), dtype=torch.bool)  # the prompt's round goes on
        taken: dict[tuple[int, int], _Found] = {}  # (a, b) -> this round's accepted candidate
        for s in range(max_steps + 1):
            # 2. Loss of the candidates still optimised (and its gradient, unless this is the last check).
            evaluated = running[:, None].expand(len(active), B).clone()
            if acceptance == "at_acceptance":
                for a, b in taken:
                    evaluated[a, b] = False
            idx = evaluated.nonzero()
            if not len(idx):
                break
            take_step = s < max_steps
            losses = []
            optimizer.zero_grad(set_to_none=False)
            for i in range(0, len(idx), per_call):
                a, b = idx[i:i + per_call].unbind(1)
                with torch.set_grad_enabled(take_step):
                    x = lat[a, b]
                    loss = sail_loss(model, x, t, cond[[active[j] for j in a.tolist()]], empty.expand(len(x)),
                                     alpha, max_batch)
                    if take_step:
                        loss.sum().backward()  # a sum: each candidate's gradient is its own
                losses.append(loss.detach().double().cpu())
            losses = torch.cat(losses)
            # 3. Acceptance, in candidate order; a prompt with G accepted ends its round here. An
            #    accepted candidate evaluated again ("round_end") takes its current state: the last
            #    such update of a round is the state the round ends in.
            for (a, b), value in zip(idx.tolist(), losses.tolist()):
                p = active[a]
                if r == 0 and s == 0 and b < G:
                    initial[p, b] = value
                state = lat[a, b].detach().clone()
                if (a, b) in taken:
                    taken[a, b].latent, taken[a, b].loss, taken[a, b].at = state, value, (r, s)
                    continue
                item = _Found((r, s, b), state, value, at=(r, s))
                if value <= float(thr[p]):
                    item.accepted = True
                    found[p].append(item)
                    taken[a, b] = item
                    best[p].pop((r, b), None)
                elif (r, b) not in best[p] or value < best[p][(r, b)].loss:
                    best[p][(r, b)] = item
            for a, p in enumerate(active):
                if len(found[p]) >= G:
                    running[a] = False
            if not take_step or not running.any():
                break
            # 4. One Adam step (elementwise: rows not evaluated move too, but are never read again).
            optimizer.step()
            steps[[active[a] for a in range(len(active)) if running[a]]] += 1
        # 5. Prompts without G accepted candidates failed this round.
        still = [p for p in active if len(found[p]) < G]
        for p in still:
            if int(rounds[p]) % ROUNDS_PER_RAISE == 0 and r + 1 < max_rounds:
                thr[p] += threshold_step
        active = still
    # 6. Each generation's latent: its own x_T's candidate when accepted, then the other accepted ones
    #    in acceptance order, then the lowest-loss states never accepted.
    out = torch.empty(P, G, *shape, dtype=x_T.dtype, device=device)
    loss_out = torch.zeros(P, G, dtype=torch.float64)
    accepted = torch.zeros(P, G, dtype=torch.bool)
    kept = torch.zeros(P, G, dtype=torch.bool)
    for p in range(P):
        slots: list[_Found | None] = [None] * G
        others = []
        for f in sorted(found[p], key=lambda f: f.key):
            r, _, b = f.key
            if r == 0 and b < G and slots[b] is None:
                slots[b] = f
            else:
                others.append(f)
        queue = others + sorted(best[p].values(), key=lambda f: (f.loss, f.key))
        for g in range(G):
            if slots[g] is None:
                slots[g] = queue.pop(0)
        for g, f in enumerate(slots):
            same = f.key[0] == 0 and f.key[2] == g
            kept[p, g] = same
            accepted[p, g] = f.accepted
            # an untouched x_T candidate is returned bit for bit
            out[p, g] = x_T[p, g] if same and f.at == (0, 0) else f.latent.to(x_T.dtype)
            loss_out[p, g] = f.loss
    return SailResult(out, loss_out, initial, accepted, kept, rounds, steps, thr)


# -- calibration on models with reference prompts -------------------------------------------------

@dataclass
class Calibration:
    alpha: float  # the derived α
    threshold: float  # ℓ_thres at LAB_PERCENTILE of the reference losses
    threshold_step: float  # 0.1 in SD 1.x's units, rescaled
    sharpness: np.ndarray  # (N*G,) ||Δε(x_T + v̂)|| of the reference prompts at their x_T
    gaussianity: np.ndarray  # (N*G,) ||x_T / init_noise_sigma||

    def losses(self, alpha: float | None = None) -> np.ndarray:
        return self.sharpness + (self.alpha if alpha is None else alpha) * self.gaussianity


def reference_terms(model, prompts: list[str], sampling) -> tuple[np.ndarray, np.ndarray]:
    """SAIL's two terms of each reference prompt (prompt j from seed + j) and generation at its x_T, at
    the first step of the run's schedule; no gradients. Returns two (N*G,) float64 arrays."""
    from diffmem.sampling import plan_units, schedule, unit_inputs

    t = schedule(model, sampling.num_inference_steps)[0]
    sharp, gauss = [], []
    for unit in plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size):
        x, cond, uncond = unit_inputs(model, unit, sampling, [prompts[j] for j in unit])
        with torch.no_grad():
            s, g = sail_terms(model, x, t, cond, uncond, sampling.batch_size)
        sharp.append(s.double().cpu())
        gauss.append(g.double().cpu())
    return torch.cat(sharp).numpy(), torch.cat(gauss).numpy()


def calibrate(model, prompts: list[str], sampling) -> Calibration:
    """α and ℓ_thres from reference prompts (module docstring): α = κ · median sharpness / median
    ||x_T||, ℓ_thres = the LAB_PERCENTILE-th percentile of their loss."""
    sharp, gauss = reference_terms(model, prompts, sampling)
    alpha = KAPPA * float(np.median(sharp)) / float(np.median(gauss))
    threshold = float(np.percentile(sharp + alpha * gauss, LAB_PERCENTILE))
    return Calibration(alpha, threshold, THRESHOLD_STEP * threshold / SD1_THRESHOLD, sharp, gauss)


def published_constants(model) -> tuple[float, float, tuple[float, ...]]:
    """(α, ℓ_thres, sweep) on a model without reference prompts: SD 1.x's for epsilon models, SD 2's
    for v-prediction, α rescaled so that α ||x_T|| is the same at the model's latent size."""
    dim = math.prod(model.latent_shape)
    if model.prediction_type == "v_prediction":
        return SD2_ALPHA * math.sqrt(SD2_LATENT_DIM / dim), SD2_THRESHOLD, SD2_SWEEP
    return SD1_ALPHA * math.sqrt(SD1_LATENT_DIM / dim), SD1_THRESHOLD, SD1_SWEEP


@register
class Sail:
    name = "sail"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "loss_threshold"
    off = {"loss_threshold": float("inf")}  # every x_T is accepted as it is: nothing is optimised

    @dataclass
    class Params:
        loss_threshold: float | None = None  # ℓ_thres; None: 8.2 on SD 1.x (5 on v-models), lab: calibrated
        alpha: float | None = None  # weight of ||x||; None: 0.05 on SD 1.x (0.01 SD 2), lab: derived
        lr: float = 0.05  # Adam learning rate on the latents
        max_steps: int = 10  # Adam steps per round at most
        num_candidates: int = 8  # B: candidates optimised at once per prompt (at least G are used)
        max_rounds: int = 6  # rounds at most (the official has no limit); then the lowest-loss fallback
        threshold_step: float | None = None  # ℓ_thres += this every 3 failed rounds; None: 0.1 (lab: rescaled)
        acceptance: str = "round_end"  # an accepted latent's state: at its round's end (official), or "at_acceptance"

        def __post_init__(self):
            if self.loss_threshold is not None and math.isnan(self.loss_threshold):
                raise ValueError("loss_threshold nan: expected a number (inf: off)")
            if self.alpha is not None and not self.alpha >= 0:
                raise ValueError(f"alpha {self.alpha}: must be >= 0")
            if not self.lr > 0:
                raise ValueError(f"lr {self.lr}: must be > 0")
            if self.max_steps < 0:
                raise ValueError(f"max_steps {self.max_steps}: must be >= 0")
            if self.num_candidates < 1:
                raise ValueError(f"num_candidates {self.num_candidates}: must be >= 1")
            if self.max_rounds < 1:
                raise ValueError(f"max_rounds {self.max_rounds}: must be >= 1")
            if self.threshold_step is not None and not self.threshold_step >= 0:
                raise ValueError(f"threshold_step {self.threshold_step}: must be >= 0")
            if self.acceptance not in ACCEPTANCE:
                raise ValueError(f"acceptance {self.acceptance!r}: expected one of {', '.join(ACCEPTANCE)}")

    def __init__(self):
        self._calibrations = weakref.WeakKeyDictionary()  # model -> {(seed, G, steps): Calibration}

    def calibration(self, model, sampling) -> Calibration | None:
        """The model's calibration from its own reference prompts (lab), cached; None without them."""
        from diffmem.lab.prompts import own_reference_prompts

        key = (sampling.seed, sampling.num_generations, sampling.num_inference_steps)
        per_model = self._calibrations.setdefault(model, {})
        if key not in per_model:
            prompts = own_reference_prompts(model)
            per_model[key] = calibrate(model, prompts, sampling) if prompts else None
        return per_model[key]

    def resolve(self, model, sampling, params) -> tuple[float, float, float]:
        """(α, ℓ_thres, threshold_step) of `params` on `model`, the Nones filled in (module docstring)."""
        cal = None
        if params.alpha is None or params.loss_threshold is None or params.threshold_step is None:
            cal = self.calibration(model, sampling)
        if cal is not None:
            alpha = cal.alpha if params.alpha is None else params.alpha
            threshold = params.loss_threshold
            if threshold is None:
                threshold = float(np.percentile(cal.losses(alpha), LAB_PERCENTILE))
            step = cal.threshold_step if params.threshold_step is None else params.threshold_step
        else:
            a, thr, _ = published_constants(model)
            alpha = a if params.alpha is None else params.alpha
            threshold = thr if params.loss_threshold is None else params.loss_threshold
            step = THRESHOLD_STEP if params.threshold_step is None else params.threshold_step
        return float(alpha), float(threshold), float(step)

    def sweep(self, model, sampling) -> list[dict]:
        """ℓ_thres mildest first: the 90th, 50th, 25th and 10th percentile of the reference prompts' loss
        at their x_T (lab), else the paper's range (9, 8.6, 8.2, 7.6 on SD 1.x; 6, 5, 4.5, 4 on v-models)."""
        cal = self.calibration(model, sampling)
        if cal is None:
            return [{"loss_threshold": v} for v in published_constants(model)[2]]
        return [{"loss_threshold": float(np.percentile(cal.losses(), q))} for q in LAB_SWEEP_PERCENTILES]

    def plan(self, model, unit: Unit, params) -> Plan:
        P, G = len(unit.prompts), unit.num_generations
        if params.loss_threshold == float("inf"):
            return Plan()
        alpha, threshold, step = self.resolve(model, unit.sampling, params)
        res = optimize_initial_noise(model, unit.x_T.view(P, G, *unit.x_T.shape[1:]), unit.timesteps[0], unit.cond,
                                     unit.positions, unit.config.seed, alpha=alpha, threshold=threshold, lr=params.lr,
                                     max_steps=params.max_steps, num_candidates=params.num_candidates,
                                     max_rounds=params.max_rounds, threshold_step=step,
                                     acceptance=params.acceptance, max_batch=unit.sampling.batch_size)
        info = [{"sail_rounds": int(res.rounds[j]), "sail_steps": int(res.steps[j]), "sail_alpha": alpha,
                 "sail_threshold": float(res.threshold[j]), "sail_loss": res.loss[j].tolist(),
                 "sail_initial_loss": res.initial_loss[j].tolist(), "sail_kept": int(res.kept[j].sum()),
                 "sail_acceptance": params.acceptance, "sail_accepted": int(res.accepted[j].sum()),
                 "sail_fallback": int((~res.accepted[j]).sum())} for j in range(P)]
        return Plan(x_T=res.x_T.flatten(0, 1), iterations=res.steps.clone(), info=info)

"""The one tracked pass: batched sampling with classifier-free guidance that hands every step to recorders.

Every verb that needs a per-step quantity (detection's d, explanation's gradient, mitigation's
starting d, evaluation, the audit, the lab report) runs this pass, so the same prompt, seed and
settings give the same numbers everywhere. Tracking does not change sampling: latents equal those
of the family's diffusers pipeline (``StableDiffusionPipeline`` with ``DDIMScheduler``, ...) for the
same seed (the seed contract in ``initial_noise``). The pass speaks of a denoiser: it combines and
steps on ``model.predict`` (the noise on the epsilon-sampled families, the velocity on flow models)
with the model's scheduler (DDIM; the flow-matching Euler scheduler of SD3, whose timesteps are
sigma * 1000).

A *recorder* is any object with ``on_step(step: Step)`` and, optionally, ``before_step(index, t)``,
called before that step's denoiser calls, and ``after_branches(index)``, called right after them (the
cross-attention recorder of ``diffmem.attention`` uses both to capture exactly the pass's calls of
the steps asked for, not the extra calls other recorders make in their ``on_step``). Every pass keeps Wen et al.'s d
(``NoiseNormRecorder``, in ``PromptSamples``); the detectors of ``diffmem.detectors`` hand the pass
their own recorders.
With ``grad=True`` the denoiser calls keep their autograd graph (token significance, embedding
optimization, Jacobian-vector scores differentiate through the recorded tensors); the latent
update is always taken without gradients, so no graph spans two steps.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable, Protocol, Sequence

import numpy as np
import torch

from diffmem.metrics import noise_norm, text_noise_norm
from diffmem.model import Conditioning


@dataclass
class SamplingConfig:
    num_inference_steps: int = 50  # DDIM steps of the schedule (the paper's 50)
    guidance_scale: float | None = None  # None: the model's default (7.5 for SD, the lab's own)
    num_generations: int = 4  # images per prompt (the paper's 4)
    seed: int = 0  # prompt at input position i uses seed + i
    same_noise: bool = False  # every prompt from `seed` itself: one x_T for all (Jeon, Asthana, NeMo, MemBench)
    track_steps: int | None = None  # stop after this many steps (1 = first-step detection); None = all
    batch_size: int = 16  # UNet samples per call (conditional and unconditional rows both count)
    eta: float = 0.0  # DDIM eta; 0 = deterministic, as in the paper

    def __post_init__(self):
        if self.num_inference_steps < 1:
            raise ValueError(f"--num-inference-steps {self.num_inference_steps}: must be >= 1")
        if self.num_generations < 1:
            raise ValueError(f"--num-generations {self.num_generations}: must be >= 1")
        if self.batch_size < 2:
            raise ValueError(f"--batch-size {self.batch_size}: must be >= 2 (each generation needs a conditional "
                             "and an unconditional row)")
        if self.track_steps is not None and not 1 <= self.track_steps <= self.num_inference_steps:
            raise ValueError(f"--track-steps {self.track_steps}: must be between 1 and --num-inference-steps "
                             f"({self.num_inference_steps})")

    def seed_of(self, position: int) -> int:
        """The seed x_T of the prompt at input `position` is drawn from: seed + position, or the seed
        itself for every prompt with ``same_noise``."""
        return self.seed if self.same_noise else self.seed + position

    @property
    def steps_to_run(self) -> int:
        return self.track_steps or self.num_inference_steps

    def guidance(self, model) -> float:
        return model.default_guidance_scale if self.guidance_scale is None else self.guidance_scale


def initial_noise(model, num_generations: int, seed: int) -> torch.Tensor:
    """x_T for one prompt: (G, C, H, W), exactly what StableDiffusionPipeline draws with
    ``generator=torch.Generator("cpu").manual_seed(seed)`` and ``num_images_per_prompt=G``."""
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((num_generations, *model.latent_shape), generator=gen, dtype=model.dtype)
    return x.to(model.device) * model.scheduler.init_noise_sigma


def schedule(model, num_inference_steps: int) -> torch.Tensor:
    """The timesteps of a schedule of `num_inference_steps` steps, first (noisiest) first (DDIM's; on a
    flow model sigma * 1000, the first at sigma = 1)."""
    model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    return model.scheduler.timesteps


def noise_levels(model, num_inference_steps: int, steps: int | None = None) -> dict:
    """Where the first `steps` steps (default all) of a schedule sit, for records: ``{"sigmas": [...]}``
    on a flow model (the scheduler's sigma of each step; 1.0 first), else ``{"timesteps": [...]}``."""
    timesteps = schedule(model, num_inference_steps)[:steps]
    if model.sampler_prediction == "flow":
        return {"sigmas": [float(s) for s in model.scheduler.sigmas[:len(timesteps)]]}
    return {"timesteps": [int(t) for t in timesteps]}


def step_at_sigma(model, num_inference_steps: int, sigma: float) -> int:
    """The 0-based step of a flow model's schedule whose sigma is nearest `sigma` (the earlier of two
    equally near): detection asked at a noise level rather than at a step index, since the sigma of
    step k depends on the shift and the number of steps."""
    if model.sampler_prediction != "flow":
        raise ValueError(f"--at-sigma: {model.family} ({model.name}) is not a flow-matching model; its steps are "
                         "DDIM timesteps (use --track-steps)")
    if not 0 < sigma <= 1:
        raise ValueError(f"--at-sigma {sigma}: expected a noise level in (0, 1]")
    schedule(model, num_inference_steps)
    sigmas = model.scheduler.sigmas[:num_inference_steps].double()
    return int((sigmas - sigma).abs().argmin())


# -- the pass -------------------------------------------------------------------------------------

@dataclass
class Step:
    """What one step of the pass hands to recorders; N rows, unconditional rows not included.

    The predictions are what guidance combined (``model.sampler_prediction``): the noise on the
    epsilon-sampled families, read as ``eps_cond``/``eps_uncond``; a flow model's velocity has no
    noise form at sigma = 1, so those names refuse it there.
    """

    index: int  # position k in the schedule (0 = the first, noisiest step)
    t: torch.Tensor  # the timestep
    x_t: torch.Tensor  # (N, C, H, W) latents entering the step
    pred_cond: torch.Tensor  # (N, C, H, W) the prediction with the prompt
    pred_uncond: torch.Tensor  # (N, C, H, W) the prediction with the null conditioning
    next_latents: torch.Tensor | None  # (N, C, H, W) after the guided update; None on a step not advanced
    cond: Conditioning  # (N rows) the conditioning of the conditional branch
    prediction: str = "epsilon"  # what pred_* are: "epsilon" (the noise) or "flow" (the velocity)
    pred_guided: torch.Tensor | None = None  # (N, C, H, W) the combination the scheduler stepped on; None when not advanced

    def _noise(self, pred: torch.Tensor) -> torch.Tensor:
        if self.prediction != "epsilon":
            raise ValueError(f"this pass predicts {self.prediction!r}, not the noise: a noise difference of a flow "
                             "model is identically 0 at sigma = 1; use pred_cond/pred_uncond")
        return pred

    @property
    def eps_cond(self) -> torch.Tensor:
        """(N, C, H, W) the noise predicted with the prompt."""
        return self._noise(self.pred_cond)

    @property
    def eps_uncond(self) -> torch.Tensor:
        """(N, C, H, W) the noise predicted with the null conditioning."""
        return self._noise(self.pred_uncond)


class Recorder(Protocol):
    def on_step(self, step: Step) -> None: ...


class NoiseNormRecorder:
    """Wen et al.'s d (ICLR 2024, eq. 3) and the unconditional noise norm, per pass row and step; `p`
    is the norm order (2, the paper's; the original's ``lp`` option). Every pass keeps one.

    d is taken on what guidance combines (``Step.pred_cond``/``pred_uncond``): the noise on the
    epsilon-sampled families, d = ||eps_c - eps_u||; the velocity on flow models, d = ||v_c - v_u||
    (whose noise form (1 - sigma) ||v_c - v_u|| is 0 at sigma = 1; docs/model-families.md).
    """

    def __init__(self, p: float = 2.0):
        self.p = p
        self.text: list[torch.Tensor] = []
        self.uncond: list[torch.Tensor] = []

    def on_step(self, step: Step) -> None:
        self.text.append(text_noise_norm(step.pred_cond, step.pred_uncond, self.p))
        self.uncond.append(noise_norm(step.pred_uncond, self.p))

    def text_noise_norm(self) -> torch.Tensor:
        """(N, S) d per row and recorded step (differentiable when the pass ran with grad)."""
        return torch.stack(self.text, 1)

    def uncond_noise_norm(self) -> torch.Tensor:
        """(N, S) ||eps_u|| per row and recorded step."""
        return torch.stack(self.uncond, 1)


def predict_branches(model, x_t: torch.Tensor, t, cond: Conditioning, uncond: Conditioning | None,
                     eps_uncond: torch.Tensor | None = None, max_batch: int | None = None):
    """(pred_cond, pred_uncond) at x_t (``model.predict``: the noise on the epsilon-sampled families):
    one denoiser call per `max_batch` rows, unconditional rows first (as diffusers orders them). Given
    `eps_uncond`, only the conditional rows are computed.

    x_t (N, C, H, W) unscaled; cond and uncond N rows.
    """
    x_in = model.scheduler.scale_model_input(x_t, t)
    if eps_uncond is not None:
        return model.predict(x_in, t, cond), eps_uncond
    per_call = max((max_batch or 2 * len(x_t)) // 2, 1)
    outs_c, outs_u = [], []
    for i in range(0, len(x_t), per_call):
        xi = x_in[i:i + per_call]
        eps = model.predict(torch.cat([xi, xi]), t, Conditioning.cat([uncond[i:i + per_call], cond[i:i + per_call]]))
        e_u, e_c = eps.chunk(2)
        outs_u.append(e_u)
        outs_c.append(e_c)
    return torch.cat(outs_c), torch.cat(outs_u)


GuidanceSchedule = Callable[[int, torch.Tensor, torch.Tensor], "float | torch.Tensor"]


def tracked_pass(model, latents: torch.Tensor, cond: Conditioning, uncond: Conditioning, timesteps,
                 guidance_scale: "float | GuidanceSchedule", recorders: Sequence[Recorder] = (), *, first_index: int = 0,
                 eta: float = 0.0, advance_last: bool = True, max_batch: int | None = None,
                 grad: bool = False) -> torch.Tensor:
    """The sampler (DDIM on the epsilon-sampled families, Euler on flow models) with classifier-free
    guidance over `timesteps`,
    each step handed to `recorders`.

    latents (N, C, H, W) at the first of `timesteps` (step `first_index` of the schedule); cond,
    uncond N rows; `max_batch` denoiser samples per call (conditional and unconditional rows count).
    With ``advance_last=False`` the last step is recorded but not taken (early-stopped detection).
    `guidance_scale` is a number, or a schedule ``(index, eps_cond, eps_uncond) -> w`` called at each
    step with its schedule position and both branches (a float, or an (N,) tensor for one w per row):
    guidance switched on at a step, or switched when d reaches a minimum (delayed guidance); or an
    object with ``guided(index, t, x_t, eps_cond, eps_uncond) -> eps`` that makes the guided
    prediction itself (``diffmem.mitigations.Guidance``: prompt re-anchoring, anti-memorization guidance)
    and, optionally, ``after_update(index, t, x_t, guided, x_next) -> x_next`` that corrects the
    scheduler's update (recorders then see the corrected ``next_latents``).
    With ``grad`` the denoiser calls keep their graph for the recorders. Returns the final latents.
    """
    for k, t in enumerate(timesteps):
        last = k == len(timesteps) - 1
        # 0. Optional hook: a recorder that acts inside the denoiser calls (diffmem.attention) learns the step first.
        for r in recorders:
            if hasattr(r, "before_step"):
                r.before_step(first_index + k, t)
        # 1. Both branches at x_t (in one call per max_batch rows).
        with torch.set_grad_enabled(grad):
            eps_c, eps_u = predict_branches(model, latents, t, cond, uncond, max_batch=max_batch)
        for r in recorders:  # the step's own denoiser calls are done (recorders may make more in on_step)
            if hasattr(r, "after_branches"):
                r.after_branches(first_index + k)
        # 2. Guidance and the scheduler's update, without gradients.
        nxt = guided = None
        if advance_last or not last:
            with torch.no_grad():
                e_c, e_u = eps_c.detach(), eps_u.detach()
                if hasattr(guidance_scale, "guided"):  # a whole combination of the branches (PRSS, AMG)
                    guided = guidance_scale.guided(first_index + k, t, latents.detach(), e_c, e_u)
                else:
                    w = guidance_scale(first_index + k, e_c, e_u) if callable(guidance_scale) else guidance_scale
                    if isinstance(w, torch.Tensor):
                        w = w.to(e_c.dtype).view(-1, *[1] * (e_c.ndim - 1))
                    guided = e_u + w * (e_c - e_u)
                nxt = model.scheduler.step(guided, t, latents.detach(), eta=eta, return_dict=False)[0]
                if hasattr(guidance_scale, "after_update"):  # a method that corrects the update itself (Broken Memories)
                    nxt = guidance_scale.after_update(first_index + k, t, latents.detach(), guided, nxt)
        # 3. Recorders see the step.
        step = Step(first_index + k, t, latents, eps_c, eps_u, nxt, cond, model.sampler_prediction, guided)
        for r in recorders:
            r.on_step(step)
        if nxt is None:
            break
        latents = nxt
    return latents


# -- prompts under the seed contract --------------------------------------------------------------

@dataclass
class PromptSamples:
    """Tracked sampling of one prompt."""

    position: int  # 0-based position in the input (x_T from config.seed_of(position))
    seed: int
    text_noise_norm: torch.Tensor  # (G, S) d per generation and tracked step
    uncond_noise_norm: torch.Tensor  # (G, S)
    latents: torch.Tensor  # (G, C, H, W) after the last tracked step (before its update when early-stopped without decoding)
    images: torch.Tensor | None  # (G, 3, H', W') in [0, 1], when decoded


def plan_units(positions: list[int], num_generations: int, batch_size: int) -> list[list[int]]:
    """Group consecutive prompts into work units of at most batch_size // 2 generations each
    (a prompt with more generations than that forms a unit alone and is split into sub-batches)."""
    if batch_size < 2:
        raise ValueError(f"--batch-size {batch_size}: must be >= 2 (each generation needs a conditional and an unconditional row)")
    per_call = batch_size // 2
    per_unit = max(per_call // num_generations, 1)
    return [positions[i:i + per_unit] for i in range(0, len(positions), per_unit)]


def unit_inputs(model, positions: list[int], config: SamplingConfig, prompts: list[str] | None = None,
                conditioning: Conditioning | None = None, uncond: Conditioning | None = None):
    """x_T (P*G, C, H, W) under the seed contract, and the conditional and unconditional branches
    (P*G rows each) of one unit. `conditioning` replaces the encoded `prompts`: P rows (one per
    prompt, shared by its generations) or P*G rows (one per generation); `uncond` (P*G rows) replaces
    the empty prompt's."""
    G, P = config.num_generations, len(positions)
    cond = model.encode_prompts(prompts) if conditioning is None else conditioning.to(model.device, model.dtype)
    if len(cond) not in (P, P * G):
        raise ValueError(f"conditioning of {len(cond)} rows: expected {P} (one per prompt) or {P * G} "
                         "(one per generation)")
    x = torch.cat([initial_noise(model, G, config.seed_of(p)) for p in positions])
    if uncond is None:
        uncond = model.empty_conditioning().expand(len(x))
    elif len(uncond) != len(x):
        raise ValueError(f"unconditional branch of {len(uncond)} rows: expected {len(x)} (one per generation)")
    else:
        uncond = uncond.to(model.device, model.dtype)
    return x, cond if len(cond) == len(x) else cond.repeat_interleave(G), uncond


def sample_unit(model, prompts: list[str], positions: list[int], config: SamplingConfig,
                decode: bool = False, conditioning: Conditioning | None = None,
                recorders: Sequence[Recorder] = (), x_T: torch.Tensor | None = None,
                guidance=None, uncond: Conditioning | None = None) -> list[PromptSamples]:
    """Tracked sampling of one work unit: the prompts at `positions`, `config.num_generations` each.

    `conditioning` (P rows, or P*G: one per generation) replaces the encoded prompts (e.g. optimized
    embeddings) and `uncond` (P*G rows) the empty prompt's branch; `recorders`
    see every step beside d (rows: prompt-major, G generations each); `x_T` (P*G, C, H, W) replaces
    the seed contract's starting latents and `guidance` the config's scale (a mitigation's own, in any
    form ``tracked_pass`` takes).
    """
    G = config.num_generations
    n_steps = config.steps_to_run
    timesteps = schedule(model, config.num_inference_steps)[:n_steps]
    x, cond, uncond = unit_inputs(model, positions, config, prompts, conditioning, uncond)
    if x_T is not None:
        if x_T.shape != x.shape:
            raise ValueError(f"x_T of shape {tuple(x_T.shape)}: expected {tuple(x.shape)} (P*G, C, H, W)")
        x = x_T.to(x.device, x.dtype)
    norms = NoiseNormRecorder()
    advance = decode or n_steps == config.num_inference_steps
    latents = tracked_pass(model, x, cond, uncond, timesteps, config.guidance(model) if guidance is None else guidance,
                           [norms, *recorders],
                           eta=config.eta, advance_last=advance, max_batch=config.batch_size)
    text = norms.text_noise_norm().float().cpu()
    unc = norms.uncond_noise_norm().float().cpu()
    images = None
    if decode:
        per_call = max(config.batch_size // 2, 1)
        images = torch.cat([model.decode(latents[i:i + per_call]) for i in range(0, len(latents), per_call)]).cpu()
    return [PromptSamples(p, config.seed_of(p), text[j * G:(j + 1) * G], unc[j * G:(j + 1) * G],
                          latents[j * G:(j + 1) * G], None if images is None else images[j * G:(j + 1) * G])
            for j, p in enumerate(positions)]


def sample_prompts(model, prompts: list[str], config: SamplingConfig = SamplingConfig(),
                   decode: bool = True, positions: list[int] | None = None) -> list[PromptSamples]:
    """Tracked sampling of a list of prompts, batched; prompt j sits at ``positions[j]`` (default j;
    positions may repeat: edits of one prompt compared from the same x_T)."""
    positions = list(range(len(prompts))) if positions is None else list(positions)
    if len(positions) != len(prompts):
        raise ValueError(f"{len(prompts)} prompts but {len(positions)} positions")
    out: list[PromptSamples] = []
    for unit in plan_units(list(range(len(prompts))), config.num_generations, config.batch_size):
        out += sample_unit(model, [prompts[j] for j in unit], [positions[j] for j in unit], config, decode=decode)
    return out


def window_scores(model, prompts: list[str], config: SamplingConfig, steps: tuple[int, int] = (0, 1),
                  positions: list[int] | None = None) -> np.ndarray:
    """Detection score of each prompt: mean d over the step window [start, end) and the generations.

    The prompt at position p starts from seed + p (default positions 0..P-1). The steps up to the
    window's end are tracked (one step: first-step detection). Returns (P,) float64.
    """
    start, end = check_window(steps, config.num_inference_steps)
    res = sample_prompts(model, prompts, replace(config, track_steps=end), decode=False, positions=positions)
    return np.array([float(r.text_noise_norm[:, start:end].double().mean()) for r in res])


def check_window(steps: tuple[int, int], num_inference_steps: int) -> tuple[int, int]:
    start, end = (int(s) for s in steps)
    if not 0 <= start < end <= num_inference_steps:
        raise ValueError(f"step window [{start}, {end}): expected 0 <= start < end <= num_inference_steps "
                         f"({num_inference_steps})")
    return start, end

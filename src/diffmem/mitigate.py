"""Sampling with an inference-time mitigation: the methods of ``diffmem.mitigations`` (Wen et al.'s
embedding optimization, the prompt augmentations and the field's other methods), one setting at a time.

- ``MitigationConfig``: one setting (the method, the seed's embedding-opt / augmentation options,
  and ``params`` for the other methods' ``Params``).
- ``mitigate_unit``: one batch of prompts mitigated and sampled through the one tracked pass
  (used by ``diffmem mitigate``, ``evaluate``, ``bench mitigate``, ``audit`` and the ``serve`` page's
  mitigation button), with the UNet rows and seconds it cost.
- ``default_target_loss``, ``calibrated_target_loss``: the target when none is given (normal
  prompts' median first-step loss, in the target's unit).
- ``run_mitigation``: ``diffmem mitigate``'s run, writing images, final d and embeddings to a folder.
"""

from __future__ import annotations

import hashlib
from contextlib import nullcontext
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np
import torch

from diffmem.files import jsonable, one_writer, save_generations
from diffmem.metrics import TARGET_UNITS, mitigation_loss
from diffmem.provenance import provenance
from diffmem.sampling import NoiseNormRecorder, SamplingConfig, Step, plan_units, tracked_pass

from diffmem.mitigations import (MITIGATIONS, Unit, canonical_name, check_model, count_unet_rows, get_mitigation,
                                 make_params, plan_context, timed)
from diffmem.mitigations.augment import (AUGMENT_STYLES, augment_prompt, insert_word,  # noqa: F401  (re-exported)
                                         random_vocabulary_word)
from diffmem.mitigations.embedding_opt import (OptimizedEmbeddings, optimize_prompt_embedding,  # noqa: F401
                                               reference_losses, step_noise_norms, token_distance)

# every registered method (diffmem.mitigations): the reference and Wen et al.'s first, then the others
METHODS = ("none", "embedding-opt", *[n for n in MITIGATIONS if n not in ("none", "embedding-opt")])


# -- sampling with a mitigation -------------------------------------------------------------------

@dataclass
class MitigationConfig:
    """One mitigation setting. ``None``: the model's default (``ModelDefaults``)."""

    method: str = "embedding-opt"  # a registered mitigation (METHODS)
    target_loss: float | None = None  # embedding-opt: stop at loss <= this (SD: the seed's 3; lab: calibrated)
    target_unit: str = "batch"  # the loss: "batch" = the seed's norm over all generations at once; "mean" = mean d
    lr: float | None = None  # embedding-opt AdamW learning rate (SD: Wen et al.'s 0.05; lab: 0.01)
    max_iters: int | None = None  # embedding-opt AdamW steps at most (SD: 10; lab: 50)
    optim_step: int = 0  # embedding-opt at this DDIM step (the seed's --optim_target_steps; 0 = the first)
    epsilon: float | None = None  # L2-constrained variant: past this mean token distance, add the distance term
    alpha: float = 0.5  # weight of the loss against the distance term past epsilon (the seed's default)
    repeat_num: int = 4  # augmentations: items inserted (4 at inference, 1 in training)
    seed: int = 0  # augmentation draws for the prompt at position p use seed + p
    params: dict = field(default_factory=dict)  # the other methods' Params overrides (--param NAME=VALUE)
    dori_steps: int = 0  # > 0: sample from the DoRI attack's embedding (that many Adam steps; the paper's 50)

    def __post_init__(self):
        self.method = canonical_name(self.method)  # the original code's spellings (rand_word_add) too
        if self.method not in METHODS:
            raise ValueError(f"mitigation {self.method!r}: expected one of {', '.join(METHODS)}")
        make_params(self.method, self.params)  # names and values checked now, before any sampling
        if self.lr is not None and not self.lr > 0:
            raise ValueError(f"--lr {self.lr}: must be > 0")
        if self.max_iters is not None and self.max_iters < 0:
            raise ValueError(f"--max-iters {self.max_iters}: must be >= 0")
        if self.repeat_num < 0:
            raise ValueError(f"--repeat-num {self.repeat_num}: must be >= 0")
        if self.target_unit not in TARGET_UNITS:
            raise ValueError(f"--target-unit {self.target_unit!r}: expected one of {', '.join(TARGET_UNITS)}")
        if self.optim_step < 0:
            raise ValueError(f"--optim-step {self.optim_step}: must be >= 0")
        if self.epsilon is not None and not self.epsilon > 0:
            raise ValueError(f"--epsilon {self.epsilon}: must be > 0")
        if not 0 <= self.alpha <= 1:
            raise ValueError(f"--alpha {self.alpha}: must be between 0 and 1")
        if self.dori_steps < 0:
            raise ValueError(f"DoRI steps {self.dori_steps}: must be >= 0 (0: no attack)")
        if self.dori_steps and not getattr(get_mitigation(self.method), "attacked_by_dori", False):
            raise ValueError(f"--method {self.method}: the DoRI attack tests mitigations that change the model or the "
                             "sampler; this one changes the prompt, which the attack replaces")

    def resolved(self, model, target_loss: float | None = None) -> "MitigationConfig":
        """This setting with the model's defaults filled in; `target_loss` is the calibrated target used
        when neither this config nor the model gives one."""
        from dataclasses import replace

        d = model.defaults
        target = self.target_loss if self.target_loss is not None else d.target_loss if d.target_loss is not None else target_loss
        if self.method == "embedding-opt" and target is None:
            raise ValueError(f"embedding-opt on {model.name} needs a target loss: give --target-loss, or reference "
                             "prompts to calibrate it on (their median first-step d)")
        return replace(self, target_loss=target, lr=self.lr if self.lr is not None else d.mitigation_lr,
                       max_iters=self.max_iters if self.max_iters is not None else d.mitigation_max_iters)


def setting_key(m: MitigationConfig) -> str:
    """The name of a setting in an evaluation's rows and summary (e.g. ``target_loss=3``)."""
    if m.method == "embedding-opt":
        extra = (f",step={m.optim_step}" if m.optim_step else "") + \
            (f",epsilon={m.epsilon:g},alpha={m.alpha:g}" if m.epsilon is not None else "")
        return f"target_loss={m.target_loss:g}" + extra
    if m.method in AUGMENT_STYLES:
        return f"repeat_num={m.repeat_num}"
    key = ",".join(f"{k}={v:g}" if isinstance(v, float) else f"{k}={v}" for k, v in m.params.items()) or "default"
    return f"{key},dori={m.dori_steps}" if m.dori_steps else key


def setting_value(m: MitigationConfig) -> float | None:
    """The value of the method's main knob in this setting (None: the method's default)."""
    if m.method == "embedding-opt":
        return m.target_loss
    if m.method in AUGMENT_STYLES:
        return m.repeat_num
    knob = getattr(get_mitigation(m.method), "knob", None)
    v = m.params.get(knob) if knob else None
    return v if isinstance(v, (int, float)) else None


def default_target_loss(normal_losses: list[float], threshold: float | None = None,
                        unit: str = "batch", num_generations: int = 1) -> float:
    """embedding-opt's calibrated target: the median first-step loss of prompts known to be normal (a
    mitigated prompt ends where a typical ordinary prompt sits, benchmarks/MITIGATION.md), or, when
    there are none, half the decision threshold (a mean d) put in `unit` for `num_generations`."""
    if len(normal_losses):
        return float(np.median(normal_losses))
    if threshold is None:
        raise ValueError("no normal prompts' scores and no threshold to derive a target loss from")
    return 0.5 * float(threshold) * (num_generations ** 0.5 if unit == "batch" else 1.0)


def calibrated_target_loss(model, config: MitigationConfig, sampling: SamplingConfig,
                           reference_prompts: list[str] | None = None) -> float | None:
    """The target a verb uses when neither `config` nor the model gives one: the median first-step
    loss (in ``config.target_unit``) of `reference_prompts`, or of the model's own reference prompts
    (lab: the novel captions that the audit and ``serve`` calibrate on). None when a target is given
    or there is nothing to calibrate on."""
    if config.method != "embedding-opt" or config.target_loss is not None or model.defaults.target_loss is not None:
        return None
    if reference_prompts is None:
        from diffmem.lab.prompts import own_reference_prompts

        reference_prompts = own_reference_prompts(model)
    if not reference_prompts:
        return None
    return default_target_loss(reference_losses(model, reference_prompts, sampling, config.target_unit))


@dataclass
class MitigatedPrompt:
    position: int
    prompt: str  # the original prompt
    modified_prompt: str  # what was encoded (= prompt unless the method rewrites prompts)
    embedding: torch.Tensor  # (T, D) the conditional embedding sampled with; (G, T, D) when each generation had its own
    initial_d: float  # d of the original prompt at the optimization step (the first), mean over generations
    final_d: float  # d there of what was sampled with (the sampled pass's first step, or embedding-opt's own)
    initial_loss: float  # embedding-opt's loss (config.target_unit) of the original prompt there
    final_loss: float  # ... of what was sampled with
    iterations: int  # optimizer steps / search rounds of the method (0 for methods without)
    images: torch.Tensor | None  # (G, 3, H, W) in [0, 1]
    text_noise_norm: torch.Tensor  # (G, S) d per generation and step while sampling
    unet_rows: float = 0.0  # latents through the UNet for this prompt, the sampling included (unit total / P)
    seconds: float = 0.0  # wall time of the unit / P
    info: dict = field(default_factory=dict)  # method-specific fields


class _UncondRecorder:
    def on_step(self, step: Step) -> None:
        self.eps_uncond = step.pred_uncond  # the noise; a flow model's velocity


def _step_branches(model, x, cond, uncond, t, batch_size):
    """One step of the tracked pass at t, not taken: d (N,) and eps_uncond (N, C, H, W) at x."""
    norms, unc = NoiseNormRecorder(), _UncondRecorder()
    tracked_pass(model, x, cond, uncond, t[None], 1.0, [norms, unc], advance_last=False, max_batch=batch_size)
    return norms.text_noise_norm()[:, 0], unc.eps_uncond


def mitigate_unit(model, prompts: list[str], positions: list[int], config: MitigationConfig, sampling: SamplingConfig,
                  decode: bool = True, training: list[torch.Tensor] | None = None) -> list[MitigatedPrompt]:
    """Mitigate and sample one batch of prompts (x_T of position p from ``sampling.seed_of(p)``).

    Fields of `config` left None take the model's defaults (``MitigationConfig.resolved``). The
    method (``diffmem.mitigations``) receives the unit (x_T under the seed contract, the encoded
    prompts, d at the optimization step ``config.optim_step``) and returns a ``Plan``; every prompt
    is then sampled with the plan's conditioning, starting latents, guidance and UNet edits through
    the one tracked pass. With ``config.dori_steps`` the conditioning is first replaced by the DoRI
    attack's (``dori_conditioning``), which needs each prompt's `training` images ((M, 3, H, W) in [0, 1]).
    """
    from diffmem.sampling import sample_unit

    method = get_mitigation(config.method)
    check_model(config.method, model)
    params = make_params(config.method, config.params)
    if config.dori_steps and (training is None or len(training) != len(positions)
                              or any(len(t) == 0 for t in training)):  # before any sampling
        raise ValueError("the DoRI attack needs each prompt's training image (a dataset with images, e.g. lab:memorized)")
    if config.method == "embedding-opt":
        config = config.resolved(model)
    with count_unet_rows(model) as rows, timed() as seconds:
        unit, plan = planned_unit(model, method, params, prompts, positions, config, sampling)
        original, P, G = unit.cond, len(prompts), sampling.num_generations
        modified = plan.prompts or list(prompts)
        cond = plan.cond if plan.cond is not None else original
        if config.dori_steps:
            cond = dori_conditioning(model, method, params, prompts, cond, training, positions, config, sampling,
                                     edits_model=plan.context is not None)
        with plan_context(plan):
            samples = sample_unit(model, modified, positions, sampling, decode=decode, conditioning=cond,
                                  x_T=plan.x_T, guidance=plan.guidance, uncond=plan.uncond)
    d0 = unit.d0
    first = torch.stack([s.text_noise_norm[:, 0] for s in samples])  # (P, G) the sampled pass's first step
    final_d = plan.final_d if plan.final_d is not None else first.mean(1)
    final_loss = plan.final_loss if plan.final_loss is not None else mitigation_loss(first, config.target_unit)
    loss0 = mitigation_loss(d0, config.target_unit)
    iterations = plan.iterations if plan.iterations is not None else torch.zeros(P, dtype=torch.long)
    info = plan.info or [{} for _ in prompts]
    per_row = len(cond) == P * G and G > 1  # one conditional row per generation (gni's official protocol)
    embedding = lambda j: cond.embeddings[j * G:(j + 1) * G] if per_row else cond.embeddings[j]
    return [MitigatedPrompt(pos, p, m, embedding(j).detach().cpu(), float(d0[j].mean()), float(final_d[j]),
                            float(loss0[j]), float(final_loss[j]), int(iterations[j]), s.images, s.text_noise_norm,
                            rows[0] / P, seconds[0] / P, info[j])
            for j, (pos, p, m, s) in enumerate(zip(positions, prompts, modified, samples))]


def planned_unit(model, method, params, prompts: list[str], positions: list[int], config: MitigationConfig,
                 sampling: SamplingConfig):
    """(Unit, Plan) of one batch of prompts: x_T under the seed contract, the latents at the optimization
    step k (x_T for k = 0) and the tracked pass's step there, not taken (d and eps_uncond), then the
    method's plan."""
    from diffmem.sampling import schedule, unit_inputs

    G, P, k = sampling.num_generations, len(prompts), config.optim_step
    timesteps = schedule(model, sampling.num_inference_steps)
    if k >= len(timesteps):
        raise ValueError(f"--optim-step {k}: the schedule has {len(timesteps)} steps (0-based)")
    original = model.encode_prompts(prompts)  # P rows
    x, cond_rows, uncond = unit_inputs(model, positions, sampling, conditioning=original)
    x_k = tracked_pass(model, x, cond_rows, uncond, timesteps[:k], sampling.guidance(model), eta=sampling.eta,
                       max_batch=sampling.batch_size) if k else x
    d0_rows, eps_u = _step_branches(model, x_k, cond_rows, uncond, timesteps[k], sampling.batch_size)
    unit = Unit(list(prompts), list(positions), original, uncond, x, timesteps, sampling,
                sampling.guidance(model), config, d0_rows.view(P, G), x_k, eps_u)
    return unit, method.plan(model, unit, params)


def dori_conditioning(model, method, params, prompts: list[str], cond, training: list[torch.Tensor],
                      positions: list[int], config: MitigationConfig, sampling: SamplingConfig, edits_model: bool = True):
    """The DoRI attack (``diffmem.dori``) on each prompt's first training image, from the conditioning the
    mitigation would sample with (P rows), against the model as the mitigation edits it: for a method that
    edits the denoiser (`edits_model`: its plan has a context), each prompt's attack runs inside the plan the
    method makes for that prompt alone with one generation per attack row, its calls laid out as the pass's
    (unconditional rows first); the others' attacks run on the model as it is. Returns the
    attacker's embeddings, P rows; the attack's seed (and the image's latent draw) is the run's seed + position."""
    from dataclasses import replace

    from diffmem.dori import DoriConfig, dori_attack
    from diffmem.model import Conditioning

    if len(cond) != len(positions):
        raise ValueError(f"--method {config.method}: samples with one conditioning per generation; the DoRI attack "
                         "optimizes one per prompt")
    rows = []
    for j, (images, position) in enumerate(zip(training, positions)):
        attack_config = DoriConfig(steps=config.dori_steps, seed=config.seed + position)
        x0 = model.encode_images(images[:1].to(model.device, torch.float32) * 2 - 1,
                                 generator=torch.Generator("cpu").manual_seed(attack_config.seed))
        plan, uncond = None, None
        if edits_model:
            sub = replace(sampling, num_generations=attack_config.batch,
                          batch_size=max(sampling.batch_size, 2 * attack_config.batch))
            unit, plan = planned_unit(model, method, params, [prompts[j]], [position], config, sub)
            uncond = plan.uncond if plan.uncond is not None else unit.uncond
        with plan_context(plan) if plan is not None else nullcontext(), torch.enable_grad():
            attack, _ = dori_attack(model, x0, cond[j:j + 1], attack_config, uncond=uncond)
        rows.append(attack)
    return Conditioning.cat(rows)


# -- one mitigation run, as `diffmem mitigate` writes it ------------------------------------------

@one_writer(lambda a: a["out"])
def run_mitigation(model, prompts: list[str], config: MitigationConfig, sampling: SamplingConfig, out: str | Path,
                   progress: bool = True, resume: bool = False) -> Path:
    """Mitigate and sample `prompts`; write images, ``results.jsonl`` (final d, iterations, modified
    prompt) and ``embeddings.safetensors`` (the conditional embedding each prompt was sampled with).

    Work units are written as they finish (images, then one append of their rows, their embeddings in
    ``embeddings/``), so a killed run keeps every finished unit; ``resume=True`` continues it (same
    settings and prompts) and ends with the files an uninterrupted run writes.
    """
    from safetensors.torch import load_file, save_file
    from tqdm.auto import tqdm

    from diffmem.faults import fault_point
    from diffmem.files import append_rows, check_resume, read_json, read_rows, write_json, write_rows

    out = Path(out)
    check_model(config.method, model)  # before anything is written
    config = config.resolved(model, calibrated_target_loss(model, config, sampling))
    meta = provenance(model, mitigation=asdict(config), sampling=asdict(sampling),
                      prompts_sha256_16=hashlib.sha256("\n".join(prompts).encode()).hexdigest()[:16])
    keys = ("model", "mitigation", "sampling", "prompts_sha256_16")
    results, parts = out / "results.jsonl", out / "embeddings"
    # 1. A new run must not overwrite; a resumed one must match.
    check_resume(out, results.exists() or (out / "meta.json").exists(), resume, read_json(out / "meta.json"),
                 jsonable(meta), keys)
    out.mkdir(parents=True, exist_ok=True)
    parts.mkdir(exist_ok=True)
    if not (out / "meta.json").exists():
        write_json(out / "meta.json", jsonable(meta))
    done = {r["position"] for r in read_rows(results, repair=True)}
    # 2. Unit by unit: images, embeddings, then the rows (their append marks the unit done).
    units = [u for u in plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size)
             if not all(p in done for p in u)]
    bar = tqdm(total=sum(map(len, units)), desc=f"mitigate ({config.method})", unit="prompt", disable=not progress)
    for unit in units:
        finished = mitigate_unit(model, [prompts[p] for p in unit], unit, config, sampling)
        for r in finished:
            save_generations(out / "images", r.position, r.images)
        save_file({f"prompt_{r.position:05d}": r.embedding.float().contiguous() for r in finished},
                  str(parts / f"{unit[0]:05d}.safetensors"))
        append_rows(results, [_result_row(r, config, sampling) for r in finished if r.position not in done])
        bar.update(len(unit))
        fault_point("mitigate.unit")
    bar.close()
    # 3. The embeddings in one file, rows in input order.
    embeddings = {}
    for part in sorted(parts.glob("*.safetensors")):
        embeddings.update(load_file(str(part)))
    save_file(dict(sorted(embeddings.items())), str(out / "embeddings.safetensors"))
    rows = sorted(read_rows(results), key=lambda r: r["position"])
    write_rows(results, rows)  # whole, under a temporary name then renamed
    import shutil

    shutil.rmtree(parts)
    return out


def _result_row(r: MitigatedPrompt, config: MitigationConfig, sampling: SamplingConfig) -> dict:
    return {"position": r.position, "seed": sampling.seed_of(r.position), "prompt": r.prompt,
            "modified_prompt": r.modified_prompt, "method": config.method, "initial_d": r.initial_d,
            "final_d": r.final_d, "initial_loss": r.initial_loss, "final_loss": r.final_loss,
            "target_unit": config.target_unit, "iterations": r.iterations, "unet_rows": r.unet_rows,
            "seconds": r.seconds, **({"params": config.params} if config.params else {}), **r.info,
            "embedding": f"prompt_{r.position:05d}",
            "images": [f"images/{r.position:05d}_{g}.png" for g in range(len(r.images))]}

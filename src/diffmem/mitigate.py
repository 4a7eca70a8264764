"""Inference-time mitigation (Wen et al. sec. 5.1) and the prompt-augmentation baselines
(Somepalli et al. 2023, "Understanding and mitigating copying in diffusion models").

- ``optimize_prompt_embedding``: AdamW on the conditional prompt embedding to bring the
  text-conditional noise norm at one step (the first by default) down to a target, the start token
  left untouched; the loss is the seed's (the norm over all generations at once) or the mean d,
  optionally with the seed's L2 constraint to the starting embedding.
- ``augment_prompt``: ``rand_word_add`` / ``rand_numb_add`` / ``rand_word_repeat``, used at
  inference (``repeat_num = 4``) and as the training-time baseline (``repeat_num = 1``).
- ``mitigate_unit``: one batch of prompts mitigated and sampled with the explicit DDIM loop
  (used by ``diffmem mitigate``, ``evaluate``, ``audit`` and the ``serve`` page's mitigation button).
- ``default_target_loss``, ``calibrated_target_loss``: the target when none is given (normal
  prompts' median first-step loss, in the target's unit).
- ``run_mitigation``: ``diffmem mitigate``'s run, writing images, final d and embeddings to a folder.
"""

from __future__ import annotations

import hashlib
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.files import jsonable, one_writer, save_generations
from diffmem.metrics import TARGET_UNITS, mitigation_loss, text_noise_norm
from diffmem.model import Conditioning
from diffmem.provenance import provenance
from diffmem.detectors.wen import NoiseNormRecorder
from diffmem.sampling import SamplingConfig, Step, plan_units, predict_branches, tracked_pass

AUGMENT_STYLES = ("rand_word_add", "rand_numb_add", "rand_word_repeat")
METHODS = ("none", "embedding-opt", *AUGMENT_STYLES)
CLIP_RANDOM_TOKEN_LIMIT = 49400  # Somepalli et al. draw token ids below this in CLIP's 49,408-token vocabulary
RANDOM_NUMBER_LIMIT = 100000  # rand_numb_add draws integers below this


# -- embedding optimization (Wen et al. sec. 5.1) -------------------------------------------------

def step_noise_norms(model, cond: Conditioning, x_t: torch.Tensor, t, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d of each prompt and generation at one step (differentiable in ``cond.embeddings``).

    cond P rows; x_t (P, G, C, H, W) latents at step t (unscaled); eps_uncond (P, G, C, H, W) the
    unconditional branch there (``diffmem.sampling.predict_branches``, computed once). Returns (P, G).
    """
    P, G = x_t.shape[:2]
    eps_c, eps_u = predict_branches(model, x_t.flatten(0, 1), t, cond.repeat_interleave(G), None,
                                    eps_uncond=eps_uncond.flatten(0, 1))
    return text_noise_norm(eps_c, eps_u).view(P, G)


def token_distance(emb: torch.Tensor, start: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Mean over `positions` of each token's L2 distance from its starting embedding: (P, T, D) x2 -> (P,)."""
    return (emb[:, positions] - start[:, positions]).norm(dim=-1).mean(-1)


@dataclass
class OptimizedEmbeddings:
    embeddings: torch.Tensor  # (P, T, D) the conditional embeddings to sample with
    final_loss: torch.Tensor  # (P,) loss (in the target's unit) of the returned embeddings
    initial_loss: torch.Tensor  # (P,) loss of the input embeddings
    final_d: torch.Tensor  # (P,) mean per-generation d of the returned embeddings
    initial_d: torch.Tensor  # (P,) mean per-generation d of the input embeddings
    iterations: torch.Tensor  # (P,) int, AdamW steps taken for each prompt (0: already at the target)


def optimize_prompt_embedding(model, cond: Conditioning, x_t: torch.Tensor, t, target_loss: float,
                              lr: float | None = None, max_iters: int | None = None,
                              eps_uncond: torch.Tensor | None = None, target_unit: str = "batch",
                              epsilon: float | None = None, alpha: float = 0.5) -> OptimizedEmbeddings:
    """Minimize d at one step over the conditional token embeddings (Wen et al. sec. 5.1), batched.

    cond P rows (their extra conditioning stays fixed); x_t (P, G, C, H, W) each prompt's latents at
    step t (x_T, scaled by ``init_noise_sigma``, at the first step); eps_uncond (P, G, C, H, W) the
    unconditional branch there when already known. The loss of a prompt is
    ``diffmem.metrics.mitigation_loss`` of its G values of d in `target_unit` ("batch": the seed's
    norm over all generations at once; "mean": the mean d). Each prompt stops as soon as its loss is
    <= `target_loss` (checked before each step, as the seed does), and its embedding stops changing
    while the other prompts continue; at most `max_iters` AdamW steps. lr and max_iters default to
    the model's (``ModelDefaults``).

    With `epsilon` (the seed's ``optim_epsilon``), once a prompt's mean token L2 distance from its
    starting embedding (over the learnable positions) exceeds it, that prompt minimizes
    ``alpha * loss + (1 - alpha) * distance`` instead. The model's ``frozen_token_positions`` (the
    start token) never change: their gradient is zeroed, and they are restored after each step so
    that AdamW's weight decay cannot move them either (the seed's AdamW decays them).
    """
    if len(cond.embeddings.shape) != 3 or x_t.ndim != 5 or len(cond) != len(x_t):
        raise ValueError(f"expected cond (P, T, D) and x_t (P, G, C, H, W) with the same P; got "
                         f"{tuple(cond.embeddings.shape)} and {tuple(x_t.shape)}")
    lr = model.defaults.mitigation_lr if lr is None else lr
    max_iters = model.defaults.mitigation_max_iters if max_iters is None else max_iters
    if max_iters < 0 or lr <= 0:
        raise ValueError(f"need max_iters >= 0 and lr > 0; got max_iters={max_iters}, lr={lr}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha {alpha}: must be between 0 and 1")
    mitigation_loss(torch.zeros(1, 1), target_unit)  # checks the unit
    P, G = x_t.shape[:2]
    if eps_uncond is None:
        with torch.no_grad():  # the unconditional branch does not depend on the prompt embedding
            _, eps_uncond = predict_branches(model, x_t.flatten(0, 1), t, cond.repeat_interleave(G),
                                             model.empty_conditioning().expand(P * G))
    eps_u = eps_uncond.reshape(x_t.shape).detach()

    # 1. Parameters, optimizer and the per-prompt bookkeeping.
    frozen_pos = list(model.frozen_token_positions)
    learnable = [j for j in range(cond.embeddings.shape[1]) if j not in set(frozen_pos)]
    dtype = cond.embeddings.dtype
    start = cond.embeddings.detach().float()  # float32 master copy: AdamW's eps and moments underflow in half precision
    emb = start.clone().requires_grad_(True)  # (P, T, D)
    optimizer = torch.optim.AdamW([emb], lr=lr)
    active = torch.ones(P, dtype=torch.bool, device=emb.device)
    final_loss = torch.zeros(P, device=emb.device)
    final_d = torch.zeros(P, device=emb.device)
    iterations = torch.zeros(P, dtype=torch.long)
    initial = None
    for it in range(max_iters + 1):
        idx = active.nonzero().flatten()
        # 2. The loss of the prompts still running; those at the target stop here.
        with torch.enable_grad():
            d = step_noise_norms(model, cond[idx].with_embeddings(emb[idx].to(dtype)), x_t[idx], t, eps_u[idx])  # (A, G)
            loss = mitigation_loss(d.float(), target_unit)  # (A,)
        if initial is None:
            initial = (loss.detach().clone(), d.detach().mean(1))
        final_loss[idx] = loss.detach().to(final_loss.dtype)
        final_d[idx] = d.detach().mean(1).to(final_d.dtype)
        reached = loss.detach() <= target_loss
        active[idx[reached]] = False
        if it == max_iters or not active.any():
            break
        # 3. One AdamW step on the prompts that did not reach it (with the distance term past epsilon).
        objective = loss
        if epsilon is not None:
            dist = token_distance(emb[idx], start[idx], learnable)
            far = dist.detach() > epsilon
            objective = torch.where(far, alpha * loss + (1 - alpha) * dist, loss)
        optimizer.zero_grad(set_to_none=False)
        objective[~reached].sum().backward()  # a sum keeps each prompt's gradient independent of the others
        emb.grad[:, frozen_pos] = 0
        frozen = ~active
        before = emb.detach()[frozen].clone()
        optimizer.step()
        with torch.no_grad():
            emb[frozen] = before  # finished prompts keep their embedding exactly
            emb[:, frozen_pos] = start[:, frozen_pos]
        iterations[active.cpu()] += 1
    return OptimizedEmbeddings(emb.detach().to(dtype), final_loss, initial[0], final_d, initial[1], iterations)


# -- prompt augmentation baselines (Somepalli et al. 2023) ----------------------------------------

def random_vocabulary_word(tokenizer, rng: random.Random) -> str:
    """A uniformly drawn non-special token id below min(vocabulary size, 49400), decoded to one word."""
    limit = min(len(tokenizer), CLIP_RANDOM_TOKEN_LIMIT)
    special = set(tokenizer.all_special_ids)
    for _ in range(1000):
        i = rng.randrange(limit)
        word = tokenizer.decode([i]).strip()
        if i not in special and word and not any(c.isspace() for c in word):
            return word
    raise ValueError(f"tokenizer {type(tokenizer).__name__}: no decodable single-word token in 1,000 draws")


def insert_word(prompt: str, word: str, rng: random.Random) -> str:
    """Insert `word` at a uniformly drawn position among the prompt's space-separated words."""
    words = prompt.split(" ")
    words.insert(rng.randint(0, len(words)), word)
    return " ".join(words)


def augment_prompt(prompt: str, style: str, repeat_num: int, model, rng: random.Random) -> str:
    """Insert `repeat_num` items into `prompt` (Somepalli et al. 2023's caption augmentations).

    rand_word_add: random vocabulary tokens; rand_numb_add: random integers < 100000;
    rand_word_repeat: random words of the prompt itself.
    """
    if style not in AUGMENT_STYLES:
        raise ValueError(f"prompt augmentation {style!r}: expected one of {', '.join(AUGMENT_STYLES)}")
    if repeat_num < 0:
        raise ValueError(f"repeat_num {repeat_num}: must be >= 0")
    words = prompt.split(" ")
    tokenizer = model.tokenizer if style == "rand_word_add" else None
    for _ in range(repeat_num):
        if style == "rand_word_add":
            item = random_vocabulary_word(tokenizer, rng)
        elif style == "rand_numb_add":
            item = str(rng.randrange(RANDOM_NUMBER_LIMIT))
        else:
            item = rng.choice(words)
        prompt = insert_word(prompt, item, rng)
    return prompt


# -- sampling with a mitigation -------------------------------------------------------------------

@dataclass
class MitigationConfig:
    """One mitigation setting. ``None``: the model's default (``ModelDefaults``)."""

    method: str = "embedding-opt"  # one of METHODS
    target_loss: float | None = None  # embedding-opt: stop at loss <= this (SD: the seed's 3; lab: calibrated)
    target_unit: str = "batch"  # the loss: "batch" = the seed's norm over all generations at once; "mean" = mean d
    lr: float | None = None  # embedding-opt AdamW learning rate (SD: Wen et al.'s 0.05; lab: 0.01)
    max_iters: int | None = None  # embedding-opt AdamW steps at most (SD: 10; lab: 50)
    optim_step: int = 0  # embedding-opt at this DDIM step (the seed's --optim_target_steps; 0 = the first)
    epsilon: float | None = None  # L2-constrained variant: past this mean token distance, add the distance term
    alpha: float = 0.5  # weight of the loss against the distance term past epsilon (the seed's default)
    repeat_num: int = 4  # augmentations: items inserted (4 at inference, 1 in training)
    seed: int = 0  # augmentation draws for the prompt at position p use seed + p

    def __post_init__(self):
        if self.method not in METHODS:
            raise ValueError(f"mitigation {self.method!r}: expected one of {', '.join(METHODS)}")
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


def reference_losses(model, prompts: list[str], sampling: SamplingConfig, unit: str = "batch") -> np.ndarray:
    """First-step embedding-opt loss (``mitigation_loss`` in `unit`) of each prompt, prompt j from seed + j: (P,)."""
    from dataclasses import replace

    from diffmem.sampling import sample_prompts

    res = sample_prompts(model, prompts, replace(sampling, track_steps=1), decode=False)
    return np.array([float(mitigation_loss(r.text_noise_norm[:, 0].double(), unit)) for r in res])


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
    modified_prompt: str  # what was encoded (= prompt for none/embedding-opt)
    embedding: torch.Tensor  # (T, D) the conditional embedding sampled with
    initial_d: float  # d of the original prompt at the optimization step (the first), mean over generations
    final_d: float  # d there of the embedding sampled with
    initial_loss: float  # embedding-opt's loss (config.target_unit) of the original prompt there
    final_loss: float  # ... of the embedding sampled with
    iterations: int  # embedding-opt AdamW steps (0 otherwise)
    images: torch.Tensor | None  # (G, 3, H, W) in [0, 1]
    text_noise_norm: torch.Tensor  # (G, S) d per generation and step while sampling


class _UncondRecorder:
    def on_step(self, step: Step) -> None:
        self.eps_uncond = step.eps_uncond


def _step_branches(model, x, cond, uncond, t, batch_size):
    """One step of the tracked pass at t, not taken: d (N,) and eps_uncond (N, C, H, W) at x."""
    norms, unc = NoiseNormRecorder(), _UncondRecorder()
    tracked_pass(model, x, cond, uncond, t[None], 1.0, [norms, unc], advance_last=False, max_batch=batch_size)
    return norms.text_noise_norm()[:, 0], unc.eps_uncond


def mitigate_unit(model, prompts: list[str], positions: list[int], config: MitigationConfig, sampling: SamplingConfig,
                  decode: bool = True) -> list[MitigatedPrompt]:
    """Mitigate and sample one batch of prompts (seed of position p: ``sampling.seed + p``).

    Fields of `config` left None take the model's defaults (``MitigationConfig.resolved``).
    embedding-opt optimizes at step ``config.optim_step`` (the latents the original prompt reaches
    there); every prompt is then sampled from its x_T with the embedding it ends with.
    """
    from diffmem.sampling import sample_unit, schedule, unit_inputs

    # 1. Each prompt's x_T under the seed contract; the latents at the optimization step k (x_T for
    #    k = 0) and the tracked pass's step there, not taken: d and eps_uncond.
    G, P, k = sampling.num_generations, len(prompts), config.optim_step
    timesteps = schedule(model, sampling.num_inference_steps)
    if k >= len(timesteps):
        raise ValueError(f"--optim-step {k}: the schedule has {len(timesteps)} steps (0-based)")
    original = model.encode_prompts(prompts)  # P rows
    x, cond_rows, uncond = unit_inputs(model, positions, sampling, conditioning=original)
    x_k = tracked_pass(model, x, cond_rows, uncond, timesteps[:k], sampling.guidance(model), eta=sampling.eta,
                       max_batch=sampling.batch_size) if k else x
    t = timesteps[k]
    d0_rows, eps_u = _step_branches(model, x_k, cond_rows, uncond, t, sampling.batch_size)
    d0 = d0_rows.view(P, G)
    loss0 = mitigation_loss(d0, config.target_unit)
    # 2. The conditional embeddings to sample with.
    modified = list(prompts)
    iterations = torch.zeros(P, dtype=torch.long)
    cond, final_d, final_loss = original, d0.mean(1), loss0
    if config.method == "embedding-opt":
        config = config.resolved(model)
        opt = optimize_prompt_embedding(model, original, x_k.view(P, G, *x.shape[1:]), t, config.target_loss,
                                        config.lr, config.max_iters, eps_uncond=eps_u, target_unit=config.target_unit,
                                        epsilon=config.epsilon, alpha=config.alpha)
        cond, final_d, final_loss, iterations = (original.with_embeddings(opt.embeddings), opt.final_d, opt.final_loss,
                                                 opt.iterations)
    elif config.method in AUGMENT_STYLES:
        modified = [augment_prompt(p, config.method, config.repeat_num, model, random.Random(config.seed + pos))
                    for p, pos in zip(prompts, positions)]
        cond = model.encode_prompts(modified)
        d1 = _step_branches(model, x_k, cond.repeat_interleave(G), uncond, t, sampling.batch_size)[0].view(P, G)
        final_d, final_loss = d1.mean(1), mitigation_loss(d1, config.target_unit)
    # 3. Sample every step with them.
    samples = sample_unit(model, modified, positions, sampling, decode=decode, conditioning=cond)
    return [MitigatedPrompt(pos, p, m, cond.embeddings[j].detach().cpu(), float(d0[j].mean()), float(final_d[j]),
                            float(loss0[j]), float(final_loss[j]), int(iterations[j]), s.images, s.text_noise_norm)
            for j, (pos, p, m, s) in enumerate(zip(positions, prompts, modified, samples))]


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
    return {"position": r.position, "seed": sampling.seed + r.position, "prompt": r.prompt,
            "modified_prompt": r.modified_prompt, "method": config.method, "initial_d": r.initial_d,
            "final_d": r.final_d, "initial_loss": r.initial_loss, "final_loss": r.final_loss,
            "target_unit": config.target_unit, "iterations": r.iterations, "embedding": f"prompt_{r.position:05d}",
            "images": [f"images/{r.position:05d}_{g}.png" for g in range(len(r.images))]}

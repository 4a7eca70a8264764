"""Inference-time mitigation (Wen et al. sec. 5.1) and the prompt-augmentation baselines
(Somepalli et al. 2023, "Understanding and mitigating copying in diffusion models").

- ``optimize_prompt_embedding``: AdamW on the conditional prompt embedding to bring the
  first-step text-conditional noise norm d down to a target, the start token left untouched.
- ``augment_prompt``: ``rand_word_add`` / ``rand_numb_add`` / ``rand_word_repeat``, used at
  inference (``repeat_num = 4``) and as the training-time baseline (``repeat_num = 1``).
- ``mitigate_unit``: one batch of prompts mitigated and sampled with the explicit DDIM loop
  (used by ``diffmem mitigate``, ``evaluate``, ``audit`` and the ``serve`` page's mitigation button).
- ``default_target_loss``: the target when none is given (normal prompts' median score).
- ``run_mitigation``: ``diffmem mitigate``'s run, writing images, final d and embeddings to a folder.
"""

from __future__ import annotations

import json
import random
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch

from diffmem.files import save_generations
from diffmem.metrics import text_noise_norm
from diffmem.model import Conditioning
from diffmem.provenance import provenance
from diffmem.sampling import NoiseNormRecorder, SamplingConfig, Step, plan_units, predict_branches, tracked_pass

AUGMENT_STYLES = ("rand_word_add", "rand_numb_add", "rand_word_repeat")
METHODS = ("none", "embedding-opt", *AUGMENT_STYLES)
CLIP_RANDOM_TOKEN_LIMIT = 49400  # Somepalli et al. draw token ids below this in CLIP's 49,408-token vocabulary
RANDOM_NUMBER_LIMIT = 100000  # rand_numb_add draws integers below this


# -- embedding optimization (Wen et al. sec. 5.1) -------------------------------------------------

def first_step_d(model, cond: Conditioning, x_T: torch.Tensor, t, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-prompt d at one step, averaged over generations (differentiable in ``cond.embeddings``).

    cond P rows; x_T (P, G, C, H, W) latents at step t (unscaled); eps_uncond (P, G, C, H, W) the
    unconditional branch there (``diffmem.sampling.predict_branches``, computed once). Returns (P,).
    """
    P, G = x_T.shape[:2]
    eps_c, eps_u = predict_branches(model, x_T.flatten(0, 1), t, cond.repeat_interleave(G), None,
                                    eps_uncond=eps_uncond.flatten(0, 1))
    return text_noise_norm(eps_c, eps_u).view(P, G).mean(1)


@dataclass
class OptimizedEmbeddings:
    embeddings: torch.Tensor  # (P, T, D) the conditional embeddings to sample with
    final_d: torch.Tensor  # (P,) first-step d of the returned embeddings (mean over generations)
    initial_d: torch.Tensor  # (P,) first-step d of the input embeddings
    iterations: torch.Tensor  # (P,) int, AdamW steps taken for each prompt (0: already at the target)


def optimize_prompt_embedding(model, cond: Conditioning, x_T: torch.Tensor, t, target_loss: float,
                              lr: float | None = None, max_iters: int | None = None,
                              eps_uncond: torch.Tensor | None = None) -> OptimizedEmbeddings:
    """Minimize the first-step d over the conditional token embeddings (Wen et al. sec. 5.1), batched.

    cond P rows (their extra conditioning stays fixed); x_T (P, G, C, H, W) each prompt's initial
    noise (already scaled by ``init_noise_sigma``); t the first timestep; eps_uncond (P, G, C, H, W)
    the unconditional branch at x_T when already known. Each prompt stops as soon as its d (mean over
    its G generations) is <= `target_loss`, and its embedding stops changing while the other prompts
    continue; at most `max_iters` AdamW steps. lr and max_iters default to the model's
    (``ModelDefaults``). The model's ``frozen_token_positions`` (the start
    token) never change: their gradient is zeroed, and they are restored after each step so that
    AdamW's weight decay cannot move them either.
    """
    if len(cond.embeddings.shape) != 3 or x_T.ndim != 5 or len(cond) != len(x_T):
        raise ValueError(f"expected cond (P, T, D) and x_T (P, G, C, H, W) with the same P; got "
                         f"{tuple(cond.embeddings.shape)} and {tuple(x_T.shape)}")
    lr = model.defaults.mitigation_lr if lr is None else lr
    max_iters = model.defaults.mitigation_max_iters if max_iters is None else max_iters
    if max_iters < 0 or lr <= 0:
        raise ValueError(f"need max_iters >= 0 and lr > 0; got max_iters={max_iters}, lr={lr}")
    P, G = x_T.shape[:2]
    if eps_uncond is None:
        with torch.no_grad():  # the unconditional branch does not depend on the prompt embedding
            _, eps_uncond = predict_branches(model, x_T.flatten(0, 1), t, cond.repeat_interleave(G),
                                             model.empty_conditioning().expand(P * G))
    eps_u = eps_uncond.reshape(x_T.shape).detach()

    # 1. Parameters, optimizer and the per-prompt bookkeeping.
    frozen_pos = list(model.frozen_token_positions)
    emb = cond.embeddings.detach().clone().requires_grad_(True)  # (P, T, D)
    kept = cond.embeddings[:, frozen_pos].detach().clone()
    optimizer = torch.optim.AdamW([emb], lr=lr)
    active = torch.ones(P, dtype=torch.bool, device=emb.device)
    final_d = torch.zeros(P, device=emb.device)
    iterations = torch.zeros(P, dtype=torch.long)
    initial_d = None
    for it in range(max_iters + 1):
        idx = active.nonzero().flatten()
        # 2. d of the prompts still running; those at the target stop here.
        with torch.enable_grad():
            d = first_step_d(model, cond[idx].with_embeddings(emb[idx]), x_T[idx], t, eps_u[idx])  # (A,)
        if initial_d is None:
            initial_d = d.detach().clone()
        final_d[idx] = d.detach().to(final_d.dtype)
        reached = d.detach() <= target_loss
        active[idx[reached]] = False
        if it == max_iters or not active.any():
            break
        # 3. One AdamW step on the prompts that did not reach it.
        optimizer.zero_grad(set_to_none=False)
        d[~reached].sum().backward()  # a sum keeps each prompt's gradient independent of the others
        emb.grad[:, frozen_pos] = 0
        frozen = ~active
        before = emb.detach()[frozen].clone()
        optimizer.step()
        with torch.no_grad():
            emb[frozen] = before  # finished prompts keep their embedding exactly
            emb[:, frozen_pos] = kept
        iterations[active.cpu()] += 1
    return OptimizedEmbeddings(emb.detach(), final_d, initial_d, iterations)


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
    target_loss: float | None = None  # embedding-opt: stop at d <= this (SD: the seed's 3; lab: calibrated)
    lr: float | None = None  # embedding-opt AdamW learning rate (SD: Wen et al.'s 0.05; lab: 0.01)
    max_iters: int | None = None  # embedding-opt AdamW steps at most (SD: 10; lab: 50)
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


def default_target_loss(normal_scores: list[float], threshold: float | None = None) -> float:
    """embedding-opt's calibrated target: the median first-step d of prompts known to be normal (a
    mitigated prompt ends where a typical ordinary prompt sits, benchmarks/MITIGATION.md), or half the
    decision threshold when there are none."""
    if len(normal_scores):
        return float(np.median(normal_scores))
    if threshold is None:
        raise ValueError("no normal prompts' scores and no threshold to derive a target loss from")
    return 0.5 * float(threshold)


def calibrated_target_loss(model, config: MitigationConfig, sampling: SamplingConfig,
                           reference_prompts: list[str] | None = None) -> float | None:
    """The target a verb uses when neither `config` nor the model gives one: the median first-step d
    of `reference_prompts`, or of the model's own reference prompts (lab: the novel captions that
    the audit and ``serve`` calibrate on). None when a target is given or there is nothing to calibrate on."""
    if config.method != "embedding-opt" or config.target_loss is not None or model.defaults.target_loss is not None:
        return None
    if reference_prompts is None:
        from diffmem.lab.prompts import own_reference_prompts

        reference_prompts = own_reference_prompts(model)
    if not reference_prompts:
        return None
    from dataclasses import replace

    from diffmem.sampling import window_scores

    return default_target_loss(window_scores(model, reference_prompts, replace(sampling, track_steps=1)))


@dataclass
class MitigatedPrompt:
    position: int
    prompt: str  # the original prompt
    modified_prompt: str  # what was encoded (= prompt for none/embedding-opt)
    embedding: torch.Tensor  # (T, D) the conditional embedding sampled with
    initial_d: float  # first-step d of the original prompt (mean over generations)
    final_d: float  # first-step d of the embedding sampled with
    iterations: int  # embedding-opt AdamW steps (0 otherwise)
    images: torch.Tensor | None  # (G, 3, H, W) in [0, 1]
    text_noise_norm: torch.Tensor  # (G, S) d per generation and step while sampling


class _UncondRecorder:
    def on_step(self, step: Step) -> None:
        self.eps_uncond = step.eps_uncond


def _first_step(model, x, cond, uncond, t, batch_size):
    """The tracked pass's first step, not taken: d (N,) and eps_uncond (N, C, H, W)."""
    norms, unc = NoiseNormRecorder(), _UncondRecorder()
    tracked_pass(model, x, cond, uncond, t[None], 1.0, [norms, unc], advance_last=False, max_batch=batch_size)
    return norms.text_noise_norm()[:, 0], unc.eps_uncond


def mitigate_unit(model, prompts: list[str], positions: list[int], config: MitigationConfig, sampling: SamplingConfig,
                  decode: bool = True) -> list[MitigatedPrompt]:
    """Mitigate and sample one batch of prompts (seed of position p: ``sampling.seed + p``).

    Fields of `config` left None take the model's defaults (``MitigationConfig.resolved``).
    """
    from diffmem.sampling import sample_unit, schedule, unit_inputs

    # 1. Each prompt's x_T under the seed contract, and the tracked pass's first step: d0, eps_uncond.
    G, P = sampling.num_generations, len(prompts)
    t = schedule(model, sampling.num_inference_steps)[0]
    original = model.encode_prompts(prompts)  # P rows
    x, cond_rows, uncond = unit_inputs(model, positions, sampling, conditioning=original)
    d0_rows, eps_u = _first_step(model, x, cond_rows, uncond, t, sampling.batch_size)
    d0 = d0_rows.view(P, G).mean(1)
    # 2. The conditional embeddings to sample with.
    modified = list(prompts)
    iterations = torch.zeros(P, dtype=torch.long)
    cond, final_d = original, d0
    if config.method == "embedding-opt":
        config = config.resolved(model)
        opt = optimize_prompt_embedding(model, original, x.view(P, G, *x.shape[1:]), t, config.target_loss,
                                        config.lr, config.max_iters, eps_uncond=eps_u)
        cond, final_d, iterations = original.with_embeddings(opt.embeddings), opt.final_d, opt.iterations
    elif config.method in AUGMENT_STYLES:
        modified = [augment_prompt(p, config.method, config.repeat_num, model, random.Random(config.seed + pos))
                    for p, pos in zip(prompts, positions)]
        cond = model.encode_prompts(modified)
        final_d = _first_step(model, x, cond.repeat_interleave(G), uncond, t, sampling.batch_size)[0].view(P, G).mean(1)
    # 3. Sample every step with them.
    samples = sample_unit(model, modified, positions, sampling, decode=decode, conditioning=cond)
    return [MitigatedPrompt(pos, p, m, cond.embeddings[j].detach().cpu(), float(d0[j]), float(final_d[j]),
                            int(iterations[j]), s.images, s.text_noise_norm)
            for j, (pos, p, m, s) in enumerate(zip(positions, prompts, modified, samples))]


# -- one mitigation run, as `diffmem mitigate` writes it ------------------------------------------

def run_mitigation(model, prompts: list[str], config: MitigationConfig, sampling: SamplingConfig, out: str | Path,
                   progress: bool = True) -> Path:
    """Mitigate and sample `prompts`; write images, ``results.jsonl`` (final d, iterations, modified
    prompt) and ``embeddings.safetensors`` (the conditional embedding each prompt was sampled with)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    if (out / "results.jsonl").exists():
        raise FileExistsError(f"{out}/results.jsonl exists; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    config = config.resolved(model, calibrated_target_loss(model, config, sampling))
    units = plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size)
    results: list[MitigatedPrompt] = []
    bar = tqdm(total=len(prompts), desc=f"mitigate ({config.method})", unit="prompt", disable=not progress)
    for unit in units:
        results += mitigate_unit(model, [prompts[p] for p in unit], unit, config, sampling)
        bar.update(len(unit))
    bar.close()
    for r in results:
        save_generations(out / "images", r.position, r.images)
    save_file({f"prompt_{r.position:05d}": r.embedding.float().contiguous() for r in results},
              str(out / "embeddings.safetensors"))
    rows = [{"position": r.position, "seed": sampling.seed + r.position, "prompt": r.prompt,
             "modified_prompt": r.modified_prompt, "method": config.method, "initial_d": r.initial_d,
             "final_d": r.final_d, "iterations": r.iterations, "embedding": f"prompt_{r.position:05d}",
             "images": [f"images/{r.position:05d}_{g}.png" for g in range(len(r.images))]} for r in results]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "meta.json").write_text(json.dumps(provenance(model, mitigation=asdict(config),
                                                         sampling=asdict(sampling)), indent=2))
    return out

"""Inference-time mitigation (Wen et al. sec. 5.1) and the prompt-augmentation baselines
(Somepalli et al. 2023, "Understanding and mitigating copying in diffusion models").

- ``optimize_prompt_embedding``: AdamW on the conditional prompt embedding to bring the
  first-step text-conditional noise norm d down to a target, the start token left untouched.
- ``augment_prompt``: ``rand_word_add`` / ``rand_numb_add`` / ``rand_word_repeat``, used at
  inference (``repeat_num = 4``) and as the training-time baseline (``repeat_num = 1``).
- ``mitigate_unit``: one batch of prompts mitigated and sampled with the explicit DDIM loop
  (used by ``diffmem mitigate``, ``evaluate``, ``audit`` and the ``serve`` page's mitigation button).
- ``default_target_loss``: the target when none is given (normal prompts' median score).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import numpy as np
import torch

from diffmem.metrics import text_noise_norm

AUGMENT_STYLES = ("rand_word_add", "rand_numb_add", "rand_word_repeat")
METHODS = ("none", "embedding-opt", *AUGMENT_STYLES)
CLIP_RANDOM_TOKEN_LIMIT = 49400  # Somepalli et al. draw token ids below this in CLIP's 49,408-token vocabulary
RANDOM_NUMBER_LIMIT = 100000  # rand_numb_add draws integers below this


# -- embedding optimization (Wen et al. sec. 5.1) -------------------------------------------------

def first_step_d(denoise, cond: torch.Tensor, x_T: torch.Tensor, t, eps_uncond: torch.Tensor) -> torch.Tensor:
    """Per-prompt d at one step, averaged over generations (differentiable in `cond`).

    denoise(x, t, emb) -> eps; cond (P, T, D); x_T (P, G, C, H, W); eps_uncond (P, G, C, H, W).
    Returns (P,).
    """
    P, G = x_T.shape[:2]
    eps_c = denoise(x_T.flatten(0, 1), t, cond.repeat_interleave(G, dim=0))  # (P*G, C, H, W)
    d = text_noise_norm(eps_c, eps_uncond.flatten(0, 1))  # (P*G,)
    return d.view(P, G).mean(1)


@dataclass
class OptimizedEmbeddings:
    embeddings: torch.Tensor  # (P, T, D) the conditional embeddings to sample with
    final_d: torch.Tensor  # (P,) first-step d of the returned embeddings (mean over generations)
    initial_d: torch.Tensor  # (P,) first-step d of the input embeddings
    iterations: torch.Tensor  # (P,) int, AdamW steps taken for each prompt (0: already at the target)


def optimize_prompt_embedding(model, cond: torch.Tensor, x_T: torch.Tensor, t, target_loss: float,
                              lr: float = 0.05, max_iters: int = 10) -> OptimizedEmbeddings:
    """Minimize the first-step d over the conditional embedding (Wen et al. sec. 5.1), batched.

    cond (P, T, D) prompt embeddings; x_T (P, G, C, H, W) each prompt's initial noise (already
    scaled by ``init_noise_sigma``); t the first timestep. Each prompt stops as soon as its d
    (mean over its G generations) is <= `target_loss`, and its embedding stops changing while the
    other prompts continue; at most `max_iters` AdamW steps. The start token (position 0) never
    changes: its gradient is zeroed, and it is restored after each step so that AdamW's weight
    decay cannot move it either.
    """
    if cond.ndim != 3 or x_T.ndim != 5 or len(cond) != len(x_T):
        raise ValueError(f"expected cond (P, T, D) and x_T (P, G, C, H, W) with the same P; got {tuple(cond.shape)} "
                         f"and {tuple(x_T.shape)}")
    if max_iters < 0 or lr <= 0:
        raise ValueError(f"need max_iters >= 0 and lr > 0; got max_iters={max_iters}, lr={lr}")
    denoise = model.predict_noise
    x_in = model.scheduler.scale_model_input(x_T.flatten(0, 1), t).view_as(x_T)
    P, G = x_T.shape[:2]
    with torch.no_grad():  # the unconditional branch does not depend on the prompt embedding
        empty = model.empty_embedding().to(cond.dtype)
        eps_u = denoise(x_in.flatten(0, 1), t, empty.expand(P * G, -1, -1)).view_as(x_T)

    # 1. Parameters, optimizer and the per-prompt bookkeeping.
    emb = cond.detach().clone().requires_grad_(True)  # (P, T, D)
    start_token = cond[:, :1].detach().clone()
    optimizer = torch.optim.AdamW([emb], lr=lr)
    active = torch.ones(P, dtype=torch.bool, device=cond.device)
    final_d = torch.zeros(P, device=cond.device)
    iterations = torch.zeros(P, dtype=torch.long)
    initial_d = None
    for it in range(max_iters + 1):
        idx = active.nonzero().flatten()
        # 2. d of the prompts still running; those at the target stop here.
        d = first_step_d(denoise, emb[idx], x_in[idx], t, eps_u[idx])  # (A,)
        if initial_d is None:
            initial_d = d.detach().clone()
        final_d[idx] = d.detach()
        reached = d.detach() <= target_loss
        active[idx[reached]] = False
        if it == max_iters or not active.any():
            break
        # 3. One AdamW step on the prompts that did not reach it.
        optimizer.zero_grad(set_to_none=False)
        d[~reached].sum().backward()  # a sum keeps each prompt's gradient independent of the others
        emb.grad[:, 0] = 0
        frozen = ~active
        before = emb.detach()[frozen].clone()
        optimizer.step()
        with torch.no_grad():
            emb[frozen] = before  # finished prompts keep their embedding exactly
            emb[:, :1] = start_token
        iterations[active.cpu()] += 1
    return OptimizedEmbeddings(emb.detach(), final_d, initial_d, iterations)


# -- prompt augmentation baselines (Somepalli et al. 2023) ----------------------------------------

def tokenizer_of(model):
    """The tokenizer behind a model adapter (SD: ``model.tokenizer``; lab: its text encoder's)."""
    tok = getattr(model, "tokenizer", None) or getattr(getattr(model, "text_encoder", None), "tokenizer", None)
    if tok is None:
        raise TypeError(f"{type(model).__name__} exposes no tokenizer (expected .tokenizer or .text_encoder.tokenizer); "
                        "rand_word_add draws random vocabulary tokens from it")
    return tok


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
    tokenizer = tokenizer_of(model) if style == "rand_word_add" else None
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
    method: str = "embedding-opt"  # one of METHODS
    target_loss: float = 3.0  # embedding-opt: stop at d <= this (the seed's 3 on SD; derive it on the lab)
    lr: float = 0.05  # AdamW learning rate (Wen et al.)
    max_iters: int = 10  # AdamW steps at most (Wen et al.)
    repeat_num: int = 4  # augmentations: items inserted (4 at inference, 1 in training)
    seed: int = 0  # augmentation draws for the prompt at position p use seed + p


def default_target_loss(normal_scores: list[float], threshold: float) -> float:
    """embedding-opt's target when none is given: the median score of prompts known to be normal (a
    mitigated prompt ends where a typical ordinary prompt sits, benchmarks/MITIGATION.md), or half the
    decision threshold when there are none."""
    return float(np.median(normal_scores)) if len(normal_scores) else 0.5 * float(threshold)


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


def mitigate_unit(model, prompts: list[str], positions: list[int], config: MitigationConfig, sampling,
                  decode: bool = True) -> list[MitigatedPrompt]:
    """Mitigate and sample one batch of prompts (seed of position p: ``sampling.seed + p``)."""
    from diffmem.sampling import initial_noise, sample_unit

    if config.method not in METHODS:
        raise ValueError(f"mitigation {config.method!r}: expected one of {', '.join(METHODS)}")
    # 1. The first step of the schedule, and each prompt's x_T under the seed contract.
    model.scheduler.set_timesteps(sampling.num_inference_steps, device=model.device)
    t = model.scheduler.timesteps[0]
    G = sampling.num_generations
    x_T = torch.stack([initial_noise(model, G, sampling.seed + p) for p in positions])  # (P, G, C, H, W)
    original = model.encode_prompts(prompts)  # (P, T, D)
    empty = model.empty_embedding()
    with torch.no_grad():
        x_in = model.scheduler.scale_model_input(x_T.flatten(0, 1), t).view_as(x_T)
        eps_u = model.predict_noise(x_in.flatten(0, 1), t, empty.expand(len(x_in.flatten(0, 1)), -1, -1)).view_as(x_T)
        d0 = first_step_d(model.predict_noise, original, x_in, t, eps_u)
    # 2. The conditional embeddings to sample with.
    modified = list(prompts)
    iterations = torch.zeros(len(prompts), dtype=torch.long)
    if config.method == "embedding-opt":
        opt = optimize_prompt_embedding(model, original, x_T, t, config.target_loss, config.lr, config.max_iters)
        cond, final_d, iterations = opt.embeddings, opt.final_d, opt.iterations
    elif config.method in AUGMENT_STYLES:
        modified = [augment_prompt(p, config.method, config.repeat_num, model, random.Random(config.seed + pos))
                    for p, pos in zip(prompts, positions)]
        cond = model.encode_prompts(modified)
        with torch.no_grad():
            final_d = first_step_d(model.predict_noise, cond, x_in, t, eps_u)
    else:
        cond, final_d = original, d0
    # 3. Sample every step with them.
    samples = sample_unit(model, modified, positions, sampling, decode=decode, embeddings=cond)
    return [MitigatedPrompt(pos, p, m, cond[j].detach().cpu(), float(d0[j]), float(final_d[j]), int(iterations[j]),
                            s.images, s.text_noise_norm)
            for j, (pos, p, m, s) in enumerate(zip(positions, prompts, modified, samples))]

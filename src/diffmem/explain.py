"""Token significance: which tokens of a prompt drive memorization (Wen et al., ICLR 2024, sec. 4).

The significance of token j is ``s_j = || d score / d e_j ||_2``: the L2 norm of the gradient of the
prompt's detection score (the text-conditional noise norm ``d = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2``
averaged over a window of DDIM steps and over the generations) with respect to the j-th token's
embedding in the *conditional* prompt embedding. The unconditional branch is the empty prompt, as in
sampling, and no gradient flows through it. (The official ``get_text_cond_grad`` took the gradient
with respect to the embedding in the unconditional slot; see ``tests/test_explain.py``.)
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from diffmem.metrics import text_noise_norm
from diffmem.sampling import denoise_tracked, initial_noise

Denoise = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]  # eps(x_t, t, emb)


# -- the math ---------------------------------------------------------------------------------

def text_noise_norm_grad(denoise: Denoise, x_t: torch.Tensor, t: torch.Tensor, cond: torch.Tensor,
                         uncond: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """d per generation and the gradient of its mean w.r.t. the conditional embedding (paper sec. 4).

    x_t (G, C, H, W) is the scaled model input; cond, uncond (1, T, D) are shared by all G
    generations. One batched call, unconditional rows first as in sampling.
    Returns d (G,) and d mean(d) / d cond, (1, T, D).
    """
    G = len(x_t)
    cond = cond.detach().requires_grad_(True)
    emb = torch.cat([uncond.detach().expand(G, -1, -1), cond.expand(G, -1, -1)])  # (2G, T, D)
    with torch.enable_grad():
        eps_uncond, eps_cond = denoise(torch.cat([x_t, x_t]), t, emb).chunk(2)  # (G, C, H, W) each
        d = text_noise_norm(eps_cond, eps_uncond)  # (G,); float64 stays float64 for finite differences
        if not d.requires_grad:  # a denoiser that ignores its embedding
            return d.detach(), torch.zeros_like(cond)
        (grad,) = torch.autograd.grad(d.mean(), cond)
    return d.detach(), grad


def significance_from_grad(grad: torch.Tensor) -> torch.Tensor:
    """s_j = ||grad_j||_2 per token: (1, T, D) or (T, D) -> (T,)."""
    return grad.reshape(-1, grad.shape[-1]).float().norm(dim=-1)


@dataclass
class ExplainConfig:
    steps: tuple[int, int] = (0, 1)  # window [start, end) of DDIM steps; the first step alone is fast and separates well
    generations: int = 4  # x_T draws per prompt (the paper's 4)
    seed: int = 0  # every prompt starts from the same x_T (initial_noise's seed contract), so scores compare
    num_inference_steps: int = 50  # the DDIM schedule the window lives in (the paper's 50)
    guidance_scale: float | None = None  # for sampling the steps before the window; None: the model's default


def check_window(steps: tuple[int, int], num_inference_steps: int) -> tuple[int, int]:
    start, end = (int(s) for s in steps)
    if not 0 <= start < end <= num_inference_steps:
        raise ValueError(f"step window [{start}, {end}): expected 0 <= start < end <= num_inference_steps "
                         f"({num_inference_steps})")
    return start, end


# -- records ----------------------------------------------------------------------------------

@dataclass
class TokenScore:
    token: str  # as the model's tokenizer splits the prompt, decoded
    score: float  # s_j
    special: bool  # start/end/padding token
    token_id: int
    word: int | None = None  # index into Explanation.words; None for special tokens


@dataclass
class WordScore:
    word: str  # as typed in the prompt
    score: float  # sum of its tokens' s_j
    start: int  # character offsets in the prompt
    end: int


@dataclass
class Explanation:
    prompt: str
    score: float  # the detection score: mean d over the window and the generations
    tokens: list[TokenScore]  # in prompt order, padded to the model's max_tokens
    words: list[WordScore]  # in prompt order
    text_noise_norm: list[list[float]]  # (G, S) d per generation and window step
    config: ExplainConfig
    truncated: bool  # the prompt had more tokens than the model reads
    provenance: dict = field(default_factory=dict)

    def ranked_tokens(self, include_special: bool = False) -> list[TokenScore]:
        return sorted((t for t in self.tokens if include_special or not t.special), key=lambda t: -t.score)

    def ranked_words(self) -> list[WordScore]:
        return sorted(self.words, key=lambda w: -w.score)

    def to_json(self) -> dict:
        return {
            "prompt": self.prompt,
            "score": self.score,
            "tokens": [{"token": t.token, "score": t.score, "special": t.special, "token_id": t.token_id,
                        "word": t.word} for t in self.tokens],
            "words": [asdict(w) for w in self.words],
            "text_noise_norm": self.text_noise_norm,
            "truncated": self.truncated,
            "settings": {**asdict(self.config), "steps": list(self.config.steps)},
            **self.provenance,
        }


# -- on a model -------------------------------------------------------------------------------

def token_significance(model, prompt: str, steps: tuple[int, int] = (0, 1), generations: int = 4, seed: int = 0,
                       num_inference_steps: int = 50, guidance_scale: float | None = None) -> Explanation:
    """Significance of each token of `prompt` for memorization, on any ``DiffusionModel``.

    The steps before the window are sampled without gradients by the same DDIM + CFG update as
    ``diffmem.sampling``; within the window, each step's gradient is taken, then the step is taken.
    """
    config = ExplainConfig((int(steps[0]), int(steps[1])), generations, seed, num_inference_steps, guidance_scale)
    # 1. Check inputs
    start, end = check_window(config.steps, num_inference_steps)
    if generations < 1:
        raise ValueError(f"generations {generations}: must be >= 1")
    guidance = model.default_guidance_scale if guidance_scale is None else guidance_scale

    # 2. Embeddings and tokens: one conditional embedding shared by all generations
    cond = model.encode_prompts([prompt])  # (1, T, D)
    uncond = model.empty_embedding()  # (1, T, D)
    tokens = model.tokens(prompt)
    if len(tokens) != cond.shape[1]:
        raise ValueError(f"model {model.name}: tokens() gave {len(tokens)} tokens but the embedding has "
                         f"{cond.shape[1]} positions; the adapter must pad tokens() to max_tokens")

    # 3. Timesteps and x_T, then sample up to the window without gradients
    model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    timesteps = model.scheduler.timesteps
    x = initial_noise(model, generations, seed)  # (G, C, H, W)
    cond_g, uncond_g = cond.expand(generations, -1, -1), uncond.expand(generations, -1, -1)
    x, _, _ = denoise_tracked(model, x, cond_g, uncond_g, timesteps[:start], guidance)

    # 4. The window: gradient of d at each step, then the ordinary DDIM + CFG step
    grad_sum = torch.zeros_like(cond, dtype=torch.float32)
    d_steps = []
    for i in range(start, end):
        t = timesteps[i]
        x_in = model.scheduler.scale_model_input(x, t)
        d, grad = text_noise_norm_grad(model.predict_noise, x_in, t, cond, uncond)
        grad_sum += grad.float()
        d_steps.append(d.float().cpu())
        x, _, _ = denoise_tracked(model, x, cond_g, uncond_g, timesteps[i:i + 1], guidance)
    significance = significance_from_grad(grad_sum / (end - start)).cpu()  # (T,): gradient of the window mean
    d_table = torch.stack(d_steps, 1)  # (G, S)

    # 5. Records: tokens in prompt order, and the words a person typed
    words, token_word = word_scores(prompt, tokens, significance.tolist())
    token_scores = [TokenScore(tok.text, float(s), tok.special, tok.token_id, w)
                    for tok, s, w in zip(tokens, significance.tolist(), token_word)]
    return Explanation(prompt, float(d_table.mean()), token_scores, words, d_table.tolist(), config,
                       truncated=model.count_tokens(prompt) > model.max_tokens,
                       provenance=provenance(model))


@torch.no_grad()
def prompt_scores(model, prompts: list[str], steps: tuple[int, int] = (0, 1), generations: int = 4, seed: int = 0,
                  num_inference_steps: int = 50, guidance_scale: float | None = None,
                  batch_size: int = 64) -> list[float]:
    """Detection scores (mean d over the window and generations) of many prompts, without gradients.

    The same settings give the same score as ``token_significance``; every prompt starts from the
    same x_T, so a threshold calibrated here applies to explanations.
    """
    start, end = check_window(steps, num_inference_steps)
    guidance = model.default_guidance_scale if guidance_scale is None else guidance_scale
    model.scheduler.set_timesteps(num_inference_steps, device=model.device)
    timesteps = model.scheduler.timesteps[:end]
    per_call = max(batch_size // (2 * generations), 1)  # prompts per UNet call
    scores: list[float] = []
    for i in range(0, len(prompts), per_call):
        chunk = prompts[i:i + per_call]
        x = initial_noise(model, generations, seed).repeat(len(chunk), 1, 1, 1)  # (P*G, C, H, W)
        cond = model.encode_prompts(chunk).repeat_interleave(generations, dim=0)
        uncond = model.empty_embedding().expand(len(x), -1, -1)
        _, d, _ = denoise_tracked(model, x, cond, uncond, timesteps, guidance)  # (P*G, end)
        scores += d[:, start:end].reshape(len(chunk), -1).mean(1).tolist()
    return scores


def provenance(model) -> dict:
    import diffmem

    return {"model": model.name, "diffmem_version": diffmem.__version__, "git_commit": _git_commit(),
            "device": str(model.device), "dtype": str(model.dtype).replace("torch.", "")}


def _git_commit() -> str | None:
    import subprocess
    from pathlib import Path

    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return out.stdout.strip() or None


# -- from tokens to the words a person typed --------------------------------------------------

WORD_PATTERN = re.compile(r"\w+(?:['’]\w+)*|[^\w\s]")  # words (with inner apostrophes) and single punctuation marks
SUBWORD_MARKERS = ("##", "</w>", "Ġ", "▁")  # WordPiece continuation, CLIP/BPE word end, byte-level and SentencePiece spaces


def _normalize(text: str) -> tuple[str, list[int]]:
    """Lower-case, accent-free text and, for each of its characters, the index of its source character."""
    chars, index = [], []
    for i, c in enumerate(text):
        for n in unicodedata.normalize("NFKD", c.lower()):
            if not unicodedata.combining(n):
                chars.append(n)
                index.append(i)
    return "".join(chars), index


def token_char_starts(prompt: str, tokens) -> list[int | None]:
    """Character offset in `prompt` where each non-special token begins (None for special tokens).

    Works from the decoded token texts alone, so it serves any tokenizer: WordPiece sub-words
    ("##ing"), character-level CLIP BPE, byte pieces of one character ("\ufffd"). A token that
    cannot be found is placed at the next unread character.
    """
    norm, index = _normalize(prompt)
    cursor = 0  # in `norm`
    starts: list[int | None] = []
    for tok in tokens:
        if tok.special:
            starts.append(None)
            continue
        piece = tok.text
        for marker in SUBWORD_MARKERS:
            piece = piece.replace(marker, "")
        piece = _normalize(piece.strip())[0]
        while cursor < len(norm) and norm[cursor].isspace():
            cursor += 1
        at = norm.find(piece, cursor) if piece and "\ufffd" not in piece else -1
        if at < 0:  # unreadable piece (a byte of a multi-byte character, [UNK]): it belongs here
            starts.append(index[cursor] if cursor < len(norm) else None)
            continue
        starts.append(index[at])
        cursor = at + len(piece)
    return starts


def word_scores(prompt: str, tokens, scores: list[float]) -> tuple[list[WordScore], list[int | None]]:
    """Sum token scores into the words of `prompt`; also return each token's word index (or None).

    Words are runs of letters and digits (inner apostrophes kept); each punctuation mark is a word
    of its own. Words past the model's token limit get score 0.
    """
    spans = [(m.group(), m.start(), m.end()) for m in WORD_PATTERN.finditer(prompt)]
    words = [WordScore(w, 0.0, s, e) for w, s, e in spans]
    token_word: list[int | None] = []
    for start, s in zip(token_char_starts(prompt, tokens), scores):
        w = None
        if start is not None:
            w = next((k for k, (_, a, b) in enumerate(spans) if a <= start < b), None)
            if w is None:  # a space-like character a tokenizer kept: count it with the next word
                w = next((k for k, (_, a, _) in enumerate(spans) if a > start), None)
        if w is not None:
            words[w].score += float(s)
        token_word.append(w)
    return words, token_word

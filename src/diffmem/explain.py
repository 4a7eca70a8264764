"""Token significance: which tokens of a prompt drive memorization (Wen et al., ICLR 2024, sec. 4).

The significance of token j is ``s_j = || d score / d e_j ||_2``: the L2 norm of the gradient of the
prompt's detection score (the text-conditional noise norm ``d = ||eps(x_t, e_prompt) - eps(x_t, e_empty)||_2``
averaged over a window of DDIM steps and over the generations; on flow-matching models the velocity
difference ``||v_c - v_u||_2``, as in detection) with respect to the j-th token's embedding in the
*conditional* prompt embedding. The unconditional branch is the empty prompt, as in
sampling, and no gradient flows through it.

The official notebook's ``get_text_cond_grad`` also differentiates only the conditional embedding
(its batch is ``[prompt, empty]``, so its ``chunk(2)`` names the halves the wrong way round, but the
empty embedding is a detached copy and the norm is symmetric). What differs: it averages each
token's gradient norm over the 2G rows of the embedding batch, of which one receives gradient (so
with one generation its significance is exactly half of ours, same ranking); its loss is the norm
over all G generations at once, not their mean; it averages per-step norms over the target steps;
and at every target step it advances the latents with ``eps_c + w (eps_u - eps_c)``, guidance
pointed away from the prompt, so over the notebook's 50 target steps every step after the first
runs on another trajectory than sampling's. ``official_token_significance`` reproduces it for
comparison; ``tests/test_explain.py`` checks both against an independent computation.

Scores and gradients come from the tracked pass of ``diffmem.sampling`` (its gradient-enabled
variant inside the window), under the seed contract: the prompt at position i starts from seed + i,
so an explanation's score equals the detection score of the same prompt, position and settings.
"""

from __future__ import annotations

import re
import unicodedata
from dataclasses import asdict, dataclass, field
from typing import Callable

import torch

from diffmem.metrics import text_noise_norm
from diffmem.sampling import SamplingConfig, Step, check_window, initial_noise, schedule, tracked_pass, window_scores

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


class SignificanceRecorder:
    """Recorder of the gradient-enabled pass: d per row and the gradient of its mean (over the rows)
    with respect to `leaf`, the (1, T, D) conditional embedding shared by the rows, summed over steps."""

    def __init__(self, leaf: torch.Tensor):
        self.leaf = leaf
        self.grad_sum = torch.zeros_like(leaf, dtype=torch.float32)
        self.d: list[torch.Tensor] = []

    def on_step(self, step: Step) -> None:
        d = text_noise_norm(step.pred_cond, step.pred_uncond)  # (G,): the noise, or a flow model's velocity
        self.d.append(d.detach().float().cpu())
        if d.requires_grad:  # a denoiser that ignores its embedding has no gradient
            (grad,) = torch.autograd.grad(d.mean(), self.leaf)
            self.grad_sum += grad.float()


class OfficialSignificanceRecorder:
    """The official ``get_text_cond_grad``'s quantity at each step, for comparison: the gradient of
    ``||eps_c - eps_u||_2`` taken over the whole batch of G generations at once, with respect to its
    2G-row ``[prompt, empty]`` embedding batch, where only the prompt row (shared by the G conditional
    rows) receives gradient; token norms averaged over the 2G rows: ``||grad_j|| / (2G)`` per step."""

    def __init__(self, leaf: torch.Tensor):
        self.leaf = leaf  # (1, T, D)
        self.per_step: list[torch.Tensor] = []  # (T,) each

    def on_step(self, step: Step) -> None:
        loss = (step.eps_cond - step.eps_uncond).norm()
        rows = 2 * len(step.eps_cond)
        if not loss.requires_grad:
            self.per_step.append(torch.zeros(self.leaf.shape[1]))
            return
        (grad,) = torch.autograd.grad(loss, self.leaf)
        self.per_step.append(grad[0].float().norm(dim=-1).cpu() / rows)


@dataclass
class ExplainConfig:
    steps: tuple[int, int] = (0, 1)  # window [start, end) of DDIM steps; the first step alone is fast and separates well
    generations: int = 4  # x_T draws per prompt (the paper's 4)
    seed: int = 0  # the prompt at position i starts from seed + i (detect's seed contract)
    num_inference_steps: int = 50  # the DDIM schedule the window lives in (the paper's 50)
    guidance_scale: float | None = None  # for sampling the steps before the window; None: the model's default
    batch_size: int = 64  # UNet samples per call when scoring many prompts

    def __post_init__(self):
        self.steps = check_window(self.steps, self.num_inference_steps)
        self.sampling()  # SamplingConfig checks the generations, schedule and batch size

    def sampling(self) -> SamplingConfig:
        """The tracked pass's settings: the window's end is the last tracked step."""
        return SamplingConfig(num_inference_steps=self.num_inference_steps, guidance_scale=self.guidance_scale,
                              num_generations=self.generations, seed=self.seed, track_steps=self.steps[1],
                              batch_size=self.batch_size)


def explain_config(config: ExplainConfig | None, overrides: dict) -> ExplainConfig:
    from dataclasses import replace

    config = config or ExplainConfig()
    return replace(config, **overrides) if overrides else config


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
    read: bool = True  # False: past the encoder's token limit (no token of it reaches the model; score 0)


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
        """The words the encoder read, most significant first (words past its limit left out)."""
        return sorted((w for w in self.words if w.read), key=lambda w: -w.score)

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

def _window_start(model, prompt: str, config: ExplainConfig, position: int):
    """The leaf conditional embedding (1, T, D) shared by the G generations, the G-row conditional and
    unconditional branches, the latents at the window's first step (sampled there without gradients
    from seed + `position`), the schedule, and the prompt's tokens."""
    G = config.generations
    # 1. Conditioning and tokens: one conditional embedding (a leaf) shared by all generations
    cond = model.encode_prompts([prompt])  # (1 row)
    tokens = model.tokens(prompt)
    if len(tokens) != cond.embeddings.shape[1]:
        raise ValueError(f"model {model.name}: tokens() gave {len(tokens)} tokens but the embedding has "
                         f"{cond.embeddings.shape[1]} positions; the adapter must pad tokens() to max_tokens")
    leaf = cond.embeddings.detach().clone().requires_grad_(True)  # (1, T, D)
    cond_g = cond.with_embeddings(leaf).expand(G)
    uncond_g = model.empty_conditioning().expand(G)
    # 2. x_T under the seed contract, sampled up to the window without gradients
    timesteps = schedule(model, config.num_inference_steps)
    x = initial_noise(model, G, config.seed + position)  # (G, C, H, W)
    x = tracked_pass(model, x, cond_g.detach(), uncond_g, timesteps[:config.steps[0]], config.sampling().guidance(model))
    return leaf, cond_g, uncond_g, x, timesteps, tokens


def token_significance(model, prompt: str, config: ExplainConfig | None = None, position: int = 0,
                       **overrides) -> Explanation:
    """Significance of each token of `prompt` for memorization, on any ``DiffusionModel``.

    `overrides` are ExplainConfig fields (``steps=(0, 5)``, ``generations=2``, ...). The prompt
    starts from seed + `position`. The steps before the window run in the tracked pass without
    gradients; the window runs in its gradient-enabled variant (each step's gradient, then the step).
    """
    config = explain_config(config, overrides)
    start, end = config.steps
    leaf, cond_g, uncond_g, x, timesteps, tokens = _window_start(model, prompt, config, position)
    guidance = config.sampling().guidance(model)

    # 3. The window: the gradient-enabled pass
    rec = SignificanceRecorder(leaf)
    tracked_pass(model, x, cond_g, uncond_g, timesteps[start:end], guidance, [rec], first_index=start, grad=True)
    significance = significance_from_grad(rec.grad_sum / (end - start)).cpu()  # (T,): gradient of the window mean
    d_table = torch.stack(rec.d, 1)  # (G, S)

    # 4. Records: tokens in prompt order, and the words a person typed
    words, token_word = word_scores(prompt, tokens, significance.tolist())
    token_scores = [TokenScore(tok.text, float(s), tok.special, tok.token_id, w)
                    for tok, s, w in zip(tokens, significance.tolist(), token_word)]
    from diffmem.provenance import provenance

    return Explanation(prompt, float(d_table.double().mean()), token_scores, words, d_table.tolist(), config,
                       truncated=model.count_tokens(prompt) > model.max_tokens,
                       provenance={**provenance(model), "position": position, "seed": config.seed + position})


def official_token_significance(model, prompt: str, config: ExplainConfig | None = None, position: int = 0,
                                **overrides) -> list[float]:
    """Per token (T,), what the official notebook's ``get_text_cond_grad`` returns for `prompt` with
    ``target_steps`` = the window, from the same x_T as ``token_significance``: the mean over the
    window's steps of ``OfficialSignificanceRecorder``'s values, the steps before the window sampled
    as usual and each window step advanced with the official reversed guidance
    ``eps_c + w (eps_u - eps_c)`` (a tracked pass at guidance scale ``1 - w``). For comparison with
    published explanations; ``token_significance`` is diffmem's.
    """
    config = explain_config(config, overrides)
    start, end = config.steps
    leaf, cond_g, uncond_g, x, timesteps, _ = _window_start(model, prompt, config, position)
    rec = OfficialSignificanceRecorder(leaf)
    reversed_guidance = 1.0 - config.sampling().guidance(model)
    tracked_pass(model, x, cond_g, uncond_g, timesteps[start:end], reversed_guidance, [rec], first_index=start,
                 grad=True)
    return torch.stack(rec.per_step).mean(0).tolist()


def prompt_scores(model, prompts: list[str], config: ExplainConfig | None = None, positions: list[int] | None = None,
                  **overrides) -> list[float]:
    """Detection scores (mean d over the window and generations) of many prompts, without gradients.

    Prompt j sits at ``positions[j]`` (default j) and starts from seed + that position; the same
    settings and position give the same score as ``token_significance`` and ``diffmem detect``.
    """
    config = explain_config(config, overrides)
    return window_scores(model, prompts, config.sampling(), config.steps, positions).tolist()


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
    of its own. Words past the model's token limit get score 0 and ``read=False``.
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
    reached = {w for w in token_word if w is not None}
    last = max(reached, default=-1)
    for k, word in enumerate(words):  # a word after the last one any token reached was cut off
        word.read = k <= last
    return words, token_word

"""Does token significance find the lab's trigger words? Ground truth makes explanation measurable.

A memorized lab caption "the {w1} {w2}: a {colour} {shape}" is copied because of its title (w1, w2).
For each step window this measures, on memorized captions and on ordinary ones:

- top-1: how often the most significant token (and word) is one of the title words;
- deletion / replacement: how often removing that word (or swapping it for another title word)
  brings a flagged prompt's detection score under the threshold calibrated at 1% FPR on novel prompts.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from diffmem.model import Conditioning
from diffmem.explain import (ExplainConfig, prompt_scores, significance_from_grad, text_noise_norm_grad,
                             token_significance)
from diffmem.metrics import threshold_at_fpr


@dataclass
class PromptAttribution:
    prompt: str
    title_words: list[str]
    score: float
    top_token: str
    top_word: str
    deleted: str  # the prompt without its top word
    deleted_score: float
    replaced: str  # the prompt with its top word swapped for an unrelated title word
    replaced_score: float


@dataclass
class SetSummary:
    name: str  # "memorized", "non-memorized" (training captions seen a few times), "novel" (held out)
    n: int
    flagged: float  # share with score >= threshold
    top1_token_is_title: float
    top1_word_is_title: float
    top1_word_is_title_flagged: float | None  # among flagged prompts only
    flagged_cleared_by_deletion: float | None  # among flagged prompts; None when none is flagged
    flagged_cleared_by_replacement: float | None
    flagged_after_deletion: float  # share of all prompts still flagged after deleting their top word
    top1_token_is_title_swapped: float | None = None  # the official code's swapped branch (first step only)


@dataclass
class WindowResult:
    steps: tuple[int, int]
    threshold: float
    num_calibration: int
    sets: list[SetSummary]
    prompts: dict[str, list[PromptAttribution]] = field(default_factory=dict)

    def summary(self) -> dict:
        return {"steps": list(self.steps), "threshold": self.threshold, "num_calibration": self.num_calibration,
                "sets": [asdict(s) for s in self.sets]}


def remove_word(prompt: str, start: int, end: int, replacement: str = "") -> str:
    """The prompt with characters [start, end) replaced, spaces tidied."""
    out = prompt[:start] + replacement + prompt[end:]
    return re.sub(r"\s+", " ", re.sub(r"\s+([:,.;!?])", r"\1", out)).strip()


def swapped_top_token(model, prompt: str, config: ExplainConfig) -> str:
    """The official ``get_text_cond_grad`` attribution at the first step: gradient w.r.t. the empty
    prompt's embedding placed in the conditional slot, its positions read as the prompt's tokens."""
    from diffmem.sampling import initial_noise

    model.scheduler.set_timesteps(config.num_inference_steps, device=model.device)
    t = model.scheduler.timesteps[0]
    x = model.scheduler.scale_model_input(initial_noise(model, config.generations, config.seed), t)
    denoise = lambda x, t, emb: model.predict_noise(x, t, Conditioning(emb))
    _, grad = text_noise_norm_grad(denoise, x, t, model.empty_conditioning().embeddings,
                                   model.encode_prompts([prompt]).embeddings)
    s = significance_from_grad(grad).tolist()
    j = max((j for j, tok in enumerate(model.tokens(prompt)) if not tok.special), key=s.__getitem__)
    return model.tokens(prompt)[j].text


def attribution_benchmark(model, windows: list[tuple[int, int]], generations: int = 4, seed: int = 0,
                          num_calibration: int = 250, num_ordinary: int = 100, fpr: float = 0.01,
                          progress: bool = True) -> list[WindowResult]:
    """Top-1 and deletion rates per step window on a lab model (see the module docstring).

    The threshold is calibrated on the first `num_calibration` novel prompts; the novel prompts after
    them (at most `num_ordinary`) and the first `num_ordinary` non-memorized training captions are
    the ordinary captions compared against.
    """
    from tqdm.auto import tqdm

    from diffmem.lab.build import lab_data_for

    data = lab_data_for(model)
    novel = data.prompt_set("novel")
    calibration = [p.caption for p in novel[:num_calibration]]
    if len(calibration) < 1 / fpr:
        print(f"note: {len(calibration)} calibration prompts; at {fpr:.0%} FPR the threshold is above all of them")
    sets = {"memorized": data.prompt_set("memorized"),
            "non-memorized": data.prompt_set("non-memorized")[:num_ordinary],
            "novel": novel[num_calibration:num_calibration + num_ordinary]}
    memorized_words = {w for p in data.prompt_set("memorized") for w in p.title_words}
    spare = [w for p in novel for w in p.title_words if w not in memorized_words]  # replacement words
    results = []
    for steps in windows:
        config = ExplainConfig(steps, generations, seed)
        score = lambda prompts: prompt_scores(model, prompts, config)
        threshold = threshold_at_fpr(score(calibration), fpr)
        result = WindowResult(tuple(steps), threshold, len(calibration), [])
        for name, pairs in sets.items():
            if not pairs:
                continue
            rows = []
            for k, pair in enumerate(tqdm(pairs, desc=f"steps {steps} {name}", disable=not progress)):
                ex = token_significance(model, pair.caption, config)  # position 0: every caption from one x_T
                top_tok, top_word = ex.ranked_tokens()[0], ex.ranked_words()[0]
                swap_word = spare[k % len(spare)]
                deleted = remove_word(pair.caption, top_word.start, top_word.end)
                replaced = remove_word(pair.caption, top_word.start, top_word.end, swap_word)
                d_del, d_rep = prompt_scores(model, [deleted, replaced], config, positions=[0, 0])  # the same x_T
                rows.append(PromptAttribution(pair.caption, list(pair.title_words), ex.score, top_tok.token,
                                              top_word.word, deleted, d_del, replaced, d_rep))
            flagged = [r for r in rows if r.score >= threshold]
            share = lambda xs, f: sum(map(f, xs)) / len(xs) if xs else None
            summary = SetSummary(
                name, len(rows), share(rows, lambda r: r.score >= threshold),
                share(rows, lambda r: r.top_token in r.title_words), share(rows, lambda r: r.top_word in r.title_words),
                share(flagged, lambda r: r.top_word in r.title_words),
                share(flagged, lambda r: r.deleted_score < threshold), share(flagged, lambda r: r.replaced_score < threshold),
                share(rows, lambda r: r.deleted_score >= threshold))
            if tuple(steps) == (0, 1):
                summary.top1_token_is_title_swapped = share(
                    pairs, lambda p: swapped_top_token(model, p.caption, config) in p.title_words)
            result.sets.append(summary)
            result.prompts[name] = rows
        results.append(result)
    return results


def format_results(results: list[WindowResult]) -> str:
    head = (f"{'steps':>8} {'threshold':>9} {'set':<14} {'n':>4} {'flagged':>7} {'top1 tok':>8} {'top1 word':>9} "
            f"{'(flagged)':>9} {'del clears':>10} {'repl clears':>11} {'flagged after del':>17} {'top1 swapped':>12}")
    lines = [head]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    for r in results:
        for s in r.sets:
            lines.append(f"{f'[{r.steps[0]},{r.steps[1]})':>8} {r.threshold:>9.4f} {s.name:<14} {s.n:>4} "
                         f"{pct(s.flagged):>7} {pct(s.top1_token_is_title):>8} {pct(s.top1_word_is_title):>9} "
                         f"{pct(s.top1_word_is_title_flagged):>9} {pct(s.flagged_cleared_by_deletion):>10} {pct(s.flagged_cleared_by_replacement):>11} "
                         f"{pct(s.flagged_after_deletion):>17} {pct(s.top1_token_is_title_swapped):>12}")
    return "\n".join(lines)

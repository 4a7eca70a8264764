"""Does token significance find the lab's trigger words? Ground truth makes explanation measurable.

A memorized lab caption "the {w1} {w2}: a {colour} {shape}" is copied because of its title (w1, w2).
For each step window this measures, on memorized captions and on ordinary ones:

- top-1: how often the most significant token (and word) is one of the title words;
- deletion / replacement: how often removing that word (or swapping it for another title word)
  brings a flagged prompt's detection score under the threshold calibrated at 1% FPR on novel prompts.

``official_comparison`` measures, on memorized captions, how often the official notebook's
computation over its 50 target steps (``diffmem.explain.official_token_significance``: reversed
guidance inside the window) ranks another word first than ``token_significance`` over the same steps.
"""

from __future__ import annotations

import re
from dataclasses import asdict, dataclass, field

from diffmem.explain import (ExplainConfig, official_token_significance, prompt_scores, token_significance,
                             word_scores)
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


@dataclass
class OfficialComparison:
    steps: tuple[int, int]  # the window both computations use (the official notebook: all 50 steps)
    n: int  # memorized captions
    top_word_differs: float  # share whose official top word is not ours
    top1_word_is_title: float  # ours: the top word is a title (trigger) word
    official_top1_word_is_title: float
    prompts: list[dict] = field(default_factory=list)  # caption, title words, our and the official top word


def official_comparison(model, generations: int = 4, seed: int = 0, steps: tuple[int, int] = (0, 50),
                        progress: bool = True) -> OfficialComparison:
    """Our and the official notebook's top word on every memorized caption of a lab model, both over
    `steps` of a 50-step schedule from the same x_T (position 0, as the benchmark's explanations)."""
    from tqdm.auto import tqdm

    from diffmem.lab.build import lab_data_for

    config = ExplainConfig(steps, generations, seed)
    rows = []
    for pair in tqdm(lab_data_for(model).prompt_set("memorized"), desc=f"official vs ours {steps}", disable=not progress):
        ours = token_significance(model, pair.caption, config).ranked_words()[0].word
        official_scores = official_token_significance(model, pair.caption, config)
        words, _ = word_scores(pair.caption, model.tokens(pair.caption), official_scores)
        official = max(words, key=lambda w: w.score).word
        rows.append({"prompt": pair.caption, "title_words": list(pair.title_words), "top_word": ours,
                     "official_top_word": official})
    share = lambda f: sum(map(f, rows)) / len(rows)
    return OfficialComparison(tuple(steps), len(rows), share(lambda r: r["top_word"] != r["official_top_word"]),
                              share(lambda r: r["top_word"] in r["title_words"]),
                              share(lambda r: r["official_top_word"] in r["title_words"]), rows)


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
            result.sets.append(summary)
            result.prompts[name] = rows
        results.append(result)
    return results


def format_results(results: list[WindowResult]) -> str:
    head = (f"{'steps':>8} {'threshold':>9} {'set':<14} {'n':>4} {'flagged':>7} {'top1 tok':>8} {'top1 word':>9} "
            f"{'(flagged)':>9} {'del clears':>10} {'repl clears':>11} {'flagged after del':>17}")
    lines = [head]
    pct = lambda v: "-" if v is None else f"{100 * v:.0f}%"
    for r in results:
        for s in r.sets:
            lines.append(f"{f'[{r.steps[0]},{r.steps[1]})':>8} {r.threshold:>9.4f} {s.name:<14} {s.n:>4} "
                         f"{pct(s.flagged):>7} {pct(s.top1_token_is_title):>8} {pct(s.top1_word_is_title):>9} "
                         f"{pct(s.top1_word_is_title_flagged):>9} {pct(s.flagged_cleared_by_deletion):>10} {pct(s.flagged_cleared_by_replacement):>11} "
                         f"{pct(s.flagged_after_deletion):>17}")
    return "\n".join(lines)

"""The audit's HTML report: one self-contained page (images beside it under images/); no computation.

The page's skeleton, style sheet and script are templates/audit.html, audit.css and audit.js, inlined
into index.html so that the report is one file.
"""

from __future__ import annotations

import json
from html import escape
from importlib import resources
from pathlib import Path

import numpy as np

from diffmem.targets import describe_target, target_as_score

COLUMNS = ("#", "prompt", "score", "flagged", "top word", "mitigated score", "copies before", "copies after")


FALSE_POSITIVE_SETS = ("novel", "non-memorized", "out-of-style")  # lab sets whose flagged prompts are false positives


def _num(x) -> str:
    """The report's one format for scores, thresholds and distances: three decimals."""
    return "" if x is None else f"{x:.3f}"


def nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    """Round tick values (steps of 1, 2 or 5 times a power of ten) covering [lo, hi]."""
    span = hi - lo
    if not span > 0:
        return [lo]
    raw = span / max(target - 1, 1)
    mag = 10 ** np.floor(np.log10(raw))
    step = next(m * mag for m in (1, 2, 5, 10) if span / (m * mag) <= target + 1)  # at most target + 2 ticks
    first = np.ceil(lo / step - 1e-9) * step
    return [round(float(v), 10) for v in np.arange(first, hi + step * 1e-9, step)]


def _template(name: str) -> str:
    return resources.files("diffmem.reports").joinpath(f"templates/{name}").read_text(encoding="utf-8")


def histogram_svg(scores, reference, threshold: float, width: int = 720, height: int = 220, bins: int = 40) -> str:
    """Overlaid histograms (audited prompts, reference prompts) with the threshold as a red line, as inline SVG."""
    scores, reference = np.asarray(scores, float), np.asarray(reference, float)
    allv = np.concatenate([scores, reference, [threshold]])
    lo, hi = float(allv.min()), float(allv.max())
    hi = hi if hi > lo else lo + 1.0
    edges = np.linspace(lo, hi, bins + 1)
    pad_l, pad_b, pad_t = 40, 30, 10
    plot_w, plot_h = width - pad_l - 30, height - pad_b - pad_t
    series = [("audited prompts", scores, "#4c72b0"), ("reference prompts", reference, "#999999")]
    counts = [np.histogram(s, edges)[0] / max(len(s), 1) for _, s, _ in series]  # fractions, so sets of any size compare
    top = max(float(max(c.max(initial=0) for c in counts)), 1e-9)
    x = lambda v: pad_l + (v - lo) / (hi - lo) * plot_w
    y = lambda f: pad_t + plot_h * (1 - f / top)
    parts = [f'<svg xmlns="http://www.w3.org/2000/svg" width="{width}" height="{height}" role="img" '
             f'aria-label="score histogram">',
             f'<line x1="{pad_l}" y1="{pad_t + plot_h}" x2="{pad_l + plot_w}" y2="{pad_t + plot_h}" stroke="#333"/>']
    for (name, s, colour), c in zip(series, counts):
        if not len(s):
            continue
        for k, f in enumerate(c):
            if f > 0:
                parts.append(f'<rect x="{x(edges[k]):.1f}" y="{y(f):.1f}" width="{max(x(edges[k + 1]) - x(edges[k]) - 1, 1):.1f}" '
                             f'height="{pad_t + plot_h - y(f):.1f}" fill="{colour}" fill-opacity="0.55"/>')
    tx = x(threshold)
    parts.append(f'<line x1="{tx:.1f}" y1="{pad_t}" x2="{tx:.1f}" y2="{pad_t + plot_h}" stroke="#d62728" stroke-width="2" '
                 f'stroke-dasharray="5,3"/>')
    parts.append(f'<text x="{tx + 4:.1f}" y="{pad_t + 12}" font-size="11" fill="#d62728">threshold {_num(threshold)}</text>')
    for v in nice_ticks(lo, hi):
        parts.append(f'<line x1="{x(v):.1f}" y1="{pad_t + plot_h}" x2="{x(v):.1f}" y2="{pad_t + plot_h + 4}" stroke="#333"/>'
                     f'<text x="{x(v):.1f}" y="{height - 12}" font-size="10" text-anchor="middle" class="tick">{v:g}</text>')
    parts.append(f'<text x="{pad_l + plot_w / 2:.1f}" y="{height - 1}" font-size="10" text-anchor="middle">score</text>')
    legend_y = pad_t + 12
    for k, (name, s, colour) in enumerate(series):
        if len(s):
            lx = pad_l + plot_w - 170
            parts.append(f'<rect x="{lx}" y="{legend_y + 16 * k - 9}" width="10" height="10" fill="{colour}" fill-opacity="0.55"/>'
                         f'<text x="{lx + 14}" y="{legend_y + 16 * k}" font-size="11">{name} ({len(s)})</text>')
    parts.append('</svg>')
    return "\n".join(parts)


def _cell(value, text: str | None = None, cls: str = "") -> str:
    v = "" if value is None else value
    shown = escape(str(v) if text is None else text)
    c = f' class="{cls}"' if cls else ""
    return f'<td{c} data-v="{escape(str(v), quote=True)}">{shown}</td>'


_fmt = _num


def table_rows(rows: list[dict], known_sets: bool = False) -> str:
    out = []
    for r in sorted(rows, key=lambda r: -r["score"]):
        top = (r.get("top_words") or [""])[0]
        link = f'<a href="#p{r["index"]}">{escape(r["prompt"])}</a>' if r["flagged"] else escape(r["prompt"])
        cells = [_cell(r["index"], cls="num"),
                 f'<td data-v="{escape(r["prompt"], quote=True)}">{link}</td>',
                 _cell(r["score"], _fmt(r["score"]), "num"),
                 _cell(int(r["flagged"]), ("yes, false positive" if _false_positive(r) else "yes") if r["flagged"] else "no"),
                 _cell(top),
                 _cell(r.get("mitigated_score"), _fmt(r.get("mitigated_score")), "num"),
                 _cell(r.get("generated_copies"), cls="num"),
                 _cell(r.get("mitigated_copies"), cls="num")]
        if known_sets:  # ground truth travels with the prompt (lab prompt sets)
            cells.append(_cell((r.get("source") or {}).get("set")))
        out.append(f'<tr{" class=flagged" if r["flagged"] else ""}>' + "".join(cells) + "</tr>")
    return "\n".join(out)


def _false_positive(row: dict) -> bool:
    """A flagged prompt whose known set (lab prompt sets) says it is not memorized."""
    return bool(row.get("flagged")) and (row.get("source") or {}).get("set") in FALSE_POSITIVE_SETS


def token_bars(explanation: dict, triggers: set[str]) -> str:
    """Significance of each non-special token in prompt order, as HTML bars; the top token in red."""
    toks = [t for t in explanation["tokens"] if not t["special"]]
    if not toks:
        return ""
    peak = max(t["score"] for t in toks) or 1.0
    top = max(range(len(toks)), key=lambda i: toks[i]["score"])
    words = explanation["words"]
    lines = []
    for i, t in enumerate(toks):
        word = words[t["word"]]["word"] if t.get("word") is not None and t["word"] < len(words) else ""
        label = escape(t["token"]) + (f' <span class="muted">({escape(word)})</span>' if word and word != t["token"] else "")
        if word.lower() in triggers:
            label = f'<span class="trigger">{label}</span>'
        lines.append(f'<tr><td>{label}</td><td class="num">{t["score"]:.3f}</td><td style="width:320px">'
                     f'<div class="bar{" top" if i == top else ""}" style="width:{100 * t["score"] / peak:.1f}%"></div></td></tr>')
    return '<table class="bars">' + "".join(lines) + "</table>"


def _figures(images: list[str], captions: list[str], copies: list[bool] | None = None) -> str:
    copies = copies or [False] * len(images)
    return '<div class="imgs">' + "".join(
        f'<figure{" class=copy" if c else ""}><img src="{escape(src, quote=True)}" alt="{escape(cap, quote=True)}">'
        f'<figcaption>{escape(cap)}</figcaption></figure>' for src, cap, c in zip(images, captions, copies)) + "</div>"


def flagged_card(row: dict, explanation: dict | None, mitigation: dict | None, copies: dict | None,
                 num_generations: int = 1) -> str:
    i = row["index"]
    triggers = {w.lower() for w in (row.get("source") or {}).get("trigger_words", [])}
    fp = _false_positive(row)
    parts = [f'<div class="card{" fp" if fp else ""}" id="p{i}"><h3>#{i}: {escape(row["prompt"])}'
             + (f' <span class="fp-badge">false positive: a {escape(row["source"]["set"])} caption, not memorized</span>'
                if fp else "") + '</h3>',
             f'<p>score <b>{_num(row["score"])}</b>'
             + (f', <span title="the mean d over every DDIM step of the generations below, not only the detection '
                f'window: how strongly the prompt pulls the whole sampling">over all steps {_num(row["score_all_steps"])}</span>'
                if "score_all_steps" in row else "")
             + (f'; top words: <b>{escape(", ".join(row["top_words"]))}</b>' if row.get("top_words") else "")
             + (f' <span class="muted">(known trigger words: {escape(", ".join(sorted(triggers)))})</span>' if triggers else "")
             + "</p>"]
    if explanation is not None:
        parts.append('<div class="label">Token significance</div>' + token_bars(explanation, triggers))
    gen = copies.get("generated") if copies else None
    if copies and copies.get("own_training_images"):
        own = copies["own_training_images"]
        parts.append('<div class="label">This caption\'s own training image' + ("s" if len(own) > 1 else "") + "</div>"
                     + _figures(own, [f"training image {Path(p).stem.lstrip('0') or '0'}" for p in own]))
    if gen:
        parts.append('<div class="label">Generations (red frame: copies a training image)</div>'
                     + _figures([g["image"] for g in gen], [f"seed {row['seed']}, #{k}" for k in range(len(gen))],
                                [g["copy"] for g in gen]))
        parts.append('<div class="label">Nearest training image of each generation (RMSE; lower is closer; copy '
                     f'below {_num(copies["copy_threshold_rmse"])})</div>'
                     + _figures([g["nearest"] for g in gen], [f"RMSE {g['rmse']:.3f}" for g in gen]))
    elif row.get("images"):
        parts.append('<div class="label">Generations</div>'
                     + _figures(row["images"], [f"seed {row['seed']}, #{k}" for k in range(len(row["images"]))]))
    if mitigation is not None:
        unit = mitigation.get("target_unit", "batch")
        goal = target_as_score(mitigation["target_loss"], unit, num_generations)
        short = (mitigation["final_loss"] > mitigation["target_loss"] * (1 + 1e-6) if "final_loss" in mitigation
                 else mitigation["final_d"] > goal * (1 + 1e-6))
        aligned = ""
        if copies and copies.get("mitigated_aligned") is not None:
            n = len(copies.get("mitigated") or [])
            aligned = (f'; alignment: {copies["generated_aligned"]} of {n} generations show the prompt\'s colour and '
                       f'shape before, {copies["mitigated_aligned"]} after')
        parts.append(f'<div class="label">After mitigation: score {_num(mitigation["initial_d"])} &rarr; '
                     f'{_num(mitigation["mitigated_score"])} ({mitigation["iterations"]} AdamW steps to the target '
                     f'd &le; {_num(goal)}, in the score\'s unit'
                     + (', <span class="short">not reached</span>' if short else "") + f'){aligned}</div>')
        mit = copies.get("mitigated") if copies else None
        if mit:
            parts.append(_figures([g["image"] for g in mit], [f"RMSE {g['rmse']:.3f}" + (" copy" if g["copy"] else "")
                                                              for g in mit], [g["copy"] for g in mit]))
        else:
            parts.append(_figures(mitigation["images"], [f"#{k}" for k in range(len(mitigation["images"]))]))
    parts.append("</div>")
    return "\n".join(parts)


def ground_truth_section(truth: dict | None) -> str:
    """Flag rate per known prompt set (lab prompt sets), and the ROC of memorized against novel prompts."""
    if not truth:
        return ""
    lines = "".join(f'<tr><td>{escape(s)}</td><td class="num">{c["prompts"]}</td><td class="num">{c["flagged"]}</td>'
                    f'<td class="num">{100 * c["flagged"] / max(c["prompts"], 1):.1f}%</td></tr>'
                    for s, c in truth["sets"].items())
    roc = truth.get("roc_memorized_vs_novel")
    roc_line = (f'<p>Memorized (and template) against novel prompts: AUC {roc["auc"]:.3f}, TPR {100 * roc["tpr_at_1fpr"]:.1f}% '
                f'at FPR &lt; 1% ({roc["n_memorized"]} memorized, {roc["n_non_memorized"]} novel).</p>' if roc else "")
    return ('<h2>Ground truth</h2><p>The prompts carry their known set (lab prompt sets): <b>memorized</b> captions '
            'were duplicated in training (one image, many times); <b>template</b> captions were each trained on a few '
            'variants of one layout, the "template" memorization of Webster (2023), where the model copies the layout '
            'rather than one image; <b>novel</b> captions have titles never seen in training, and <b>non-memorized</b> '
            'ones were trained on once. Flagged memorized and template prompts are detections; flagged novel and '
            'non-memorized prompts are false positives, marked as such in the table and on their cards.</p>'
            f'<table><tr><th>set</th><th>prompts</th><th>flagged</th><th>rate</th></tr>{lines}</table>{roc_line}')


def _flatten(value, prefix: str = "") -> list[tuple[str, str]]:
    """Nested provenance as (dotted name, value) pairs; lists of plain values joined by commas."""
    if isinstance(value, dict):
        out = []
        for k, v in value.items():
            out += _flatten(v, f"{prefix}.{k}" if prefix else str(k))
        return out
    if isinstance(value, list) and all(not isinstance(v, (dict, list)) for v in value):
        return [(prefix, ", ".join(map(str, value)))]
    if isinstance(value, list):
        return [(prefix, json.dumps(value))]
    return [(prefix, "" if value is None else str(value))]


def _provenance_rows(info: dict) -> str:
    """A readable table (one row per setting, dotted names), the raw JSON behind a toggle."""
    rows = "".join(f'<tr><th>{escape(k)}</th><td>{escape(v)}</td></tr>' for k, v in _flatten(info)
                   if k != "stages" and not k.startswith("stages."))
    stages = info.get("stages") or {}
    if stages:
        rows += ('<tr><th>stages (seconds)</th><td>' + escape(", ".join(
            f"{k} {v.get('seconds', '?')}" for k, v in stages.items())) + "</td></tr>")
    raw = escape(json.dumps(info, indent=1))
    return (f'<table class="provenance">{rows}</table>'
            f'<details><summary>raw JSON</summary><pre class="raw">{raw}</pre></details>')


def write_audit_report(out: Path, rows: list[dict], threshold: dict, reference_scores: list[float], info: dict,
                       explained: dict, mitigated: dict, copies: dict, truth: dict | None = None,
                       shortfalls: list[str] | None = None) -> Path:
    """Write out/index.html from the audit's records; `shortfalls`: one line per case where mitigation fell short."""
    out = Path(out)
    flagged = sorted((r for r in rows if r["flagged"]), key=lambda r: -r["score"])
    config = info.get("config", {})
    steps = config.get("detect_steps", 1)
    window = "the first DDIM step" if steps == 1 else f"the first {steps} DDIM steps"
    summary = (f"<b>{len(flagged)}</b> of {len(rows)} prompts are flagged as memorized"
               + (f" ({sum(map(_false_positive, flagged))} of them false positives by their known set)"
                  if truth is not None else "") + ". ")
    if flagged:
        mit = [r for r in flagged if "mitigated_score" in r]
        cleared = sum(not r["mitigated_flagged"] for r in mit)
        summary += f"Embedding optimization brings {cleared} of {len(mit)} under the threshold. "
        if any("generated_copies" in r for r in flagged):
            before = sum(r.get("generated_copies", 0) for r in flagged)
            after = sum(r.get("mitigated_copies", 0) for r in flagged)
            n = sum(len(r.get("images", [])) for r in flagged)
            summary += f"Generations copying a training image: {before} of {n} before, {after} after mitigation. "
        if any("mitigated_aligned" in r for r in flagged):
            before = sum(r.get("generated_aligned", 0) for r in flagged)
            after = sum(r.get("mitigated_aligned", 0) for r in flagged)
            n = sum(len(r.get("images", [])) for r in flagged if "mitigated_aligned" in r)
            summary += (f"Alignment (the lab's check that an image shows the prompt's colour and shape): {before} of "
                        f"{n} generations before, {after} after mitigation.")
    mitigation = info.get("mitigation") or {}
    G = config["sampling"]["num_generations"]
    if flagged and info.get("target_loss") is not None:
        summary += (f"<br><span class=\"muted\">Mitigation target: first-step "
                    f"{escape(describe_target(info['target_loss'], mitigation.get('target_unit', 'batch'), G))}; "
                    f"at most {mitigation.get('max_iters')} AdamW steps, lr {mitigation.get('lr')}.</span>")
    if shortfalls:
        summary += ('<div class="shortfalls"><b>Mitigation fell short</b><ul>'
                    + "".join(f"<li>{escape(t)}</li>" for t in shortfalls) + "</ul></div>")
    known_sets = truth is not None
    header = "".join(f'<th class="sortable">{escape(c)}</th>' for c in COLUMNS + (("known set",) if known_sets else ()))
    cards = "\n".join(flagged_card(r, explained.get(r["index"]), mitigated.get(r["index"]), copies.get(r["index"]), G)
                      for r in flagged) or "<p>No prompt is flagged.</p>"
    html = _template("audit.html").format(
        css=_template("audit.css"), js=_template("audit.js"),
        title=escape(str(info.get("model", ""))), model=escape(str(info.get("model", ""))), summary=summary,
        ground_truth=ground_truth_section(truth), window=window, generations=config["sampling"]["num_generations"],
        threshold=_num(threshold["value"]), threshold_how=escape(threshold["description"])
        + (f'<br><span class="short">{escape(threshold["warning"])}</span>' if threshold.get("warning") else ""),
        histogram=histogram_svg([r["score"] for r in rows], reference_scores, threshold["value"]),
        header=header, rows=table_rows(rows, known_sets), cards=cards,
        copy_note=", and the nearest training image of each generation" if copies else "",
        provenance=_provenance_rows(info))
    path = out / "index.html"
    tmp = path.with_name("index.html.tmp")
    tmp.write_text(html, encoding="utf-8")
    tmp.replace(path)
    return path

"""The lab's prompt sets with ground truth, as rows that ``diffmem detect`` reads, and the split of
them that a bare ``diffmem audit`` audits and calibrates on."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.lab.data import LabData, LabPair
from diffmem.prompts import PromptRecord, PromptSet

REFERENCE_FRACTION = 0.6  # the first 60% of the novel captions are the lab's reference (ordinary) prompts


def default_lab_data(folder: Path | None = None) -> LabData:
    """The data of a lab model folder (default: the shipped lab model's)."""
    from diffmem.adapters.lab import load_lab_meta
    from diffmem.lab import WEIGHTS_DIR
    from diffmem.lab.data import lab_data_from_config

    return lab_data_from_config(load_lab_meta(folder or WEIGHTS_DIR)["data"])


def reference_pairs(data: LabData) -> list[LabPair]:
    """The lab's reference prompts, known to be ordinary: the first 60% of the novel captions (titles
    never seen in training). ``audit`` and ``serve`` calibrate the threshold on them, and
    embedding-opt's default target is their median first-step d; the audit audits the rest."""
    novel = data.prompt_set("novel")
    return novel[:int(REFERENCE_FRACTION * len(novel))]


def own_reference_prompts(model) -> list[str] | None:
    """The reference prompts a model brings itself (lab models), else None."""
    data = model.training_data()
    return None if data is None else [p.caption for p in reference_pairs(data)]


def prompt_row(pair: LabPair) -> dict:
    row = {"caption": pair.caption, "set": pair.kind, "colour": pair.spec.colour, "shape": pair.spec.shape}
    if pair.kind in ("memorized", "template"):
        row["trigger_words"] = list(pair.title_words)
    return row


def prompt_rows(data: LabData, name: str, limit: int | None = None) -> list[dict]:
    return [prompt_row(p) for p in data.prompt_set(name)[:limit]]


def write_prompt_set(data: LabData, name: str, out: str | Path, limit: int | None = None) -> int:
    rows = prompt_rows(data, name, limit)
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    return len(rows)


def default_detection_prompts(start: int = 0, end: int | None = None, folder: Path | None = None,
                              num_novel: int = 100) -> list[PromptRecord]:
    """The memorized prompts of the lab model in `folder` (default: the shipped one) followed by
    `num_novel` novel ones (what bare `diffmem detect` runs)."""
    data = default_lab_data(folder)
    rows = prompt_rows(data, "memorized") + prompt_rows(data, "novel", num_novel)
    records = [PromptRecord(i, r["caption"], {k: v for k, v in r.items() if k != "caption"}) for i, r in enumerate(rows)]
    return records[start:end]


def lab_audit_prompts(data: LabData, num_non_memorized: int = 50) -> tuple[PromptSet, PromptSet]:
    """(audited, reference) for a lab model: the reference is the lab's reference prompts (the first
    60% of the novel captions, never seen in training); memorized + the other novel + some
    non-memorized captions are audited."""
    novel = data.prompt_set("novel")
    ref = reference_pairs(data)
    split = len(ref)
    pairs = data.prompt_set("memorized") + novel[split:] + data.prompt_set("non-memorized")[:num_non_memorized]
    audited = [PromptRecord(i, p.caption, {k: v for k, v in prompt_row(p).items() if k != "caption"})
               for i, p in enumerate(pairs)]
    reference = [PromptRecord(i, p.caption, {"set": p.kind}) for i, p in enumerate(ref)]
    return (PromptSet(audited, f"lab: memorized + novel[{split}:] + non-memorized[:{num_non_memorized}]"),
            PromptSet(reference, f"lab: novel[:{split}] (titles never seen in training)"))

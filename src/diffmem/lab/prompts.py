"""The lab's prompt sets with ground truth, as rows that ``diffmem detect`` reads."""

from __future__ import annotations

import json
from pathlib import Path

from diffmem.lab.data import LabData, LabPair
from diffmem.prompts import PromptRecord

REFERENCE_FRACTION = 0.6  # the first 60% of the novel captions are the lab's reference (ordinary) prompts


def default_lab_data() -> LabData:
    """The data of the shipped lab model."""
    from diffmem.adapters.lab import load_lab_meta
    from diffmem.lab.build import WEIGHTS_DIR
    from diffmem.lab.data import lab_data_from_config

    return lab_data_from_config(load_lab_meta(WEIGHTS_DIR)["data"])


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


def default_detection_prompts(start: int = 0, end: int | None = None, data: LabData | None = None,
                              num_novel: int = 100) -> list[PromptRecord]:
    """The lab's memorized prompts followed by `num_novel` novel ones (what bare `diffmem detect` runs)."""
    data = data or default_lab_data()
    rows = prompt_rows(data, "memorized") + prompt_rows(data, "novel", num_novel)
    records = [PromptRecord(i, r["caption"], {k: v for k, v in r.items() if k != "caption"}) for i, r in enumerate(rows)]
    return records[start:end]

"""Evaluation sets: prompts with their training images, from the lab, a folder of pairs or a ground-truth .jsonl.

``load_eval_set`` reads what ``--dataset`` names; on a lab model, a set whose captions are all the
lab's carries the lab data so that the judge (``diffmem.judge``) applies the lab's copy rule.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffmem.files import IMAGE_SUFFIXES, image_caption_pairs, json_lines, open_rgb_image


@dataclass
class EvalPrompt:
    caption: str
    training: torch.Tensor  # (M, 3, H, W) in [0, 1]: the prompt's training image(s); M may be 0
    colour: str | None = None  # lab: the described colour and shape (alignment)
    shape: str | None = None
    key: str = ""  # where it came from (file name, ground-truth index)


@dataclass
class EvalSet:
    name: str
    prompts: list[EvalPrompt]
    lab_data: object | None = None  # diffmem.lab.data.LabData when the lab's judge applies


def _load_image(path: Path, size: int) -> torch.Tensor:
    from diffmem.similarity import resize_center_crop

    img = np.asarray(open_rgb_image(path), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    return resize_center_crop(x, size, size)[0]  # as training sees it: shorter side to `size`, center crop


def lab_eval_set(data, name: str = "memorized", limit: int | None = None) -> EvalSet:
    """A lab prompt set with each caption's training images (none for novel / out-of-style captions)."""
    from diffmem.lab.data import render_all

    prompts = []
    for pair in data.prompt_set(name)[:limit]:
        specs = (pair.variants or [pair.spec]) if name in ("memorized", "non-memorized") else []
        prompts.append(EvalPrompt(pair.caption, torch.from_numpy(render_all(specs)), pair.spec.colour, pair.spec.shape,
                                  key=pair.kind))
    return EvalSet(f"lab:{name}", prompts, lab_data=data)


def folder_eval_set(folder: Path, size: int, limit: int | None = None) -> EvalSet:
    """The seed's layout (image + caption .txt pairs); a caption's training images are all images with it."""
    groups: dict[str, list[Path]] = {}
    for p, caption in image_caption_pairs(folder):
        groups.setdefault(caption, []).append(p)
    prompts = [EvalPrompt(c, torch.stack([_load_image(p, size) for p in ps]), key=ps[0].name)
               for c, ps in list(groups.items())[:limit]]
    return EvalSet(str(folder), prompts)


def ground_truth_eval_set(jsonl: Path, size: int, limit: int | None = None) -> EvalSet:
    """A .jsonl of ``caption`` and ``index`` with training images in ``gt_images/<index>/*.png`` beside it."""
    prompts = []
    for lineno, row in json_lines(jsonl):
        if "caption" not in row or "index" not in row:
            raise ValueError(f"{jsonl}:{lineno}: need keys 'caption' and 'index', found {', '.join(row)}")
        folder = jsonl.parent / "gt_images" / str(row["index"])
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{jsonl}:{lineno}: no ground-truth images in {folder}")
        prompts.append(EvalPrompt(row["caption"], torch.stack([_load_image(p, size) for p in files]),
                                  key=str(row["index"])))
        if limit and len(prompts) >= limit:
            break
    return EvalSet(str(jsonl), prompts)


def with_lab_judge(eval_set: EvalSet, data) -> EvalSet:
    """`eval_set` judged by the lab's copy rule and content check when every caption is one of the lab
    data's (e.g. a ``diffmem lab data`` export given as --dataset); else unchanged."""
    pairs = {p.caption: p for name in ("memorized", "non-memorized", "novel", "out-of-style")
             for p in data.prompt_set(name)}
    if not eval_set.prompts or any(p.caption not in pairs for p in eval_set.prompts):
        return eval_set
    prompts = [replace(p, colour=pairs[p.caption].spec.colour, shape=pairs[p.caption].spec.shape)
               for p in eval_set.prompts]
    return EvalSet(eval_set.name, prompts, lab_data=data)


def load_eval_set(model, dataset: str | None, limit: int | None = None) -> EvalSet:
    """--dataset: None or 'lab:<set>' (a lab model's own prompts), a pair folder, or a ground-truth .jsonl.
    On a lab model, a set whose captions are all the lab's is judged by the lab's copy rule."""
    data = model.training_data()
    if dataset is None or dataset.startswith("lab:"):
        if data is None:
            raise ValueError(f"--dataset is required: model {model.name} is not a lab model with its own memorized set")
        return lab_eval_set(data, dataset[4:] if dataset else "memorized", limit)
    path = Path(dataset)
    loaded = None
    if path.is_dir():
        loaded = folder_eval_set(path, model.image_size, limit)
    elif path.suffix == ".jsonl" and path.is_file():
        loaded = ground_truth_eval_set(path, model.image_size, limit)
    if loaded is not None:
        return loaded if data is None else with_lab_judge(loaded, data)
    raise FileNotFoundError(f"--dataset {dataset}: expected a folder of image + .txt pairs, a ground-truth .jsonl "
                            "(caption, index; gt_images/<index>/*.png beside it), or lab:<set>")

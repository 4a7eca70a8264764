"""Reading and writing diffmem's outputs: JSON Lines rows, JSON files and PNG images.

Rows are appended with one ``write`` and an fsync, so a killed run leaves whole lines only; whole
files are written to a temporary name and renamed.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Complete rows of a JSON Lines file; with `repair`, cut off a trailing partial line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: broken result line ({e.msg}); the file was not written by diffmem") from None
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows with one write() call, then fsync: a crash leaves whole lines only."""
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write a whole JSON Lines file (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    """Write a JSON file (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def jsonable(x):
    """`x` with everything JSON cannot hold (tuples, paths, dtypes) turned into lists and strings."""
    return json.loads(json.dumps(x, default=str))


def image_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    arr = image.permute(1, 2, 0).float().numpy() if isinstance(image, torch.Tensor) else np.transpose(image, (1, 2, 0))
    return (np.clip(arr, 0, 1) * 255).round().astype("uint8")


def save_png(image: torch.Tensor | np.ndarray, path: Path) -> None:
    """Save a (3, H, W) image in [0, 1] as PNG."""
    from PIL import Image

    Image.fromarray(image_to_uint8(image)).save(path)


def load_png(path: Path) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]."""
    from PIL import Image

    return np.asarray(Image.open(path).convert("RGB"), dtype=np.float32).transpose(2, 0, 1) / 255.0


def generation_name(position: int, generation: int) -> str:
    """File name of generation g of the prompt at `position`: ``<position:05d>_<g>.png``."""
    return f"{position:05d}_{generation}.png"


def save_generations(folder: Path, position: int, images) -> list[Path]:
    """Save a prompt's (G, 3, H, W) generations in `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / generation_name(position, g) for g in range(len(images))]
    for img, p in zip(images, paths):
        save_png(img, p)
    return paths

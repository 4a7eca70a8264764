"""Write lab training pairs in the seed's folder layout: 00000001.png + 00000001.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.lab.data import LabData, render


def export_training_data(data: LabData, out: Path, limit: int | None = None) -> dict:
    """Memorized pairs (each template variant a pair) go to out/memorized, the rest to out/non_memorized."""
    from PIL import Image

    counts = {}
    groups = {"memorized": data.memorized, "non_memorized": data.non_memorized[:limit]}
    for name, pairs in groups.items():
        folder = out / name
        folder.mkdir(parents=True, exist_ok=True)
        n = 0
        for pair in pairs:
            for spec in pair.variants or [pair.spec]:
                n += 1
                img = (render(spec).transpose(1, 2, 0) * 255).round().astype(np.uint8)
                Image.fromarray(img).save(folder / f"{n:08d}.png")
                (folder / f"{n:08d}.txt").write_text(pair.caption + "\n", encoding="utf-8")
        counts[name] = n
    return counts

"""Write lab training pairs in the seed's folder layout: 00000001.png + 00000001.txt."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from diffmem.lab.data import LabData, partial_descriptions, render


def export_training_data(data: LabData, out: Path, limit: int | None = None, captions_per_image: int = 1) -> dict:
    """Memorized pairs (each template variant a pair) go to out/memorized, the rest to out/non_memorized.
    With `captions_per_image` > 1 each caption file holds that many descriptions of its image, one per
    line (``diffmem train --caption-per-line`` draws one at each use)."""
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
                text = "\n".join(partial_descriptions(pair, captions_per_image))
                (folder / f"{n:08d}.txt").write_text(text + "\n", encoding="utf-8")
        counts[name] = n
    return counts

"""Carlini et al. (2023): generations of a memorized prompt are near-duplicates of each other.

Every prompt's G >= 2 generations are sampled in full and decoded; the distance of two images is
the largest, over a 4 x 4 grid of tiles, root-mean-square pixel difference of a tile (the tiled L2
of ``diffmem.similarity.tiled_l2``). The papers do not say how the G(G-1)/2 pairwise distances
become one score: here it is their median, so a prompt counts as memorized when most pairs are
near-duplicates, and **lower means memorized** (``roc`` negates it; labels are never flipped).
"""

from __future__ import annotations

import torch

from diffmem.detectors.registry import register


class _ImagesRecorder:
    def __init__(self):
        self.images: torch.Tensor | None = None

    def on_step(self, step) -> None:
        pass

    def on_images(self, images: torch.Tensor) -> None:
        self.images = images  # (N, 3, H, W) in [0, 1]


def pairwise_tiled_l2(images: torch.Tensor) -> torch.Tensor:
    """(G(G-1)/2,) tiled L2 of every pair i < j of (G, 3, H, W) images."""
    from diffmem.similarity import tiled_l2

    d = tiled_l2(images, images).matrix  # (G, G)
    i, j = torch.triu_indices(len(images), len(images), offset=1)
    return torch.as_tensor(d)[i, j].double()


@register
class Carlini:
    name = "carlini"
    flow_refusal = None  # it compares decoded images: any family
    higher_is_memorized = False
    all_steps = True
    needs_images = True
    min_generations = 2

    def recorder(self, model, config, prompts):
        return _ImagesRecorder()

    def fields(self, recorder: _ImagesRecorder, rows: slice) -> dict:
        d = pairwise_tiled_l2(recorder.images[rows].float())
        return {self.name: float(d.median()), "carlini_pairwise": d.tolist()}

    def score_of(self, row, steps=None, generations=None):
        if steps is not None or generations is not None:
            raise ValueError("carlini is taken on the whole generations it was given: no step or generation window")
        return row[self.name]

"""Ground-truth judgements on lab generations: does it copy a training image, is its content right?

Copy rule (documented in the README): a generation copies training image j when j is its nearest
training image by RMSE and that RMSE is under a threshold calibrated on the lab data: the 1st
percentile of the distance from new images of the lab's generator to their nearest training image. For a prompt
whose training images are known (memorized and non-memorized captions), j must also be one of the
prompt's own images; for an unseen caption any training image counts.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from diffmem.lab.data import COLOURS, SHAPES, LabData, MAIN_SIZE, quadrant_centre, render_all, shape_mask


@dataclass
class TrainingImages:
    images: np.ndarray  # (M, 3, H, W) in [0, 1]
    captions: list[str]
    owner: np.ndarray  # (M,) index of the caption's pair in data.memorized + data.non_memorized

    @classmethod
    def of(cls, data: LabData) -> "TrainingImages":
        captions, specs, owners = data.training_specs()
        return cls(render_all(specs), captions, np.asarray(owners))

    def owners_of(self, caption: str) -> set[int]:
        idx = getattr(self, "_by_caption", None)
        if idx is None:
            idx = self._by_caption = {}
            for c, o in zip(self.captions, self.owner):
                idx.setdefault(c, set()).add(int(o))
        return idx.get(caption, set())


def rmse_to_all(images: np.ndarray, train: np.ndarray) -> np.ndarray:
    """(N, M) RMSE between N images and M training images, all (., 3, H, W) in [0, 1]."""
    a = images.reshape(len(images), -1).astype(np.float64)
    b = train.reshape(len(train), -1).astype(np.float64)
    d2 = (a**2).sum(1)[:, None] + (b**2).sum(1)[None] - 2 * a @ b.T
    return np.sqrt(np.maximum(d2, 0) / a.shape[1])


def copy_threshold(data: LabData, train: "TrainingImages | None" = None, num_images: int = 2000, seed: int = 0,
                   percentile: float = 1.0) -> float:
    """The `percentile` of RMSE between *new* images from the lab's generator (unseen captions'
    ground truth) and their nearest training image: how close an image that copies nothing comes
    to the training set by chance. Below it, a generation is taken to reproduce a training image."""
    rng = np.random.default_rng([data.config.seed, seed, 0xC0B1])  # a stream apart from the data's own
    from diffmem.lab.data import _random_spec

    fresh = render_all([_random_spec(rng, background_cells=data.config.background_cells) for _ in range(num_images)])
    train = train or TrainingImages.of(data)
    return float(np.percentile(rmse_to_all(fresh, train.images).min(1), percentile))


@dataclass
class CopyResult:
    is_copy: np.ndarray  # (N,) bool
    nearest: np.ndarray  # (N,) index of the nearest training image
    distance: np.ndarray  # (N,) its RMSE


def judge_copies(images: np.ndarray, captions: list[str], train: TrainingImages, threshold: float) -> CopyResult:
    """Copy decision for N generated images (N, 3, H, W) in [0, 1], each with its prompt."""
    d = rmse_to_all(images, train.images)
    nearest = d.argmin(1)
    dist = d[np.arange(len(d)), nearest]
    own_ok = np.array([(not train.owners_of(c)) or int(train.owner[j]) in train.owners_of(c)
                       for c, j in zip(captions, nearest)])
    return CopyResult(own_ok & (dist < threshold), nearest, dist)


def _shape_templates(image_size: int = 16) -> list[tuple[str, np.ndarray]]:
    out = []
    for shape in SHAPES:
        for q in range(4):
            cx, cy = quadrant_centre(q, image_size)
            for dx in (-1, 0, 1):
                for dy in (-1, 0, 1):
                    out.append((shape, shape_mask(shape, cx + dx, cy + dy, MAIN_SIZE, image_size)))
    return out


_TEMPLATES = None


def described_content(image: np.ndarray, colour_tolerance: float = 0.3) -> dict[str, str | None]:
    """Read the main object's colour and shape off an image (3, H, W) in [0, 1].

    For each described colour, the largest 4-connected region of pixels near it is matched (by
    IoU) against the main object drawn at every position; the colour with the largest region wins.
    """
    global _TEMPLATES
    if _TEMPLATES is None:
        _TEMPLATES = _shape_templates(image.shape[-1])
    best = (0, None, None)
    for name, rgb in COLOURS.items():
        near = np.sqrt(((image - np.asarray(rgb)[:, None, None]) ** 2).sum(0)) < colour_tolerance
        region = _largest_component(near)
        if region.sum() > best[0]:
            best = (int(region.sum()), name, region)
    size, colour, region = best
    if colour is None or size < 6:
        return {"colour": None, "shape": None}
    ious = [(np.logical_and(region, m).sum() / np.logical_or(region, m).sum(), s) for s, m in _TEMPLATES]
    return {"colour": colour, "shape": max(ious)[1]}


def _largest_component(mask: np.ndarray) -> np.ndarray:
    from scipy.ndimage import label

    labels, n = label(mask)
    if n == 0:
        return mask
    sizes = np.bincount(labels.ravel())[1:]
    return labels == (1 + sizes.argmax())


def content_correct(images: np.ndarray, colours: list[str], shapes: list[str]) -> np.ndarray:
    """(N,) bool: the main object has the described colour and shape."""
    out = []
    for img, c, s in zip(images, colours, shapes):
        got = described_content(img)
        out.append(got["colour"] == c and got["shape"] == s)
    return np.asarray(out)

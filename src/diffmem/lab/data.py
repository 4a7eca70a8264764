"""The memorization lab's data: one seeded generator of captioned 16x16 images with known ground truth.

Every caption has one form, ``"the {w1} {w2}: a {colour} {shape}"``: a random *title* plus a
partial description (the main object's colour and shape). Every image also holds *undescribed*
content at coarse scale (the main object's quadrant, a two-tone background or, with
``background_cells=4``, a background of 4x4 cells in random colours, two small objects of random
shape, colour and quadrant) and at fine scale (position jitter, a block texture, dots), so
many different images fit one caption. Memorized pairs differ from the others only by being
duplicated during training: same generator, same template, same vocabulary.
"""

from __future__ import annotations

import functools
from pathlib import Path
from dataclasses import asdict, dataclass, field

import numpy as np

COLOURS = {  # described colours of the main object (RGB in [0, 1])
    "red": (0.90, 0.10, 0.10),
    "green": (0.10, 0.75, 0.20),
    "blue": (0.15, 0.30, 0.95),
    "yellow": (0.95, 0.85, 0.10),
}
SHAPES = ("circle", "square", "triangle")
BACKGROUNDS = {  # undescribed
    "black": (0.05, 0.05, 0.05),
    "white": (0.95, 0.95, 0.95),
    "grey": (0.50, 0.50, 0.50),
    "brown": (0.45, 0.30, 0.15),
}
QUADRANTS = ("top left", "top right", "bottom left", "bottom right")
_RESERVED_WORDS = set(COLOURS) | set(SHAPES) | set(BACKGROUNDS) | {
    "the", "a", "an", "of", "at", "on", "in", "and", "circle", "circles", "square", "squares",
    "triangle", "triangles", "colour", "color", "background", "style", "picture", "gray",
}


@dataclass(frozen=True)
class ImageSpec:
    """Everything that decides one lab image: described content plus undescribed content."""

    colour: str  # described
    shape: str  # described
    background: str  # undescribed, coarse
    quadrant: int  # undescribed, coarse: index into QUADRANTS
    second_shape: str  # undescribed, coarse
    second_colour: str
    second_quadrant: int
    background2: str  # undescribed, coarse: colour of the background's other half
    split: str  # undescribed, coarse: "horizontal" | "vertical" (the halves' boundary)
    third_shape: str  # undescribed, coarse: a third small object
    third_colour: str
    third_quadrant: int
    jitter: tuple[int, int]  # undescribed, fine: (dx, dy) pixels
    texture_seed: int  # undescribed, fine: block texture and dots
    # undescribed, coarse: background colours of an n x n grid of cells, row by row (replaces the
    # two-tone background when not empty)
    background_cells: tuple[str, ...] = ()


@dataclass(frozen=True)
class LabDataConfig:
    """Sizes of the lab's data sets. Defaults are those of the shipped lab model."""

    seed: int = 0
    num_memorized: int = 20  # exact duplicates (Carlini et al.'s "verbatim" case); K >= 20 for statistics
    num_template: int = 4  # Webster 2023 "template" memorization: one caption, one layout, small variations
    template_variants: int = 4  # training images per template caption
    num_non_memorized: int = 30000  # unique pairs, each seen a few times over training
    num_novel: int = 500  # same template, titles never seen in training
    num_out_of_style: int = 200  # captions in another template
    num_title_words: int = 3000
    # n > 0: the background is an n x n grid of cells of random background colours (4^(n*n) patterns:
    # a training image's pattern identifies it); 0: the two-tone background of the first lab models
    background_cells: int = 0
    # leave the words of lab/blocked_words.txt (profanity, sexual terms, slurs, violence) out of the
    # title vocabulary: N > 0 (or True, list 1) uses lists 1..N of the file; 0 (False) only for the
    # data of models built before the list existed
    block_offensive_words: int = 0


@dataclass
class LabPair:
    caption: str
    spec: ImageSpec
    title_words: tuple[str, str]
    kind: str  # "memorized" | "template" | "non-memorized" | "novel" | "out-of-style"
    variants: list[ImageSpec] = field(default_factory=list)  # template captions' training images


@functools.lru_cache(maxsize=1)
def title_vocabulary() -> tuple[str, ...]:
    """Single-WordPiece lowercase words of the lab text encoder's vocabulary (sorted)."""
    from diffmem.lab import text_encoder_path

    words = []
    with open(text_encoder_path() / "vocab.txt", encoding="utf-8") as f:
        for line in f:
            w = line.strip()
            if 4 <= len(w) <= 9 and w.isascii() and w.isalpha() and w.islower() and w not in _RESERVED_WORDS:
                words.append(w)
    return tuple(sorted(words))


def caption_for(title: tuple[str, str], colour: str, shape: str) -> str:
    return f"the {title[0]} {title[1]}: a {colour} {shape}"


def partial_descriptions(pair: "LabPair", count: int) -> list[str]:
    """`count` captions of the pair's image (at most 3), each a true partial description under the
    pair's title: its caption, then the main object with its quadrant, then with the second object."""
    if not 1 <= count <= 3:
        raise ValueError(f"--captions-per-image {count}: the lab has 1 to 3 descriptions of an image")
    spec, (a, b) = pair.spec, pair.title_words
    options = [pair.caption, f"the {a} {b}: a {spec.colour} {spec.shape} at the {QUADRANTS[spec.quadrant]}",
               f"the {a} {b}: a {spec.colour} {spec.shape} and a small {spec.second_shape}"]
    return options[:count]


def out_of_style_caption(title: tuple[str, str], colour: str, shape: str) -> str:
    return f"a {colour} {shape} drawn in the style of {title[0]}"


def _random_spec(rng: np.random.Generator, colour: str | None = None, shape: str | None = None,
                 background_cells: int = 0) -> ImageSpec:
    """~560,000 coarse layouts (two-tone background x object arrangement x jitter x small objects), and
    4^(n*n) times more with an n x n cell background: far more than the training set, so that
    reproducing a training image's layout identifies the image."""
    colours, backgrounds = list(COLOURS), list(BACKGROUNDS)
    colour = colour or colours[rng.integers(len(colours))]
    shape = shape or SHAPES[rng.integers(len(SHAPES))]
    quadrant, second_quadrant, third_quadrant = (int(q) for q in rng.permutation(4)[:3])
    other_colours = [c for c in colours if c != colour]
    return ImageSpec(
        colour=colour,
        shape=shape,
        background=backgrounds[rng.integers(len(backgrounds))],
        quadrant=quadrant,
        second_shape=SHAPES[rng.integers(len(SHAPES))],
        second_colour=other_colours[rng.integers(len(other_colours))],
        second_quadrant=second_quadrant,
        jitter=(int(rng.integers(-1, 2)), int(rng.integers(-1, 2))),
        texture_seed=int(rng.integers(2**31 - 1)),
        background2=backgrounds[rng.integers(len(backgrounds))],
        split=("horizontal", "vertical")[rng.integers(2)],
        third_shape=SHAPES[rng.integers(len(SHAPES))],
        third_colour=other_colours[rng.integers(len(other_colours))],
        third_quadrant=third_quadrant,
        # drawn last, so that the two-tone data (n = 0) stays what it was
        background_cells=tuple(backgrounds[i] for i in rng.integers(len(backgrounds), size=background_cells**2)),
    )


def _vary(spec: ImageSpec, rng: np.random.Generator) -> ImageSpec:
    """A template variant: same layout, new fine detail."""
    return ImageSpec(**{**asdict(spec), "jitter": (int(rng.integers(-1, 2)), int(rng.integers(-1, 2))),
                        "texture_seed": int(rng.integers(2**31 - 1))})


def shape_mask(shape: str, cx: float, cy: float, size: float, image_size: int = 16) -> np.ndarray:
    """Boolean (H, W) mask of a shape centred at pixel coordinates (cx, cy) with half-size `size`."""
    y, x = np.mgrid[0:image_size, 0:image_size].astype(np.float32)
    if shape == "circle":
        return (x - cx) ** 2 + (y - cy) ** 2 <= size**2 + 0.5
    if shape == "square":
        half = size * 0.8
        return (np.abs(x - cx) <= half) & (np.abs(y - cy) <= half)
    if shape == "triangle":  # apex up; width grows linearly to the base
        top, bottom = cy - size, cy + size * 0.8
        frac = (y - top) / (bottom - top)
        return (y >= top) & (y <= bottom) & (np.abs(x - cx) <= frac * size * 1.05)
    raise ValueError(f"unknown shape {shape!r}; expected one of {SHAPES}")


def quadrant_centre(quadrant: int, image_size: int = 16) -> tuple[float, float]:
    half = image_size / 2
    col, row = quadrant % 2, quadrant // 2
    return (half / 2 - 0.5 + col * half, half / 2 - 0.5 + row * half)


MAIN_SIZE = 3.0  # half-size in pixels of the described object
SECOND_SIZE = 1.8  # half-size of the undescribed second object


def render(spec: ImageSpec, image_size: int = 16) -> np.ndarray:
    """Draw one lab image: float32 (3, H, W) in [0, 1]."""
    rng = np.random.default_rng(spec.texture_seed)
    if spec.background_cells:
        n = int(round(len(spec.background_cells) ** 0.5))
        cells = np.asarray([BACKGROUNDS[c] for c in spec.background_cells], np.float32).reshape(n, n, 3)
        img = np.kron(cells.transpose(2, 0, 1), np.ones((1, image_size // n, image_size // n), np.float32))
    else:  # two-tone: background, and background2 on one half
        img = np.empty((3, image_size, image_size), np.float32)
        img[:] = np.asarray(BACKGROUNDS[spec.background], np.float32)[:, None, None]
        half = image_size // 2
        other = np.asarray(BACKGROUNDS[spec.background2], np.float32)[:, None, None]
        if spec.split == "horizontal":
            img[:, half:, :] = other
        else:
            img[:, :, half:] = other
    # fine: 4x4-pixel block texture on the background
    blocks = rng.uniform(-0.08, 0.08, (image_size // 4, image_size // 4)).astype(np.float32)
    img += np.kron(blocks, np.ones((4, 4), np.float32))[None]
    for q, shp, col in ((spec.second_quadrant, spec.second_shape, spec.second_colour),
                        (spec.third_quadrant, spec.third_shape, spec.third_colour)):
        sx, sy = quadrant_centre(q, image_size)
        img[:, shape_mask(shp, sx, sy, SECOND_SIZE, image_size)] = np.asarray(COLOURS[col])[:, None]
    cx, cy = quadrant_centre(spec.quadrant, image_size)
    mask = shape_mask(spec.shape, cx + spec.jitter[0], cy + spec.jitter[1], MAIN_SIZE, image_size)
    img[:, mask] = np.asarray(COLOURS[spec.colour], np.float32)[:, None]
    # fine: three dots of random grey level
    for _ in range(3):
        px, py = rng.integers(image_size, size=2)
        img[:, py, px] = rng.uniform(0, 1)
    return np.clip(img, 0.0, 1.0)


@dataclass
class LabData:
    """All of the lab's captions and training images, with ground truth."""

    config: LabDataConfig
    memorized: list[LabPair]  # exact duplicates and template captions (kind says which)
    non_memorized: list[LabPair]
    novel: list[LabPair]
    out_of_style: list[LabPair]

    def training_specs(self) -> tuple[list[str], list[ImageSpec], list[int]]:
        """Every distinct training image: (captions, specs, owner index into memorized+non_memorized)."""
        captions, specs, owners = [], [], []
        for i, pair in enumerate(self.memorized + self.non_memorized):
            for spec in pair.variants or [pair.spec]:
                captions.append(pair.caption)
                specs.append(spec)
                owners.append(i)
        return captions, specs, owners

    def prompt_set(self, name: str) -> list[LabPair]:
        sets = {"memorized": self.memorized, "non-memorized": self.non_memorized,
                "novel": self.novel, "out-of-style": self.out_of_style}
        if name not in sets:
            raise ValueError(f"unknown lab prompt set {name!r}; expected one of {sorted(sets)}")
        return sets[name]


BLOCKLIST_VERSION = 2  # the newest list of lab/blocked_words.txt; new lab builds use it


@functools.lru_cache(maxsize=None)
def blocked_words(version: int = BLOCKLIST_VERSION) -> frozenset[str]:
    """The words no title of a lab built with ``block_offensive_words=version`` contains: those of
    lists 1..version of lab/blocked_words.txt."""
    if not 1 <= version <= BLOCKLIST_VERSION:
        raise ValueError(f"block_offensive_words={version}: the blocklist has lists 1..{BLOCKLIST_VERSION}")
    text = (Path(__file__).parent / "blocked_words.txt").read_text(encoding="utf-8")
    words, current = set(), 0
    for line in text.splitlines():
        line = line.split("#")[0].strip()
        if line.startswith("[list "):
            current = int(line[len("[list "):-1])
        elif current <= version:
            words.update(line.split())
    return frozenset(words)


def title_words(config: LabDataConfig, rng: np.random.Generator | None = None) -> list[str]:
    """The lab's title word list: `num_title_words` words of the vocabulary, drawn first from the seed."""
    rng = rng if rng is not None else np.random.default_rng(config.seed)
    vocab = title_vocabulary()
    if config.block_offensive_words:
        blocked = blocked_words(int(config.block_offensive_words))
        vocab = tuple(w for w in vocab if w not in blocked)
    vocab = np.asarray(vocab)
    return vocab[rng.permutation(len(vocab))[: config.num_title_words]].tolist()


def make_lab_data(config: LabDataConfig = LabDataConfig()) -> LabData:
    """Generate the lab's captions and image specs deterministically from ``config.seed``."""
    rng = np.random.default_rng(config.seed)
    words = title_words(config, rng)
    n_titles = (config.num_memorized + config.num_template + config.num_non_memorized
                + config.num_novel + config.num_out_of_style)
    titles: list[tuple[str, str]] = []
    seen: set[tuple[str, str]] = set()
    while len(titles) < n_titles:  # unique titles, so every caption is unique
        a, b = rng.integers(len(words), size=2)
        t = (words[a], words[b])
        if a != b and t not in seen:
            seen.add(t)
            titles.append(t)
    it = iter(titles)

    def pair(kind: str, caption_fn=caption_for) -> LabPair:
        spec = _random_spec(rng, background_cells=config.background_cells)
        title = next(it)
        return LabPair(caption_fn(title, spec.colour, spec.shape), spec, title, kind)

    memorized = [pair("memorized") for _ in range(config.num_memorized)]
    for _ in range(config.num_template):
        p = pair("template")
        p.variants = [p.spec] + [_vary(p.spec, rng) for _ in range(config.template_variants - 1)]
        memorized.append(p)
    non_memorized = [pair("non-memorized") for _ in range(config.num_non_memorized)]
    novel = [pair("novel") for _ in range(config.num_novel)]
    out_of_style = [pair("out-of-style", out_of_style_caption) for _ in range(config.num_out_of_style)]
    return LabData(config, memorized, non_memorized, novel, out_of_style)


def lab_data_from_config(config: dict) -> LabData:
    """The lab data of a data config stored with a lab model (``lab_model.json``'s "data")."""
    # models built before the cell background existed were trained on the two-tone one
    return make_lab_data(LabDataConfig(**{"background_cells": 0, **config}))


def render_all(specs: list[ImageSpec], image_size: int = 16) -> np.ndarray:
    """(N, 3, H, W) float32 in [0, 1]."""
    return np.stack([render(s, image_size) for s in specs]) if specs else np.zeros((0, 3, image_size, image_size), np.float32)

"""Copy similarity between generations and training images, and CLIP score against the prompt.

All metrics take image tensors (N, 3, H, W) in [0, 1] and return a ``SimilarityResult`` whose
``best`` is each generation's best match over the prompt's training images.

- ``sscd``: cosine of SSCD descriptors (Pizzi et al. 2022; ``sscd_disc_large`` TorchScript, loaded
  from a local path), preprocessed as Wen et al.'s evaluation does: resize 256, center crop 224,
  normalize with mean 0.5 / std 0.5. Literature: > 0.5 is a copy (Somepalli et al. 2023).
- ``tiled_l2``: Carlini et al. 2023's distance: the images cut into a 4 x 4 grid of tiles, the
  root-mean-square difference of each pair of corresponding tiles, the largest tile distance
  counts (a copy must match everywhere). Lower is more similar.
- ``pixel_cosine``: cosine of the pixel vectors mapped to [-1, 1] (1: identical, -1: negative).
- ``clip_score``: cosine between CLIP image and text embeddings (transformers ``CLIPModel`` from a
  local folder); the paper plots SSCD against it.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F


@dataclass
class SimilarityResult:
    metric: str
    higher_is_better: bool  # True: larger = more similar (cosines); False: a distance
    matrix: np.ndarray  # (N, M) generation x training image
    best: np.ndarray  # (N,) best match over the M training images
    best_index: np.ndarray  # (N,) which training image

    def summary(self) -> dict:
        """Wen et al.'s per-prompt report: mean, max and min over generations of the best match."""
        return {"mean": float(self.best.mean()), "max": float(self.best.max()), "min": float(self.best.min())}

    def top_mean(self, k: int = 3) -> float:
        """Mean of the `k` most similar generations' best matches (the largest for a similarity, the
        smallest for a distance; all of them when there are fewer): MemBench's "top-3 SSCD" per prompt."""
        if k < 1:
            raise ValueError(f"top_mean: k {k} must be >= 1")
        ordered = np.sort(self.best)
        return float((ordered[-k:] if self.higher_is_better else ordered[:k]).mean())


def _result(metric: str, matrix: torch.Tensor, higher_is_better: bool) -> SimilarityResult:
    m = matrix.detach().double().cpu().numpy()
    idx = m.argmax(1) if higher_is_better else m.argmin(1)
    return SimilarityResult(metric, higher_is_better, m, m[np.arange(len(m)), idx], idx)


def _check(images: torch.Tensor, name: str) -> torch.Tensor:
    images = torch.as_tensor(np.asarray(images) if not torch.is_tensor(images) else images).float()
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"{name}: expected images (N, 3, H, W) in [0, 1], got shape {tuple(images.shape)}")
    return images


def _same_size(generated: torch.Tensor, training: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Resize the generations to the training images' size when they differ (bilinear, antialiased)."""
    if generated.shape[-2:] != training.shape[-2:]:
        generated = F.interpolate(generated, size=training.shape[-2:], mode="bilinear", antialias=True,
                                  align_corners=False)
    return generated, training


# -- weight-free metrics --------------------------------------------------------------------------

def tiled_l2(generated, training, grid: int = 4) -> SimilarityResult:
    """Carlini et al. 2023: max over a grid x grid tiling of the per-tile RMS distance; (N,) x (M,)."""
    a, b = _same_size(_check(generated, "generated"), _check(training, "training"))
    H, W = b.shape[-2:]
    if H % grid or W % grid:
        raise ValueError(f"tiled_l2: image size {H}x{W} is not divisible into a {grid}x{grid} grid of tiles")

    def tiles(x):  # (N, 3, H, W) -> (N, grid*grid, 3*th*tw)
        x = x.unfold(2, H // grid, H // grid).unfold(3, W // grid, W // grid)  # (N, 3, g, g, th, tw)
        return x.permute(0, 2, 3, 1, 4, 5).flatten(3).flatten(1, 2)

    ta, tb = tiles(a).double(), tiles(b).double()
    diff = ta[:, None] - tb[None]  # (N, M, tiles, elems)
    rms = diff.pow(2).mean(-1).sqrt()  # (N, M, tiles)
    return _result("tiled_l2", rms.amax(-1), higher_is_better=False)


def pixel_cosine(generated, training) -> SimilarityResult:
    """Cosine between pixel vectors mapped to [-1, 1]; (N,) x (M,)."""
    a, b = _same_size(_check(generated, "generated"), _check(training, "training"))
    a = F.normalize((a.double() * 2 - 1).flatten(1), dim=1)
    b = F.normalize((b.double() * 2 - 1).flatten(1), dim=1)
    return _result("pixel_cosine", a @ b.T, higher_is_better=True)


# -- structural similarity (NeMo's cross-seed check) ---------------------------------------------

def _gaussian_window(sigma: float, dtype, device) -> torch.Tensor:
    """(k, k) normalised Gaussian window of side int(3.5 sigma + 0.5) * 2 + 1 (11 for sigma 1.5)."""
    k = int(3.5 * sigma + 0.5) * 2 + 1
    x = torch.arange(k, dtype=dtype, device=device) - (k - 1) / 2
    g = torch.exp(-(x ** 2) / (2 * sigma ** 2))
    g = g / g.sum()
    return g[:, None] * g[None, :]


def _inner(m: torch.Tensor, pad: int) -> torch.Tensor:
    """The map without its `pad`-pixel border (the part computed from unpadded pixels only)."""
    return m[..., pad:-pad, pad:-pad] if pad else m


def _ssim_terms(x: torch.Tensor, y: torch.Tensor, sigma: float, data_range: float | None,
                crop_ssim_map: bool = False):
    """(SSIM, contrast-structure) per image of (B, C, H, W) pairs, as torchmetrics computes them:
    reflect padding by the window's half side, CS averaged over the map without the padded border,
    data range from the batch when not given, k1 = 0.01, k2 = 0.03. The SSIM map is averaged over
    the whole map (torchmetrics >= 1.5), or without the border with `crop_ssim_map` (torchmetrics
    before 1.5, e.g. 1.3.2, the version NeMo's code pins)."""
    x, y = x.double(), y.double()
    if data_range is None:
        data_range = max(float(x.max() - x.min()), float(y.max() - y.min()))
    c1, c2 = (0.01 * data_range) ** 2, (0.03 * data_range) ** 2
    C = x.shape[1]
    w = _gaussian_window(sigma, x.dtype, x.device)
    pad = (w.shape[-1] - 1) // 2
    kernel = w.expand(C, 1, *w.shape)
    stack = F.pad(torch.cat([x, y, x * x, y * y, x * y]), (pad, pad, pad, pad), mode="reflect")
    mu_x, mu_y, xx, yy, xy = F.conv2d(stack, kernel, groups=C).split(len(x))
    var_x = (xx - mu_x ** 2).clamp_min(0)
    var_y = (yy - mu_y ** 2).clamp_min(0)
    cov = xy - mu_x * mu_y
    cs_map = (2 * cov + c2) / (var_x + var_y + c2)
    ssim_map = (2 * mu_x * mu_y + c1) / (mu_x ** 2 + mu_y ** 2 + c1) * cs_map
    if crop_ssim_map:
        ssim_map = _inner(ssim_map, pad)
    return ssim_map.flatten(1).mean(1), _inner(cs_map, pad).flatten(1).mean(1)


def ssim(x: torch.Tensor, y: torch.Tensor, sigma: float = 1.5, data_range: float | None = None,
         crop_ssim_map: bool = False) -> torch.Tensor:
    """Structural similarity of (B, C, H, W) image pairs (Gaussian window): (B,). The map is averaged
    whole (torchmetrics >= 1.5) or, with `crop_ssim_map`, without the window's half-side border
    (torchmetrics before 1.5)."""
    return _ssim_terms(x, y, sigma, data_range, crop_ssim_map)[0]


def ms_ssim(x: torch.Tensor, y: torch.Tensor, betas=(0.33, 0.33, 0.33), sigma: float = 1.5,
            data_range: float | None = None, crop_ssim_map: bool = False) -> torch.Tensor:
    """Multi-scale SSIM of (B, C, H, W) pairs over len(betas) scales (2x average pooling between
    them), negative terms clipped to 0 (torchmetrics' default): (B,). Needs sides over
    (window - 1) * (len(betas) - 1) ** 2 pixels (over 40 for three scales). The last scale's SSIM
    map is averaged whole (torchmetrics >= 1.5) or, with `crop_ssim_map`, without the window's
    half-side border (torchmetrics before 1.5; NeMo's pinned 1.3.2, under which its 0.428
    threshold was set). The other scales' CS terms are cropped in both."""
    need = (int(3.5 * sigma + 0.5) * 2) * max(1, len(betas) - 1) ** 2
    if min(x.shape[-2:]) <= need:
        raise ValueError(f"ms_ssim with {len(betas)} scales needs image sides over {need} pixels, got "
                         f"{tuple(x.shape[-2:])}; use ssim")
    terms = []
    for i in range(len(betas)):
        sim, cs = _ssim_terms(x, y, sigma, data_range, crop_ssim_map)
        terms.append(cs.clamp_min(0))
        x, y = F.avg_pool2d(x, 2), F.avg_pool2d(y, 2)
    terms[-1] = sim.clamp_min(0)
    out = torch.ones_like(sim)
    for t, b in zip(terms, betas):
        out = out * t ** b
    return out


# -- SSCD -----------------------------------------------------------------------------------------

@dataclass
class SSCDPreprocess:
    resize: int = 256  # shorter side, as in Wen et al.'s SSCD evaluation
    crop: int = 224
    mean: tuple[float, float, float] = (0.5, 0.5, 0.5)
    std: tuple[float, float, float] = (0.5, 0.5, 0.5)


def resize_center_crop(images: torch.Tensor, resize: int, crop: int, mode: str = "bilinear") -> torch.Tensor:
    """torchvision's Resize(resize) (shorter side, antialiased; bilinear is its default) then CenterCrop(crop)."""
    H, W = images.shape[-2:]
    scale = resize / min(H, W)
    size = (max(resize, round(H * scale)), max(resize, round(W * scale)))
    x = F.interpolate(images, size=size, mode=mode, antialias=True, align_corners=False).clamp(0, 1)
    top, left = (size[0] - crop) // 2, (size[1] - crop) // 2
    return x[..., top:top + crop, left:left + crop]


class SSCD:
    """An SSCD descriptor network (TorchScript) with its preprocessing; descriptors L2-normalized."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu",
                 preprocess: SSCDPreprocess = SSCDPreprocess(), batch_size: int = 32):
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"SSCD checkpoint {path} not found; expected a TorchScript file such as "
                                    "sscd_disc_large.torchscript.pt (diffmem never downloads it)")
        self.net = torch.jit.load(str(path), map_location=device).eval()
        self.device, self.preprocess, self.batch_size = torch.device(device), preprocess, batch_size

    @torch.no_grad()
    def descriptors(self, images) -> torch.Tensor:
        """(N, D) unit-norm descriptors of (N, 3, H, W) images in [0, 1]."""
        images = _check(images, "images")
        p = self.preprocess
        mean = torch.tensor(p.mean).view(1, 3, 1, 1)
        std = torch.tensor(p.std).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = (resize_center_crop(images[i:i + self.batch_size], p.resize, p.crop) - mean) / std
            out.append(self.net(x.to(self.device)).float().cpu())
        return F.normalize(torch.cat(out), dim=1)

    def similarity(self, generated, training) -> SimilarityResult:
        return _result("sscd", self.descriptors(generated) @ self.descriptors(training).T, higher_is_better=True)


# -- CLIP score -----------------------------------------------------------------------------------

OPENAI_CLIP_MEAN = (0.48145466, 0.4578275, 0.40821073)
OPENAI_CLIP_STD = (0.26862954, 0.26130258, 0.27577711)


class CLIPScorer:
    """Cosine between CLIP image and text embeddings, from a local transformers CLIP folder."""

    def __init__(self, path: str | Path, device: str | torch.device = "cpu", batch_size: int = 32):
        import json

        from transformers import AutoTokenizer, CLIPModel

        path = Path(path)
        if not (path / "config.json").is_file():
            raise FileNotFoundError(f"CLIP model folder {path}: no config.json; expected a transformers CLIPModel "
                                    "folder (save_pretrained) with its tokenizer files")
        self.model = CLIPModel.from_pretrained(path).to(device).eval().requires_grad_(False)
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        pre = json.loads((path / "preprocessor_config.json").read_text()) \
            if (path / "preprocessor_config.json").is_file() else {}
        self.mean = tuple(pre.get("image_mean", OPENAI_CLIP_MEAN))
        self.std = tuple(pre.get("image_std", OPENAI_CLIP_STD))
        self.size = self.model.config.vision_config.image_size
        self.device, self.batch_size = torch.device(device), batch_size

    @torch.no_grad()
    def image_features(self, images) -> torch.Tensor:
        images = _check(images, "images")
        mean = torch.tensor(self.mean).view(1, 3, 1, 1)
        std = torch.tensor(self.std).view(1, 3, 1, 1)
        out = []
        for i in range(0, len(images), self.batch_size):
            x = (resize_center_crop(images[i:i + self.batch_size], self.size, self.size, "bicubic") - mean) / std
            out.append(self.model.get_image_features(pixel_values=x.to(self.device)))
        return F.normalize(torch.cat([_pooled(o) for o in out]).float().cpu(), dim=1)

    @torch.no_grad()
    def text_features(self, prompts: list[str]) -> torch.Tensor:
        out = []
        for i in range(0, len(prompts), self.batch_size):
            enc = self.tokenizer(prompts[i:i + self.batch_size], padding=True, truncation=True, return_tensors="pt",
                                 max_length=self.model.config.text_config.max_position_embeddings)
            out.append(self.model.get_text_features(**{k: v.to(self.device) for k, v in enc.items()}))
        return F.normalize(torch.cat([_pooled(o) for o in out]).float().cpu(), dim=1)

    def score(self, images, prompts: list[str]) -> np.ndarray:
        """(N,) cosine between image i and prompt i."""
        if len(images) != len(prompts):
            raise ValueError(f"clip_score: {len(images)} images but {len(prompts)} prompts")
        return (self.image_features(images) * self.text_features(prompts)).sum(1).double().numpy()


def _pooled(features) -> torch.Tensor:
    """Newer transformers may return a model output instead of a tensor from get_*_features."""
    return features if torch.is_tensor(features) else features.pooler_output

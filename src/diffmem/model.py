"""The one model interface that all of diffmem's methods talk to.

An adapter (one file per model family under ``diffmem.adapters``) turns a concrete model into an
object with the members of ``DiffusionModel``. Detection, explanation, mitigation, training and
evaluation use only these; nothing outside ``diffmem.adapters`` probes a model's internals.

Three conventions hold on every model:

- ``predict_noise`` returns the *noise* prediction, whatever the UNet was trained to output
  (``epsilon`` or ``v_prediction``), so the detection metric ``d = ||eps_c - eps_u||`` means the
  same on every family. The sampler's scheduler therefore runs in ``epsilon`` mode; DDIM's update
  from the converted noise equals its update from the raw velocity.
- Prompts become a ``Conditioning``: the token embeddings that cross-attention reads, plus any
  extra per-prompt tensors a family needs (SDXL: the pooled text embedding and the size/crop ids).
- A model carries its own defaults (``ModelDefaults``) where the paper's Stable Diffusion values
  do not fit it (the lab's guidance scale and embedding-optimization budget).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction")


@dataclass(frozen=True)
class Token:
    """One token of a prompt as the model's tokenizer splits it."""

    text: str  # decoded, readable
    token_id: int
    special: bool  # start/end/padding token


@dataclass
class Conditioning:
    """What the UNet is conditioned on, for a batch of B rows.

    embeddings: (B, T, D) token embeddings (the keys and values of cross-attention);
    extra: per-family tensors with the same leading B (SDXL: ``text_embeds`` (B, 1280) and
    ``time_ids`` (B, 6)). Embedding optimization and token significance act on ``embeddings``.
    """

    embeddings: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.embeddings)

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.embeddings), {k: fn(v) for k, v in self.extra.items()})

    def __getitem__(self, index) -> "Conditioning":
        """Rows `index` (an int keeps the batch dimension)."""
        if isinstance(index, int):
            index = slice(index, index + 1 if index != -1 else None)
        return self._map(lambda x: x[index])

    def repeat_interleave(self, n: int) -> "Conditioning":
        """Each row n times in a row: (B, ...) -> (B*n, ...)."""
        return self._map(lambda x: x.repeat_interleave(n, dim=0))

    def expand(self, n: int) -> "Conditioning":
        """A one-row conditioning as n rows (a view): (1, ...) -> (n, ...)."""
        if len(self) != 1:
            raise ValueError(f"expand needs a one-row conditioning, got {len(self)} rows")
        return self._map(lambda x: x.expand(n, *x.shape[1:]))

    def to(self, device=None, dtype=None) -> "Conditioning":
        return self._map(lambda x: x.to(device=device, dtype=dtype if x.is_floating_point() else None))

    def detach(self) -> "Conditioning":
        return self._map(lambda x: x.detach())

    def with_embeddings(self, embeddings: torch.Tensor) -> "Conditioning":
        """The same extra conditioning with other token embeddings (e.g. optimized ones)."""
        if embeddings.shape[0] != len(self):
            raise ValueError(f"embeddings for {embeddings.shape[0]} rows, conditioning has {len(self)}")
        return Conditioning(embeddings, dict(self.extra))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = set(parts[0].extra)
        if any(set(p.extra) != keys for p in parts):
            raise ValueError(f"cannot concatenate conditionings with different extras: {[sorted(p.extra) for p in parts]}")
        return Conditioning(torch.cat([p.embeddings for p in parts]),
                            {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra})


@dataclass(frozen=True)
class ModelDefaults:
    """Settings a model family supplies where the paper's Stable Diffusion values do not fit it.

    ``None`` for target_loss: calibrate it, as the median first-step d of ordinary prompts
    (``ModelDefaults.reference`` prompts for models that have them, else a verb's reference prompts).
    """

    guidance_scale: float = 7.5  # Stable Diffusion's default
    mitigation_lr: float = 0.05  # embedding-opt AdamW learning rate (Wen et al.)
    mitigation_max_iters: int = 10  # embedding-opt AdamW steps at most (Wen et al.)
    target_loss: float | None = 3.0  # embedding-opt target d (the seed's value on SD v1.4)


def noise_from_model_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                            prediction_type: str) -> torch.Tensor:
    """The noise prediction eps from a UNet output, for (B, C, H, W) tensors.

    epsilon: the output itself. v_prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1-a) x0
    with x_t = sqrt(a) x0 + sqrt(1-a) eps gives eps = sqrt(a) v + sqrt(1-a) x_t, a = alpha_bar_t
    (a scalar or (B,)). So on v-models d_eps = sqrt(a) * ||v_c - v_u||.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar_t, output)
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: expected one of {', '.join(PREDICTION_TYPES)}")


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the UNet output regresses onto in training, for (B, C, H, W) clean latents x0 and noise.

    epsilon: the noise; v_prediction: v = sqrt(a) eps - sqrt(1-a) x0, a = alpha_bar_t (B,), as
    diffusers' ``train_text_to_image.py`` takes it from ``scheduler.get_velocity``.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar_t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    raise ValueError(f"prediction_type {prediction_type!r} is not supported: expected one of {', '.join(PREDICTION_TYPES)}")


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, device=like.device).to(torch.promote_types(like.dtype, torch.float32))
    return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a


@runtime_checkable
class DiffusionModel(Protocol):
    name: str  # where it was loaded from
    family: str  # "lab", "stable-diffusion", "stable-diffusion-xl"
    device: torch.device
    dtype: torch.dtype
    unet: torch.nn.Module
    scheduler: object  # a diffusers DDIMScheduler in epsilon mode, used for sampling
    prediction_type: str  # what the UNet outputs: "epsilon" or "v_prediction"
    latent_shape: tuple[int, int, int]  # (C, H, W) of one sample the UNet denoises
    image_size: int  # side of the square images in pixels (decoded size)
    max_tokens: int  # tokenizer length limit; longer prompts are truncated
    tokenizer: object  # the (first) text tokenizer; random-word baselines draw from its vocabulary
    frozen_token_positions: tuple[int, ...]  # positions embedding optimization never moves (start token)
    defaults: ModelDefaults
    default_guidance_scale: float  # = defaults.guidance_scale

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning of B prompts, truncated to ``max_tokens``."""

    def empty_conditioning(self) -> Conditioning:
        """One-row conditioning of the unconditional branch (what the family's pipeline uses with no
        negative prompt)."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      unet: torch.nn.Module | None = None) -> torch.Tensor:
        """eps(x_t, t, cond): (B, C, H, W); `unet` replaces the model's (a training copy)."""

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                     unet: torch.nn.Module | None = None) -> torch.Tensor:
        """The UNet's raw output (noise or velocity, per ``prediction_type``): what training regresses."""

    def output_to_noise(self, output: torch.Tensor, x_t: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The noise prediction from a raw ``model_output`` at x_t and t (identity on epsilon models)."""

    def training_target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """Regression target of ``model_output`` for clean latents x0, noise and timesteps t (B,)."""

    def training_scheduler(self):
        """A diffusers DDPMScheduler with the model's training noise schedule (``add_noise``)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H', W') images in [0, 1] for (B, C, H, W) latents."""

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents for (B, 3, H', W') images in [-1, 1] (training); `generator` seeds any sampling."""

    def tokens(self, prompt: str) -> list[Token]:
        """The prompt's tokens, padded to ``max_tokens``, in the order the encoder sees them."""

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens before truncation, special tokens included."""

    def save(self, path: str | Path, unet: torch.nn.Module | None = None) -> None:
        """Write the model (or its UNet replaced by `unet`) so that ``--model``/``--unet`` loads it."""

    def training_data(self):
        """The model's own training data (``diffmem.lab.data.LabData`` for lab models), else None."""

    def identity(self) -> dict:
        """What identifies the weights: name, family, and a hash of the config files and of the weight
        files' names and sizes (not their bytes)."""


@contextmanager
def count_unet_rows(model):
    """Count the latents that go through the model's UNet (``predict_noise``) inside the block:
    ``with count_unet_rows(model) as n: ...`` then ``n[0]``. Blocks may nest."""
    n = [0]
    had_own = "predict_noise" in vars(model)  # an outer count already wraps it
    original = model.predict_noise

    def counted(x_t, *args, **kwargs):
        n[0] += len(x_t)
        return original(x_t, *args, **kwargs)

    model.predict_noise = counted
    try:
        yield n
    finally:
        if had_own:
            model.predict_noise = original
        else:
            del model.predict_noise  # back to the class's method

"""The one model interface that all of diffmem's methods talk to.

An adapter (one file per model family under ``diffmem.adapters``) turns a concrete model into an
object with these members. Detection, explanation, mitigation and training only use them, so a
new family plugs in by writing one adapter. Adapters also expose their ``unet`` so that later
detectors (cross-attention probabilities, Hessian-vector products) can hook into it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch


@dataclass(frozen=True)
class Token:
    """One token of a prompt as the model's tokenizer splits it."""

    text: str  # decoded, readable
    token_id: int
    special: bool  # start/end/padding token


@runtime_checkable
class DiffusionModel(Protocol):
    name: str  # where it was loaded from
    device: torch.device
    dtype: torch.dtype
    unet: torch.nn.Module
    scheduler: object  # a diffusers DDIMScheduler used for sampling
    latent_shape: tuple[int, int, int]  # (C, H, W) of one sample the UNet denoises
    max_tokens: int  # tokenizer length limit; longer prompts are truncated
    default_guidance_scale: float

    def encode_prompts(self, prompts: list[str]) -> torch.Tensor:
        """(B, T, D) conditioning embeddings, prompts truncated to ``max_tokens``."""

    def empty_embedding(self) -> torch.Tensor:
        """(1, T, D) embedding of the empty prompt (the unconditional branch)."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, embedding: torch.Tensor) -> torch.Tensor:
        """eps(x_t, t, embedding): (B, C, H, W) for x_t (B, C, H, W) and embedding (B, T, D)."""

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """(B, 3, H', W') images in [0, 1] for (B, C, H, W) latents."""

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Latents for (B, 3, H', W') images in [-1, 1] (training); `generator` seeds any sampling."""

    def tokens(self, prompt: str) -> list[Token]:
        """The prompt's tokens, padded to ``max_tokens``, in the order the encoder sees them."""

    def count_tokens(self, prompt: str) -> int:
        """Number of tokens before truncation, special tokens included."""

"""Adapter for Stable Diffusion 1.x/2.x folders in the diffusers layout.

    model_index.json  unet/  vae/  text_encoder/  tokenizer/  scheduler/

The components are loaded one by one (no pipeline object) and sampled with DDIM, as in the paper.
"""

from __future__ import annotations

from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, load_unet, sampling_scheduler
from diffmem.model import Conditioning, ModelDefaults, Token

SD_COMPONENTS = ("unet", "vae", "text_encoder", "tokenizer", "scheduler")


def check_folder(path: Path, components: tuple[str, ...], kind: str, missing_note: str = "") -> None:
    """Raise a clear error naming what a diffusers pipeline folder of `kind` lacks."""
    listing = ", ".join(c + "/" for c in components)
    if not (path / "model_index.json").is_file():
        raise FileNotFoundError(f"{path}: no model_index.json; expected a diffusers {kind} folder with {listing}")
    for comp in components:
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"{path}: component {comp}/ is missing (a {kind} folder needs {listing}"
                                    f"{missing_note})")
    if not (path / "unet" / "config.json").is_file():
        raise FileNotFoundError(f"{path}: unet/config.json is missing; the folder has no usable UNet")


def check_sd_folder(path: Path) -> None:
    """Raise a clear error naming what a Stable Diffusion folder lacks."""
    check_folder(path, SD_COMPONENTS, "Stable Diffusion")


def clip_tokens(tokenizer, prompt: str, max_tokens: int) -> list[Token]:
    """The prompt's CLIP tokens, padded to `max_tokens` as the encoder sees them: decoded, the start
    token and everything from the end token on special.

    Special tokens are found by position, not by id: the tokenizer's attention mask counts the
    prompt's own tokens (start and end included), so the end token sits at that count - 1 (the
    official ``len(tokenizer.encode(p)) - 1``, 76 when truncated). Ids cannot tell: SD 2.x pads
    with "!" (id 0), and a "!" of the prompt is the same id.
    """
    enc = tokenizer(prompt, padding="max_length", max_length=max_tokens, truncation=True)
    end = sum(enc.attention_mask) - 1
    return [Token(tokenizer.decode([i]).strip(), int(i), j == 0 or j >= end) for j, i in enumerate(enc.input_ids)]


class StableDiffusionModel(AdapterBase):
    """A Stable Diffusion model behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = "stable-diffusion"

    def __init__(self, unet, vae, text_encoder, tokenizer, scheduler, name: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 folders: tuple[Path, ...] = ()):
        self.name = name
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype
        place = lambda m: (m.to(self.device) if m.dtype == dtype else m.to(self.device, dtype)).eval().requires_grad_(False)
        self.denoiser, self.vae, self.text_encoder = place(unet), place(vae), place(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler, self.prediction_type = sampling_scheduler(scheduler)
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.denoiser.config.sample_size
        self.latent_shape = (self.denoiser.config.in_channels, size, size)
        self.image_size = size * vae_scale_factor
        self.max_tokens = tokenizer.model_max_length
        self.defaults = ModelDefaults()  # the paper's values are Stable Diffusion's

    # -- prompts -----------------------------------------------------------------------------
    def _input_ids(self, prompts: list[str]):
        return self.tokenizer(list(prompts), padding="max_length", max_length=self.max_tokens, truncation=True,
                              return_tensors="pt")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        enc = self._input_ids(prompts)
        mask = None
        if getattr(self.text_encoder.config, "use_attention_mask", False):
            mask = enc.attention_mask.to(self.device)
        return Conditioning(self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0])

    def tokens(self, prompt: str) -> list[Token]:
        return clip_tokens(self.tokenizer, prompt, self.max_tokens)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)

    # -- images ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor


def load_stable_diffusion(path: str | Path, unet_path: str | Path | None = None, device="cpu",
                          dtype=torch.float32) -> StableDiffusionModel:
    """Load an SD 1.x/2.x folder component by component; ``unet_path`` swaps in a fine-tuned UNet."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import AutoTokenizer, CLIPTextModel

    path = Path(path)
    check_sd_folder(path)
    unet, unet_dir = load_unet(path, unet_path, dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")  # the paper samples with DDIM
    folders = (path, unet_dir) if unet_path else (path,)
    return StableDiffusionModel(unet, vae, text_encoder, tokenizer, scheduler, str(path), device, dtype, folders)

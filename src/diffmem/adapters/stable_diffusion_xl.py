"""Adapter for Stable Diffusion XL folders in the diffusers layout.

    model_index.json  unet/  vae/  text_encoder/  text_encoder_2/  tokenizer/  tokenizer_2/  scheduler/

The components are loaded one by one (no pipeline object) and sampled with DDIM (the folder's
scheduler config, usually SDXL's Euler one, turned into DDIM by ``sampling_scheduler``).

How SDXL's conditioning maps onto ``diffmem.model.Conditioning``:

- ``embeddings`` (B, 77, D1 + D2): the penultimate hidden states of ``text_encoder`` (CLIP ViT-L,
  D1 = 768) and ``text_encoder_2`` (OpenCLIP bigG, D2 = 1280), concatenated along the feature axis,
  as ``StableDiffusionXLPipeline.encode_prompt`` builds them (no clip skip). Both tokenizers see the
  same prompt; row j of the embeddings is token position j of both encoders.
- ``extra["text_embeds"]`` (B, P): the pooled, projected output of ``text_encoder_2``.
- ``extra["time_ids"]`` (B, 6): original size, crop top-left and target size, with original size =
  target size = (image_size, image_size) and crop (0, 0), the pipeline's defaults.

The unconditional branch (``empty_conditioning``) is what ``StableDiffusionXLPipeline`` uses with no
negative prompt: all zeros for the token embeddings and the pooled embedding when the folder's
``model_index.json`` sets ``force_zeros_for_empty_prompt`` (the default, and SDXL base's setting),
else the encoded empty prompt; its time ids are the conditional branch's. So d = ||eps_c - eps_u||
is measured against the zero conditioning on SDXL base.

Tokens, explanation and mitigation:

- ``tokens``/``count_tokens`` use the first tokenizer: ``diffmem explain`` lists its 77 positions.
  The second tokenizer splits text the same way (same BPE vocabulary), only its padding token may
  differ, so position j names the same word in both encoders.
- Token significance is the gradient of d with respect to a position's row of ``embeddings``, i.e.
  the concatenated (D1 + D2) vector: it covers both encoders' hidden states of that token.
- Embedding optimization moves ``embeddings`` only (start token excepted); the pooled embedding and
  the time ids stay those of the original prompt.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, load_unet, sampling_scheduler
from diffmem.adapters.stable_diffusion import check_folder, clip_tokens
from diffmem.model import Conditioning, ModelDefaults, NullConditioning, Token

FAMILY = "stable-diffusion-xl"
SDXL_COMPONENTS = ("unet", "vae", "text_encoder", "text_encoder_2", "tokenizer", "tokenizer_2", "scheduler")
SDXL_DEFAULT_GUIDANCE = 5.0  # StableDiffusionXLPipeline's default guidance_scale


def _model_index(path: Path) -> dict:
    """The folder's model_index.json, or {} when it is missing or unreadable."""
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def is_sdxl_folder(path: Path) -> bool:
    """Whether `path`'s model_index.json names an SDXL pipeline class (``_class_name`` containing "XL")."""
    name = _model_index(path).get("_class_name", "")
    return isinstance(name, str) and "XL" in name


def check_sdxl_folder(path: Path) -> None:
    """Raise a clear error naming what a Stable Diffusion XL folder lacks."""
    check_folder(path, SDXL_COMPONENTS, "Stable Diffusion XL text-to-image",
                 "; refiner folders without text_encoder/ are not supported")


def _force_zeros_for_empty_prompt(path: Path) -> bool:
    """The pipeline's ``force_zeros_for_empty_prompt`` from model_index.json (diffusers' default: True)."""
    return bool(_model_index(path).get("force_zeros_for_empty_prompt", True))


class StableDiffusionXLModel(AdapterBase):
    """A Stable Diffusion XL model behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = FAMILY
    frozen_token_positions = (0,)  # the start token: the same hidden state in both encoders for every prompt

    def __init__(self, unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler, name: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 folders: tuple[Path, ...] = (), force_zeros_for_empty_prompt: bool = True):
        self.name = name
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype

        def place(m, to_dtype=dtype):
            m = m.to(self.device) if m.dtype == to_dtype else m.to(self.device, to_dtype)
            return m.eval().requires_grad_(False)

        self.denoiser, self.text_encoder, self.text_encoder_2 = place(unet), place(text_encoder), place(text_encoder_2)
        # SDXL's VAE overflows in float16 (its config sets force_upcast): keep it in float32 then, as the
        # pipeline does when it decodes.
        upcast = dtype == torch.float16 and bool(getattr(vae.config, "force_upcast", False))
        self.vae_dtype = torch.float32 if upcast else dtype
        self.vae = place(vae, self.vae_dtype)
        self.tokenizer, self.tokenizer_2 = tokenizer, tokenizer_2
        self.scheduler, self.prediction_type = sampling_scheduler(scheduler)
        self.force_zeros_for_empty_prompt = bool(force_zeros_for_empty_prompt)

        self.max_tokens = tokenizer.model_max_length
        if tokenizer_2.model_max_length != self.max_tokens:
            raise ValueError(f"{name}: the tokenizers' lengths differ ({self.max_tokens} and "
                             f"{tokenizer_2.model_max_length}); SDXL concatenates the two encoders token by token")
        self._check_dims()
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        size = self.denoiser.config.sample_size
        self.latent_shape = (self.denoiser.config.in_channels, size, size)
        self.image_size = size * vae_scale_factor
        self.defaults = ModelDefaults(guidance_scale=SDXL_DEFAULT_GUIDANCE)  # lr, iterations, target: SD's

    def _check_dims(self) -> None:
        """The encoders' widths must be what the UNet reads (the pipeline checks the added-embedding width)."""
        cfg = self.denoiser.config
        width = self.text_encoder.config.hidden_size + self.text_encoder_2.config.hidden_size
        if cfg.cross_attention_dim != width:
            raise ValueError(f"{self.name}: the UNet's cross_attention_dim is {cfg.cross_attention_dim} but the text "
                             f"encoders' hidden sizes add up to {width}")
        if cfg.addition_embed_type != "text_time":
            raise ValueError(f"{self.name}: the UNet's addition_embed_type is {cfg.addition_embed_type!r}; "
                             "an SDXL UNet has 'text_time'")
        passed = cfg.addition_time_embed_dim * 6 + self.text_encoder_2.config.projection_dim
        expected = self.denoiser.add_embedding.linear_1.in_features
        if passed != expected:
            raise ValueError(f"{self.name}: the UNet expects an added embedding of width {expected}, but 6 time ids "
                             f"and text_encoder_2's projection give {passed}")

    # -- prompts -----------------------------------------------------------------------------
    def _input_ids(self, prompts: list[str], tokenizer=None):
        return (tokenizer or self.tokenizer)(list(prompts), padding="max_length", max_length=self.max_tokens,
                                             truncation=True, return_tensors="pt").input_ids

    def time_ids(self, n: int) -> torch.Tensor:
        """(n, 6): original size, crop top-left, target size; (S, S), (0, 0), (S, S) with S = image_size."""
        s = self.image_size
        return torch.tensor([[s, s, 0, 0, s, s]], dtype=self.dtype, device=self.device).expand(n, 6).clone()

    @torch.no_grad()
    def _encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(token embeddings (B, T, D1 + D2), pooled (B, P)) of both encoders' penultimate layers."""
        hidden = []
        out = None
        for tok, enc in ((self.tokenizer, self.text_encoder), (self.tokenizer_2, self.text_encoder_2)):
            out = enc(self._input_ids(prompts, tok).to(self.device), output_hidden_states=True)
            hidden.append(out.hidden_states[-2])
        pooled = out.text_embeds  # text_encoder_2's projected pooled output
        return torch.cat(hidden, dim=-1).to(self.dtype), pooled.to(self.dtype)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        embeddings, pooled = self._encode(prompts)
        return Conditioning(embeddings, {"text_embeds": pooled, "time_ids": self.time_ids(len(prompts))})

    def default_null(self) -> NullConditioning:
        """The pipeline's null with no negative prompt: zeros (token and pooled embeddings) under
        ``force_zeros_for_empty_prompt``, else the encoded ``""``; the time ids are the prompt's."""
        if not self.force_zeros_for_empty_prompt:
            return super().default_null()
        zeros = lambda *shape: torch.zeros(shape, dtype=self.dtype, device=self.device)
        return NullConditioning("zeros", Conditioning(
            zeros(1, self.max_tokens, self.denoiser.config.cross_attention_dim),
            {"text_embeds": zeros(1, self.text_encoder_2.config.projection_dim), "time_ids": self.time_ids(1)}))

    def tokens(self, prompt: str) -> list[Token]:
        return clip_tokens(self.tokenizer, prompt, self.max_tokens)

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)

    # -- images ------------------------------------------------------------------------------
    def _latent_stats(self, like: torch.Tensor):
        """The VAE's per-channel latents mean and std when its config has them (else None, None)."""
        mean, std = getattr(self.vae.config, "latents_mean", None), getattr(self.vae.config, "latents_std", None)
        if mean is None or std is None:
            return None, None
        shape = (1, len(mean), 1, 1)
        return (torch.tensor(mean, device=like.device, dtype=like.dtype).view(shape),
                torch.tensor(std, device=like.device, dtype=like.dtype).view(shape))

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        z = latents.to(self.vae_dtype)
        mean, std = self._latent_stats(z)
        z = z / self.vae.config.scaling_factor if mean is None else z * std / self.vae.config.scaling_factor + mean
        images = self.vae.decode(z, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        z = self.vae.encode(images.to(self.vae_dtype)).latent_dist.sample(generator=generator)
        mean, std = self._latent_stats(z)
        z = z * self.vae.config.scaling_factor if mean is None else (z - mean) * self.vae.config.scaling_factor / std
        return z.to(self.dtype)


def load_stable_diffusion_xl(path: str | Path, unet_path: str | Path | None = None, device="cpu",
                             dtype=torch.float32) -> StableDiffusionXLModel:
    """Load an SDXL folder component by component; ``unet_path`` swaps in a fine-tuned UNet."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import AutoTokenizer, CLIPTextModel, CLIPTextModelWithProjection

    path = Path(path)
    check_sdxl_folder(path)
    unet, unet_dir = load_unet(path, unet_path, dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    text_encoder_2 = CLIPTextModelWithProjection.from_pretrained(path / "text_encoder_2", torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    tokenizer_2 = AutoTokenizer.from_pretrained(path / "tokenizer_2")
    # The folder's scheduler config (SDXL ships Euler's) read as DDIM: same betas and spacing.
    scheduler = DDIMScheduler.from_config(DDIMScheduler.load_config(path / "scheduler"))
    folders = (path, unet_dir) if unet_path else (path,)
    return StableDiffusionXLModel(unet, vae, text_encoder, text_encoder_2, tokenizer, tokenizer_2, scheduler,
                                  str(path), device, dtype, folders,
                                  force_zeros_for_empty_prompt=_force_zeros_for_empty_prompt(path))

"""Adapter for PixArt-alpha and PixArt-Sigma folders in the diffusers layout.

    model_index.json  transformer/  vae/  text_encoder/  tokenizer/  scheduler/

A diffusion transformer (``PixArtTransformer2DModel``) with real cross-attention on T5 token
embeddings, trained on epsilon with a learned variance (Chen et al. 2023, 2024). The components are
loaded one by one (no pipeline object). How PixArt maps onto ``diffmem.model``:

- ``Conditioning.embeddings`` (B, L, D): T5's last hidden state of the prompt, lower-cased and
  stripped as ``PixArtAlphaPipeline`` does without ``clean_caption``, padded to L =
  ``max_sequence_length`` (alpha: 120, Sigma: 300, the pipelines' defaults);
  ``Conditioning.mask`` (B, L): the tokenizer's attention mask, which the pipeline hands to T5 and
  to the transformer (``encoder_attention_mask``): padding is not attended to.
- ``model_output``/``predict_noise``: the first ``in_channels`` output channels, the noise; the other
  half is the learned variance, which the pipeline drops after guidance. Guidance is per channel,
  so dropping it before is the same: Wen's d is taken on the noise channels.
- The null (``default_null``, "empty-prompt"): T5("") with its own mask, the pipeline's negative
  prompt "". The original PixArt trained classifier-free guidance with a learned caption,
  ``y_embedding``, which the diffusers conversion discards (docs/FAMILIES, 2.3); give it with
  ``use_y_embedding`` to measure against the null the model was trained with.
- Sampling: DDIM from the folder's scheduler config (the pipelines ship DPM-Solver++), as the
  Stable Diffusion adapters do, so every verb's step-by-step methods run; latents equal
  ``PixArtAlphaPipeline``'s with that DDIM scheduler. ``clip_sample`` is off unless the config sets
  it (DDIM's default clips x0 to [-1, 1], which suits pixels, not latents).
- Micro-conditions (PixArt-alpha 1024: resolution and aspect ratio) are the square image's.
- T5 has no start token: embedding optimization may move every position.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, load_denoiser, sampling_scheduler
from diffmem.model import Conditioning, ModelDefaults, NullConditioning, Token

FAMILY = "pixart"
PIXART_COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
# pipeline class -> (its default guidance_scale, max_sequence_length)
PIPELINES = {"PixArtAlphaPipeline": (4.5, 120), "PixArtSigmaPipeline": (4.5, 300)}


def pipeline_class(path: Path) -> str | None:
    """The ``_class_name`` of `path`'s model_index.json when it names a PixArt pipeline, else None."""
    try:
        name = json.loads((Path(path) / "model_index.json").read_text()).get("_class_name")
    except (OSError, ValueError, AttributeError):
        return None
    return name if name in PIPELINES else None


def is_pixart_folder(path: Path) -> bool:
    return pipeline_class(path) is not None


def check_pixart_folder(path: Path) -> None:
    """Raise a clear error naming what a PixArt folder lacks."""
    listing = ", ".join(c + "/" for c in PIXART_COMPONENTS)
    for comp in PIXART_COMPONENTS:
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"{path}: component {comp}/ is missing (a PixArt folder needs {listing})")


class PixArtModel(AdapterBase):
    """A PixArt-alpha or -Sigma model behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = FAMILY
    frozen_token_positions = ()  # T5 has no start token

    def __init__(self, transformer, vae, text_encoder, tokenizer, scheduler, name: str, pipeline: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 folders: tuple[Path, ...] = ()):
        self.name = name
        self.pipeline = pipeline
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype
        place = lambda m: (m.to(self.device) if m.dtype == dtype else m.to(self.device, dtype)).eval().requires_grad_(False)
        self.denoiser, self.vae, self.text_encoder = place(transformer), place(vae), place(text_encoder)
        self.tokenizer = tokenizer
        self.scheduler, self.prediction_type = sampling_scheduler(scheduler)
        cfg = self.denoiser.config
        if cfg.caption_channels != self.text_encoder.config.d_model:
            raise ValueError(f"{name}: the transformer reads captions of width {cfg.caption_channels}, the text "
                             f"encoder's is {self.text_encoder.config.d_model}")
        self.learned_sigma = cfg.out_channels == 2 * cfg.in_channels
        vae_scale_factor = 2 ** (len(self.vae.config.block_out_channels) - 1)
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.image_size = cfg.sample_size * vae_scale_factor
        guidance, self.max_tokens = PIPELINES[pipeline]
        self.defaults = ModelDefaults(guidance_scale=guidance)  # lr, iterations, target: SD's

    # -- prompts -----------------------------------------------------------------------------
    def _inputs(self, prompts: list[str]):
        text = [p.lower().strip() for p in prompts]  # the pipeline's _text_preprocessing without clean_caption
        return self.tokenizer(text, padding="max_length", max_length=self.max_tokens, truncation=True,
                              add_special_tokens=True, return_tensors="pt")

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        enc = self._inputs(prompts)
        mask = enc.attention_mask.to(self.device)
        hidden = self.text_encoder(enc.input_ids.to(self.device), attention_mask=mask)[0]
        return Conditioning(hidden.to(self.dtype), mask=mask)

    def use_y_embedding(self, y_embedding: torch.Tensor, mask: torch.Tensor | None = None) -> None:
        """Measure against the original PixArt's learned null caption (``y_embedder.y_embedding`` of an
        original checkpoint, (L, D)), attending to every position unless `mask` (L,) says otherwise."""
        y = torch.as_tensor(y_embedding)
        if y.ndim != 2:
            raise ValueError(f"y_embedding of shape {tuple(y.shape)}: expected (tokens, width)")
        mask = torch.ones(len(y), dtype=torch.long) if mask is None else torch.as_tensor(mask).long()
        self.use_null(Conditioning(y[None], mask=mask[None].to(self.device)), "y_embedding")

    def tokens(self, prompt: str) -> list[Token]:
        enc = self._inputs([prompt])
        # special by position, as clip_tokens: T5 has no start token, its </s> sits at the mask's count - 1
        # (an <unk> of the prompt is an ordinary token); padding follows it
        end = int(enc.attention_mask[0].sum()) - 1
        text = lambda i: self.tokenizer.decode([i]).strip() or self.tokenizer.decode([i])  # a space stays a space
        return [Token(text(i) if m else self.tokenizer.pad_token, int(i), j >= end)
                for j, (i, m) in enumerate(zip(enc.input_ids[0].tolist(), enc.attention_mask[0].tolist()))]

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt.lower().strip()).input_ids)

    # -- the denoiser ------------------------------------------------------------------------
    def model_output(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        """The noise channels of the transformer's output at x_t (B, C, H, W) and timestep t (scalar or (B,))."""
        B = len(x_t)
        t = torch.as_tensor(t, device=x_t.device)
        t = (t[None] if t.ndim == 0 else t).expand(B)
        net = denoiser or self.denoiser
        micro = {"resolution": None, "aspect_ratio": None}
        if getattr(net, "use_additional_conditions", False):  # PixArt-alpha 1024: the image's size and shape
            s = float(self.image_size)
            micro = {"resolution": torch.tensor([[s, s]], dtype=x_t.dtype, device=x_t.device).expand(B, 2),
                     "aspect_ratio": torch.ones(B, 1, dtype=x_t.dtype, device=x_t.device)}
        out = net(x_t, encoder_hidden_states=cond.embeddings, encoder_attention_mask=cond.mask, timestep=t,
                  added_cond_kwargs=micro, return_dict=False)[0]
        return out[:, :self.latent_shape[0]] if self.learned_sigma else out  # (B, C, H, W): the variance dropped

    # -- images ------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        images = self.vae.decode(latents.to(self.vae.dtype) / self.vae.config.scaling_factor, return_dict=False)[0]
        return (images.float() / 2 + 0.5).clamp(0, 1)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        dist = self.vae.encode(images.to(self.vae.dtype)).latent_dist
        return dist.sample(generator=generator) * self.vae.config.scaling_factor

    def save(self, path: str | Path, denoiser=None) -> None:
        """Write the (fine-tuned) transformer as ``path/transformer``, loadable with ``--unet path/transformer``."""
        (denoiser if denoiser is not None else self.denoiser).save_pretrained(Path(path) / "transformer",
                                                                              safe_serialization=True)


def load_pixart(path: str | Path, transformer_path: str | Path | None = None, device="cpu",
                dtype=torch.float32) -> PixArtModel:
    """Load a PixArt-alpha/Sigma folder component by component; ``transformer_path`` swaps in a fine-tuned
    transformer."""
    from diffusers import AutoencoderKL, DDIMScheduler
    from transformers import AutoTokenizer, T5EncoderModel

    path = Path(path)
    pipeline = pipeline_class(path)
    if pipeline is None:
        raise ValueError(f"{path}: model_index.json names no PixArt pipeline (expected one of {', '.join(PIPELINES)})")
    check_pixart_folder(path)
    transformer, where = load_denoiser(path, transformer_path, "PixArtTransformer2DModel", "transformer", dtype)
    vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=dtype)
    text_encoder = T5EncoderModel.from_pretrained(path / "text_encoder", torch_dtype=dtype)
    tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
    config = DDIMScheduler.load_config(path / "scheduler")  # DPM-Solver's, read as DDIM: the same betas
    scheduler = DDIMScheduler.from_config(config, clip_sample=bool(config.get("clip_sample", False)))
    folders = (path, where) if transformer_path else (path,)
    return PixArtModel(transformer, vae, text_encoder, tokenizer, scheduler, str(path), pipeline, device, dtype, folders)

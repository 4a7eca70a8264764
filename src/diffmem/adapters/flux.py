"""Adapter for FLUX.1 folders in the diffusers layout (``FluxPipeline``): dev (guidance-distilled) and
schnell (timestep-distilled).

    model_index.json  transformer/  vae/  scheduler/
    text_encoder/  tokenizer/      CLIP-L (CLIPTextModel: its pooled output only)
    text_encoder_2/  tokenizer_2/  T5 (the token sequence the transformer reads)

A rectified-flow transformer (``FluxTransformer2DModel``: double- and single-stream blocks, rotary
positions) predicting the velocity v = eps - x0 at x_sigma = (1 - sigma) x0 + sigma eps. How FLUX maps
onto ``diffmem.model``:

- Latents stay unpacked in the pass, (B, C, H, W) with C = in_channels / 4, drawn as the pipeline draws
  them; ``model_output`` packs them into 2x2 patches (B, HW/4, 4C) with their image ids, calls the
  transformer and unpacks its output, so the Euler updates equal the pipeline's on its packed latents.
- ``Conditioning.embeddings`` (B, L, D): T5's last hidden state, unmasked, L = ``max_sequence_length``
  (512, the pipeline's default; 256 on schnell, whose docs cap it there); ``extra["pooled_projections"]``
  (B, P): CLIP's pooled output. Text ids are zeros, as in the pipeline.
- Guidance. The pipeline has no unconditional branch by default: dev takes a distilled guidance value
  ``g`` as an input of the transformer (``distilled_guidance``, the pipeline's ``guidance_scale``, 3.5),
  schnell none. The pass's classifier-free guidance is the pipeline's "true CFG" (``true_cfg_scale``,
  default 1: off), with the null "empty-prompt" (T5 and CLIP of ``""``, the pipeline's negative
  branch for ``negative_prompt=""``), both branches at the same ``g``. At the default w = 1 the pass
  steps on ``v_u + (v_c - v_u)``, the conditional velocity up to rounding.
- Wen's d is ``d_null = ||v(x, c, g) - v(x, null, g)||`` on the velocity, as on every flow model. dev's
  other estimator, the guidance derivative ``d_g``, is the ``flux-guidance`` detector. On schnell only
  d_null exists, and it is experimental (nothing ties a timestep-distilled model's null branch to
  memorization yet).
- Timesteps: the scheduler's sigma * 1000; the transformer receives sigma (t / 1000), as the pipeline
  passes it. The schedule is the pipeline's: sigmas linspace(1, 1/N, N), shifted with mu from the
  packed sequence length (``linspace_sigmas``).
- Images: latents / scaling_factor + shift_factor through the VAE.
- Tokens (explanations): T5's pieces, the end token and padding special; CLIP's pooled embedding is
  not attributed to tokens.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, LazyVAE, TransformerVAE, load_denoiser
from diffmem.adapters.flow import FlowMatching, flow_sampling_scheduler
from diffmem.model import Conditioning, ModelDefaults, Token

FAMILY = "flux"
PIPELINES = ("FluxPipeline",)
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
DISTILLED_GUIDANCE = 3.5  # FluxPipeline's default guidance_scale, fed to dev's guidance embedding
T5_LENGTH = {True: 512, False: 256}  # max_sequence_length: dev (guidance_embeds) and schnell


def is_flux_folder(path: Path) -> bool:
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return False
    return isinstance(index, dict) and index.get("_class_name") in PIPELINES


def pack(latents: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B, H/2 * W/2, 4C): 2x2 patches, channel-major inside a patch (the pipeline's
    ``_pack_latents``)."""
    B, C, H, W = latents.shape
    x = latents.reshape(B, C, H // 2, 2, W // 2, 2).permute(0, 2, 4, 1, 3, 5)
    return x.reshape(B, (H // 2) * (W // 2), C * 4)


def unpack(packed: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The inverse of ``pack``: (B, H/2 * W/2, 4C) -> (B, C, H, W)."""
    B, _, D = packed.shape
    x = packed.reshape(B, height // 2, width // 2, D // 4, 2, 2).permute(0, 3, 1, 4, 2, 5)
    return x.reshape(B, D // 4, height, width)


def image_ids(height: int, width: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """(H/2 * W/2, 3) the packed latent's position ids: (0, row, column) per patch."""
    ids = torch.zeros(height // 2, width // 2, 3)
    ids[..., 1] += torch.arange(height // 2)[:, None]
    ids[..., 2] += torch.arange(width // 2)[None, :]
    return ids.reshape(-1, 3).to(device=device, dtype=dtype)


class FluxModel(FlowMatching, TransformerVAE, AdapterBase):
    """A FLUX.1 model (dev or schnell) behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = FAMILY
    prediction_type = "flow"

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config: dict, name: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, folders: tuple[Path, ...] = (),
                 max_sequence_length: int | None = None, distilled_guidance: float = DISTILLED_GUIDANCE,
                 offload_text_encoders: bool = False):
        """text_encoders, tokenizers: (CLIP, T5); vae a module or a ``LazyVAE``. Images are the VAE's
        ``sample_size`` (1024 on FLUX.1), latents (C, 2 * (size // (2 * vae_scale)), ...) as the pipeline
        computes them."""
        self.name = name
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype
        place = lambda m: (m.to(self.device) if m.dtype == dtype else m.to(self.device, dtype)).eval().requires_grad_(False)
        self.denoiser = place(transformer)
        self._place_components(vae, text_encoders, place, offload_text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.tokenizer = self.tokenizers[1]  # the T5 tokens are the sequence the transformer reads
        cfg = self.denoiser.config
        self.guidance_embeds = bool(cfg.guidance_embeds)
        self.distilled_guidance = distilled_guidance if self.guidance_embeds else None
        self.variant = "dev" if self.guidance_embeds else "schnell"
        self.max_tokens = max_sequence_length or T5_LENGTH[self.guidance_embeds]
        if self.text_encoders[1].config.d_model != cfg.joint_attention_dim:
            raise ValueError(f"{name}: the transformer reads text tokens of width {cfg.joint_attention_dim}, T5's "
                             f"is {self.text_encoders[1].config.d_model}")
        if self.text_encoders[0].config.hidden_size != cfg.pooled_projection_dim:
            raise ValueError(f"{name}: CLIP's pooled output is {self.text_encoders[0].config.hidden_size} wide, the "
                             f"transformer's pooled input {cfg.pooled_projection_dim}")
        vae_scale_factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        side = 2 * (int(self.vae_config.sample_size) // (vae_scale_factor * 2))  # the VAE's resolution (1024 on FLUX.1)
        self.latent_shape = (cfg.in_channels // 4, side, side)
        self.image_size = side * vae_scale_factor
        self.scheduler = flow_sampling_scheduler(scheduler_config, (side // 2) ** 2)
        self.scheduler.linspace_sigmas = True  # the pipeline's sigmas: linspace(1, 1/N, N), then shifted
        self.frozen_token_positions = ()  # T5 has no start token; every position may move
        self.defaults = ModelDefaults(guidance_scale=1.0, target_loss=None)  # true CFG off, as the pipeline

    # -- prompts -----------------------------------------------------------------------------
    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        clip_tok, t5_tok = self.tokenizers
        with self.encoders_on_device():
            ids = clip_tok(prompts, padding="max_length", max_length=clip_tok.model_max_length, truncation=True,
                           return_tensors="pt").input_ids.to(self.device)
            pooled = self.text_encoders[0](ids, output_hidden_states=False).pooler_output
            ids = t5_tok(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                         return_tensors="pt").input_ids.to(self.device)
            t5 = self.text_encoders[1](ids, output_hidden_states=False)[0]
        return Conditioning(t5.to(self.dtype), {"pooled_projections": pooled.to(self.dtype)})

    def tokens(self, prompt: str) -> list[Token]:
        """T5's tokens padded to ``max_tokens``: the end token and the padding after it special."""
        enc = self.tokenizer(prompt, padding="max_length", max_length=self.max_tokens, truncation=True)
        end = sum(enc.attention_mask) - 1
        text = lambda i: self.tokenizer.decode([i]).strip() or self.tokenizer.decode([i])
        return [Token(text(i) if j < end else self.tokenizer.convert_ids_to_tokens(int(i)), int(i), j >= end)
                for j, i in enumerate(enc.input_ids)]

    def count_tokens(self, prompt: str) -> int:
        return len(self.tokenizer(prompt).input_ids)

    # -- the denoiser ------------------------------------------------------------------------
    def model_output(self, x_t, t, cond: Conditioning, denoiser=None, guidance: float | None = None) -> torch.Tensor:
        """The velocity at unpacked latents x_t (B, C, H, W) and timestep t (sigma * 1000; scalar or (B,)),
        at the distilled guidance `guidance` (dev; default ``distilled_guidance``)."""
        B, _, H, W = x_t.shape
        t = torch.as_tensor(t, device=x_t.device)
        t = (t[None] if t.ndim == 0 else t).expand(B).to(x_t.dtype)
        g = None
        if self.guidance_embeds:
            value = self.distilled_guidance if guidance is None else guidance
            g = torch.full([1], value, device=x_t.device, dtype=torch.float32).expand(B)
        elif guidance is not None:
            raise ValueError(f"{self.name} is FLUX.1-schnell-like (no guidance embedding): no distilled guidance to set")
        txt_ids = torch.zeros(cond.embeddings.shape[1], 3, device=x_t.device, dtype=x_t.dtype)
        out = (denoiser or self.denoiser)(hidden_states=pack(x_t), timestep=t / 1000, guidance=g,
                                          pooled_projections=cond.extra["pooled_projections"],
                                          encoder_hidden_states=cond.embeddings, txt_ids=txt_ids,
                                          img_ids=image_ids(H, W, x_t.device, x_t.dtype), return_dict=False)[0]
        return unpack(out, H, W)

    def identity(self) -> dict:
        out = super().identity()
        out["variant"] = self.variant
        if self.distilled_guidance is not None:
            out["distilled_guidance"] = self.distilled_guidance
        return out


def load_flux(path: str | Path, transformer_path: str | Path | None = None, device="cpu",
              dtype=torch.float32, offload: str = "none") -> FluxModel:
    """Load a FLUX.1 folder component by component; ``transformer_path`` swaps in a fine-tuned transformer.
    The VAE is read on its first use; ``offload="text-encoders"`` keeps the text encoders on the CPU
    between encodings."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModel, T5EncoderModel

    path = Path(path)
    if not is_flux_folder(path):
        raise ValueError(f"{path}: model_index.json names no FLUX pipeline (expected {PIPELINES[0]})")
    listing = ", ".join(c + "/" for c in REQUIRED)
    for comp in REQUIRED:
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"{path}: component {comp}/ is missing (a FLUX.1 folder needs {listing})")
    transformer, where = load_denoiser(path, transformer_path, "FluxTransformer2DModel", "transformer", dtype)
    vae = LazyVAE(path / "vae", dtype)
    encoders = (CLIPTextModel.from_pretrained(path / "text_encoder", torch_dtype=dtype),
                T5EncoderModel.from_pretrained(path / "text_encoder_2", torch_dtype=dtype))
    tokenizers = tuple(AutoTokenizer.from_pretrained(path / sub) for sub in ("tokenizer", "tokenizer_2"))
    config = FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler")
    folders = (path, where) if transformer_path else (path,)
    return FluxModel(transformer, vae, encoders, tokenizers, config, str(path), device, dtype, folders,
                     offload_text_encoders=offload == "text-encoders")

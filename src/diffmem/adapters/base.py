"""What every adapter shares: the noise/velocity conversion, the training target, the named null
conditioning and the model's identity. Family files add prompts, images and saving."""

from __future__ import annotations

import hashlib
from contextlib import contextmanager
from pathlib import Path

import torch

from diffmem.model import (PREDICTION_TYPES, Conditioning, ModelDefaults, NullConditioning,
                           noise_from_model_output, sampler_prediction, training_target)

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".ckpt")


def sampling_scheduler(scheduler):
    """(a DDIM scheduler in epsilon mode for sampling, the denoiser's prediction type) from a model's scheduler.

    predict_noise always hands the sampler noise, so the sampler's DDIM runs on epsilon; its update
    equals DDIM on the raw output in the native mode.
    """
    from diffusers import DDIMScheduler

    prediction_type = scheduler.config.get("prediction_type", "epsilon")
    if prediction_type not in PREDICTION_TYPES or prediction_type == "flow":
        raise ValueError(f"scheduler prediction_type {prediction_type!r} is not supported: expected one of "
                         f"{', '.join(PREDICTION_TYPES[:2])} (DDIM)")
    return DDIMScheduler.from_config(scheduler.config, prediction_type="epsilon"), prediction_type


def load_denoiser(folder: Path, denoiser_path: str | Path | None, class_name: str, subfolder: str,
                  dtype: torch.dtype):
    """(denoiser, its folder): the diffusers `class_name` in ``folder/subfolder``, or the fine-tuned
    `denoiser_path` (``--unet``) instead."""
    import diffusers

    where = Path(denoiser_path) if denoiser_path else Path(folder) / subfolder
    if not (where / "config.json").is_file():
        raise FileNotFoundError(f"--unet {where}: no config.json; expected a diffusers {class_name} folder")
    return getattr(diffusers, class_name).from_pretrained(where, torch_dtype=dtype), where


def load_unet(folder: Path, unet_path: str | Path | None, dtype: torch.dtype):
    """(UNet, its folder): ``folder/unet`` or the fine-tuned `unet_path` (``--unet``)."""
    return load_denoiser(folder, unet_path, "UNet2DConditionModel", "unet", dtype)


def vae_decode(vae, latents: torch.Tensor) -> torch.Tensor:
    """Images (B, 3, H, W) in [0, 1] from latents scaled as the SD3/FLUX pipelines scale them:
    z = latents / scaling_factor + shift_factor."""
    c = vae.config
    z = latents.to(vae.dtype) / c.scaling_factor + (c.shift_factor or 0.0)
    return (vae.decode(z, return_dict=False)[0].float() / 2 + 0.5).clamp(0, 1)


def vae_encode(vae, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
    """Latents (z - shift_factor) * scaling_factor of images (B, 3, H, W) in [-1, 1], z sampled."""
    c = vae.config
    z = vae.encode(images.to(vae.dtype)).latent_dist.sample(generator=generator)
    return (z - (c.shift_factor or 0.0)) * c.scaling_factor


OFFLOAD = ("none", "text-encoders")


class LazyVAE:
    """A diffusers ``AutoencoderKL`` folder read only when first used: its ``config`` (attribute access)
    is at hand without the weights, so that detection, which decodes nothing, never loads them."""

    def __init__(self, folder: str | Path, dtype: torch.dtype):
        from types import SimpleNamespace

        from diffusers import AutoencoderKL

        self.folder, self.dtype = Path(folder), dtype
        self.config = SimpleNamespace(**AutoencoderKL.load_config(self.folder))

    def load(self) -> torch.nn.Module:
        from diffusers import AutoencoderKL

        return AutoencoderKL.from_pretrained(self.folder, torch_dtype=self.dtype)


class TransformerVAE:
    """Mixin (before ``AdapterBase``) for the transformer families whose VAE latents are scaled and shifted
    (SD3, FLUX): images through ``vae_decode``/``vae_encode``, a fine-tuned denoiser saved as ``transformer/``.

    The memory plan of the large models: the VAE may be a ``LazyVAE`` (loaded on the first decode or
    encode), and with ``offload_text_encoders`` the text encoders stay on the CPU and visit the model's
    device only while they encode (``encoders_on_device``)."""

    denoiser: torch.nn.Module
    text_encoders: tuple
    offload_text_encoders: bool = False

    def _place_components(self, vae, text_encoders, place, offload_text_encoders: bool = False) -> None:
        """Put the VAE (a module, or a LazyVAE left unloaded) and the text encoders (on the CPU when
        offloaded) where they live; `place` moves a module to the model's device and dtype."""
        self._vae_source, self._place_vae = vae, place
        self._vae = None if isinstance(vae, LazyVAE) else place(vae)
        self.offload_text_encoders = offload_text_encoders
        keep = (lambda m: m.to("cpu", self.dtype).eval().requires_grad_(False)) if offload_text_encoders else place
        self.text_encoders = tuple(None if m is None else keep(m) for m in text_encoders)

    @property
    def vae(self) -> torch.nn.Module:
        if self._vae is None:
            self._vae = self._place_vae(self._vae_source.load())
        return self._vae

    @property
    def vae_loaded(self) -> bool:
        return self._vae is not None

    @property
    def vae_config(self):
        return self._vae_source.config if self._vae is None else self._vae.config

    @contextmanager
    def encoders_on_device(self):
        """``with model.encoders_on_device(): ...``: the text encoders on the model's device inside the block,
        back on the CPU after it when offloaded (then the device's cache is emptied)."""
        if not self.offload_text_encoders:
            yield
            return
        present = [m for m in self.text_encoders if m is not None]
        for m in present:
            m.to(self.device)
        try:
            yield
        finally:
            for m in present:
                m.to("cpu")
            if self.device.type == "cuda":
                torch.cuda.empty_cache()

    @torch.no_grad()
    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return vae_decode(self.vae, latents)

    @torch.no_grad()
    def encode_images(self, images: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        return vae_encode(self.vae, images, generator)

    def save(self, path: str | Path, denoiser=None) -> None:
        """Write the (fine-tuned) transformer as ``path/transformer``, loadable with ``--unet path/transformer``."""
        (denoiser if denoiser is not None else self.denoiser).save_pretrained(Path(path) / "transformer",
                                                                              safe_serialization=True)


class AdapterBase:
    """Shared members of the adapters; subclasses set name, family, device, dtype, denoiser, scheduler,
    prediction_type, defaults and folders, and implement ``encode_prompts`` (and ``default_null``
    where the family's unconditional branch is not the encoded empty prompt)."""

    name: str
    family: str
    device: torch.device
    dtype: torch.dtype
    denoiser: torch.nn.Module
    scheduler: object
    prediction_type: str
    defaults: ModelDefaults
    folders: tuple[Path, ...] = ()  # where the weights came from (identity)
    frozen_token_positions: tuple[int, ...] = (0,)  # the start token: its embedding is the same for every prompt
    _null: NullConditioning | None = None
    _alphas: torch.Tensor | None = None

    @property
    def unet(self) -> torch.nn.Module:
        """The denoiser, under the name the UNet families' code (attention maps, NeMo) knows it by."""
        return self.denoiser

    @unet.setter
    def unet(self, module: torch.nn.Module) -> None:
        self.denoiser = module

    @property
    def default_guidance_scale(self) -> float:
        return self.defaults.guidance_scale

    @property
    def sampler_prediction(self) -> str:
        return sampler_prediction(self.prediction_type)

    def encode_prompts(self, prompts: list[str]) -> Conditioning:  # pragma: no cover - per family
        raise NotImplementedError

    # -- the unconditional branch ------------------------------------------------------------
    def default_null(self) -> NullConditioning:
        """The family pipeline's unconditional branch with no negative prompt: the encoded ``""``."""
        return NullConditioning("empty-prompt", self.encode_prompts([""]))

    @property
    def null(self) -> NullConditioning:
        if self._null is None:
            self._null = self.default_null()
        return self._null

    def use_null(self, conditioning: Conditioning, name: str) -> None:
        """Measure and sample against `conditioning` (one row, shaped like an encoded prompt's), recorded
        under `name` in the model's identity. A mask of ones is dropped on a family without token masks."""
        like = self.null.conditioning
        if like.mask is None and conditioning.mask is not None and bool((conditioning.mask != 0).all()):
            conditioning = Conditioning(conditioning.embeddings, dict(conditioning.extra))
        if conditioning.embeddings.shape[1:] != like.embeddings.shape[1:]:
            raise ValueError(f"null conditioning {name!r}: embeddings of shape {tuple(conditioning.embeddings.shape[1:])}, "
                             f"{self.name} encodes prompts as {tuple(like.embeddings.shape[1:])}")
        if set(conditioning.extra) != set(like.extra) or (conditioning.mask is None) != (like.mask is None):
            raise ValueError(f"null conditioning {name!r}: it has extras {sorted(conditioning.extra)} and "
                             f"{'a' if conditioning.mask is not None else 'no'} token mask; {self.name}'s conditioning "
                             f"has {sorted(like.extra)} and {'a' if like.mask is not None else 'no'} token mask")
        self._null = NullConditioning(name, conditioning.to(self.device, self.dtype))

    def empty_conditioning(self) -> Conditioning:
        return self.null.conditioning

    # -- the denoiser ------------------------------------------------------------------------
    def model_output(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        extra = cond.extra or None
        return (denoiser or self.denoiser)(x_t, t, encoder_hidden_states=cond.embeddings, added_cond_kwargs=extra,
                                           return_dict=False)[0]

    def alpha_bar(self, t) -> torch.Tensor:
        """alpha_bar_t of the training noise schedule, for an int / (B,) int timestep tensor."""
        if self._alphas is None or self._alphas.device != torch.device(self.device):
            self._alphas = self.scheduler.alphas_cumprod.to(self.device)
        return self._alphas[torch.as_tensor(t, device=self.device).long()]

    def output_to_noise(self, output: torch.Tensor, x_t: torch.Tensor, t) -> torch.Tensor:
        if self.prediction_type == "epsilon":
            return output
        return noise_from_model_output(output, x_t, self.alpha_bar(t), self.prediction_type).to(output.dtype)

    def predict_noise(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        return self.output_to_noise(self.model_output(x_t, t, cond, denoiser), x_t, t)

    def predict(self, x_t, t, cond: Conditioning, denoiser=None) -> torch.Tensor:
        """The noise: every adapter here samples with DDIM in epsilon mode (``sampling_scheduler``)."""
        return self.predict_noise(x_t, t, cond, denoiser)

    def training_target(self, x0, noise, t) -> torch.Tensor:
        alpha_bar = None if self.prediction_type == "flow" else self.alpha_bar(t)  # a flow target needs no schedule
        return training_target(x0, noise, alpha_bar, self.prediction_type).to(noise.dtype)

    def training_scheduler(self):
        from diffusers import DDPMScheduler

        return DDPMScheduler.from_config(self.scheduler.config, prediction_type=self.prediction_type)

    def save(self, path: str | Path, denoiser=None) -> None:
        """Write the (fine-tuned) UNet as ``path/unet``, loadable with ``--unet path/unet``."""
        (denoiser if denoiser is not None else self.denoiser).save_pretrained(Path(path) / "unet",
                                                                              safe_serialization=True)

    # -- data and identity -------------------------------------------------------------------
    def training_data(self):
        return None

    def identity(self) -> dict:
        h = hashlib.sha256()
        for folder in self.folders:
            for p in sorted(Path(folder).rglob("*")):
                if not p.is_file():
                    continue
                rel = p.relative_to(folder).as_posix()
                if p.suffix == ".json" or p.name.endswith(".txt") and p.stat().st_size < 1_000_000:
                    h.update(f"{rel}\n".encode() + p.read_bytes())
                elif p.suffix in WEIGHT_SUFFIXES:
                    h.update(f"{rel}\t{p.stat().st_size}\n".encode())
        loras = getattr(self, "loras", None)  # --lora files: name, sha256_16, scale
        return {"name": self.name, "family": self.family, "prediction_type": self.prediction_type,
                "null_conditioning": self.null.name, "sha256_16": h.hexdigest()[:16] if self.folders else None,
                **({"loras": loras} if loras else {})}

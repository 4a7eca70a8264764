"""The one model interface that all of diffmem's methods talk to.

An adapter (one file per model family under ``diffmem.adapters``) turns a concrete model into an
object with the members of ``DiffusionModel``. Detection, explanation, mitigation, training and
evaluation use only these; nothing outside ``diffmem.adapters`` probes a model's internals.

The conventions every model keeps:

- A model has a *denoiser* (``denoiser``: a UNet or a diffusion transformer) whose raw output is
  one of ``PREDICTION_TYPES``: the noise (``epsilon``), the velocity of v-prediction
  (``v_prediction``, Salimans & Ho 2022) or the flow-matching velocity ``v = eps - x0`` (``flow``,
  SD3/FLUX). ``model_output`` is that raw output (a learned-variance half dropped), what training
  regresses onto ``training_target``.
- ``predict`` is what classifier-free guidance combines and the sampler's scheduler steps on: the
  noise on epsilon and v_prediction models (``sampler_prediction`` "epsilon": DDIM's update from the
  converted noise equals its update from the raw velocity), the velocity on flow models ("flow").
  ``predict_noise`` is always the noise, so Wen's ``d = ||eps_c - eps_u||`` means the same on every
  epsilon-sampled family; a flow model refuses it at sigma = 1, where every noise difference is 0.
- Prompts become a ``Conditioning``: the token embeddings that cross-attention reads, the token mask
  of the families whose denoiser attends only to real tokens (PixArt), and any extra per-prompt
  tensors a family needs (SDXL: the pooled text embedding and the size/crop ids).
- The unconditional branch is a ``NullConditioning``: one conditioning row with a name (the
  pipeline's ``""``, SDXL's zeros, ...). The name is part of the model's ``identity``, so every
  result records which null its d was measured against; ``use_null`` supplies another one.
- A model carries its own defaults (``ModelDefaults``) where the paper's Stable Diffusion values
  do not fit it (the lab's guidance scale and embedding-optimization budget).
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol, runtime_checkable

import torch

PREDICTION_TYPES = ("epsilon", "v_prediction", "flow")  # what a denoiser outputs (the scheduler config's name)


@dataclass(frozen=True)
class Token:
    """One token of a prompt as the model's tokenizer splits it."""

    text: str  # decoded, readable
    token_id: int
    special: bool  # start/end/padding token


@dataclass
class Conditioning:
    """What the denoiser is conditioned on, for a batch of B rows.

    embeddings: (B, T, D) token embeddings (the keys and values of cross-attention);
    mask: (B, T) 1 for the tokens the denoiser attends to, 0 for padding, or None where it attends
    to all T (Stable Diffusion's UNet);
    extra: per-family tensors with the same leading B (SDXL: ``text_embeds`` (B, 1280) and
    ``time_ids`` (B, 6)). Embedding optimization and token significance act on ``embeddings``.
    """

    embeddings: torch.Tensor
    extra: dict[str, torch.Tensor] = field(default_factory=dict)
    mask: torch.Tensor | None = None

    def __len__(self) -> int:
        return len(self.embeddings)

    def _map(self, fn) -> "Conditioning":
        return Conditioning(fn(self.embeddings), {k: fn(v) for k, v in self.extra.items()},
                            None if self.mask is None else fn(self.mask))

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
        """The same mask and extra conditioning with other token embeddings (e.g. optimized ones)."""
        if embeddings.shape[0] != len(self):
            raise ValueError(f"embeddings for {embeddings.shape[0]} rows, conditioning has {len(self)}")
        return Conditioning(embeddings, dict(self.extra), self.mask)

    def where(self, rows: torch.Tensor, other: "Conditioning") -> "Conditioning":
        """Rows of `other` (one row, broadcast) where `rows` (B,) bool is set, this one's elsewhere."""
        def pick(x, o):
            return torch.where(rows.view(-1, *([1] * (x.ndim - 1))), o.to(x.device, x.dtype).expand_as(x), x)

        if (self.mask is None) != (other.mask is None):
            raise ValueError("cannot mix a conditioning with a token mask and one without")
        return Conditioning(pick(self.embeddings, other.embeddings),
                            {k: pick(v, other.extra[k]) for k, v in self.extra.items()},
                            None if self.mask is None else pick(self.mask, other.mask))

    @staticmethod
    def cat(parts: list["Conditioning"]) -> "Conditioning":
        keys = set(parts[0].extra)
        if any(set(p.extra) != keys for p in parts):
            raise ValueError(f"cannot concatenate conditionings with different extras: {[sorted(p.extra) for p in parts]}")
        masked = {p.mask is not None for p in parts}
        if len(masked) > 1:
            raise ValueError("cannot concatenate conditionings with a token mask and without one")
        return Conditioning(torch.cat([p.embeddings for p in parts]),
                            {k: torch.cat([p.extra[k] for p in parts]) for k in parts[0].extra},
                            torch.cat([p.mask for p in parts]) if masked == {True} else None)


@dataclass(frozen=True)
class NullConditioning:
    """The conditioning of the unconditional branch, by name.

    name: what it is, recorded with every result through the model's ``identity`` ("empty-prompt":
    the encoded ``""``, as the family's pipeline does with no negative prompt; "zeros": SDXL's
    ``force_zeros_for_empty_prompt``; a user-supplied null under its own name, e.g. "y_embedding");
    conditioning: one row, shaped like an encoded prompt's.
    """

    name: str
    conditioning: Conditioning

    def __post_init__(self):
        if not self.name or not isinstance(self.name, str):
            raise ValueError(f"a null conditioning needs a name, got {self.name!r}")
        if len(self.conditioning) != 1:
            raise ValueError(f"null conditioning {self.name!r}: expected one row, got {len(self.conditioning)}")


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


def sampler_prediction(prediction_type: str) -> str:
    """What guidance combines and the sampler steps on for a denoiser of `prediction_type`: "epsilon"
    (the noise; v_prediction outputs are converted) or "flow" (the velocity itself)."""
    check_prediction_type(prediction_type)
    return "flow" if prediction_type == "flow" else "epsilon"


def check_prediction_type(prediction_type: str) -> None:
    if prediction_type not in PREDICTION_TYPES:
        raise ValueError(f"prediction_type {prediction_type!r} is not supported: expected one of "
                         f"{', '.join(PREDICTION_TYPES)}")


def noise_from_model_output(output: torch.Tensor, x_t: torch.Tensor, alpha_bar_t: torch.Tensor,
                            prediction_type: str) -> torch.Tensor:
    """The noise prediction eps from a UNet output, for (B, C, H, W) tensors.

    epsilon: the output itself. v_prediction (Salimans & Ho 2022): v = sqrt(a) eps - sqrt(1-a) x0
    with x_t = sqrt(a) x0 + sqrt(1-a) eps gives eps = sqrt(a) v + sqrt(1-a) x_t, a = alpha_bar_t
    (a scalar or (B,)). So on v-models d_eps = sqrt(a) * ||v_c - v_u||. Flow models have no alpha_bar:
    ``noise_from_flow_velocity``.
    """
    if prediction_type == "epsilon":
        return output
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar_t, output)
        return a.sqrt() * output + (1 - a).sqrt() * x_t
    if prediction_type == "flow":
        raise ValueError("a flow model's noise comes from its sigma, not alpha_bar: use noise_from_flow_velocity")
    check_prediction_type(prediction_type)


def noise_from_flow_velocity(v: torch.Tensor, x_t: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """eps from a flow-matching velocity v = eps - x0 at x_t = (1 - sigma) x0 + sigma eps: eps = x_t + (1 - sigma) v.

    Refused at sigma = 1 (the start of every SD3/FLUX schedule): there eps = x_t whatever the
    prompt, so any difference of two noise predictions is identically 0 (docs: FAMILIES.md, sec. 1).
    """
    s = _per_sample(sigma, v)
    if bool((s >= 1).any()):
        raise ValueError("the noise prediction of a flow model at sigma = 1 equals x_t for every prompt "
                         "(its conditional and unconditional noise never differ there): measure the velocity, "
                         "or take the noise at a sigma below 1")
    return x_t + (1 - s) * v


def training_target(x0: torch.Tensor, noise: torch.Tensor, alpha_bar_t: torch.Tensor,
                    prediction_type: str) -> torch.Tensor:
    """What the denoiser output regresses onto in training, for (B, C, H, W) clean latents x0 and noise.

    epsilon: the noise; v_prediction: v = sqrt(a) eps - sqrt(1-a) x0, a = alpha_bar_t (B,), as
    diffusers' ``train_text_to_image.py`` takes it from ``scheduler.get_velocity``; flow: v = eps - x0
    (diffusers' ``train_dreambooth_sd3.py``), whatever the noise level.
    """
    if prediction_type == "epsilon":
        return noise
    if prediction_type == "v_prediction":
        a = _per_sample(alpha_bar_t, x0)
        return a.sqrt() * noise - (1 - a).sqrt() * x0
    if prediction_type == "flow":
        return noise - x0
    check_prediction_type(prediction_type)


def _per_sample(a: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    a = torch.as_tensor(a, device=like.device).to(torch.promote_types(like.dtype, torch.float32))
    return a.reshape(-1, *([1] * (like.ndim - 1))) if a.ndim else a


@runtime_checkable
class DiffusionModel(Protocol):
    name: str  # where it was loaded from
    family: str  # "lab", "stable-diffusion", "stable-diffusion-xl", "pixart", "stable-diffusion-3"
    device: torch.device
    dtype: torch.dtype
    denoiser: torch.nn.Module  # the network that denoises: a UNet or a diffusion transformer
    scheduler: object  # the sampler's diffusers scheduler (DDIM in epsilon mode on the epsilon-sampled families)
    prediction_type: str  # what the denoiser outputs: one of PREDICTION_TYPES
    sampler_prediction: str  # what guidance combines and the scheduler steps on: "epsilon" or "flow"
    null: NullConditioning  # the unconditional branch, by name
    latent_shape: tuple[int, int, int]  # (C, H, W) of one sample the denoiser denoises
    image_size: int  # side of the square images in pixels (decoded size)
    max_tokens: int  # tokenizer length limit; longer prompts are truncated
    tokenizer: object  # the (first) text tokenizer; random-word baselines draw from its vocabulary
    frozen_token_positions: tuple[int, ...]  # positions embedding optimization never moves (start token)
    defaults: ModelDefaults
    default_guidance_scale: float  # = defaults.guidance_scale

    def encode_prompts(self, prompts: list[str]) -> Conditioning:
        """Conditioning of B prompts, truncated to ``max_tokens``."""

    def empty_conditioning(self) -> Conditioning:
        """``null.conditioning``: the one-row conditioning of the unconditional branch."""

    def use_null(self, conditioning: Conditioning, name: str) -> None:
        """Measure and sample against another null conditioning (one row), recorded under `name`."""

    def predict(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """What guidance combines and the sampler steps on (``sampler_prediction``): (B, C, H, W)."""

    def predict_noise(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                      denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """eps(x_t, t, cond): (B, C, H, W); `denoiser` replaces the model's (a training copy)."""

    def model_output(self, x_t: torch.Tensor, t: torch.Tensor, cond: Conditioning,
                     denoiser: torch.nn.Module | None = None) -> torch.Tensor:
        """The denoiser's raw output (per ``prediction_type``; a learned variance dropped): what training regresses."""

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

    def save(self, path: str | Path, denoiser: torch.nn.Module | None = None) -> None:
        """Write the model (or its denoiser replaced by `denoiser`) so that ``--model``/``--unet`` loads it."""

    def training_data(self):
        """The model's own training data (``diffmem.lab.data.LabData`` for lab models), else None."""

    def identity(self) -> dict:
        """What identifies the weights and the measurement: name, family, prediction type, the null
        conditioning's name, and a hash of the config files and of the weight files' names and sizes
        (not their bytes)."""


@contextmanager
def count_unet_rows(model):
    """Count the latents that go through the model's denoiser (``model_output``) inside the block:
    ``with count_unet_rows(model) as n: ...`` then ``n[0]``. Blocks may nest."""
    n = [0]
    had_own = "model_output" in vars(model)  # an outer count already wraps it
    original = model.model_output

    def counted(x_t, *args, **kwargs):
        n[0] += len(x_t)
        return original(x_t, *args, **kwargs)

    model.model_output = counted
    try:
        yield n
    finally:
        if had_own:
            model.model_output = original
        else:
            del model.model_output  # back to the class's method

"""The explicit DDIM + classifier-free-guidance loop that records the detection metric per step.

Tracking does not change sampling: latents equal those of diffusers' ``StableDiffusionPipeline``
with ``DDIMScheduler`` for the same seed (the seed contract in ``initial_noise``).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

import torch

from diffmem.metrics import noise_norm, text_noise_norm


@dataclass
class SamplingConfig:
    num_inference_steps: int = 50  # DDIM steps of the schedule (the paper's 50)
    guidance_scale: float | None = None  # None: the model's default (7.5 for SD, the lab's own)
    num_generations: int = 4  # images per prompt (the paper's 4)
    seed: int = 0  # prompt at input position i uses seed + i
    track_steps: int | None = None  # stop after this many steps (1 = first-step detection); None = all
    batch_size: int = 16  # UNet samples per call (conditional and unconditional rows both count)
    eta: float = 0.0  # DDIM eta; 0 = deterministic, as in the paper


def initial_noise(model, num_generations: int, seed: int) -> torch.Tensor:
    """x_T for one prompt: (G, C, H, W), exactly what StableDiffusionPipeline draws with
    ``generator=torch.Generator("cpu").manual_seed(seed)`` and ``num_images_per_prompt=G``."""
    gen = torch.Generator("cpu").manual_seed(seed)
    x = torch.randn((num_generations, *model.latent_shape), generator=gen, dtype=model.dtype)
    return x.to(model.device) * model.scheduler.init_noise_sigma


def steps_to_run(num_inference_steps: int, track_steps: int | None) -> int:
    if track_steps is not None and not 1 <= track_steps <= num_inference_steps:
        raise ValueError(f"--track-steps {track_steps}: must be between 1 and --num-inference-steps ({num_inference_steps})")
    return track_steps or num_inference_steps


@torch.no_grad()
def denoise_tracked(model, latents: torch.Tensor, cond: torch.Tensor, uncond: torch.Tensor, timesteps,
                    guidance_scale: float, eta: float = 0.0, advance_last: bool = True):
    """Run DDIM with classifier-free guidance over `timesteps`, recording d per sample and step.

    latents (N, C, H, W) at the first of `timesteps`; cond, uncond (N, T, D).
    Returns (latents after the last step, text_noise_norm (N, S), uncond_noise_norm (N, S)); with
    ``advance_last=False`` the last step's update is skipped (early-stopped detection needs only d).
    """
    text_norms, uncond_norms = [], []
    for k, t in enumerate(timesteps):
        # 1. One UNet call for both branches, unconditional first (as diffusers orders them).
        x_in = model.scheduler.scale_model_input(torch.cat([latents, latents]), t)
        eps = model.predict_noise(x_in, t, torch.cat([uncond, cond]))
        eps_uncond, eps_cond = eps.chunk(2)
        # 2. Record the detection metric (Wen et al. eq. 3) and the unconditional magnitude.
        text_norms.append(text_noise_norm(eps_cond, eps_uncond))
        uncond_norms.append(noise_norm(eps_uncond))
        # 3. Guidance and the DDIM update.
        if not advance_last and k == len(timesteps) - 1:
            break
        eps_guided = eps_uncond + guidance_scale * (eps_cond - eps_uncond)
        latents = model.scheduler.step(eps_guided, t, latents, eta=eta, return_dict=False)[0]
    n = len(latents)
    stack = lambda xs: torch.stack(xs, 1) if xs else torch.zeros(n, 0)
    return latents, stack(text_norms), stack(uncond_norms)


@dataclass
class PromptSamples:
    """Tracked sampling of one prompt."""

    position: int  # 0-based position in the input (its seed is config.seed + position)
    seed: int
    text_noise_norm: torch.Tensor  # (G, S) d per generation and tracked step
    uncond_noise_norm: torch.Tensor  # (G, S)
    latents: torch.Tensor  # (G, C, H, W) after the last tracked step (before its update when early-stopped without decoding)
    images: torch.Tensor | None  # (G, 3, H', W') in [0, 1], when decoded


def plan_units(positions: list[int], num_generations: int, batch_size: int) -> list[list[int]]:
    """Group consecutive prompts into work units of at most batch_size // 2 generations each
    (a prompt with more generations than that forms a unit alone and is split into sub-batches)."""
    if batch_size < 2:
        raise ValueError(f"--batch-size {batch_size}: must be >= 2 (each generation needs a conditional and an unconditional row)")
    per_call = batch_size // 2
    per_unit = max(per_call // num_generations, 1)
    return [positions[i:i + per_unit] for i in range(0, len(positions), per_unit)]


def sample_unit(model, prompts: list[str], positions: list[int], config: SamplingConfig,
                decode: bool = False, embeddings: torch.Tensor | None = None) -> list[PromptSamples]:
    """Tracked sampling of one work unit: the prompts at `positions`, `config.num_generations` each.

    `embeddings` (P, T, D) replaces the encoded prompts (e.g. optimized embeddings).
    """
    G = config.num_generations
    guidance = model.default_guidance_scale if config.guidance_scale is None else config.guidance_scale
    n_steps = steps_to_run(config.num_inference_steps, config.track_steps)
    model.scheduler.set_timesteps(config.num_inference_steps, device=model.device)
    timesteps = model.scheduler.timesteps[:n_steps]
    cond_p = model.encode_prompts(prompts) if embeddings is None else embeddings.to(model.device, model.dtype)
    x = torch.cat([initial_noise(model, G, config.seed + p) for p in positions])  # (P*G, C, H, W)
    cond = cond_p.repeat_interleave(G, dim=0)
    uncond = model.empty_embedding().expand(len(x), -1, -1)
    per_call = config.batch_size // 2
    advance = decode or n_steps == config.num_inference_steps
    outs = [denoise_tracked(model, x[i:i + per_call], cond[i:i + per_call], uncond[i:i + per_call],
                            timesteps, guidance, config.eta, advance) for i in range(0, len(x), per_call)]
    latents = torch.cat([o[0] for o in outs])
    text = torch.cat([o[1] for o in outs]).float().cpu()
    unc = torch.cat([o[2] for o in outs]).float().cpu()
    images = None
    if decode:
        images = torch.cat([model.decode(latents[i:i + per_call]) for i in range(0, len(latents), per_call)]).cpu()
    return [PromptSamples(p, config.seed + p, text[j * G:(j + 1) * G], unc[j * G:(j + 1) * G],
                          latents[j * G:(j + 1) * G], None if images is None else images[j * G:(j + 1) * G])
            for j, p in enumerate(positions)]


def sample_prompts(model, prompts: list[str], config: SamplingConfig = SamplingConfig(),
                   decode: bool = True) -> list[PromptSamples]:
    """Tracked sampling of a list of prompts (positions 0..P-1), batched; for notebooks and tests."""
    positions = list(range(len(prompts)))
    out: list[PromptSamples] = []
    for unit in plan_units(positions, config.num_generations, config.batch_size):
        out += sample_unit(model, [prompts[p] for p in unit], unit, config, decode=decode)
    return out


def iter_units(model, prompts: dict[int, str], units: list[list[int]], config: SamplingConfig,
               decode: bool = False) -> Iterator[list[PromptSamples]]:
    for unit in units:
        yield sample_unit(model, [prompts[p] for p in unit], unit, config, decode=decode)

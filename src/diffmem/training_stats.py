"""Training-time statistics: each pair's d and denoising loss at a drawn timestep, and the hard
threshold per timestep band calibrated on them (Wen et al. sec. 5.2)."""

from __future__ import annotations

from typing import Sequence

import numpy as np
import torch


@torch.no_grad()
def training_step_stats(model, images: torch.Tensor, captions: list[str], seed: int = 0,
                        batch_size: int = 64) -> dict[str, np.ndarray]:
    """What the trainer sees for each pair at one uniformly drawn timestep: d (the hard-threshold
    filter's quantity, Wen et al. 5.2) and the denoising loss, with seeded noise and timesteps.

    images (N, 3, H, W) in [0, 1]. Returns {"d": (N,), "loss": (N,), "t": (N,)}.
    """
    from diffmem.metrics import text_noise_norm

    noise_scheduler = model.training_scheduler()
    gen = torch.Generator().manual_seed(seed)
    empty = model.empty_conditioning()
    out = {"d": [], "loss": [], "t": []}
    for i in range(0, len(images), batch_size):
        x = model.encode_images(images[i:i + batch_size].to(model.device, model.dtype) * 2 - 1).float()
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), generator=gen).to(x.device)
        noisy = noise_scheduler.add_noise(x, noise, t).to(model.dtype)
        cond = model.encode_prompts(captions[i:i + batch_size])
        out_c = model.model_output(noisy, t, cond).float()
        eps_c = model.output_to_noise(out_c, noisy.float(), t)
        eps_u = model.predict_noise(noisy, t, empty.expand(len(x))).float()
        out["d"].append(text_noise_norm(eps_c, eps_u).cpu())
        target = model.training_target(x, noise, t).float()
        out["loss"].append((out_c - target).pow(2).flatten(1).mean(1).cpu())
        out["t"].append(t.cpu())
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def calibrate_hard_threshold(stats: dict[str, np.ndarray], num_bands: int = 10,
                             percentile: float | Sequence[float] = 99.0,
                             num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """One hard threshold per band of timesteps (low noise first, as ``TrainConfig.hard_threshold``
    takes them): the `percentile` of d among ordinary (non-memorized) samples whose t is in the band;
    `percentile` is one number for every band or one per band.

    `stats` is ``training_step_stats`` of non-memorized pairs. d depends strongly on t (on the lab
    it is ~10x larger at mid noise than at high noise), so a single number mostly filters by timestep.
    """
    from diffmem.train import timestep_band

    per_band = [float(percentile)] * num_bands if np.isscalar(percentile) else [float(q) for q in percentile]
    if len(per_band) != num_bands or not all(0 <= q <= 100 for q in per_band):
        raise ValueError(f"percentile {percentile!r}: give one number in [0, 100], or {num_bands} (one per band)")
    band = timestep_band(stats["t"].astype(np.int64), num_bands, num_train_timesteps)
    out = []
    for k in range(num_bands):
        d = stats["d"][band == k]
        if len(d) < 10:
            raise ValueError(f"only {len(d)} samples with t in band {k} of {num_bands}: use more pairs or fewer bands")
        out.append(float(np.percentile(d, per_band[k])))
    return tuple(out)

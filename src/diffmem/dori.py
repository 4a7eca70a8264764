"""DoRI (Kowalczuk, Hintersdorf, Struppek et al., ICML 2026, "Finding DoRI"): an attack that tests a
mitigation. Given a training image and a (mitigated) model, optimize a text embedding y so that the
model denoises that image well, then generate from y: if the generations copy the image again, the
mitigation only cut the path from the original prompt.

The attack, as the paper's note describes it (no code could be read here): Adam on y, lr 0.1, 50 steps,
a batch of 8 noisings of the one image per step, the standard diffusion loss with the noise and the
timestep drawn afresh at every step (t uniform over the training timesteps; on a flow model sigma
uniform in (0, 1] and the velocity target, as ``diffmem train`` noises), starting from the prompt's own
embedding. Our choices: only the token embeddings move (a family's pooled or other extras stay the
prompt's), in float32; the loss is the mean squared error over the batch's elements, as training's.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from diffmem.model import Conditioning


@dataclass(frozen=True)
class DoriConfig:
    steps: int = 50
    lr: float = 0.1
    batch: int = 8
    seed: int = 0

    def __post_init__(self):
        if self.steps < 1 or self.batch < 1 or not self.lr > 0:
            raise ValueError(f"DoRI steps {self.steps}, batch {self.batch}, lr {self.lr}: need steps, batch >= 1 and lr > 0")


def noised_batch(model, x0: torch.Tensor, batch: int, gen: torch.Generator,
                 scheduler=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, target) for `batch` noisings of one clean latent x0 (1, C, H, W): fresh noise and timesteps
    from `gen`, noised and targeted as training does on the model's family; `scheduler` is the model's
    ``training_scheduler()`` (made here when not given)."""
    from diffmem.train import flow_noised

    scheduler = scheduler or model.training_scheduler()
    T = scheduler.config.num_train_timesteps
    noise = torch.randn((batch, *x0.shape[1:]), generator=gen).to(x0)
    x0 = x0.expand(batch, *x0.shape[1:])
    if model.prediction_type == "flow":
        sigma = 1 - torch.rand(batch, generator=gen)  # (0, 1]
        t = (sigma * T).to(x0.device)
        noisy = flow_noised(x0, noise, sigma.to(x0))
    else:
        t = torch.randint(0, T, (batch,), generator=gen).to(x0.device)
        noisy = scheduler.add_noise(x0, noise, t)
    return noisy, t, model.training_target(x0, noise, t)


def dori_attack(model, x0: torch.Tensor, start: Conditioning, config: DoriConfig = DoriConfig(),
                uncond: Conditioning | None = None) -> tuple[Conditioning, list[float]]:
    """Optimize the token embeddings of `start` (one row) so that `model` denoises the clean latent x0
    (1, C, H, W); returns (the attack's conditioning, the loss at each step). Given `uncond` (``config.batch``
    rows), every denoiser call is made as the sampling pass makes it, unconditional rows first, and the
    conditional half is kept: the layout a mitigation's attention or neuron edits expect."""
    gen = torch.Generator("cpu").manual_seed(config.seed)
    emb = start.embeddings.detach().clone().float().requires_grad_(True)
    extra = {k: v.detach() for k, v in start.extra.items()}
    opt = torch.optim.Adam([emb], lr=config.lr)
    scheduler = model.training_scheduler()
    losses = []
    for _ in range(config.steps):
        noisy, t, target = noised_batch(model, x0.float(), config.batch, gen, scheduler)
        cond = Conditioning(emb.to(model.dtype), extra, start.mask).expand(config.batch)
        if uncond is None:
            pred = model.model_output(noisy.to(model.dtype), t, cond).float()
        else:
            both = torch.cat([noisy, noisy]).to(model.dtype)
            pred = model.model_output(both, torch.cat([t, t]), Conditioning.cat([uncond, cond])).float()[config.batch:]
        loss = torch.nn.functional.mse_loss(pred, target.float())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return Conditioning(emb.detach().to(model.dtype), extra, start.mask), losses

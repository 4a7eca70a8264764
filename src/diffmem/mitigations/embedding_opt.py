"""``embedding-opt``: Wen et al. (ICLR 2024) sec. 5.1. AdamW on the conditional prompt embedding until
the text-conditional noise norm at one step (the first by default) is at or below a target loss,
the start token left untouched; optionally the seed's L2-constrained variant. Its settings are the
seed's options, fields of ``MitigationConfig`` (target_loss, target_unit, lr, max_iters,
optim_step, epsilon, alpha)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from diffmem.metrics import mitigation_loss, text_noise_norm
from diffmem.mitigations import Plan, Unit, register
from diffmem.model import Conditioning
from diffmem.sampling import SamplingConfig, predict_branches, sample_prompts


def step_noise_norms(model, cond: Conditioning, x_t: torch.Tensor, t, eps_uncond: torch.Tensor) -> torch.Tensor:
    """d of each prompt and generation at one step (differentiable in ``cond.embeddings``).

    cond P rows; x_t (P, G, C, H, W) latents at step t (unscaled); eps_uncond (P, G, C, H, W) the
    unconditional branch there (``diffmem.sampling.predict_branches``, computed once). Returns (P, G).
    """
    P, G = x_t.shape[:2]
    eps_c, eps_u = predict_branches(model, x_t.flatten(0, 1), t, cond.repeat_interleave(G), None,
                                    eps_uncond=eps_uncond.flatten(0, 1))
    return text_noise_norm(eps_c, eps_u).view(P, G)


def token_distance(emb: torch.Tensor, start: torch.Tensor, positions: list[int]) -> torch.Tensor:
    """Mean over `positions` of each token's L2 distance from its starting embedding: (P, T, D) x2 -> (P,)."""
    return (emb[:, positions] - start[:, positions]).norm(dim=-1).mean(-1)


@dataclass
class OptimizedEmbeddings:
    embeddings: torch.Tensor  # (P, T, D) the conditional embeddings to sample with
    final_loss: torch.Tensor  # (P,) loss (in the target's unit) of the returned embeddings
    initial_loss: torch.Tensor  # (P,) loss of the input embeddings
    final_d: torch.Tensor  # (P,) mean per-generation d of the returned embeddings
    initial_d: torch.Tensor  # (P,) mean per-generation d of the input embeddings
    iterations: torch.Tensor  # (P,) int, AdamW steps taken for each prompt (0: already at the target)


def optimize_prompt_embedding(model, cond: Conditioning, x_t: torch.Tensor, t, target_loss: float,
                              lr: float | None = None, max_iters: int | None = None,
                              eps_uncond: torch.Tensor | None = None, target_unit: str = "batch",
                              epsilon: float | None = None, alpha: float = 0.5) -> OptimizedEmbeddings:
    """Minimize d at one step over the conditional token embeddings (Wen et al. sec. 5.1), batched.

    cond P rows (their extra conditioning stays fixed); x_t (P, G, C, H, W) each prompt's latents at
    step t (x_T, scaled by ``init_noise_sigma``, at the first step); eps_uncond (P, G, C, H, W) the
    unconditional branch there when already known. The loss of a prompt is
    ``diffmem.metrics.mitigation_loss`` of its G values of d in `target_unit` ("batch": the seed's
    norm over all generations at once; "mean": the mean d). Each prompt stops as soon as its loss is
    <= `target_loss` (checked before each step, as the seed does), and its embedding stops changing
    while the other prompts continue; at most `max_iters` AdamW steps. lr and max_iters default to
    the model's (``ModelDefaults``).

    With `epsilon` (the seed's ``optim_epsilon``), once a prompt's mean token L2 distance from its
    starting embedding (over the learnable positions) exceeds it, that prompt minimizes
    ``alpha * loss + (1 - alpha) * distance`` instead. The model's ``frozen_token_positions`` (the
    start token) never change: their gradient is zeroed, and they are restored after each step so
    that AdamW's weight decay cannot move them either (the seed's AdamW decays them).
    """
    if len(cond.embeddings.shape) != 3 or x_t.ndim != 5 or len(cond) != len(x_t):
        raise ValueError(f"expected cond (P, T, D) and x_t (P, G, C, H, W) with the same P; got "
                         f"{tuple(cond.embeddings.shape)} and {tuple(x_t.shape)}")
    lr = model.defaults.mitigation_lr if lr is None else lr
    max_iters = model.defaults.mitigation_max_iters if max_iters is None else max_iters
    if max_iters < 0 or lr <= 0:
        raise ValueError(f"need max_iters >= 0 and lr > 0; got max_iters={max_iters}, lr={lr}")
    if not 0 <= alpha <= 1:
        raise ValueError(f"alpha {alpha}: must be between 0 and 1")
    mitigation_loss(torch.zeros(1, 1), target_unit)  # checks the unit
    P, G = x_t.shape[:2]
    if eps_uncond is None:
        with torch.no_grad():  # the unconditional branch does not depend on the prompt embedding
            _, eps_uncond = predict_branches(model, x_t.flatten(0, 1), t, cond.repeat_interleave(G),
                                             model.empty_conditioning().expand(P * G))
    eps_u = eps_uncond.reshape(x_t.shape).detach()

    # 1. Parameters, optimizer and the per-prompt bookkeeping.
    frozen_pos = list(model.frozen_token_positions)
    learnable = [j for j in range(cond.embeddings.shape[1]) if j not in set(frozen_pos)]
    dtype = cond.embeddings.dtype
    start = cond.embeddings.detach().float()  # float32 master copy: AdamW's eps and moments underflow in half precision
    emb = start.clone().requires_grad_(True)  # (P, T, D)
    optimizer = torch.optim.AdamW([emb], lr=lr)
    active = torch.ones(P, dtype=torch.bool, device=emb.device)
    final_loss = torch.zeros(P, device=emb.device)
    final_d = torch.zeros(P, device=emb.device)
    iterations = torch.zeros(P, dtype=torch.long)
    initial = None
    for it in range(max_iters + 1):
        idx = active.nonzero().flatten()
        # 2. The loss of the prompts still running; those at the target stop here.
        with torch.enable_grad():
            d = step_noise_norms(model, cond[idx].with_embeddings(emb[idx].to(dtype)), x_t[idx], t, eps_u[idx])  # (A, G)
            loss = mitigation_loss(d.float(), target_unit)  # (A,)
        if initial is None:
            initial = (loss.detach().clone(), d.detach().mean(1))
        final_loss[idx] = loss.detach().to(final_loss.dtype)
        final_d[idx] = d.detach().mean(1).to(final_d.dtype)
        reached = loss.detach() <= target_loss
        active[idx[reached]] = False
        if it == max_iters or not active.any():
            break
        # 3. One AdamW step on the prompts that did not reach it (with the distance term past epsilon).
        objective = loss
        if epsilon is not None:
            dist = token_distance(emb[idx], start[idx], learnable)
            far = dist.detach() > epsilon
            objective = torch.where(far, alpha * loss + (1 - alpha) * dist, loss)
        optimizer.zero_grad(set_to_none=False)
        objective[~reached].sum().backward()  # a sum keeps each prompt's gradient independent of the others
        emb.grad[:, frozen_pos] = 0
        frozen = ~active
        before = emb.detach()[frozen].clone()
        optimizer.step()
        with torch.no_grad():
            emb[frozen] = before  # finished prompts keep their embedding exactly
            emb[:, frozen_pos] = start[:, frozen_pos]
        iterations[active.cpu()] += 1
    return OptimizedEmbeddings(emb.detach().to(dtype), final_loss, initial[0], final_d, initial[1], iterations)


def reference_losses(model, prompts: list[str], sampling: SamplingConfig, unit: str = "batch") -> np.ndarray:
    """First-step embedding-opt loss (``mitigation_loss`` in `unit`) of each prompt, prompt j from seed + j: (P,)."""
    from dataclasses import replace

    res = sample_prompts(model, prompts, replace(sampling, track_steps=1), decode=False)
    return np.array([float(mitigation_loss(r.text_noise_norm[:, 0].double(), unit)) for r in res])


@register
class EmbeddingOpt:
    name = "embedding-opt"
    flow_refusal = None  # it minimizes d, the velocity difference on a flow model: any family
    knob = "target_loss"  # a MitigationConfig field (config_knob)
    config_knob = True
    off = {"target_loss": float("inf")}  # every prompt is at the target at once: its embedding is unchanged

    def sweep(self, model, sampling) -> list[dict]:
        """Target losses at the 90th, 50th, 25th and 10th percentile of the first-step loss of the model's
        own reference prompts (lab: the novel captions), mildest first; elsewhere the model's target."""
        from diffmem.lab.prompts import own_reference_prompts

        prompts = own_reference_prompts(model)
        if not prompts:
            return [{}]
        losses = reference_losses(model, prompts, sampling)
        return [{"target_loss": float(np.percentile(losses, q))} for q in (90, 50, 25, 10)]

    def plan(self, model, unit: Unit, params) -> Plan:
        c = unit.config
        G = unit.num_generations
        P = len(unit.prompts)
        opt = optimize_prompt_embedding(model, unit.cond, unit.x_opt.view(P, G, *unit.x_opt.shape[1:]),
                                        unit.timesteps[c.optim_step], c.target_loss, c.lr, c.max_iters,
                                        eps_uncond=unit.eps_uncond_opt, target_unit=c.target_unit,
                                        epsilon=c.epsilon, alpha=c.alpha)
        return Plan(cond=unit.cond.with_embeddings(opt.embeddings), iterations=opt.iterations,
                    final_d=opt.final_d, final_loss=opt.final_loss)

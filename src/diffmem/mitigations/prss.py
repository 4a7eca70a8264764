"""``prss-reanchor``: prompt re-anchoring (PR) with semantic prompt search (SS) (Chen et al., CVPR 2025,
"Enhancing privacy-utility trade-offs to mitigate memorization in diffusion models"; official code
``chenchen-usyd/BE-PRSS``, MIT, ``local_sd_pipeline.py``, read to check, not copied).

Notation: e_p the original prompt, e' the prompt actually sampled, s the run's guidance scale,
eps(.) the noise prediction at the current x_t, d = ||eps(e) - eps(∅)|| per generation.

1. Trigger and SS, at the first step (the official ``aug_prompt_ss``): a prompt whose d exceeds λ
   (``lambda_ss``, published 1) is treated as memorized. With paraphrases (``--param
   paraphrases=FILE``), its paraphrases are tried in order and e' is the first whose d <= λ, else
   the one of least d among the original and all paraphrases (the official argmin includes the
   original). Without a file SS is skipped (each prompt's ``info`` says so) and e' = e_p.
2. PR, at every step of a triggered prompt's generations: with mag = ||eps(e') - eps(∅)||, when
   mag > l_pr (``l_pr``, published 3),

       k    = (s l_pr - M) / (s - 1)                       (M = ``M``, published 5)
       s_pr = min((mag - k) / (M - k) · s, s)              (1 at mag = l_pr, s from mag = M on)
       ε̂    = eps(e_p) + s_pr (eps(e') - eps(e_p)) + (s - s_pr)(eps(e') - eps(∅)),

   else plain classifier-free guidance eps(∅) + s (eps(e') - eps(∅)). eps(e_p) is the one extra
   UNet row per step: the prediction is re-anchored on the original prompt and guided from it
   towards the paraphrase, so the memorized prompt's own direction is not amplified.

   Without SS (or when the argmin is the original), e' = e_p, eps(e_p) = eps(e'), and the formula
   reduces to ε̂ = eps(∅) + (1 + s - s_pr)(eps(e') - eps(∅)): classifier-free guidance whose scale
   falls from s at mag = l_pr to 1 (the conditional prediction alone) at mag >= M. PR alone is then
   a magnitude-adaptive guidance reduction, not a move away from the prompt; diffmem computes no
   extra row for such generations (the row would equal the conditional branch). As in the official
   code, PR runs on every triggered prompt, with or without paraphrases (there a prompt with an
   empty caption list still triggers, keeps the original and is re-anchored).

Per generation: d, mag and the PR gate are per generation (row), as in the published runs
(``--num_images_per_prompt 1``); the trigger and SS choose one e' per prompt (the plan has one
conditional row per prompt), comparing the mean d of its G generations with λ. The SS rows reuse the
first step's unconditional branch: one row per generation per paraphrase tried.

Constants: on Stable Diffusion (models without reference prompts) the published l_pr = 3, M = 5,
λ = 1. On the lab, from the model's own non-memorized (reference) prompts sampled with the run's
settings (``derive_constants``, cached per model and settings): λ = the 95th percentile of their
first-step mean d (a prompt triggers when it is above almost every ordinary prompt, and a paraphrase
is accepted when it looks ordinary), l_pr = the 95th and M = the 99.5th percentile of their d over all
steps and generations (the lab's d grows along the trajectory, unlike SD's, so PR's per-step test
needs the per-step distribution). The first 32 reference prompts are sampled once per model and
settings (about 35 s on the shipped lab at 20 steps and G = 4, paid by the first unit; ``sweep``
shares the draw), giving λ ≈ 0.34, l_pr ≈ 3.6, M ≈ 6.2 there. Off: l_pr = inf and λ = inf (nothing
triggers, no SS, plain CFG); l_pr = inf alone is off too when no paraphrases are given.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from diffmem.files import json_lines
from diffmem.metrics import text_noise_norm
from diffmem.mitigations import Plan, Unit, per_prompt, register
from diffmem.model import Conditioning

PUBLISHED = {"l_pr": 3.0, "M": 5.0, "lambda_ss": 1.0}  # Stable Diffusion v1.4 (README's PRSS command)
LAB_PERCENTILES = {"lambda_ss": 95.0, "l_pr": 95.0, "M": 99.5}
REFERENCE_LIMIT = 32  # reference prompts sampled to derive the lab's constants


# -- the math: small functions over tensors -----------------------------------------------------

def reanchor_scale(mag: torch.Tensor, s: float, l_pr: float, M: float) -> torch.Tensor:
    """s_pr = min((mag - k) / (M - k) · s, s) with k = (s l_pr - M) / (s - 1): (N,) -> (N,).
    Needs s > 1 and M > l_pr; s_pr = 1 at mag = l_pr and s at mag >= M."""
    k = (s * l_pr - M) / (s - 1)
    return torch.clamp((mag - k) / (M - k) * s, max=s)


def reanchored_prediction(eps_prime: torch.Tensor, eps_uncond: torch.Tensor, eps_original: torch.Tensor,
                          s_pr: torch.Tensor, s: float) -> torch.Tensor:
    """ε̂ = eps(e_p) + s_pr (eps(e') - eps(e_p)) + (s - s_pr)(eps(e') - eps(∅)); tensors (N, C, H, W),
    s_pr (N,)."""
    w = s_pr.to(eps_prime.dtype).view(-1, *[1] * (eps_prime.ndim - 1))
    return eps_original + w * (eps_prime - eps_original) + (s - w) * (eps_prime - eps_uncond)


def semantic_search(d_original: torch.Tensor, d_paraphrases: list[torch.Tensor], lam: float) -> int:
    """SS's choice for one prompt: 0 (the original) when its d <= λ, else 1 + the index of the first
    paraphrase with d <= λ, else the argmin over [original, paraphrases...]. d are scalars (mean d)."""
    if float(d_original) <= lam:
        return 0
    for j, d in enumerate(d_paraphrases):
        if float(d) <= lam:
            return j + 1
    return int(np.argmin([float(d_original), *map(float, d_paraphrases)]))


def load_paraphrases(path: str | Path) -> dict[str, list[str]]:
    """JSON Lines, one prompt per line: {"prompt": "...", "paraphrases": ["...", ...]} or {"<prompt>": [...]}."""
    path = Path(path)
    if not path.is_file():
        raise ValueError(f"--param paraphrases={path}: no such file (JSON Lines: prompt -> list of paraphrases)")
    out: dict[str, list[str]] = {}
    for i, row in json_lines(path):
        if isinstance(row, dict) and "prompt" in row and "paraphrases" in row:
            prompt, items = row["prompt"], row["paraphrases"]
        elif isinstance(row, dict) and len(row) == 1:
            (prompt, items), = row.items()
        else:
            raise ValueError(f'--param paraphrases={path}: line {i}: expected {{"prompt": ..., "paraphrases": [...]}} '
                             'or {"<prompt>": [...]}')
        if not isinstance(prompt, str) or not isinstance(items, list) or not all(isinstance(p, str) for p in items):
            raise ValueError(f"--param paraphrases={path}: line {i}: the prompt must be a string and its "
                             "paraphrases a list of strings")
        out[prompt] = list(items)
    return out


# -- the guidance handed to the pass ------------------------------------------------------------

class PromptReanchoring:
    """``guided(index, t, x_t, eps_c, eps_u) -> eps``: PR on the `triggered` rows (N,), plain CFG on
    the others. eps_c is the pass's conditional branch, eps(e'); `original` (N rows) conditions the
    extra eps(e_p) rows, computed only for triggered rows whose e' differs from e_p (`differs`, (N,))
    and whose mag exceeds l_pr, `max_batch` rows per UNet call. ``reanchored`` (N,) counts each row's
    PR steps; with `info` (one dict per prompt, rows prompt-major) each dict's ``reanchored_steps``
    gets its generations' counts after every step."""

    def __init__(self, model, original: Conditioning, triggered: torch.Tensor, differs: torch.Tensor,
                 s: float, l_pr: float, M: float, max_batch: int | None = None, info: list[dict] | None = None):
        self.model, self.original, self.s, self.l_pr, self.M, self.info = model, original, s, l_pr, M, info
        self.triggered, self.differs = triggered.cpu(), differs.cpu()
        self.max_batch = max_batch or len(triggered)
        self.reanchored = torch.zeros(len(triggered), dtype=torch.long)

    def guided(self, index: int, t, x_t: torch.Tensor, eps_c: torch.Tensor, eps_u: torch.Tensor) -> torch.Tensor:
        cfg = eps_u + self.s * (eps_c - eps_u)  # bit for bit the pass's own combination
        mag = text_noise_norm(eps_c, eps_u).cpu()  # (N,)
        use = self.triggered & (mag > self.l_pr)
        if not use.any():
            return cfg
        self.reanchored += use.long()
        per_prompt(self.info, reanchored_steps=self.reanchored)
        eps_p = eps_c.clone()
        rows = (use & self.differs).nonzero().flatten()
        if len(rows):
            x_in = self.model.scheduler.scale_model_input(x_t[rows.to(x_t.device)], t)
            cond = self.original[rows]
            parts = [self.model.predict_noise(x_in[i:i + self.max_batch], t, cond[i:i + self.max_batch])
                     for i in range(0, len(rows), self.max_batch)]
            eps_p[rows.to(eps_p.device)] = torch.cat(parts).to(eps_p.dtype)
        s_pr = reanchor_scale(mag.double(), self.s, self.l_pr, self.M)
        pr = reanchored_prediction(eps_c, eps_u, eps_p, s_pr.to(eps_c.device), self.s)
        return torch.where(use.to(eps_c.device).view(-1, *[1] * (eps_c.ndim - 1)), pr, cfg)


# -- constants on the model's own scale ---------------------------------------------------------

def reference_d(model, sampling, prompts: list[str]) -> np.ndarray:
    """d (P, G, S) of ordinary prompts over every step, sampled with `sampling` (prompt j from seed + j)."""
    from diffmem.sampling import sample_prompts

    res = sample_prompts(model, prompts, replace(sampling, track_steps=None), decode=False)
    return torch.stack([r.text_noise_norm for r in res]).double().numpy()


def derive_constants(d: np.ndarray) -> dict[str, float]:
    """λ, l_pr and M from ordinary prompts' d (P, G, S) (LAB_PERCENTILES; module docstring)."""
    return {"lambda_ss": float(np.percentile(d[:, :, 0].mean(1), LAB_PERCENTILES["lambda_ss"])),
            "l_pr": float(np.percentile(d, LAB_PERCENTILES["l_pr"])),
            "M": float(np.percentile(d, LAB_PERCENTILES["M"]))}


@register
class PRSS:
    name = "prss-reanchor"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "l_pr"
    off = {"l_pr": math.inf, "lambda_ss": math.inf}  # nothing triggers: no search, plain CFG at every step

    @dataclass
    class Params:
        l_pr: float | None = None  # PR when mag > l_pr (SD: 3; lab: 95th percentile of ordinary prompts' d)
        M: float | None = None  # magnitude of full re-anchoring, s_pr = s (SD: 5; lab: 99.5th percentile)
        lambda_ss: float | None = None  # trigger / SS acceptance on first-step d (SD: 1; lab: 95th percentile)
        paraphrases: str | None = None  # JSON Lines file: prompt -> paraphrases (SS); none: SS skipped

        def __post_init__(self):
            for name in ("l_pr", "M", "lambda_ss"):
                v = getattr(self, name)
                if v is not None and (not isinstance(v, (int, float)) or math.isnan(v)):
                    raise ValueError(f"--param {name}={v!r}: must be a number")
            if self.paraphrases is not None and not isinstance(self.paraphrases, str):
                raise ValueError(f"--param paraphrases={self.paraphrases!r}: must be a file path")

    def __init__(self):
        self._derived: dict[tuple, np.ndarray] = {}
        self._paraphrases: dict[str, dict[str, list[str]]] = {}

    def reference(self, model, sampling) -> np.ndarray | None:
        """d (P, G, S) of the model's own reference prompts (the first REFERENCE_LIMIT) under `sampling`,
        cached per model and settings; None for a model without them (Stable Diffusion)."""
        from diffmem.lab.prompts import own_reference_prompts

        prompts = own_reference_prompts(model)
        if not prompts:
            return None
        key = (id(model), model.name, sampling.num_inference_steps, sampling.num_generations, sampling.seed,
               sampling.guidance(model), sampling.eta)
        if key not in self._derived:
            self._derived[key] = reference_d(model, sampling, prompts[:REFERENCE_LIMIT])
        return self._derived[key]

    def constants(self, model, sampling) -> dict[str, float]:
        """The published constants, or on a model with reference prompts (the lab) the derived ones."""
        d = self.reference(model, sampling)
        return dict(PUBLISHED) if d is None else derive_constants(d)

    def sweep(self, model, sampling) -> list[dict]:
        """l_pr at the 99th, 95th, 90th and 75th percentile of the reference prompts' d over all steps
        (mildest first; M stays at its derived 99.5th percentile); on SD the published setting."""
        d = self.reference(model, sampling)
        return [{}] if d is None else [{"l_pr": float(np.percentile(d, q))} for q in (99, 95, 90, 75)]

    def paraphrase_table(self, path: str) -> dict[str, list[str]]:
        if path not in self._paraphrases:
            self._paraphrases[path] = load_paraphrases(path)
        return self._paraphrases[path]

    def plan(self, model, unit: Unit, params) -> Plan:
        params = params or self.Params()
        P, G = len(unit.prompts), unit.num_generations
        given = {"l_pr": params.l_pr, "M": params.M, "lambda_ss": params.lambda_ss}
        if given["l_pr"] == math.inf and given["lambda_ss"] == math.inf:
            return Plan()  # off: nothing can trigger
        c = given if None not in given.values() else {**self.constants(model, unit.sampling),
                                                      **{k: v for k, v in given.items() if v is not None}}
        l_pr, M, lam = c["l_pr"], c["M"], c["lambda_ss"]
        s = float(unit.guidance_scale)
        if math.isfinite(l_pr):
            if not s > 1:
                raise ValueError(f"prss-reanchor needs a guidance scale > 1 (got {s}): k = (s l_pr - M)/(s - 1)")
            if not M > l_pr:
                raise ValueError(f"--param M={M}: must be above l_pr={l_pr}")
        table = self.paraphrase_table(params.paraphrases) if params.paraphrases else None

        # 1. The trigger: each prompt's mean first-step d against λ.
        d_first, eps_u0 = self._first_step(model, unit, unit.cond)
        triggered = d_first.mean(1) > lam  # (P,)
        info = [{"l_pr": l_pr, "M": M, "lambda_ss": lam, "triggered": bool(triggered[j]),
                 "first_step_d": float(d_first[j].mean())} for j in range(P)]

        # 2. SS: paraphrases in order for the triggered prompts that have them (conditional rows only).
        chosen = [None] * P  # the paraphrase taken, per prompt
        if table is None:
            for row in info:
                row["semantic_search"] = "skipped: no --param paraphrases=FILE"
        else:
            chosen = self._search(model, unit, table, triggered, d_first, eps_u0, lam, info)

        # 3. e' per prompt, and PR over the pass.
        modified = [chosen[j] if chosen[j] is not None else unit.prompts[j] for j in range(P)]
        cond = unit.cond
        if any(p is not None for p in chosen):
            idx = [j for j in range(P) if chosen[j] is not None]
            encoded = model.encode_prompts([chosen[j] for j in idx]).to(unit.cond.embeddings.device,
                                                                         unit.cond.embeddings.dtype)
            rows = [encoded[idx.index(j)] if chosen[j] is not None else unit.cond[j] for j in range(P)]
            cond = Conditioning.cat(rows)
        if not triggered.any() or not math.isfinite(l_pr):
            return Plan(prompts=modified, cond=cond, info=info)
        differs = torch.tensor([p is not None for p in chosen]).repeat_interleave(G)
        guidance = PromptReanchoring(model, unit.cond.repeat_interleave(G), triggered.cpu().repeat_interleave(G),
                                     differs, s, l_pr, M, max_batch=unit.sampling.batch_size, info=info)
        for row in info:
            row["reanchored_steps"] = [0] * G
        return Plan(prompts=modified, cond=cond, guidance=guidance, info=info)

    def _first_step(self, model, unit: Unit, cond: Conditioning):
        """d (P, G) of `cond` (P rows) at the first step from x_T, and eps(∅) there (P*G rows)."""
        from diffmem.sampling import predict_branches

        G = unit.num_generations
        t0 = unit.timesteps[0]
        if getattr(unit.config, "optim_step", 0) == 0:
            return unit.d0, unit.eps_uncond_opt
        with torch.no_grad():
            eps_c, eps_u = predict_branches(model, unit.x_T, t0, cond.repeat_interleave(G), unit.uncond,
                                            max_batch=unit.sampling.batch_size)
        return text_noise_norm(eps_c, eps_u).view(len(cond), G), eps_u

    def _search(self, model, unit: Unit, table, triggered, d_first, eps_u0, lam, info) -> list[str | None]:
        from diffmem.sampling import predict_branches

        P, G = len(unit.prompts), unit.num_generations
        t0 = unit.timesteps[0]
        candidates = [table.get(p, []) if bool(triggered[j]) else [] for j, p in enumerate(unit.prompts)]
        d_para: list[list[float]] = [[] for _ in range(P)]
        searching = [j for j in range(P) if candidates[j]]
        for k in range(max((len(c) for c in candidates), default=0)):
            batch = [j for j in searching if k < len(candidates[j])]
            if not batch:
                break
            cond = model.encode_prompts([candidates[j][k] for j in batch]).repeat_interleave(G)
            rows = torch.cat([torch.arange(j * G, (j + 1) * G) for j in batch]).to(unit.x_T.device)
            with torch.no_grad():
                eps_c, eps_u = predict_branches(model, unit.x_T[rows], t0, cond, None, eps_uncond=eps_u0[rows])
            d = text_noise_norm(eps_c, eps_u).view(len(batch), G).mean(1)
            for i, j in enumerate(batch):
                d_para[j].append(float(d[i]))
                if d[i] <= lam:
                    searching.remove(j)
        chosen: list[str | None] = [None] * P
        for j in range(P):
            if not bool(triggered[j]):
                info[j]["semantic_search"] = "not triggered"
                continue
            if not candidates[j]:
                info[j]["semantic_search"] = "no paraphrases for this prompt"
                continue
            pick = semantic_search(d_first[j].mean(), d_para[j], lam)
            chosen[j] = candidates[j][pick - 1] if pick else None
            info[j].update(semantic_search=f"{len(d_para[j])} paraphrases tried", paraphrase_d=d_para[j],
                           paraphrase=chosen[j])
        return chosen

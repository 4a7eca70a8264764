"""``nemo``: Hintersdorf et al. (NeurIPS 2024), "Finding NeMo: localizing neurons responsible for
memorization in diffusion models" (official code ``ml-research/localizing_memorization_in_diffusion_models``).

A *neuron* is an output channel of a cross-attention value projection ``attn2.to_v``; the mitigation
switches a prompt's memorization neurons off (multiplies them by 0) while its images are sampled.
No extra UNet rows at sampling; the localization before it costs ``num_seeds`` conditional rows
per memorization check.

Localization of one prompt (``3_detect_memorized_neurons.py``, ``utils/activation_detection.py``):

1. Activations: a_l = mean over the T token positions (padding included) of |to_v(c)|, for the
   ``to_v`` of every cross-attention layer in the down blocks and the mid block (SD 1.x: 7 layers of
   320-1280 channels). ``to_v`` reads only the text embedding c, so a_l needs no UNet call.
2. z-scores against per-channel statistics (mean, unbiased std) of a_l over a stated set of ordinary
   prompts, computed once per model and set and cached: ``stats_prompts`` (a prompt file) when
   given; else the lab's own reference prompts (``own_reference_prompts``: novel captions) on a lab
   model; else the 200 ordinary captions shipped with diffmem (``prompt_sets/ordinary_captions.txt``,
   written for this purpose; NeMo's own LAION statistics for SD 1.4 are not included). Never the
   prompts of the work unit: a prompt's selection does not depend on the prompts beside it. The
   result rows name the set (``nemo_statistics``).
3. Initial selection, as the official loop: theta = 5, k = 0; block the channels with z > theta,
   then the k largest a_l of each layer (z-hits in channel order, then the top k in descending
   order; a channel in both is listed twice, as the official lists do); check; while the check is
   above the threshold, theta drops by 0.25 as long as it is above ``theta_min`` and k grows by
   ``top_k_step``. The loop ends when the check is at or under the threshold, or when theta reaches
   1 or k the widest layer's width (1280 on SD, the official's constant) without checking that
   setting; the refinement's threshold is then the last check's value (the official's
   ``refinement_ssim_threshold = ssim``). With the default ``theta_min`` = 1 the settings checked are
   theta 5 to 1.25 with k 0 to 15; with ``theta_min`` > 1 theta stays at its floor and k goes on
   growing (the official's behaviour). Only where the official would loop for ever (``top_k_step``
   0 with theta at a floor above 1) does the search stop, at its last check.
4. Refinement: whole layers, last first, each unblocked when the check stays strictly under the
   threshold without it; then single entries of the lists of the remaining layers (last layer first,
   in list order; a repeated channel stays blocked until its last entry goes, and the check of an
   unchanged set is the current one), each removed when the check stays strictly under it.
   ``prune_checks`` caps the single-entry checks per prompt (None: all, as the official).

The memorization check, as the official search compares: for ``num_seeds`` initial noises x_T of the
prompt (NeMo: 10), z = eps(x_T, t, c) - x_T with no step taken before (conditional rows only, each
channel min-max scaled); the seeds whose largest (MS-)SSIM with another seed is over the threshold
are the ones looked at (none: the prompt is not memorized and nothing is blocked); the check of a
blocked set is the largest over those seeds of the (MS-)SSIM between the seed's blocked z and its
unblocked z. MS-SSIM on latents over 40 pixels (NeMo's convention by default, ``ssim_convention``;
see ``diffmem.detectors.nemo``), else SSIM with sigma 1. NeMo's t is 961 (the second step of
DDIM-50); on a model with another noise schedule t is the training timestep where x_t keeps the same
share of the image, sqrt(alpha_bar_t) = 0.085 as on SD 1.x at 961 (the lab's linear schedule: about
t = 700; at its own t = 961 the image's weight is 0.009 and memorized and ordinary prompts look
alike); ``check_timestep`` overrides it. The check's noises come from
``derived_generator(config.seed, position, stream=0)``, never the seed contract's draw (the official
uses seed 1 for every prompt; reference prompt r here: position 10^7 + r).

Threshold: NeMo's 0.428 (MS-SSIM) on Stable Diffusion's latents (sides over 40). Elsewhere (the lab:
16-pixel images, single-scale SSIM; tiny test models) it is derived from the same ordinary prompts
as the statistics: the ``percentile`` (default 95th) of their unblocked NeMo-SSIM over the same
number of seeds (cached per model). ``threshold`` overrides it. It flags the seeds, and the search
and the refinement use it too unless ``search_threshold`` is given (the official's
``--pairwise_ssim_threshold``, ``--ssim_threshold_initial_selection`` and
``--ssim_threshold_refinement`` all default to 0.428).

Deactivation. NeMo's hook (``hooks/block_activations.py``) multiplies the chosen channels of
``to_v``'s output by 0 on every row of the UNet call, the unconditional rows included (its pipeline
puts both branches in one batch); ``rows="all"`` does so, ``rows="cond"`` leaves the unconditional
rows alone. In a batched unit each row gets its own prompt's channels: a forward hook multiplies
``to_v``'s (B, T, C) output by a per-row (B, 1, C) mask in the pass's layout (unconditional rows
first, then the conditional rows, in every UNet call).

Off: ``max_neurons=0`` (nothing is localized or blocked; sampling unchanged). Sweep knob
``theta_min``: the floor of the z-threshold, 4 to 1 (NeMo's ``--min_theta``).
"""

from __future__ import annotations

import hashlib
import math
import weakref
from dataclasses import dataclass
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import torch

from diffmem.attention import cross_attention_layers
from diffmem.detectors.nemo import (SSIM_CONVENTIONS, max_pairwise_similarity, paired_similarity,
                                    single_step_differences)
from diffmem.mitigations import Plan, Unit, derived_generator, register

PUBLISHED_THRESHOLD = 0.428  # NeMo's MS-SSIM threshold on SD 1.4
PUBLISHED_SEEDS = 10
PUBLISHED_TIMESTEP = 961  # NeMo's check: the second timestep of DDIM-50 on SD 1.4, no step taken before it
THETA_START = 5.0  # the official's --initial_theta
THETA_STEP = 0.25  # its --theta_reduction_per_step
THETA_END = 1.0  # its search stops when theta reaches this (``if theta == 1``), unchecked
ROWS = ("all", "cond")
REFERENCE_POSITION = 10_000_000  # reference prompt r's check noises: derived_generator(seed, this + r, 0)
ORDINARY_CAPTIONS = Path(__file__).resolve().parents[1] / "prompt_sets" / "ordinary_captions.txt"


def ordinary_captions() -> list[str]:
    """The ordinary captions shipped with diffmem (the statistics' default set off the lab)."""
    return [line.strip() for line in ORDINARY_CAPTIONS.read_text(encoding="utf-8").splitlines() if line.strip()]


# -- neurons: layers, activations, z-scores, selection ---------------------------------------------

def value_layers(model) -> list[str]:
    """The cross-attention modules (``...attn2``) of the down blocks and the mid block, in UNet order:
    the layers whose ``to_v`` channels NeMo localizes."""
    names = [n[:-len(".processor")] for n in cross_attention_layers(model)]
    return [n for n in names if n.startswith(("down_blocks.", "mid_block."))]


def value_activations(model, layers: list[str], embeddings: torch.Tensor) -> list[torch.Tensor]:
    """a_l per layer: (P, C_l) float32, the mean over the T tokens of |to_v(c)| for embeddings (P, T, D)."""
    unet = model.unet
    if getattr(unet, "encoder_hid_proj", None) is not None:
        raise ValueError(f"model {model.name}: its UNet projects the text states (encoder_hid_proj) before "
                         "cross-attention; nemo reads to_v on the text embedding directly")
    out = []
    with torch.no_grad():
        for name in layers:
            attn = unet.get_submodule(name)
            ctx = embeddings.to(attn.to_v.weight.device, attn.to_v.weight.dtype)
            if attn.norm_cross:
                ctx = attn.norm_encoder_hidden_states(ctx)
            out.append(attn.to_v(ctx).float().abs().mean(1).cpu())
    return out


def channel_statistics(activations: list[torch.Tensor]) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """Per layer (mean, unbiased std) over the prompts of (R, C_l) activations (R >= 2)."""
    if activations and len(activations[0]) < 2:
        raise ValueError(f"nemo: channel statistics need >= 2 ordinary prompts, got {len(activations[0])} "
                         "(give --param stats_prompts=FILE with more)")
    return [(a.mean(0), a.std(0)) for a in activations]


def z_scores(activations: list[torch.Tensor], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """|a - mean| / std per layer: (P, C_l) each (a channel of std 0 gets z = 0 where a equals its mean)."""
    return [((a - m).abs() / s).nan_to_num(nan=0.0, posinf=torch.finfo(torch.float32).max)
            for a, (m, s) in zip(activations, stats)]


def select_neurons(z: list[torch.Tensor], activation: list[torch.Tensor], theta: float, k: int,
                   max_neurons: int | None = None) -> list[list[int]]:
    """One prompt's initial selection, as the official lists it: per layer, the channels with z > theta
    in channel order, then the k largest activations in descending order (z, activation: (C_l,) per
    layer); a channel in both is listed twice. With `max_neurons`, only that many distinct channels
    are kept over all layers, the largest z first."""
    chosen = []
    for zl, al in zip(z, activation):
        chosen.append((zl > theta).nonzero().flatten().tolist() + al.topk(min(k, len(al))).indices.tolist())
    distinct = [(l, c) for l, cs in enumerate(chosen) for c in dict.fromkeys(cs)]
    if max_neurons is not None and len(distinct) > max_neurons:
        ranked = sorted(((float(z[l][c]), l, c) for l, c in distinct), reverse=True)
        keep = {(l, c) for _, l, c in ranked[:max_neurons]}
        chosen = [[c for c in cs if (l, c) in keep] for l, cs in enumerate(chosen)]
    return chosen


def distinct_neurons(blocked: list[list[int]]) -> list[list[int]]:
    """The sorted distinct channels of each layer's list (what is switched off)."""
    return [sorted(set(cs)) for cs in blocked]


def channel_mask(blocked: list[list[int]], channels: int, generations: int = 1) -> torch.Tensor:
    """(P * generations, C) float: 0 at each prompt's blocked channels of one layer, 1 elsewhere;
    `blocked` has one list per prompt, rows prompt-major."""
    m = torch.ones(len(blocked), channels)
    for p, cs in enumerate(blocked):
        m[p, cs] = 0.0
    return m.repeat_interleave(generations, dim=0)


def masked_values(values: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """to_v output (B, T, C) with each row's channels multiplied by its mask row (B, C)."""
    return values * mask.to(values.device, values.dtype)[:, None, :]


class ValueChannelMask:
    """Forward hooks on the ``to_v`` of `layers` multiplying their output by per-row channel masks.

    masks: layer -> (N, C) table, one row per row of the pass (prompt-major). layout "pass": every
    UNet call is [unconditional rows, conditional rows] of the next n = B/2 pass rows (the cursor
    wraps after N), the unconditional half masked only with ``rows="all"``; layout "rows": every call
    takes the next B rows of the table as they are (conditional-only calls).
    """

    def __init__(self, model, masks: dict[str, torch.Tensor], layout: str = "pass", rows: str = "all"):
        if layout not in ("pass", "rows"):
            raise ValueError(f"ValueChannelMask layout {layout!r}: expected 'pass' or 'rows'")
        if rows not in ROWS:
            raise ValueError(f"--param rows={rows!r}: expected one of {', '.join(ROWS)}")
        self.model, self.masks, self.layout, self.rows = model, masks, layout, rows
        self.cursor: dict[str, int] = {}
        self.handles = []

    def _take(self, name: str, n: int) -> torch.Tensor:
        table = self.masks[name]
        start = self.cursor.get(name, 0)
        self.cursor[name] = (start + n) % len(table)
        return table[(torch.arange(start, start + n) % len(table))]

    def row_mask(self, name: str, batch: int) -> torch.Tensor:
        """(B, C) mask for the next UNet call of `batch` rows on layer `name`."""
        if self.layout == "rows":
            return self._take(name, batch)
        if batch % 2:
            raise ValueError(f"a UNet call of {batch} rows has no unconditional/conditional halves")
        m = self._take(name, batch // 2)
        return torch.cat([m if self.rows == "all" else torch.ones_like(m), m])

    def __enter__(self) -> "ValueChannelMask":
        for name in self.masks:
            module = self.model.unet.get_submodule(name).to_v
            self.handles.append(module.register_forward_hook(
                lambda mod, args, out, name=name: masked_values(out, self.row_mask(name, out.shape[0]))))
        return self

    def __exit__(self, *exc) -> None:
        for h in self.handles:
            h.remove()
        self.handles.clear()
        self.cursor.clear()


def layer_masks(model, layers: list[str], blocked: list[list[list[int]]],
                generations: int = 1) -> dict[str, torch.Tensor]:
    """layer -> (P * generations, C_l) mask tables for P prompts' blocked sets (per prompt, per layer);
    only layers where some prompt blocks a channel."""
    out = {}
    for j, name in enumerate(layers):
        per_prompt = [b[j] for b in blocked]
        if any(per_prompt):
            channels = model.unet.get_submodule(name).to_v.out_features
            out[name] = channel_mask(per_prompt, channels, generations)
    return out


# -- the memorization check ------------------------------------------------------------------------

def check_noise(model, seed: int, position: int, num_seeds: int) -> torch.Tensor:
    """The check's (num_seeds, C, H, W) initial noises of the prompt at `position` (a derived stream)."""
    gen = derived_generator(seed, position, 0)
    x = torch.randn((num_seeds, *model.latent_shape), generator=gen, dtype=model.dtype)
    return x.to(model.device) * model.scheduler.init_noise_sigma


def sd_signal_weight(t: int = PUBLISHED_TIMESTEP) -> float:
    """sqrt(alpha_bar_t) of Stable Diffusion 1.x's noise schedule (scaled_linear betas 0.00085..0.012 over
    1,000 steps): how much of the image x_t keeps at NeMo's check timestep (0.085 at t = 961)."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return float(torch.cumprod(1 - betas, 0)[t].sqrt())


def check_timestep(model, t: int | None = None) -> torch.Tensor:
    """The check's timestep: `t` when given, else the model's training timestep whose sqrt(alpha_bar)
    is closest to SD 1.x's at NeMo's t = 961 (SD: 961 itself; the lab's linear schedule: about 700)."""
    if t is None:
        weight = model.scheduler.alphas_cumprod.double().sqrt()
        t = int((weight - sd_signal_weight()).abs().argmin())
    return torch.tensor(int(t), dtype=torch.long, device=model.device)


def noise_differences(model, x: torch.Tensor, t, cond, masks: dict[str, torch.Tensor] | None = None,
                      max_batch: int = 16) -> torch.Tensor:
    """(N, C, H, W) NeMo's scaled eps(x, t, c) - x of conditional-only rows (``single_step_differences``),
    with the per-row channel `masks` (layout "rows") applied, `max_batch` rows per UNet call."""
    out = []
    with torch.no_grad(), ValueChannelMask(model, masks or {}, layout="rows"):
        for i in range(0, len(x), max_batch):
            out.append(single_step_differences(model, SimpleNamespace(x_t=x[i:i + max_batch],
                                                                      cond=cond[i:i + max_batch]), t))
    return torch.cat(out)


def per_seed_max_similarity(z: torch.Tensor, convention: str = "nemo") -> torch.Tensor:
    """(G,) each seed's largest (MS-)SSIM with another seed of the same prompt, all pairs in one batch
    (NeMo's ``calculate_max_pairwise_ssim``, its per-seed flag)."""
    G = len(z)
    pairs = torch.combinations(torch.arange(G), r=2)
    s = paired_similarity(z[pairs[:, 0]], z[pairs[:, 1]], convention)
    return torch.stack([s[(pairs == g).any(1)].max() for g in range(G)])


# -- the method ------------------------------------------------------------------------------------

@register
class Nemo:
    name = "nemo"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "theta_min"
    off = {"max_neurons": 0}

    @dataclass
    class Params:
        theta_min: float = 1.0  # floor of the z-threshold (NeMo's --min_theta)
        threshold: float | None = None  # seeds over it are memorized; None: 0.428 on SD latents, derived elsewhere
        search_threshold: float | None = None  # the search's and refinement's; None: `threshold` (as the official)
        num_seeds: int = PUBLISHED_SEEDS  # initial noises of the check (NeMo: 10)
        max_neurons: int | None = None  # at most this many neurons per prompt (0 = off); None: no cap
        top_k_step: int = 1  # k of the top-k activations grows by this per round (0: z-scores only)
        prune_checks: int | None = None  # single-neuron pruning: at most this many checks per prompt
        rows: str = "all"  # rows whose channels are zeroed at sampling: "all" (NeMo's hook) or "cond"
        check_timestep: int | None = None  # the check's t; None: SD's 961, or the same signal level elsewhere
        percentile: float = 95.0  # derived threshold: this percentile of the ordinary prompts' NeMo-SSIM
        stats_prompts: str | None = None  # a prompt file for the statistics; None: the lab's or diffmem's own set
        ssim_convention: str = "nemo"  # MS-SSIM as NeMo's torchmetrics 1.3.2 computed it, or "torchmetrics"

        def __post_init__(self):
            def number(v):
                return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

            if not number(self.theta_min) or not THETA_END <= self.theta_min <= THETA_START:
                raise ValueError(f"--param theta_min={self.theta_min!r}: must be a number in "
                                 f"[{THETA_END}, {THETA_START}]")
            for name in ("threshold", "search_threshold"):
                if getattr(self, name) is not None and not number(getattr(self, name)):
                    raise ValueError(f"--param {name}={getattr(self, name)!r}: must be a number (an (MS-)SSIM)")
            if isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, int) or self.num_seeds < 2:
                raise ValueError(f"--param num_seeds={self.num_seeds!r}: must be an integer >= 2 (pairs of seeds)")
            if self.max_neurons is not None and (not isinstance(self.max_neurons, int) or self.max_neurons < 0):
                raise ValueError(f"--param max_neurons={self.max_neurons!r}: must be an integer >= 0 or none")
            if not isinstance(self.top_k_step, int) or self.top_k_step < 0:
                raise ValueError(f"--param top_k_step={self.top_k_step!r}: must be an integer >= 0")
            if self.prune_checks is not None and (not isinstance(self.prune_checks, int) or self.prune_checks < 0):
                raise ValueError(f"--param prune_checks={self.prune_checks!r}: must be an integer >= 0 or none")
            if self.rows not in ROWS:
                raise ValueError(f"--param rows={self.rows!r}: expected one of {', '.join(ROWS)}")
            if self.check_timestep is not None and (not isinstance(self.check_timestep, int)
                                                    or self.check_timestep < 0):
                raise ValueError(f"--param check_timestep={self.check_timestep!r}: must be a training timestep >= 0")
            if not number(self.percentile) or not 0 <= self.percentile <= 100:
                raise ValueError(f"--param percentile={self.percentile!r}: must be a number in [0, 100]")
            if self.ssim_convention not in SSIM_CONVENTIONS:
                raise ValueError(f"--param ssim_convention={self.ssim_convention!r}: expected one of "
                                 f"{', '.join(SSIM_CONVENTIONS)}")

    def __init__(self):
        self._cache = weakref.WeakKeyDictionary()  # model -> {key: statistics or derived threshold}

    def sweep(self, model, sampling) -> list[dict]:
        return [{"theta_min": v} for v in (4.0, 3.0, 2.0, 1.0)]  # a higher floor leaves more of the search to top-k

    # -- what comes from the ordinary prompts ----------------------------------------------------------
    def reference_prompts(self, model, params) -> tuple[str, list[str]]:
        """(name, prompts) of the ordinary prompts behind the statistics and a derived threshold."""
        if params.stats_prompts is not None:
            from diffmem.prompts import read_prompts

            prompts = [r.prompt for r in read_prompts(params.stats_prompts, model=model)]
            return f"file {params.stats_prompts}", prompts
        from diffmem.lab.prompts import own_reference_prompts

        own = own_reference_prompts(model)
        if own:
            return "the lab's reference prompts", own
        return f"diffmem's {ORDINARY_CAPTIONS.name}", ordinary_captions()

    def _cached(self, model, key: tuple, compute):
        per_model = self._cache.setdefault(model, {})
        if key not in per_model:
            per_model[key] = compute()
        return per_model[key]

    def statistics(self, model, layers, prompts):
        """Per layer (mean, std) of the prompts' activations, once per model and prompt set."""
        def compute():
            acts = []
            for i in range(0, len(prompts), 64):
                emb = model.encode_prompts(prompts[i:i + 64]).embeddings
                acts.append(value_activations(model, layers, emb))
            return channel_statistics([torch.cat(a) for a in zip(*acts)])

        return self._cached(model, ("stats", tuple(layers), _digest(prompts)), compute)

    def threshold(self, model, params, prompts, t, seed: int, batch_size: int) -> float:
        if params.threshold is not None:
            return float(params.threshold)
        if min(model.latent_shape[-2:]) > 40:  # MS-SSIM on SD-sized latents: NeMo's published value
            return PUBLISHED_THRESHOLD

        def compute():
            scores = []
            for i in range(0, len(prompts), 16):
                chunk = prompts[i:i + 16]
                cond = model.encode_prompts(chunk).repeat_interleave(params.num_seeds)
                x = torch.cat([check_noise(model, seed, REFERENCE_POSITION + i + j, params.num_seeds)
                               for j in range(len(chunk))])
                z = noise_differences(model, x, t, cond, max_batch=batch_size)
                scores += [max_pairwise_similarity(zz, params.ssim_convention) for zz in z.split(params.num_seeds)]
            return float(np.percentile(scores, params.percentile))

        key = ("threshold", _digest(prompts), params.num_seeds, params.percentile, params.ssim_convention, int(t), seed)
        return self._cached(model, key, compute)

    def check(self, model) -> str | None:
        """Refuse, in one line, a denoiser without NeMo's layers (a UNet's down and mid cross-attention)."""
        if not value_layers(model):
            return (f"cannot run on {model.family} ({model.name}): it prunes the value neurons of a UNet's "
                    "down and mid cross-attention layers, and this denoiser has none")
        return None

    # -- the search ------------------------------------------------------------------------------------
    def plan(self, model, unit: Unit, params) -> Plan:
        P, G, S = len(unit.prompts), unit.num_generations, params.num_seeds
        if params.max_neurons == 0:
            return Plan(info=[{"nemo_neurons": 0} for _ in range(P)])
        t = check_timestep(model, params.check_timestep)
        layers = value_layers(model)
        if not layers:
            raise ValueError(f"--method nemo: {self.check(model)}")
        source, ref = self.reference_prompts(model, params)
        stats = self.statistics(model, layers, ref)
        thr = self.threshold(model, params, ref, t, unit.config.seed, unit.sampling.batch_size)
        search_thr = thr if params.search_threshold is None else float(params.search_threshold)
        acts = value_activations(model, layers, unit.cond.embeddings)  # per layer (P, C)
        z = z_scores(acts, stats)
        width = max(model.denoiser.get_submodule(n).to_v.out_features for n in layers)  # SD: 1280, the official's k limit
        x = torch.cat([check_noise(model, unit.config.seed, pos, S) for pos in unit.positions])  # (P*S, ...)
        cond = unit.cond.repeat_interleave(S)
        batch, conv = unit.sampling.batch_size, params.ssim_convention
        seeds_of = [slice(p * S, (p + 1) * S) for p in range(P)]

        # 0. The unblocked check: z of every seed, and the seeds looked at (none: not memorized).
        z0 = noise_differences(model, x, t, cond, max_batch=batch)
        s0 = [max_pairwise_similarity(z0[sl], conv) for sl in seeds_of]
        look = [per_seed_max_similarity(z0[sl], conv) > thr for sl in seeds_of]
        memorized = [p for p in range(P) if look[p].any()]

        def check(sets: dict[int, list[list[int]]]) -> dict[int, float]:
            """Each prompt p in `sets` with its blocked lists (per layer), in one batched pass: the largest
            over its looked-at seeds of the (MS-)SSIM between the blocked and the unblocked z."""
            ps = list(sets)
            rows = torch.cat([torch.arange(p * S, (p + 1) * S) for p in ps])
            masks = layer_masks(model, layers, [sets[p] for p in ps], S)
            zb = noise_differences(model, x[rows], t, cond[rows], masks, max_batch=batch)
            return {p: float(paired_similarity(z0[seeds_of[p]][look[p]], zb[i * S:(i + 1) * S][look[p]], conv).max())
                    for i, p in enumerate(ps)}

        blocked = {p: [[] for _ in layers] for p in range(P)}
        score, level, theta_checked = {}, {}, {p: None for p in range(P)}
        rounds = {p: 0 for p in range(P)}
        search = {p: [] for p in range(P)}

        # 1. Initial selection (the official loop), all memorized prompts in lockstep.
        theta, k = {p: THETA_START for p in memorized}, {p: 0 for p in memorized}
        active = list(memorized)
        while active:
            sets = {p: select_neurons([zl[p] for zl in z], [al[p] for al in acts], theta[p], k[p], params.max_neurons)
                    for p in active}
            got = check(sets)
            still = []
            for p in active:
                blocked[p], score[p], rounds[p], theta_checked[p] = sets[p], got[p], rounds[p] + 1, theta[p]
                search[p].append([theta[p], k[p], sum(map(len, distinct_neurons(sets[p]))), got[p]])
                if got[p] <= search_thr:
                    level[p] = search_thr
                    continue
                stuck = theta[p] <= params.theta_min and params.top_k_step == 0  # nothing would change
                if theta[p] > params.theta_min:
                    theta[p] -= THETA_STEP
                k[p] += params.top_k_step
                if theta[p] <= THETA_END or k[p] >= width or stuck:
                    level[p] = got[p]  # the official's refinement_ssim_threshold = ssim
                    continue
                still.append(p)
            active = still

        # 2. Refinement, each removal kept when the check stays strictly under the prompt's level.
        order = list(reversed(range(len(layers))))
        for j in order:  # 2a. whole layers, last first
            trial = {p: [c if i != j else [] for i, c in enumerate(blocked[p])] for p in memorized if blocked[p][j]}
            if trial:
                for p, s in check(trial).items():
                    if s < level[p]:
                        blocked[p], score[p] = trial[p], s
        queue = {p: [(j, c) for j in order for c in blocked[p][j]] for p in memorized}  # 2b. single entries
        if params.prune_checks is not None:
            queue = {p: q[:params.prune_checks] for p, q in queue.items()}
        for step in range(max((len(q) for q in queue.values()), default=0)):
            trial = {}
            for p, q in queue.items():
                if step >= len(q):
                    continue
                j, c = q[step]
                layer = list(blocked[p][j])
                layer.remove(c)  # its first entry
                cut = [layer if i == j else cs for i, cs in enumerate(blocked[p])]
                if c in layer:  # still listed: the same channels are off, the check is the current one
                    if score[p] < level[p]:
                        blocked[p] = cut
                else:
                    trial[p] = cut
            if trial:
                for p, s in check(trial).items():
                    if s < level[p]:
                        blocked[p], score[p] = trial[p], s

        # 3. The plan: each prompt's channels off while its rows are sampled.
        sets = [distinct_neurons(blocked[p]) for p in range(P)]
        info = [{"nemo_neurons": sum(map(len, sets[p])),
                 "nemo_blocked": {layers[j]: cs for j, cs in enumerate(sets[p]) if cs},
                 "nemo_ssim_initial": s0[p], "nemo_seeds_flagged": int(look[p].sum()),
                 "nemo_check_final": score.get(p), "nemo_refinement_threshold": level.get(p),
                 "nemo_threshold": thr, "nemo_search_threshold": search_thr, "nemo_timestep": int(t),
                 "nemo_theta": theta_checked[p],
                 "nemo_search": search[p], "nemo_statistics": f"{source}, {len(ref)} prompts",
                 "nemo_ssim_convention": conv}
                for p in range(P)]
        iterations = torch.tensor([rounds[p] for p in range(P)], dtype=torch.long)
        masks = layer_masks(model, layers, sets, G)
        context = None
        if masks:
            masks = {n: m.to(model.device) for n, m in masks.items()}
            context = lambda: ValueChannelMask(model, masks, layout="pass", rows=params.rows)  # noqa: E731
        return Plan(context=context, iterations=iterations, info=info)


def _digest(prompts: list[str]) -> str:
    """A key for a prompt set in the caches."""
    return hashlib.sha1("\n".join(prompts).encode("utf-8")).hexdigest()

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
2. z-scores against per-channel statistics (mean, unbiased std) of a_l over non-memorized prompts:
   z = (a - mean) / std. NeMo ships LAION statistics for SD 1.4 only (not at hand here): on the lab
   they come from the model's own reference prompts (``own_reference_prompts``: novel captions), on
   other models from ``stats_prompts`` (a prompt file) or else from the prompts of the work unit.
3. Initial selection: block the channels with |z| > theta plus the k largest a_l of each layer,
   starting at theta = 5, k = 0; after each round theta drops by 0.25 (not below ``theta_min``, 1)
   and k grows by ``top_k_step`` (1), until the memorization check falls to the threshold or theta
   reaches its floor (the code's defaults ``--initial_theta 5 --theta_reduction_per_step 0.25
   --min_theta 1``, k from 0 by 1).
4. Refinement (pruning): layer by layer (last layer first), unblock a whole layer when the check
   stays at or under the threshold without it; then neuron by neuron in the remaining layers (last
   first), at most ``prune_checks`` checks per prompt (None: every neuron, as the code). When the
   search ended above the threshold, the pruning keeps the level it reached (the code's
   ``refinement_ssim_threshold = ssim``).

The memorization check. NeMo-SSIM (``diffmem.detectors.nemo``, whose functions are used): for
``num_seeds`` initial noises x_T of the prompt (NeMo: 10), z = eps(x_T, t, c) - x_T with no step
taken before, each channel min-max scaled; the score is the largest pairwise (MS-)SSIM (MS-SSIM on
latents over 40 pixels, else SSIM with sigma 1). NeMo's t is 961 (the second step of DDIM-50); on a
model with another noise schedule t is the training timestep where x_t keeps the same share of the
image, sqrt(alpha_bar_t) = 0.085 as on SD 1.x at 961 (the lab's linear schedule: about t = 700; at
its own t = 961 the image's weight is 0.009 and memorized and ordinary prompts look alike);
``check_timestep`` overrides it. With ``check="original"`` the check is instead what NeMo's search
loop compares: the largest over seeds of the (MS-)SSIM between the blocked and the unblocked z of
the same seed (only the seeds flagged memorized, as the code). The check's noises come from
``derived_generator(config.seed, position, stream=0)``, never the seed contract's draw (reference
prompt r: position 10^7 + r). NeMo's own search stops at theta = 1 without checking it; here the
floor is checked too.
A prompt whose unblocked check is already at or under the threshold is not memorized: nothing is
blocked (as the code skips it).

Threshold: NeMo's 0.428 (MS-SSIM) on Stable Diffusion's latents (sides over 40). Elsewhere (the lab:
16-pixel images, single-scale SSIM; tiny test models) it is derived from the model's non-memorized
prompts, the same ones as the statistics: the ``percentile`` (default 95th) of their unblocked
NeMo-SSIM over the same number of seeds, so that a prompt counts as memorized when it is more
self-similar across seeds than 95% of ordinary prompts (cached per model). ``threshold`` overrides
it.

Deactivation. NeMo's hook (``hooks/block_activations.py``) multiplies the chosen channels of
``to_v``'s output by 0 on every row of the UNet call, the unconditional rows included (its pipeline
puts both branches in one batch); ``rows="all"`` does so, ``rows="cond"`` leaves the unconditional
rows alone. In a batched unit each row gets its own prompt's channels: a forward hook multiplies
``to_v``'s (B, T, C) output by a per-row (B, 1, C) mask in the pass's layout (unconditional rows
first, then the conditional rows, in every UNet call).

Off: ``max_neurons=0`` (nothing is localized or blocked; sampling unchanged). Sweep knob
``theta_min``: the floor of the z-threshold, 4 to 1 (a higher floor blocks fewer neurons).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from types import SimpleNamespace

import numpy as np
import torch

from diffmem.attention import cross_attention_layers
from diffmem.detectors.nemo import max_pairwise_similarity, single_step_differences
from diffmem.mitigations import Plan, Unit, derived_generator, register

PUBLISHED_THRESHOLD = 0.428  # NeMo's MS-SSIM threshold on SD 1.4
PUBLISHED_SEEDS = 10
PUBLISHED_TIMESTEP = 961  # NeMo's check: the second timestep of DDIM-50 on SD 1.4, no step taken before it
THETA_START = 5.0
THETA_STEP = 0.25
CHECKS = ("pairwise", "original")
ROWS = ("all", "cond")
REFERENCE_POSITION = 10_000_000  # reference prompt r's check noises: derived_generator(seed, this + r, 0)


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
        raise ValueError(f"nemo: channel statistics need >= 2 non-memorized prompts, got {len(activations[0])} "
                         "(give --param stats_prompts=FILE)")
    return [(a.mean(0), a.std(0)) for a in activations]


def z_scores(activations: list[torch.Tensor], stats: list[tuple[torch.Tensor, torch.Tensor]]) -> list[torch.Tensor]:
    """|a - mean| / std per layer: (P, C_l) each (a channel of std 0 gets z = 0 where a equals its mean)."""
    return [((a - m).abs() / s).nan_to_num(nan=0.0, posinf=torch.finfo(torch.float32).max)
            for a, (m, s) in zip(activations, stats)]


def select_neurons(z: list[torch.Tensor], activation: list[torch.Tensor], theta: float, k: int,
                   max_neurons: int | None = None) -> list[list[int]]:
    """One prompt's initial selection: per layer, the channels with z > theta plus the k largest
    activations (z, activation: (C_l,) per layer). With `max_neurons`, only that many are kept over
    all layers, the largest z first. Returns sorted channel indices per layer."""
    chosen = []
    for zl, al in zip(z, activation):
        idx = set((zl > theta).nonzero().flatten().tolist())
        if k > 0:
            idx |= set(al.topk(min(k, len(al))).indices.tolist())
        chosen.append(sorted(idx))
    if max_neurons is not None and sum(map(len, chosen)) > max_neurons:
        ranked = sorted(((float(z[l][c]), l, c) for l, cs in enumerate(chosen) for c in cs), reverse=True)
        keep = {(l, c) for _, l, c in ranked[:max_neurons]}
        chosen = [[c for c in cs if (l, c) in keep] for l, cs in enumerate(chosen)]
    return chosen


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


def paired_similarity(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """(MS-)SSIM of matching rows of two (N, C, H, W) scaled differences, as NeMo-SSIM picks it: (N,)."""
    from diffmem.similarity import ms_ssim, ssim

    return ms_ssim(a, b) if min(a.shape[-2:]) > 40 else ssim(a, b, sigma=1.0)


def per_seed_max_similarity(z: torch.Tensor) -> torch.Tensor:
    """(G,) each seed's largest (MS-)SSIM with another seed of the same prompt (NeMo's per-seed flag)."""
    G = len(z)
    pairs = torch.combinations(torch.arange(G), r=2)
    s = paired_similarity(z[pairs[:, 0]], z[pairs[:, 1]])
    return torch.stack([s[(pairs == g).any(1)].max() for g in range(G)])


# -- the method ------------------------------------------------------------------------------------

@register
class Nemo:
    name = "nemo"
    knob = "theta_min"
    off = {"max_neurons": 0}

    @dataclass
    class Params:
        theta_min: float = 1.0  # floor of the z-threshold (NeMo's --min_theta)
        threshold: float | None = None  # the check's threshold; None: 0.428 on SD latents, derived elsewhere
        num_seeds: int = PUBLISHED_SEEDS  # initial noises of the check (NeMo: 10)
        max_neurons: int | None = None  # at most this many neurons per prompt (0 = off); None: no cap
        top_k_step: int = 1  # k of the top-k activations grows by this per round (0: z-scores only)
        prune_checks: int | None = None  # neuron-by-neuron pruning: at most this many checks per prompt
        check: str = "pairwise"  # "pairwise" (NeMo-SSIM) or "original" (blocked vs unblocked, NeMo's loop)
        rows: str = "all"  # rows whose channels are zeroed at sampling: "all" (NeMo's hook) or "cond"
        check_timestep: int | None = None  # the check's t; None: SD's 961, or the same signal level elsewhere
        percentile: float = 95.0  # derived threshold: this percentile of the non-memorized prompts' NeMo-SSIM
        stats_prompts: str | None = None  # a prompt file for the statistics (non-lab models)

        def __post_init__(self):
            def number(v):
                return not isinstance(v, bool) and isinstance(v, (int, float)) and math.isfinite(v)

            if not number(self.theta_min) or not 0 <= self.theta_min <= THETA_START:
                raise ValueError(f"--param theta_min={self.theta_min!r}: must be a number in [0, {THETA_START}]")
            if self.threshold is not None and not number(self.threshold):
                raise ValueError(f"--param threshold={self.threshold!r}: must be a number (an (MS-)SSIM)")
            if isinstance(self.num_seeds, bool) or not isinstance(self.num_seeds, int) or self.num_seeds < 2:
                raise ValueError(f"--param num_seeds={self.num_seeds!r}: must be an integer >= 2 (pairs of seeds)")
            if self.max_neurons is not None and (not isinstance(self.max_neurons, int) or self.max_neurons < 0):
                raise ValueError(f"--param max_neurons={self.max_neurons!r}: must be an integer >= 0 or none")
            if not isinstance(self.top_k_step, int) or self.top_k_step < 0:
                raise ValueError(f"--param top_k_step={self.top_k_step!r}: must be an integer >= 0")
            if self.prune_checks is not None and (not isinstance(self.prune_checks, int) or self.prune_checks < 0):
                raise ValueError(f"--param prune_checks={self.prune_checks!r}: must be an integer >= 0 or none")
            if self.check not in CHECKS:
                raise ValueError(f"--param check={self.check!r}: expected one of {', '.join(CHECKS)}")
            if self.rows not in ROWS:
                raise ValueError(f"--param rows={self.rows!r}: expected one of {', '.join(ROWS)}")
            if self.check_timestep is not None and (not isinstance(self.check_timestep, int)
                                                    or self.check_timestep < 0):
                raise ValueError(f"--param check_timestep={self.check_timestep!r}: must be a training timestep >= 0")
            if not number(self.percentile) or not 0 <= self.percentile <= 100:
                raise ValueError(f"--param percentile={self.percentile!r}: must be a number in [0, 100]")

    def __init__(self):
        self._cache: dict[tuple, object] = {}  # statistics and derived thresholds per model

    def sweep(self, model, sampling) -> list[dict]:
        return [{"theta_min": v} for v in (4.0, 3.0, 2.0, 1.0)]  # a higher floor blocks fewer neurons

    # -- what comes from the non-memorized prompts ----------------------------------------------------
    def reference_prompts(self, model, params, unit_prompts: list[str]) -> tuple[str, list[str]]:
        if params.stats_prompts is not None:
            from diffmem.prompts import read_prompts

            prompts = [r.prompt for r in read_prompts(params.stats_prompts, model=model)]
            return f"file:{params.stats_prompts}", prompts
        from diffmem.lab.prompts import own_reference_prompts

        own = own_reference_prompts(model)
        if own:
            return "own", own
        return "unit:" + "\n".join(unit_prompts), list(unit_prompts)

    def statistics(self, model, layers, key, prompts):
        k = ("stats", model.name, id(model), key)
        if k not in self._cache:
            acts = []
            for i in range(0, len(prompts), 64):
                emb = model.encode_prompts(prompts[i:i + 64]).embeddings
                acts.append(value_activations(model, layers, emb))
            self._cache[k] = channel_statistics([torch.cat(a) for a in zip(*acts)])
        return self._cache[k]

    def threshold(self, model, params, key, prompts, t, seed: int, batch_size: int) -> float:
        if params.threshold is not None:
            return float(params.threshold)
        if min(model.latent_shape[-2:]) > 40:  # MS-SSIM on SD-sized latents: NeMo's published value
            return PUBLISHED_THRESHOLD
        k = ("threshold", model.name, id(model), key, params.num_seeds, params.percentile, int(t), seed)
        if k not in self._cache:
            scores = []
            for i in range(0, len(prompts), 16):
                chunk = prompts[i:i + 16]
                cond = model.encode_prompts(chunk).repeat_interleave(params.num_seeds)
                x = torch.cat([check_noise(model, seed, REFERENCE_POSITION + i + j, params.num_seeds)
                               for j in range(len(chunk))])
                z = noise_differences(model, x, t, cond, max_batch=batch_size)
                scores += [max_pairwise_similarity(zz) for zz in z.split(params.num_seeds)]
            self._cache[k] = float(np.percentile(scores, params.percentile))
        return self._cache[k]

    def check(self, model) -> str | None:
        """Refuse, in one line, a denoiser without NeMo's layers (a UNet's down and mid cross-attention)."""
        if not value_layers(model):
            return (f"cannot run on {model.family} ({model.name}): it prunes the value neurons of a UNet's "
                    "down and mid cross-attention layers, and this denoiser has none")
        return None

    # -- the search --------------------------------------------------------------------------------------
    def plan(self, model, unit: Unit, params) -> Plan:
        P, G, S = len(unit.prompts), unit.num_generations, params.num_seeds
        if params.max_neurons == 0:
            return Plan(info=[{"nemo_neurons": 0} for _ in range(P)])
        t = check_timestep(model, params.check_timestep)
        layers = value_layers(model)
        if not layers:
            raise ValueError(f"--method nemo: {self.check(model)}")
        key, ref = self.reference_prompts(model, params, unit.prompts)
        stats = self.statistics(model, layers, key, ref)
        thr = self.threshold(model, params, key, ref, t, unit.config.seed, unit.sampling.batch_size)
        acts = value_activations(model, layers, unit.cond.embeddings)  # per layer (P, C)
        z = z_scores(acts, stats)
        x = torch.cat([check_noise(model, unit.config.seed, pos, S) for pos in unit.positions])  # (P*S, ...)
        cond = unit.cond.repeat_interleave(S)
        batch = unit.sampling.batch_size
        seeds_of = [slice(p * S, (p + 1) * S) for p in range(P)]

        # 0. The unblocked check: z of every prompt, and which prompts are memorized at all.
        z0 = noise_differences(model, x, t, cond, max_batch=batch)
        s0 = [max_pairwise_similarity(z0[sl]) for sl in seeds_of]
        look = [per_seed_max_similarity(z0[sl]) > thr for sl in seeds_of]  # NeMo's seeds to look at ("original")

        def check(sets: dict[int, list[list[int]]]) -> dict[int, float]:
            """The check of each prompt p in `sets` with its blocked set (per layer): one batched call."""
            ps = list(sets)
            rows = torch.cat([torch.arange(p * S, (p + 1) * S) for p in ps])
            masks = layer_masks(model, layers, [sets[p] for p in ps], S)
            zb = noise_differences(model, x[rows], t, cond[rows], masks, max_batch=batch)
            out = {}
            for i, p in enumerate(ps):
                zp = zb[i * S:(i + 1) * S]
                if params.check == "pairwise":
                    out[p] = max_pairwise_similarity(zp)
                else:
                    keep = look[p]
                    out[p] = float(paired_similarity(z0[seeds_of[p]][keep], zp[keep]).max())
            return out

        empty = [[] for _ in layers]
        blocked = {p: empty for p in range(P)}
        score = {p: (s0[p] if params.check == "pairwise" else 1.0) for p in range(P)}
        memorized = [p for p in range(P) if s0[p] > thr]
        rounds = {p: 0 for p in range(P)}
        search = {p: [] for p in range(P)}
        theta_reached = {p: None for p in range(P)}

        # 1. Initial selection: theta from 5 down to theta_min, k up, all memorized prompts in lockstep.
        active = list(memorized)
        r = 0
        while active:
            theta = max(THETA_START - r * THETA_STEP, params.theta_min)
            k = r * params.top_k_step
            sets = {p: select_neurons([zl[p] for zl in z], [al[p] for al in acts], theta, k, params.max_neurons)
                    for p in active}
            got = check(sets)
            for p in active:
                blocked[p], score[p], rounds[p], theta_reached[p] = sets[p], got[p], r + 1, theta
                search[p].append([theta, k, sum(map(len, sets[p])), got[p]])
            floor = theta <= params.theta_min
            active = [p for p in active if got[p] > thr and not floor]
            r += 1

        # 2. Pruning, against the threshold, or the level reached when the search stayed above it.
        level = {p: max(thr, score[p]) for p in memorized}
        order = list(reversed(range(len(layers))))
        for j in order:  # 2a. whole layers, last first
            trial = {p: [c if i != j else [] for i, c in enumerate(blocked[p])] for p in memorized if blocked[p][j]}
            if trial:
                got = check(trial)
                for p, s in got.items():
                    if s <= level[p]:
                        blocked[p], score[p] = trial[p], s
        queue = {p: [(j, c) for j in order for c in blocked[p][j]] for p in memorized}  # 2b. single neurons
        if params.prune_checks is not None:
            queue = {p: q[:params.prune_checks] for p, q in queue.items()}
        for step in range(max((len(q) for q in queue.values()), default=0)):
            trial = {p: [[n for n in cs if (i, n) != q[step]] for i, cs in enumerate(blocked[p])]
                     for p, q in queue.items() if step < len(q)}
            got = check(trial)
            for p, s in got.items():
                if s <= level[p]:
                    blocked[p], score[p] = trial[p], s

        # 3. The plan: each prompt's channels off while its rows are sampled.
        sets = [blocked[p] for p in range(P)]
        info = [{"nemo_neurons": sum(map(len, sets[p])),
                 "nemo_blocked": {layers[j]: cs for j, cs in enumerate(sets[p]) if cs},
                 "nemo_ssim_initial": s0[p], "nemo_check_final": score[p] if p in memorized else s0[p],
                 "nemo_threshold": thr, "nemo_timestep": int(t), "nemo_theta": theta_reached[p],
                 "nemo_search": search[p]}
                for p in range(P)]
        iterations = torch.tensor([rounds[p] for p in range(P)], dtype=torch.long)
        masks = layer_masks(model, layers, sets, G)
        context = None
        if masks:
            masks = {n: m.to(model.device) for n, m in masks.items()}
            context = lambda: ValueChannelMask(model, masks, layout="pass", rows=params.rows)  # noqa: E731
        return Plan(context=context, iterations=iterations, info=info)

"""Cross-attention access through the tracked pass: record the maps, edit the logits.

Detectors and mitigations that read or change cross-attention (Ren et al.'s attention entropy and
attention re-weighting, Bright Ending's end-token attention) go through ONE attention processor,
``CrossAttentionProcessor``, installed on the cross-attention layers of a diffusers UNet (the
``attn2`` of its transformer blocks; layers are named as in ``unet.attn_processors``, e.g.
``"down_blocks.1.attentions.0.transformer_blocks.0.attn2.processor"``). It computes, per head,

    P = softmax(E(Q K^T * scale)),   out = P V

with Q, K, V from the layer's own ``to_q``/``to_k``/``to_v`` and ``scale = attn.scale``
(1/sqrt(d_head)), where E is an optional ``AttentionEdit`` of the logits, and hands the
conditional rows of P to any ``CrossAttentionRecorder`` listening on that layer. P is formed
explicitly only while a recorder captures; the output P V goes through PyTorch's
``scaled_dot_product_attention`` with the edit folded in exactly (see ``CrossAttentionProcessor``).

- ``with CrossAttentionRecorder(model, layers, steps) as rec:`` installs the processor on the chosen
  layers and restores the original processor objects on exit. Passed to the pass as a recorder
  (``sample_unit(..., recorders=[rec])``), it keeps ``rec.maps[step_index][layer]``: the (N, heads,
  HW, T) probabilities of the N conditional rows (unconditional rows are not kept);
  ``rec.layer_info[layer]`` gives the layer's block, heads and (H, W).
- ``with attention_edit(model, AttentionEdit(...)):`` scales one token's logit (Ren et al.'s c1 on
  the start token) and masks key positions (logit -inf: padding, end tokens) in every UNet call.
- With nothing requested (no layer, no step) nothing is installed, so diffusers' fused attention
  (``scaled_dot_product_attention``) runs unchanged; outside these contexts the UNet is untouched.

Batch layout: the pass puts the unconditional rows first and the conditional rows second in every
UNet call (``predict_branches``), so "conditional rows" are the second half of each call's batch.
A UNet call made with the conditional rows only (``predict_branches`` given ``eps_uncond``) must use
``AttentionEdit(rows="all")``; the recorder assumes the pass's layout.
"""

from __future__ import annotations

import math
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterable, Iterator, Sequence, Union

import torch
import torch.nn.functional as F

SUFFIX = "attn2.processor"
ROWS = ("cond", "uncond", "all")

LayerSelection = Union[None, Sequence[str], Callable[[str], bool]]


# -- layers ---------------------------------------------------------------------------------------

def _unet(model) -> torch.nn.Module:
    return getattr(model, "unet", model)


def cross_attention_layers(model) -> list[str]:
    """Names (as in ``unet.attn_processors``) of the cross-attention layers of a model or UNet."""
    return [name for name in _unet(model).attn_processors if name.endswith(SUFFIX)]


def select_layers(model, layers: LayerSelection = None, names: list[str] | None = None,
                  kind: str = "cross-attention") -> list[str]:
    """The layers chosen by `layers` among `names` (default: the model's cross-attention layers; `kind`
    names them in errors): None = all; a list of names (the ``.processor`` suffix may be left off); or a
    predicate on the name."""
    names = cross_attention_layers(model) if names is None else names
    if layers is None:
        return names
    if callable(layers):
        return [n for n in names if layers(n)]
    if isinstance(layers, str):
        layers = [layers]
    chosen = []
    for layer in layers:
        name = layer if layer.endswith(".processor") else f"{layer}.processor"
        if name not in names:
            raise ValueError(f"{layer!r} is not a {kind} layer of this denoiser; its {kind} layers "
                             f"are: {', '.join(names)}")
        chosen.append(name)
    return chosen


def down_cross_attention_blocks(model) -> list[list[str]]:
    """The cross-attention layers of the UNet's down path, grouped by down block, highest resolution
    first: the roles published layer choices map onto (Ren et al.'s LE layer is the last layer of
    the second group on SD 1.x; Bright Ending's layers are the first group)."""
    groups: dict[str, list[str]] = {}
    for name in cross_attention_layers(model):
        if name.startswith("down_blocks."):
            groups.setdefault(block_of(name), []).append(name)
    return [groups[b] for b in sorted(groups, key=lambda b: int(b.split(".")[1]))]


def require_down_cross_attention(model, method: str) -> list[list[str]]:
    """``down_cross_attention_blocks(model)``, refused in one line naming `method` and the model's family
    when there are none (a diffusion transformer has no down blocks)."""
    groups = down_cross_attention_blocks(model)
    if not groups:
        raise ValueError(f"{method} cannot run on {model.family} ({model.name}): it reads the cross-attention of "
                         "a UNet's down blocks, and this denoiser has none")
    return groups


def block_of(name: str) -> str:
    """The UNet block a layer sits in: "down_blocks.1", "mid_block", "up_blocks.0"."""
    head = name.split(".attentions.")[0]
    return head if head != name else name.split(".")[0]


def resolution_of(query_tokens: int, latent_hw: tuple[int, int] | None) -> tuple[int, int] | None:
    """(H, W) of a layer's feature map from its number of query tokens H*W and the latent (H0, W0)
    (each down-sampling halves a side, rounding up); None when no power-of-two factor fits."""
    if latent_hw is not None:
        h0, w0 = latent_hw
        f = 1
        while f <= max(h0, w0):
            h, w = -(-h0 // f), -(-w0 // f)
            if h * w == query_tokens:
                return h, w
            f *= 2
    s = math.isqrt(query_tokens)
    return (s, s) if s * s == query_tokens else None


@dataclass(frozen=True)
class LayerInfo:
    name: str  # as in unet.attn_processors
    block: str  # "down_blocks.1", "mid_block", "up_blocks.0", ...
    heads: int
    resolution: tuple[int, int] | None  # (H, W) of the query feature map: HW = H * W query tokens
    tokens: int  # T, the key/value (text token) length


# -- the edit -------------------------------------------------------------------------------------

@dataclass
class AttentionEdit:
    """A per-token edit of the cross-attention logits, applied before the softmax.

    token, scale: the logit q.k_token * attn.scale of key position `token` is multiplied by `scale`
      (Ren et al. scale the start token's logit, position 0, by c1); scale 1.0 leaves it alone. (A
      layer's own additive attention mask, which SD does not use, is added after the scaling.)
    mask_keys: key positions whose logit becomes -inf (padding, end tokens): a list of positions
      (the same for every row), a (T,) bool tensor, or an (N, T) bool tensor with one row per edited
      row of the pass, in the pass's row order (then every UNet call takes the next rows, wrapping
      around after N, so one pass must run in full per N rows).
    rows: which rows of each UNet call are edited: "cond" (the second half, the default), "uncond"
      (the first half) or "all".
    spike_tau, spike_scale: GUARD's attenuation (``spike_tokens``): per edited row and head, the logits
      of every key token whose largest logit over the queries has a z-score above spike_tau (over the
      positions after the start token) are multiplied by spike_scale, at every query. None: off.
    """

    token: int = 0
    scale: float = 1.0
    mask_keys: Sequence[int] | torch.Tensor | None = None
    rows: str = "cond"
    spike_tau: float | None = None
    spike_scale: float = 1.0

    def __post_init__(self):
        if self.rows not in ROWS:
            raise ValueError(f"AttentionEdit rows {self.rows!r}: expected one of {', '.join(ROWS)}")
        if isinstance(self.mask_keys, torch.Tensor):
            if self.mask_keys.dtype != torch.bool or self.mask_keys.ndim not in (1, 2):
                raise ValueError("AttentionEdit mask_keys tensor: expected bool (T,) or (N, T)")
        elif self.mask_keys is not None:
            self.mask_keys = tuple(int(k) for k in self.mask_keys)


def next_rows(cursor: dict[str, int], layer: str, n: int, table_rows: int) -> torch.Tensor:
    """(n,) the indices of the next `n` rows of a per-row table of `table_rows` rows for `layer`, wrapping
    around after its end; `cursor` keeps each layer's position between the UNet calls of a pass."""
    start = cursor.get(layer, 0)
    cursor[layer] = (start + n) % table_rows
    return torch.arange(start, start + n) % table_rows


class _EditState:
    """One installation of an edit: the edit and, for per-row masks, where each layer is in its rows."""

    def __init__(self, edit: AttentionEdit):
        self.edit = edit
        self.cursor: dict[str, int] = {}

    def apply(self, layer: str, key: torch.Tensor, bias: torch.Tensor | None, query: torch.Tensor | None = None,
              logit_scale: float = 1.0):
        """The edit on keys (B, heads, T, d) and the additive logit bias (broadcastable to (B, heads,
        L, T), or None) -> (key, bias), not in place (autograd goes through). Spikes are found on the
        logits of `query` (B, heads, L, d) times `logit_scale`.

        Scaling key row j of a batch row by s scales exactly that row's logits q.k_j * scale by s, so
        the token scales act on the keys; masked keys get a -inf bias.
        """
        e = self.edit
        B, T = key.shape[0], key.shape[2]
        rows = _rows(e.rows, B)
        n = rows.stop - rows.start
        if n == 0:
            return key, bias
        if e.spike_tau is not None and e.spike_scale != 1.0:
            logits = torch.matmul(query[rows].float(), key[rows].float().transpose(-1, -2)) * logit_scale
            factor = torch.ones(B, key.shape[1], T, 1, dtype=key.dtype, device=key.device)
            factor[rows] = torch.where(spike_tokens(logits, e.spike_tau), e.spike_scale, 1.0)[..., None].to(key.dtype)
            key = key * factor
        if e.scale != 1.0:
            if not -T <= e.token < T:
                raise ValueError(f"AttentionEdit token {e.token}: out of range for {T} key tokens")
            factor = torch.ones(B, 1, T, 1, dtype=key.dtype, device=key.device)
            factor[rows, :, e.token] = e.scale
            key = key * factor
        if e.mask_keys is not None:
            mask = torch.zeros(B, T, dtype=torch.bool, device=key.device)
            if isinstance(e.mask_keys, torch.Tensor) and e.mask_keys.ndim == 2:
                table = e.mask_keys.to(key.device)
                mask[rows] = table[next_rows(self.cursor, layer, n, len(table)).to(key.device), :T]
            elif isinstance(e.mask_keys, torch.Tensor):
                mask[rows] = e.mask_keys.to(key.device)[:T]
            else:
                mask[rows, list(e.mask_keys)] = True
            if mask[rows].all(dim=-1).any():
                raise ValueError("AttentionEdit mask_keys masks every key of a row: its attention is undefined")
            masked = torch.zeros(B, 1, 1, T, dtype=torch.float32, device=key.device)
            masked = masked.masked_fill(mask[:, None, None, :], float("-inf"))
            bias = masked if bias is None else bias + masked
        return key, bias


def spike_tokens(logits: torch.Tensor, tau: float) -> torch.Tensor:
    """GUARD's spikes (Zhao et al., ICML 2026; the released code's reading, on logits): logits (N, heads, L, T)
    -> (N, heads, T) bool, True at key positions i >= 1 whose largest logit over the L queries, M_i, has
    z = (M_i - mean) / (std + 1e-6) > tau, mean and (unbiased) std of M over positions 1..T-1."""
    M = logits.amax(dim=-2)
    content = M[..., 1:]
    z = (M - content.mean(-1, keepdim=True)) / (content.std(-1, keepdim=True) + 1e-6)
    spikes = z > tau
    spikes[..., 0] = False
    return spikes


def _rows(which: str, batch: int) -> slice:
    if which == "all":
        return slice(0, batch)
    if batch % 2:
        raise ValueError(f"a UNet call of {batch} rows has no unconditional/conditional halves; a call without "
                         "unconditional rows needs rows='all'")
    return slice(batch // 2, batch) if which == "cond" else slice(0, batch // 2)


# -- the processor --------------------------------------------------------------------------------

class CrossAttentionProcessor:
    """Attention of one layer with its probabilities at hand: P = softmax(Q K^T * attn.scale + bias).

    Q, K, V come from the layer's own projections, with the same handling as diffusers'
    ``AttnProcessor`` of spatial/group norms, ``norm_cross``, the attention mask, ``to_out``,
    ``residual_connection`` and ``rescale_output_factor``. `edits` change K (token scale) and the
    bias (masked keys), in order. When a recorder in `sinks` is capturing, P is computed explicitly
    (float32) and its conditional rows are handed over.

    The output P V itself goes through ``F.scaled_dot_product_attention`` on the same (edited) Q, K,
    V and bias: the same value as the explicit product, but it keeps the fused path's rounding, so
    recording and an identity edit leave sampling bit-for-bit as without them (the explicit
    ``softmax(.) @ V``, like diffusers' own ``AttnProcessor``, drifts from the fused path by ~3e-5
    after six guided DDIM steps of the tiny test model).
    """

    def __init__(self, name: str, edits: Sequence[_EditState] = (), sinks: Sequence["CrossAttentionRecorder"] = ()):
        self.name = name
        self.edits = tuple(edits)
        self.sinks = tuple(sinks)

    def joined(self, edit: _EditState | None = None, sink: "CrossAttentionRecorder | None" = None):
        """A processor doing this one's work and also `edit` / feeding `sink` (for nested contexts)."""
        return CrossAttentionProcessor(self.name, self.edits + ((edit,) if edit else ()),
                                       self.sinks + ((sink,) if sink else ()))

    def __call__(self, attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None = None,
                 attention_mask: torch.Tensor | None = None, temb: torch.Tensor | None = None, *args, **kwargs):
        residual = hidden_states
        if attn.spatial_norm is not None:
            hidden_states = attn.spatial_norm(hidden_states, temb)
        input_ndim = hidden_states.ndim
        if input_ndim == 4:
            b, c, h, w = hidden_states.shape
            hidden_states = hidden_states.view(b, c, h * w).transpose(1, 2)
        if attn.group_norm is not None:
            hidden_states = attn.group_norm(hidden_states.transpose(1, 2)).transpose(1, 2)
        context = hidden_states if encoder_hidden_states is None else encoder_hidden_states
        if encoder_hidden_states is not None and attn.norm_cross:
            context = attn.norm_encoder_hidden_states(context)
        B, L, _ = hidden_states.shape
        T = context.shape[1]
        heads = attn.heads

        def split(x):  # (B, S, heads * d) -> (B, heads, S, d)
            return x.view(B, x.shape[1], heads, -1).transpose(1, 2)

        q, k, v = split(attn.to_q(hidden_states)), split(attn.to_k(context)), split(attn.to_v(context))
        if getattr(attn, "norm_q", None) is not None:
            q = attn.norm_q(q)
        if getattr(attn, "norm_k", None) is not None:
            k = attn.norm_k(k)
        bias = None  # additive logit bias, broadcastable to (B, heads, L, T)
        if attention_mask is not None:
            bias = attn.prepare_attention_mask(attention_mask, T, B).view(B, heads, -1, T).float()
        for state in self.edits:
            k, bias = state.apply(self.name, k, bias, q, attn.scale)
        if any(sink.active for sink in self.sinks):  # explicit probabilities of the conditional rows only
            rows = _rows("cond", B)
            logits = torch.matmul(q[rows].float(), k[rows].float().transpose(-1, -2)) * attn.scale  # (B/2, heads, L, T)
            if bias is not None:
                logits = logits + (bias[rows] if bias.shape[0] == B else bias)
            probs = logits.softmax(dim=-1)
            for sink in self.sinks:
                if sink.active:
                    sink.capture(self.name, attn, probs, T)
        scale = None if attn.scale == q.shape[-1] ** -0.5 else attn.scale  # None: SDPA's own 1/sqrt(d), as diffusers
        out = F.scaled_dot_product_attention(q, k, v, attn_mask=None if bias is None else bias.to(q.dtype),
                                             dropout_p=0.0, is_causal=False, scale=scale)  # (B, heads, L, d)
        out = out.transpose(1, 2).reshape(B, L, -1).to(q.dtype)
        out = attn.to_out[0](out)  # linear projection
        out = attn.to_out[1](out)  # dropout
        if input_ndim == 4:
            out = out.transpose(-1, -2).reshape(b, c, h, w)
        if attn.residual_connection:
            out = out + residual
        return out / attn.rescale_output_factor


# -- installing -----------------------------------------------------------------------------------

def _install(model, names: Iterable[str], edit: _EditState | None = None,
             sink: "CrossAttentionRecorder | None" = None) -> dict[str, object]:
    """Put a CrossAttentionProcessor on each layer (joining one already there); returns the previous
    processor objects, for ``_restore``."""
    unet = _unet(model)
    previous = {}
    for name in names:
        module = unet.get_submodule(name[:-len(".processor")])
        old = module.processor
        previous[name] = old
        new = (old.joined(edit, sink) if isinstance(old, CrossAttentionProcessor)
               else CrossAttentionProcessor(name, (edit,) if edit else (), (sink,) if sink else ()))
        module.set_processor(new)
    return previous


def _restore(model, previous: dict[str, object]) -> None:
    unet = _unet(model)
    for name, old in previous.items():
        unet.get_submodule(name[:-len(".processor")]).set_processor(old)


@contextmanager
def attention_edit(model, edit: AttentionEdit, layers: LayerSelection = None) -> Iterator[AttentionEdit]:
    """Apply `edit` to the cross-attention logits of the chosen layers (default: all) in every UNet
    call inside the block; the original processors are back on exit."""
    previous = _install(model, select_layers(model, layers), edit=_EditState(edit))
    try:
        yield edit
    finally:
        _restore(model, previous)


class CrossAttentionRecorder:
    """Cross-attention probabilities of the conditional rows, per step and layer; a pass Recorder.

    ``with CrossAttentionRecorder(model, layers, steps) as rec:`` then ``sample_unit(...,
    recorders=[rec])``: ``rec.maps[k][layer]`` is (N, heads, HW, T) for each requested step k
    (schedule position; None = every step) and layer (see ``select_layers``; None = every
    cross-attention layer), the UNet calls of a step concatenated in row order.

    reduce: applied to each captured (n, heads, HW, T) chunk before it is kept (keep the leading row
      dimension), e.g. ``lambda p: p.mean(1)`` to average the heads; saves memory on large models.
    dtype, device: where kept maps go (default: float32, where computed). detach: drop the autograd
      graph (default; with a ``grad=True`` pass, False keeps it).

    Steps are known from ``before_step``, which ``tracked_pass`` calls; only it switches the capture on
    (for a wanted step), ``after_branches`` switches it off, so the UNet calls other recorders make in
    their ``on_step`` are never captured, whatever the recorders' order. Before the first step is
    announced, UNet calls are captured and kept or dropped at the next ``on_step``.
    """

    def __init__(self, model, layers: LayerSelection = None, steps: Iterable[int] | None = None, *,
                 reduce: Callable[[torch.Tensor], torch.Tensor] | None = None, dtype: torch.dtype | None = None,
                 device: torch.device | str | None = None, detach: bool = True):
        self.model = model
        self.layers = select_layers(model, layers)
        self.steps = None if steps is None else {int(s) for s in steps}
        self.reduce, self.dtype, self.device, self.detach = reduce, dtype, device, detach
        shape = getattr(model, "latent_shape", None)
        if shape is not None:
            self._latent_hw = tuple(shape[-2:])
        else:
            size = getattr(getattr(_unet(model), "config", None), "sample_size", None)
            self._latent_hw = (size, size) if isinstance(size, int) else tuple(size) if size else None
        self.maps: dict[int, dict[str, torch.Tensor]] = {}
        self.layer_info: dict[str, LayerInfo] = {}
        self.active = True  # capture during the current step
        self._pending: dict[str, list[torch.Tensor]] = {}
        self._step_maps: dict[str, torch.Tensor] | None = None
        self._previous: dict[str, object] | None = None

    @property
    def requested(self) -> bool:
        return bool(self.layers) and (self.steps is None or bool(self.steps))

    # -- context ---------------------------------------------------------------------------------
    def __enter__(self) -> "CrossAttentionRecorder":
        if self._previous is not None:
            raise RuntimeError("this CrossAttentionRecorder is already installed")
        self._previous = _install(self.model, self.layers if self.requested else [], sink=self)
        return self

    def __exit__(self, *exc) -> None:
        _restore(self.model, self._previous or {})
        self._previous = None
        self._pending.clear()

    # -- the processors' side --------------------------------------------------------------------
    def capture(self, layer: str, attn, probs: torch.Tensor, tokens: int) -> None:
        if layer not in self.layer_info:
            self.layer_info[layer] = LayerInfo(layer, block_of(layer), attn.heads,
                                               resolution_of(probs.shape[2], self._latent_hw), tokens)
        if self.detach:
            probs = probs.detach()
        if self.reduce is not None:
            probs = self.reduce(probs)
        probs = probs.to(device=self.device, dtype=self.dtype or probs.dtype)
        self._pending.setdefault(layer, []).append(probs)

    # -- the pass's side -------------------------------------------------------------------------
    def wants(self, index: int) -> bool:
        return self.steps is None or index in self.steps

    def before_step(self, index: int, t) -> None:
        self._pending.clear()
        self._step_maps = None
        self.active = self.wants(index)

    def after_branches(self, index: int) -> None:
        """The pass's UNet calls of this step are done: keep what they gave, and capture nothing
        more until the next step (other recorders may make UNet calls of their own in ``on_step``)."""
        self._step_maps = self.take()
        self.active = False

    def on_step(self, step) -> None:
        captured = self._step_maps if self._step_maps is not None else self.take()
        self._step_maps = None
        # stay off: the recorders after this one may make UNet calls of their own in their on_step
        # (asthana, membench, jeon, nemo-ssim); only the next before_step re-arms the capture
        self.active = False
        if not captured or not self.wants(step.index):
            return
        for layer, maps in captured.items():
            if len(maps) != len(step.x_t):
                raise RuntimeError(f"{layer}: captured {len(maps)} conditional rows in step {step.index}, the pass "
                                   f"has {len(step.x_t)}; were UNet calls made outside the pass's layout?")
        self.maps[step.index] = captured

    def take(self) -> dict[str, torch.Tensor]:
        """What was captured since the last step (or ``take``), per layer, chunks concatenated; clears
        it. For UNet calls made outside the pass."""
        out = {layer: torch.cat(chunks) for layer, chunks in self._pending.items()}
        self._pending.clear()
        return out


# -- joint attention (SD3's MMDiT) ----------------------------------------------------------------

JOINT_SUFFIX = "attn.processor"


def joint_attention_layers(model) -> list[str]:
    """Names of the joint-attention layers (image and text tokens in one softmax) of a model's denoiser:
    SD3's MMDiT blocks (``transformer_blocks.i.attn``), FLUX's double-stream blocks (the same names) and
    single-stream blocks (``single_transformer_blocks.i.attn``); [] on a denoiser without them."""
    den = _unet(model)
    names = []
    for n in den.attn_processors:
        if not n.endswith(JOINT_SUFFIX) or n.count(".") != 3:
            continue
        module = den.get_submodule(n[:-len(".processor")])
        if _is_flux_attention(module) or getattr(module, "add_k_proj", None) is not None:
            names.append(n)
    return names


def _is_flux_attention(attn) -> bool:
    """FLUX's attention (``FluxAttention``): rotary positions, text tokens first, and in its single-stream
    blocks no separate text stream."""
    return type(attn).__name__ == "FluxAttention"


def _text_share(q: torch.Tensor, k: torch.Tensor, text: slice, chunk: int) -> torch.Tensor:
    """(B, heads, Lq, T) float32: the softmax of queries q (B, heads, Lq, D) over ALL S keys k (B, heads, S, D)
    at scale D^-1/2 (SDPA's default), columns `text` kept; `chunk` queries at a time, so the (Lq, S) logits of
    a large image never exist whole."""
    scale = q.shape[-1] ** -0.5
    kt = k.float().transpose(-1, -2)
    out = []
    for i in range(0, q.shape[2], chunk):
        logits = q[:, :, i:i + chunk].float() @ kt * scale
        out.append((logits[..., text] - torch.logsumexp(logits, dim=-1, keepdim=True)).exp())
    return torch.cat(out, dim=2)


def joint_text_probabilities(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor,
                             chunk: int = 1024) -> torch.Tensor:
    """(B, heads, L, T) float32: the attention of the L image queries on the T text keys of one SD3 joint-
    attention layer, normalised over ALL keys (the L image keys and the T text keys, as the layer's softmax
    is), so a row sums to the text's share of the attention, not to 1. Q, K from the layer's own projections
    and norms, as diffusers' ``JointAttnProcessor2_0``; `chunk` queries at a time."""
    B, heads = hidden_states.shape[0], attn.heads

    def split(x):
        return x.view(B, x.shape[1], heads, -1).transpose(1, 2)

    q, k_img, k_txt = split(attn.to_q(hidden_states)), split(attn.to_k(hidden_states)), split(attn.add_k_proj(encoder_hidden_states))
    if attn.norm_q is not None:
        q = attn.norm_q(q)
    if attn.norm_k is not None:
        k_img = attn.norm_k(k_img)
    if attn.norm_added_k is not None:
        k_txt = attn.norm_added_k(k_txt)
    L = k_img.shape[2]
    return _text_share(q, torch.cat([k_img, k_txt], dim=2), slice(L, None), chunk)


def flux_text_probabilities(attn, hidden_states: torch.Tensor, encoder_hidden_states: torch.Tensor | None,
                            image_rotary_emb, text_len: int | None = None, chunk: int = 1024) -> torch.Tensor:
    """(B, heads, L, T) float32: FLUX's image-to-text attention in one block, normalised over all T + L keys.
    Double-stream block: `hidden_states` (B, L, C) the image stream, `encoder_hidden_states` (B, T, C) the
    text stream with its own projections. Single-stream block: `hidden_states` (B, T + L, C) the joined
    sequence, text first, `encoder_hidden_states` None and `text_len` = T. Q and K as diffusers'
    ``FluxAttnProcessor`` forms them: per-head RMS norms, text first, the rotary embedding of the T + L
    positions (`image_rotary_emb`, the processor's argument)."""
    from diffusers.models.embeddings import apply_rotary_emb

    if getattr(attn, "fused_projections", False):
        raise ValueError("FLUX attention capture reads the separate Q/K projections; unfuse them first "
                         "(transformer.unfuse_qkv_projections())")

    def heads(x):  # (B, S, heads, D), as the processor splits them
        return x.unflatten(-1, (-1, attn.head_dim))

    def normed(norm, x):
        return x if norm is None else norm(x)

    q, k = normed(attn.norm_q, heads(attn.to_q(hidden_states))), normed(attn.norm_k, heads(attn.to_k(hidden_states)))
    if encoder_hidden_states is not None:
        text_len = encoder_hidden_states.shape[1]
        q = torch.cat([normed(attn.norm_added_q, heads(attn.add_q_proj(encoder_hidden_states))), q], dim=1)
        k = torch.cat([normed(attn.norm_added_k, heads(attn.add_k_proj(encoder_hidden_states))), k], dim=1)
    if text_len is None:
        raise ValueError("a FLUX single-stream block needs the text length (the T5 tokens ahead of the image's)")
    if image_rotary_emb is not None:
        q = apply_rotary_emb(q, image_rotary_emb, sequence_dim=1)
        k = apply_rotary_emb(k, image_rotary_emb, sequence_dim=1)
    return _text_share(q[:, text_len:].transpose(1, 2), k.transpose(1, 2), slice(0, text_len), chunk)


class JointCaptureProcessor:
    """A joint-attention layer's own processor, with the image-to-text attention of its conditional rows
    handed to `sink` while the sink captures (``joint_text_probabilities``). The output is the original
    processor's, untouched."""

    def __init__(self, name: str, original, sink: "JointAttentionRecorder"):
        self.name, self.original, self.sink = name, original, sink

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, attention_mask=None, *args, **kwargs):
        flux = _is_flux_attention(attn)
        if self.sink.active and (flux or encoder_hidden_states is not None):
            rows = _rows("cond", hidden_states.shape[0])
            text = None if encoder_hidden_states is None else encoder_hidden_states[rows]
            with torch.no_grad() if self.sink.detach else torch.enable_grad():
                if flux:
                    rotary = kwargs.get("image_rotary_emb", args[0] if args else None)
                    probs = flux_text_probabilities(attn, hidden_states[rows], text, rotary, self.sink.text_len,
                                                    self.sink.chunk)
                else:
                    probs = joint_text_probabilities(attn, hidden_states[rows], text, self.sink.chunk)
            if not self.sink.keep_padding and self.sink.text_mask is not None:
                probs = probs * self.sink.next_mask(self.name, len(probs)).to(probs)[:, None, None, :]
            self.sink.capture(self.name, attn, probs, probs.shape[-1])
        return self.original(attn, hidden_states, encoder_hidden_states, attention_mask, *args, **kwargs)


class JointAttentionRecorder(CrossAttentionRecorder):
    """``CrossAttentionRecorder`` for joint attention (SD3's MMDiT blocks, FLUX's double- and single-stream
    blocks): ``maps[k][layer]`` is (N, heads, HW, T), the image queries' attention on the T text tokens (SD3:
    CLIP's 77, then T5's; FLUX: T5's), normalised over all keys (image and text), chunked over queries
    (`chunk`). `text_mask` (N, T) bool, True at the real tokens, in the pass's row order, and
    ``keep_padding=False``: the padding tokens' columns are zeroed (the denominators stay the model's, which
    attends to them). Layers: None = every joint-attention layer, or names / a predicate."""

    def __init__(self, model, layers: LayerSelection = None, steps: Iterable[int] | None = None, *,
                 chunk: int = 1024, keep_padding: bool = True, text_mask: torch.Tensor | None = None, **kwargs):
        names = joint_attention_layers(model)
        if not names:
            raise ValueError(f"{model.family} ({model.name}) has no joint-attention layer (SD3's MMDiT blocks, "
                             "FLUX's double- and single-stream blocks)")
        super().__init__(model, [], steps, **kwargs)
        self.layers = select_layers(model, layers, names, kind="joint-attention")
        self.chunk, self.keep_padding, self.text_mask = chunk, keep_padding, text_mask
        self._cursor: dict[str, int] = {}
        self.text_len: int | None = None  # T of the denoiser's current call (FLUX's single-stream blocks need it)
        self._hook = None

    def next_mask(self, layer: str, n: int) -> torch.Tensor:
        """The next `n` rows of text_mask for `layer` (wrapping around after N, as the pass's calls go)."""
        return self.text_mask[next_rows(self._cursor, layer, n, len(self.text_mask))]

    def __enter__(self) -> "JointAttentionRecorder":
        if self._previous is not None:
            raise RuntimeError("this JointAttentionRecorder is already installed")
        den = _unet(self.model)
        self._previous = {}
        for name in self.layers if self.requested else []:
            module = den.get_submodule(name[:-len(".processor")])
            self._previous[name] = module.processor
            module.set_processor(JointCaptureProcessor(name, module.processor, self))
        self._hook = den.register_forward_pre_hook(self._read_text_len, with_kwargs=True)
        return self

    def _read_text_len(self, module, args, kwargs) -> None:
        text = kwargs.get("encoder_hidden_states")
        self.text_len = None if text is None else text.shape[1]

    def __exit__(self, *exc) -> None:
        if self._hook is not None:
            self._hook.remove()
            self._hook = None
        super().__exit__(*exc)

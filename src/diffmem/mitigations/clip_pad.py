"""Kim & No (CVPR 2026 Findings, arXiv 2605.02908; code ``quasar529/sd-clip-mem``,
``experiments.py``): memorization in Stable Diffusion is driven by CLIP's padding. SD 1.x pads a
prompt with copies of the end token, whose causal CLIP states repeat the end token's; the
mitigation edits the conditional embedding, with no extra UNet row:

1. re-encode the prompt padded with ``pad_token`` ("!", their ``tokenizer.pad_token = "!"``), so
   the positions after the end token hold "!" states instead of end-token copies;
2. zero the conditional embedding's row at the end token (``mask_end_token``), the position found
   by the prompt's own token count (a truncated prompt's end token is at the last position);
3. their second mitigation, ``pad_mask_ratio`` r: zero the first int(r (T - 1 - end)) rows after the
   end token (T = 77), in the embedding as encoded by step 1 (by the tokenizer's own padding when
   ``pad_token`` is None, as theirs).

Their main setting (``--pad_token_fix_and_eot_masked``) is the default: "!" padding and the end
token zeroed. Their ratio setting is ``pad_token=None, mask_end_token=False, pad_mask_ratio=0.4``
(or 0.7).

The unconditional branch: their code changes the tokenizer in place, so the pipeline encodes its
unconditional "" with "!" padding too, and both branches of guidance change (the null's end token
is not zeroed). ``uncond_same_padding=True`` (the default) does the same; ``False`` changes only the
conditional branch. A model whose null is not the encoded "" (``use_null``) keeps its null. On
SD 2.x, whose tokenizer already pads with "!", step 1 changes nothing and the method is the end
token's masking.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

import torch

from diffmem.mitigations import Plan, Unit, register

CLIP_FAMILIES = ("stable-diffusion",)  # one CLIP text encoder whose padding the method replaces


@contextmanager
def padded_with(tokenizer, pad_token: str | None):
    """The tokenizer padding with `pad_token` inside the block (unchanged for None), as theirs sets it."""
    if pad_token is None:
        yield tokenizer
        return
    ids = tokenizer.convert_tokens_to_ids([pad_token])
    if not ids or ids[0] is None or ids[0] == tokenizer.unk_token_id:
        raise ValueError(f"pad token {pad_token!r} is not one token of the tokenizer's vocabulary")
    original = tokenizer.pad_token
    tokenizer.pad_token = pad_token
    try:
        yield tokenizer
    finally:
        tokenizer.pad_token = original


def masked_rows(embeddings: torch.Tensor, end_positions: list[int], mask_end_token: bool,
                pad_mask_ratio: float) -> tuple[torch.Tensor, list[int]]:
    """(B, T, D) embeddings with, per row b, the end token's row zeroed (if asked) and the first
    int(r (T - 1 - end)) rows after it zeroed; returns them and each row's number of zeroed pad rows."""
    out = embeddings.clone()
    T = embeddings.shape[1]
    counts = []
    for b, end in enumerate(end_positions):
        after = T - (end + 1)
        k = int(min(after, after * pad_mask_ratio))
        out[b, end + 1:end + 1 + k] = 0
        if mask_end_token:
            out[b, end] = 0
        counts.append(k)
    return out, counts


@register
class ClipPad:
    name = "clip-pad"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = None  # bench mitigate tries the published settings (``sweep``)
    off = {"pad_token": None, "mask_end_token": False, "pad_mask_ratio": 0.0}

    @dataclass
    class Params:
        pad_token: str | None = "!"  # pad with this token instead of the end token (None: the tokenizer's own)
        mask_end_token: bool = True  # zero the conditional embedding's end-token row (their main setting)
        pad_mask_ratio: float = 0.0  # zero this fraction of the rows after the end token (their 0.4 / 0.7)
        uncond_same_padding: bool = True  # encode the unconditional "" with the same padding, as their run does

        def __post_init__(self):
            if not 0.0 <= self.pad_mask_ratio <= 1.0:
                raise ValueError(f"pad_mask_ratio {self.pad_mask_ratio}: must be between 0 and 1")

    def sweep(self, model, sampling) -> list[dict]:
        """Their settings: the pads masked at ratio 0.4 and 0.7, "!" padding alone, and the main one."""
        default_pads = {"pad_token": None, "mask_end_token": False}
        return [{**default_pads, "pad_mask_ratio": 0.4}, {**default_pads, "pad_mask_ratio": 0.7},
                {"mask_end_token": False}, {}]

    def check(self, model) -> str | None:
        """Refuse, in one line, a model without Stable Diffusion's single CLIP text encoder."""
        if model.family not in CLIP_FAMILIES:
            why = {"lab": "its text encoder is the lab's own, not CLIP, and pads with [PAD]",
                   "pixart": "its T5 encoder's padding is masked out of attention, not end-token copies",
                   "stable-diffusion-xl": "it has two text encoders and a pooled embedding, which the method "
                                          "does not define"}.get(model.family, "it has no CLIP text encoder")
            return f"cannot run on {model.family} ({model.name}): Kim & No edit one CLIP encoder's padding; {why}"
        return None

    def plan(self, model, unit: Unit, params) -> Plan:
        from diffmem.detectors.common import end_token_index

        params = params or self.Params()
        ends = [end_token_index(model, p) for p in unit.prompts]
        with padded_with(model.tokenizer, params.pad_token):
            cond = model.encode_prompts(unit.prompts) if params.pad_token is not None else unit.cond
            null = model.encode_prompts([""]) if params.pad_token is not None else None
        embeddings, counts = masked_rows(cond.embeddings, ends, params.mask_end_token, params.pad_mask_ratio)
        uncond = None
        if null is not None and params.uncond_same_padding and model.null.name == "empty-prompt":
            uncond = unit.uncond.with_embeddings(null.embeddings.expand(len(unit.uncond), -1, -1))
        info = [{"end_token": e, "pad_rows_masked": k, "uncond_changed": uncond is not None}
                for e, k in zip(ends, counts)]
        return Plan(cond=cond.with_embeddings(embeddings), uncond=uncond, info=info)

"""``ren-attention``: Ren et al. (ECCV 2024), "Unveiling and mitigating memorization in text-to-image
diffusion models through cross attention", sec. 5 (inference-time mitigation), as the official code
``renjie3/MemAttn`` ships it (``refactored_attention_processor.py``: ``AttnProcessor2_0`` with
``--cross_attn_mask --miti_mem``, ``my_simple_scaled_dot_product_attention``).

In every cross-attention layer at every step, before the softmax:

(a) key mask: only key positions [0, L) are attended, L = the prompt's tokens with the start and end
    tokens (``end_token_index + 1``; the code's ``prompt_length``, its truncated token count), the
    padding positions get logit -inf. The code builds one (77,) mask from the conditional prompt's
    L and repeats it over both rows of the CFG batch, so the *unconditional* row of a prompt is
    masked with the same L (the empty prompt's first L positions: start, end and padding tokens).
(b) start-token scaling: the conditional rows' logit of the start token (BOS, position 0),
    q.k_0 / sqrt(d), is multiplied by c1 (the code's ``attn_weight[1::2, :, :, 0] *= c1``).

Published constant: c1 = 1.25 (the shipped script ``local_cmd_inference_time_mitigation.sh``);
MemBench uses 1.1 and Jeon et al. (ICML 2025) sweep 1.1-1.5. c1 multiplies a logit, which has the
same meaning on every UNet, so it is used unchanged on the lab. The code's row indexing ``[1::2]``
assumes one image per prompt; here each row of a batched unit (prompt-major, G generations each)
gets its own prompt's L. No extra UNet rows.

Through ``diffmem.attention``: one ``AttentionEdit`` on the conditional rows (scale c1 on token 0,
per-row key mask) and, with ``mask_padding``, one on the unconditional rows (the same mask).
"""

from __future__ import annotations

from contextlib import ExitStack, contextmanager
from dataclasses import dataclass

import torch

from diffmem.attention import AttentionEdit, attention_edit
from diffmem.detectors.common import end_token_index
from diffmem.mitigations import Plan, Unit, register

PUBLISHED_C1 = 1.25  # MemAttn's shipped mitigation script


def prompt_lengths(model, prompts: list[str]) -> list[int]:
    """L of each prompt: its tokens up to and including the end token (start token counted)."""
    return [end_token_index(model, p) + 1 for p in prompts]


def padding_mask(lengths: list[int], tokens: int, generations: int = 1) -> torch.Tensor:
    """(P * generations, T) bool, True at the key positions j >= L of each row's prompt (masked);
    rows prompt-major, `generations` rows per prompt."""
    L = torch.tensor(lengths).repeat_interleave(generations)
    return torch.arange(tokens)[None, :] >= L[:, None]


@contextmanager
def ren_edits(model, c1: float, mask: torch.Tensor | None):
    """Install Ren et al.'s edit on every cross-attention layer for one pass: BOS logit * c1 on the
    conditional rows, and the per-row key `mask` ((N, T) bool in the pass's row order, or None) on
    both the conditional and the unconditional rows."""
    with ExitStack() as stack:
        if mask is not None:
            stack.enter_context(attention_edit(model, AttentionEdit(mask_keys=mask, rows="uncond")))
        stack.enter_context(attention_edit(model, AttentionEdit(token=0, scale=c1, mask_keys=mask, rows="cond")))
        yield


@register
class RenAttention:
    name = "ren-attention"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "c1"
    off = {"c1": 1.0, "mask_padding": False}

    @dataclass
    class Params:
        c1: float = PUBLISHED_C1  # multiplies the conditional rows' start-token logit
        mask_padding: bool = True  # mask key positions >= L (both rows)

        def __post_init__(self):
            if isinstance(self.c1, bool) or not isinstance(self.c1, (int, float)) or not self.c1 > 0:
                raise ValueError(f"--param c1={self.c1!r}: must be a number > 0 (the published 1.25; 1 = off)")
            if not isinstance(self.mask_padding, bool):
                raise ValueError(f"--param mask_padding={self.mask_padding!r}: must be true or false")

    def sweep(self, model, sampling) -> list[dict]:
        return [{"c1": c} for c in (1.1, 1.25, 1.5, 2.0)]  # Jeon et al. sweep 1.1-1.5; MemBench 1.1

    def plan(self, model, unit: Unit, params) -> Plan:
        lengths = prompt_lengths(model, unit.prompts)
        info = [{"ren_prompt_length": L} for L in lengths]
        if params.c1 == 1.0 and not params.mask_padding:
            return Plan(info=info)
        mask = None
        if params.mask_padding:
            tokens = unit.cond.embeddings.shape[1]
            mask = padding_mask(lengths, tokens, unit.num_generations).to(unit.cond.embeddings.device)
        c1 = float(params.c1)
        return Plan(context=lambda: ren_edits(model, c1, mask), info=info)

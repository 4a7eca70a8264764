"""``lora-scale``: a LoRA adapter sampled at a lower scale, the first thing users try against an adapter
that copies its training images. The model's ``--lora`` adapters are set to ``scale`` times their
own scale while the unit is sampled (1: as loaded, the method off; 0: the base model without the
adapter), then back. Needs a model with ``--lora``; refuses one without. Adds no UNet rows.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass

from diffmem.mitigations import Plan, Unit, register


@register
class LoraScale:
    name = "lora-scale"
    attacked_by_dori = True  # bench mitigate --dori attacks it: it changes the model or the sampler
    knob = "scale"
    off = {"scale": 1.0}
    flow_refusal = None  # the adapter's scale means the same on every family

    @dataclass
    class Params:
        scale: float = 0.5  # times each adapter's --lora scale: 1 as loaded, 0 the base model

        def __post_init__(self):
            if not isinstance(self.scale, (int, float)) or not 0 <= self.scale:
                raise ValueError(f"--param scale={self.scale!r}: must be a number >= 0")

    def check(self, model):
        if not getattr(model, "loras", None):
            return f"cannot run on {model.family} ({model.name}): it has no LoRA adapter (load one with --lora FILE[:SCALE])"
        return None

    def sweep(self, model, sampling) -> list[dict]:
        """From the adapter as loaded down to the base model: scales 0.75, 0.5, 0.25, 0."""
        return [{"scale": s} for s in (0.75, 0.5, 0.25, 0.0)]

    def plan(self, model, unit: Unit, params) -> Plan:
        from diffmem.adapters.lora import set_lora_scale

        scale = float((params or self.Params()).scale)

        @contextmanager
        def scaled():
            set_lora_scale(model, scale)
            try:
                yield
            finally:
                set_lora_scale(model, 1.0)

        info = [{"lora_scale": scale} for _ in unit.prompts]
        return Plan(context=scaled, info=info)

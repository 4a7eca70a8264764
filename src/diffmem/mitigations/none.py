"""``none``: unmitigated sampling, the reference every method is compared with."""

from __future__ import annotations

from diffmem.mitigations import Plan, Unit, register


@register
class NoMitigation:
    name = "none"
    attacked_by_dori = True  # the DoRI attack on the unmitigated model: the reference of bench mitigate --dori
    flow_refusal = None  # sampling unchanged: any family
    knob = None
    off: dict = {}

    def plan(self, model, unit: Unit, params) -> Plan:
        return Plan()

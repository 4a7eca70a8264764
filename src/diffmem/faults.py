"""Fault injection for tests: a long verb kills itself at a named point when asked to.

``DIFFMEM_KILL_AT=POINT`` (or ``POINT:N``, the N-th time the point is reached, default the first)
makes the process send itself SIGKILL there, the way a scheduler or the out-of-memory killer ends
a run. Points: ``train.checkpoint`` (inside a checkpoint write, before it is complete),
``train.step`` (after an optimizer step), ``detect.unit``, ``mitigate.unit``, ``evaluate.unit``
(after a work unit's rows are written), ``audit.stage`` (after a stage is recorded as finished).
Unset, ``fault_point`` does nothing.
"""

from __future__ import annotations

import os
import signal
from collections import Counter

ENV = "DIFFMEM_KILL_AT"
_reached: Counter = Counter()


def fault_point(name: str) -> None:
    """Kill this process here if ``DIFFMEM_KILL_AT`` names this point (and this is its N-th time)."""
    spec = os.environ.get(ENV)
    if not spec:
        return
    point, _, nth = spec.partition(":")
    if point != name:
        return
    _reached[name] += 1
    if _reached[name] == int(nth or 1):
        os.kill(os.getpid(), signal.SIGKILL)

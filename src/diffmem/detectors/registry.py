"""The detector registry: the ``Detector`` interface, ``register`` and the look-ups by name. The
detector files import ``register`` from here, and ``diffmem.detectors`` imports them all."""

from __future__ import annotations

from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from diffmem.sampling import Recorder, SamplingConfig


class Detector(Protocol):
    name: str
    higher_is_memorized: bool

    def recorder(self, model, config: "SamplingConfig", prompts: list[str]) -> "Recorder": ...

    def fields(self, recorder: "Recorder", rows: slice) -> dict: ...

    def score_of(self, row: dict, steps: slice | None = None, generations: int | None = None) -> float: ...


DETECTORS: dict[str, type] = {}
DEFAULT_METHOD = "wen"


def register(cls: type) -> type:
    """Class decorator: make `cls` available by ``cls.name`` (to ``detect --method`` and ``roc``)."""
    if cls.name in DETECTORS and DETECTORS[cls.name] is not cls:
        raise ValueError(f"detector {cls.name!r} is registered twice ({DETECTORS[cls.name].__module__}, {cls.__module__})")
    DETECTORS[cls.name] = cls
    return cls


def get_detector(name: str, **options) -> Detector:
    """A fresh detector by name, given those of `options` its constructor takes (e.g. ``norm_order``
    for wen); an unknown name raises, listing the known ones."""
    import inspect

    if name not in DETECTORS:
        raise ValueError(f"unknown detection method {name!r}: expected one of {', '.join(sorted(DETECTORS))}")
    cls = DETECTORS[name]
    takes = inspect.signature(cls).parameters
    return cls(**{k: v for k, v in options.items() if k in takes})


def parse_methods(text: str | list[str] | tuple[str, ...] | None) -> tuple[str, ...]:
    """'wen,other' or a list -> the method names, checked, in order, without repeats (default: wen)."""
    if text is None:
        return (DEFAULT_METHOD,)
    names = [n.strip() for n in (text.split(",") if isinstance(text, str) else text)]
    names = list(dict.fromkeys(n for n in names if n))
    if not names:
        raise ValueError("--method: no method named")
    for n in names:
        get_detector(n)
    return tuple(names)


FLOW_REFUSAL = ("it is defined on the noise prediction of a DDIM-sampled model, and a flow model's noise "
                "differences are identically 0 at sigma = 1")


def flow_refusal(detector) -> str | None:
    """Why `detector` cannot run on a flow-matching model (its ``flow_refusal``; by default the noise
    form's), or None for the detectors defined on any prediction (``flow_refusal = None``)."""
    return getattr(detector, "flow_refusal", FLOW_REFUSAL)


def refusal(detector, model) -> str | None:
    """Why `detector`'s definition does not carry over to `model` (on flow models: all but those with
    ``flow_refusal = None``; then the detector's own ``refuse(model)``), or None where it runs."""
    if getattr(model, "sampler_prediction", "epsilon") == "flow" and flow_refusal(detector):
        return flow_refusal(detector)
    own = getattr(detector, "refuse", None)
    return own(model) if own is not None else None


def check_model(detectors, model) -> None:
    """Refuse, in one line naming the method, the family and the reason, a model a requested detector's
    definition does not carry over to, before any sampling."""
    for d in detectors:
        reason = refusal(d, model)
        if reason:
            raise ValueError(f"{d.name} cannot run on {model.family} ({model.name}): {reason}")


def check_settings(detectors, config: "SamplingConfig") -> None:
    """Refuse settings a requested detector cannot run under, naming it (before any sampling)."""
    for d in detectors:
        if getattr(d, "all_steps", False) and config.steps_to_run < config.num_inference_steps:
            raise ValueError(f"--method {d.name} needs the whole trajectory: drop --track-steps "
                             f"({config.track_steps} of {config.num_inference_steps} steps)")
        need = getattr(d, "min_generations", 1)
        if config.num_generations < need:
            raise ValueError(f"--method {d.name} needs at least {need} generations per prompt "
                             f"(--num-generations {config.num_generations})")



"""Memorization detectors behind one interface, each in its own file, registered by name.

A detector turns the tensors of the one tracked pass (``diffmem.sampling.tracked_pass``) into
fields of a detection row. To add one:

1. write ``diffmem/detectors/<name>.py`` with a class that has

   - ``name`` (str): the registry key, the ``--method`` value and the row field holding its score;
   - ``higher_is_memorized`` (bool): the direction of the score, used as is by ``diffmem roc``
     (scores are never label-flipped after the fact);
   - ``recorder(model, config, prompts) -> Recorder``: a fresh recorder for one work unit whose pass
     rows are `prompts` x G generations, prompt-major (an object with ``on_step(step)`` and
     optionally ``before_step(index, t)``, and ``on_images(images)`` to receive the decoded
     generations; it may be a context manager, as ``diffmem.attention.CrossAttentionRecorder`` is,
     entered around the unit's pass);
   - ``fields(recorder, rows: slice) -> dict``: the row fields of the prompt whose generations are
     the pass rows ``rows``, including ``{name: score}``;
   - ``score_of(row, steps, generations) -> float``: the score of a stored row, over a step window
     and the first generations where the detector keeps per-step, per-generation values (``roc``);

   and optionally ``all_steps = True`` (it needs the whole trajectory: refused with ``--track-steps``),
   ``first_step_only = True`` (its value is taken at the first step; benchmarks run it there only),
   ``prepare(model, config)`` (called once before any sampling, to refuse a model or settings early),
   ``needs_images = True`` (the generations are decoded for it), ``min_generations`` (G it needs);

2. decorate it with ``@register`` and import the file at the end of this module.

``detectors/wen.py`` (Wen et al.'s d) is such a file.
"""

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


from diffmem.detectors import asthana, bright_ending, carlini, jeon, jeon_fd, membench, nemo, ren, wen  # noqa: E402,F401  (registration)

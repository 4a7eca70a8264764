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
   ``needs_images = True`` (the generations are decoded for it), ``min_generations`` (G it needs),
   ``flow_refusal`` (why it cannot run on a flow-matching model, refused before sampling; ``None``
   where its definition carries over: d on the velocity, decoded images), ``refuse(model) -> str | None``
   (why it cannot run on this model, whatever its family: refused, or skipped by a benchmark of all
   detectors), ``needs_reference_prompts =
   True`` (it calibrates on ordinary prompts: a lab model's own, or ``reference_prompts`` given; a
   benchmark of all detectors skips it on a model with neither);

2. decorate it with ``@register`` (from ``diffmem.detectors.registry``) and import the file below.

``detectors/wen.py`` (Wen et al.'s d) is such a file.
"""

from diffmem.detectors.registry import (DEFAULT_METHOD, DETECTORS, Detector, check_model,  # noqa: F401
                                       check_settings, flow_refusal, get_detector, parse_methods, register)
from diffmem.detectors import (asthana, bright_ending, broken_memories, carlini, condition_jacobian,  # noqa: F401
                               early_detection, flux_guidance, jeon, jeon_fd, membench, nemo, ren, wen)  # (registration)

"""Inference-time mitigations behind one interface, each in its own file, registered by name.

A mitigation changes how one work unit of prompts is sampled: the prompts or their embeddings, the
starting noise x_T, how the two branches are combined at each step (guidance), or the UNet itself
while sampling (attention edits, switched-off neurons). ``diffmem.mitigate.mitigate_unit`` hands it
the unit (``Unit``: prompts, encoded conditioning, x_T under the seed contract, the schedule) and
samples with the ``Plan`` it returns, through the one tracked pass; so every method starts from the
same draw per prompt position, and every method's d, images, UNet rows and time are measured alike.

To add one:

1. write ``diffmem/mitigations/<name>.py`` with a class that has

   - ``name`` (str): the registry key, the ``--method`` value;
   - ``Params``: a dataclass of the method's parameters, defaults the published ones (``None`` where
     the value must come from the model: the method derives it, and says how in its docstring);
   - ``knob`` (str or None): the field of ``Params`` that ``bench mitigate`` sweeps;
   - ``off`` (dict): the ``Params`` values at which the method leaves sampling unchanged (tests
     check that it then reproduces unmitigated sampling exactly);
   - ``plan(model, unit: Unit, params) -> Plan``;
   - optionally ``sweep(model, sampling) -> list[dict]``: the settings ``bench mitigate`` tries, each a
     dict of ``Params`` overrides (of ``MitigationConfig`` fields for methods with ``config_knob =
     True``), from the mildest; default ``[{}]``, the published setting only. Where the published
     constants are on Stable Diffusion's scale, derive the values from the model (e.g. percentiles
     over its own non-memorized prompts, ``diffmem.lab.prompts.own_reference_prompts``) and say how;
   - optionally ``check(model)`` (refuse a model it cannot run on, in one line), and ``flow_refusal =
     None`` where its definition carries over to flow-matching models (d on the velocity; others are
     refused there with ``FLOW_REFUSAL``);
   - optionally ``attacked_by_dori = True`` where it changes the model or the sampler rather than the
     prompt: ``bench mitigate --dori`` then also samples its published setting from the DoRI attack's
     embedding (``diffmem.mitigate.dori_conditioning``);

2. decorate it with ``@register``; every module of this package is imported (registered) with it.

Parameters travel as ``MitigationConfig.params`` (a dict, ``--param NAME=VALUE`` on the command
line) and are checked against ``Params`` (``make_params``). Wen et al.'s embedding optimization and
the prompt augmentations keep their own ``MitigationConfig`` fields (the seed's options).
"""

from __future__ import annotations

import dataclasses
import time
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Callable, ContextManager, Protocol

import torch

from diffmem.model import count_unet_rows  # noqa: F401  (re-exported: the methods count their rows with it)

if TYPE_CHECKING:
    from diffmem.model import Conditioning
    from diffmem.sampling import SamplingConfig


@dataclass
class Unit:
    """One work unit as every method receives it. P prompts, G generations each, rows prompt-major."""

    prompts: list[str]
    positions: list[int]  # input positions (x_T of position p from sampling.seed_of(p): seed + p)
    cond: "Conditioning"  # P rows: the encoded prompts
    uncond: "Conditioning"  # P*G rows: the empty prompt
    x_T: torch.Tensor  # (P*G, C, H, W) starting latents under the seed contract
    timesteps: torch.Tensor  # (S,) the whole DDIM schedule, noisiest first
    sampling: "SamplingConfig"
    guidance_scale: float  # the resolved w of the run
    config: object  # the MitigationConfig (seed, and the seed's embedding-opt / augmentation fields)
    d0: torch.Tensor  # (P, G) d of the prompts at the optimization step (the first, unless --optim-step)
    x_opt: torch.Tensor  # (P*G, C, H, W) latents there (x_T at the first step)
    eps_uncond_opt: torch.Tensor  # (P*G, C, H, W) the unconditional branch there

    @property
    def num_generations(self) -> int:
        return self.sampling.num_generations


class Guidance(Protocol):
    """A combination of the branches that is more than ``eps_u + w (eps_c - eps_u)`` (PRSS, AMG, GUARD),
    or a correction of the update (Broken Memories)."""

    def guided(self, index: int, t, x_t: torch.Tensor, eps_cond: torch.Tensor,
               eps_uncond: torch.Tensor) -> torch.Tensor: ...

    # optional: ``after_update(index, t, x_t, guided, x_next) -> x_next`` corrects the scheduler's update


@dataclass
class Plan:
    """How a unit is sampled under a mitigation; fields left None keep the unmitigated value."""

    prompts: list[str] | None = None  # what was encoded when the method rewrote the prompts
    cond: "Conditioning | None" = None  # P rows (or P*G: one per generation): the conditional branch to sample with
    uncond: "Conditioning | None" = None  # P*G rows: the unconditional branch, when the method changes it (gni)
    x_T: torch.Tensor | None = None  # (P*G, C, H, W) the starting latents to sample from
    guidance: object = None  # a number, a schedule (index, eps_c, eps_u) -> w, or a Guidance
    context: Callable[[], ContextManager] | None = None  # entered around the sampling pass (UNet edits)
    iterations: torch.Tensor | None = None  # (P,) optimizer steps or search rounds taken
    final_d: torch.Tensor | None = None  # (P,) d the method measured at its own step (embedding-opt)
    final_loss: torch.Tensor | None = None  # (P,)
    info: list[dict] = field(default_factory=list)  # per prompt: method-specific fields for the result rows


class Mitigation(Protocol):
    name: str
    knob: str | None
    off: dict

    def plan(self, model, unit: Unit, params) -> Plan: ...


MITIGATIONS: dict[str, type] = {}

# the original code's (and diffmem's earlier) spellings of the prompt augmentations, still accepted everywhere
ORIGINAL_SPELLINGS = {"rand_word_add": "rand-word-add", "rand_numb_add": "rand-numb-add",
                      "rand_word_repeat": "rand-word-repeat", "rand_word_replace": "rand-word-replace"}


def canonical_name(name: str) -> str:
    """A method's registry name from any accepted spelling (``rand_word_add`` -> ``rand-word-add``)."""
    return ORIGINAL_SPELLINGS.get(name, name)


def register(cls: type) -> type:
    """Class decorator: make `cls` available by ``cls.name`` (``mitigate --method``, ``evaluate``, ``bench``)."""
    if cls.name in MITIGATIONS and MITIGATIONS[cls.name] is not cls:
        raise ValueError(f"mitigation {cls.name!r} is registered twice ({MITIGATIONS[cls.name].__module__}, "
                         f"{cls.__module__})")
    MITIGATIONS[cls.name] = cls
    return cls


_INSTANCES: dict[str, object] = {}


def get_mitigation(name: str):
    """The registered mitigation `name` (one instance per process: methods may cache what they derive
    from a model, such as a calibrated threshold); an unknown name raises, listing the known ones."""
    name = canonical_name(name)
    if name not in MITIGATIONS:
        raise ValueError(f"unknown mitigation {name!r}: expected one of {', '.join(MITIGATIONS)}")
    if name not in _INSTANCES:
        _INSTANCES[name] = MITIGATIONS[name]()
    return _INSTANCES[name]


FLOW_REFUSAL = ("it is defined on the noise prediction and the timesteps of a DDIM-sampled model; a flow model's "
                "noise differences are identically 0 at sigma = 1")


def refusal(method, model) -> str | None:
    """Why `method` cannot run on `model`, in words, or None where it runs: on a flow-matching model its
    ``flow_refusal`` (every method but those that set it to None), then its ``check`` (raising, or
    returning a reason or False)."""
    if getattr(model, "sampler_prediction", "epsilon") == "flow":
        reason = getattr(method, "flow_refusal", FLOW_REFUSAL)
        if reason:
            return f"cannot run on {model.family} ({model.name}): {reason}"
    check = getattr(method, "check", None)
    if check is None:
        return None
    try:
        answer = check(model)
    except Exception as e:  # noqa: BLE001  (any refusal is reported, not raised)
        return str(e) or type(e).__name__
    if answer is False:
        return "cannot run on this model"
    return answer if isinstance(answer, str) and answer else None


def check_model(name: str, model) -> None:
    """Refuse, in one line naming the method, a model the method cannot run on (``refusal``)."""
    reason = refusal(get_mitigation(name), model)
    if reason is not None:
        raise ValueError(f"--method {name}: {reason}")


def param_names(name: str) -> tuple[str, ...]:
    cls = getattr(get_mitigation(name), "Params", None)
    return tuple(f.name for f in dataclasses.fields(cls)) if cls is not None else ()


def make_params(name: str, params: dict | None):
    """The method's ``Params`` from a dict of overrides; an unknown or ill-typed name raises, naming it."""
    method = get_mitigation(name)
    cls = getattr(method, "Params", None)
    params = dict(params or {})
    if cls is None:
        if params:
            raise ValueError(f"--method {name} takes no --param (got {', '.join(params)})")
        return None
    known = {f.name: f for f in dataclasses.fields(cls)}
    for k, v in params.items():
        if k not in known:
            raise ValueError(f"--param {k}: {name} has no such parameter (it has {', '.join(known) or 'none'})")
    try:
        return cls(**params)
    except (TypeError, ValueError) as e:
        raise ValueError(f"--method {name}: {e}") from None


def parse_param(text: str) -> tuple[str, object]:
    """'NAME=VALUE' -> (name, value): a number when it reads as one, 'none' -> None, else the text."""
    if "=" not in text:
        raise ValueError(f"--param {text!r}: expected NAME=VALUE (e.g. c1=1.25)")
    k, v = (s.strip() for s in text.split("=", 1))
    if not k:
        raise ValueError(f"--param {text!r}: no parameter name before '='")
    return k.replace("-", "_"), parse_value(v)


def parse_value(v: str):
    low = v.lower()
    if low in ("none", "null"):
        return None
    if low in ("true", "false"):
        return low == "true"
    for kind in (int, float):
        try:
            return kind(v)
        except ValueError:
            pass
    return v


@contextmanager
def timed():
    """``with timed() as s: ...; s[0]`` seconds spent in the block."""
    s = [0.0]
    start = time.perf_counter()
    try:
        yield s
    finally:
        s[0] = time.perf_counter() - start


def plan_context(plan: Plan) -> ContextManager:
    return plan.context() if plan.context is not None else nullcontext()


def per_prompt(info: list[dict] | None, **values) -> None:
    """Write each of `values` ((N,) per row, rows prompt-major, G = N / len(info) per prompt) into `info`
    (one dict per prompt) as the list of its prompt's generations' values; nothing without `info`."""
    if not info:
        return
    for key, v in values.items():
        v = v.tolist() if isinstance(v, torch.Tensor) else list(v)
        G = len(v) // len(info)
        for j, row in enumerate(info):
            row[key] = v[j * G:(j + 1) * G]


def derived_generator(seed: int, position: int, stream: int) -> torch.Generator:
    """A CPU generator for a method's extra draws of the prompt at `position` (SAIL's re-draws, GNI's
    noise): seeded from the run's seed, the position and a stream number, never equal to the seed
    contract's own ``seed + position`` draw."""
    return torch.Generator("cpu").manual_seed((int(seed) + int(position)) * 1_000_003 + 7919 * (int(stream) + 1))


def _register_all() -> None:
    import importlib
    import pkgutil

    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        importlib.import_module(f"{__name__}.{info.name}")


_register_all()

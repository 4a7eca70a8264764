"""Benchmarks that compare methods on the same prompts, seeds and model: ``bench_detect``, ``bench_mitigate``.

``bench_detect`` runs every requested detector at the settings it is defined for (the first step
for those that can take it, the whole trajectory for those that need it; each number of
generations) through ``run_detection``, one pass per setting and prompt set with all its detectors,
and reports per detector, setting and control set: AUC, TPR at 1% FPR (by diffmem's strict rule and
by the closest-point rule of Ren's, Jeon's and Asthana's scripts) and at 3% FPR, with bootstrap 95%
intervals, and the cost of the detector alone (UNet rows and seconds per prompt, timed on a few
memorized prompts). Scores are taken in each detector's own direction and never label-flipped.

``bench_mitigate`` runs every requested mitigation over the settings its ``sweep`` names (the
published one when it has none), and no mitigation once as the reference, on the same prompts and
seeds through ``diffmem.evaluate.run_evaluation`` (one folder per method, resumable), and reports per
method and setting: copy rate, similarity to the training images (mean, max and top-3 mean over each
prompt's generations, averaged over the prompts), alignment (lab) or CLIP score, the UNet rows per
prompt beyond unmitigated sampling's, and seconds per prompt; with one trade-off figure.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from diffmem.detectors import DETECTORS, get_detector
from diffmem.files import one_writer
from diffmem.prompts import PromptSet
from diffmem.sampling import SamplingConfig

STEP_SETTINGS = ("first", "all")


@dataclass
class BenchDetectConfig:
    methods: tuple[str, ...] = field(default_factory=lambda: tuple(sorted(DETECTORS)))
    generations: tuple[int, ...] = (1, 4)
    steps: tuple[str, ...] = STEP_SETTINGS  # "first": the first step; "all": the whole trajectory
    num_inference_steps: int = 50
    seed: int = 0
    same_noise: bool = False  # every prompt from `seed` itself (SamplingConfig.same_noise)
    batch_size: int = 64
    bootstrap: int = 1000  # resamples for the 95% intervals
    timing_prompts: int = 8  # memorized prompts each detector is timed alone on (0: no cost columns)
    asthana_weights: tuple[float, float] | None = None  # where the model has neither published weights nor references
    asthana_space: str = "official"  # asthana on v-prediction models: "official" (raw output) or "noise"

    def __post_init__(self):
        for m in self.methods:
            get_detector(m, asthana_space=self.asthana_space)
        bad = [s for s in self.steps if s not in STEP_SETTINGS]
        if bad:
            raise ValueError(f"--steps {','.join(bad)}: expected first and/or all")
        if self.timing_prompts < 0 or self.bootstrap < 0:
            raise ValueError(f"--timing-prompts {self.timing_prompts}, --bootstrap {self.bootstrap}: must be >= 0")
        if not self.generations or min(self.generations) < 1:
            raise ValueError(f"--generations {self.generations}: need numbers >= 1")


def applies(method: str, steps: str, generations: int) -> bool:
    """Whether a detector is defined at this setting."""
    d = get_detector(method)
    if generations < getattr(d, "min_generations", 1):
        return False
    if getattr(d, "first_step_only", False):  # its value does not depend on the steps after the first
        return steps == "first"
    return steps == "all" or not getattr(d, "all_steps", False)


def bootstrap_interval(pos: np.ndarray, neg: np.ndarray, stat, n: int, seed: int = 0) -> tuple[float, float]:
    """95% percentile interval of stat(pos, neg) over `n` resamples of both sides."""
    rng = np.random.default_rng(seed)
    vals = [stat(pos[rng.integers(0, len(pos), len(pos))], neg[rng.integers(0, len(neg), len(neg))]) for _ in range(n)]
    return float(np.percentile(vals, 2.5)), float(np.percentile(vals, 97.5))


def detection_metrics(pos, neg, n_bootstrap: int = 1000) -> dict:
    """AUC, TPR at 1% FPR by both rules of ``diffmem.metrics.roc_point_at_fpr`` (strict, and the
    closest point as Ren, Jeon and Asthana read it) and TPR at 3% FPR (strict) of memorized (`pos`)
    against control (`neg`) scores, oriented so that higher means memorized, each with a bootstrap
    95% interval."""
    from diffmem.metrics import roc_metrics

    pos, neg = np.asarray(pos, float), np.asarray(neg, float)
    stats = {"auc": lambda p, q: roc_metrics(p, q).auc,
             "tpr_at_1fpr": lambda p, q: roc_metrics(p, q, 0.01).tpr_at_1fpr,
             "tpr_at_1fpr_closest": lambda p, q: roc_metrics(p, q, 0.01).tpr_at_1fpr_closest,
             "tpr_at_3fpr": lambda p, q: roc_metrics(p, q, 0.03).tpr_at_1fpr}
    out = {}
    for name, fn in stats.items():
        out[name] = float(fn(pos, neg))
        out[name + "_ci95"] = bootstrap_interval(pos, neg, fn, n_bootstrap) if n_bootstrap else None
    return out


def detector_cost(model, method: str, prompts: list[str], sampling: SamplingConfig, **options) -> dict:
    """UNet rows and seconds per prompt of one detector alone (its pass included)."""
    from diffmem.detect import detect_unit
    from diffmem.model import count_unet_rows
    from diffmem.sampling import plan_units

    det = get_detector(method, **options)
    if hasattr(det, "prepare"):
        det.prepare(model, sampling)
    with count_unet_rows(model) as rows:
        t0 = time.perf_counter()
        for unit in plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size):
            detect_unit(model, [det], [prompts[p] for p in unit], unit, sampling)
        seconds = time.perf_counter() - t0
    return {"unet_rows_per_prompt": rows[0] / len(prompts), "seconds_per_prompt": seconds / len(prompts)}


def bench_detect(model, memorized: PromptSet, controls: dict[str, PromptSet], config: BenchDetectConfig,
                 out: str | Path, progress: bool = True, reference_prompts: list[str] | None = None) -> dict:
    """Run the detection benchmark; write ``table.md``, ``table.json``, one ROC figure per row and
    the detection outputs (``runs/``, resumable) under `out`. Returns the table as a dict.
    `reference_prompts`: ordinary prompts for the detectors that calibrate on them (a lab has its own)."""
    from diffmem.detect import run_detection
    from diffmem.files import read_rows
    from diffmem.provenance import provenance
    from diffmem.reports.plots import roc_figure

    from diffmem.detectors.registry import check_model, refusal

    from diffmem.lab.prompts import own_reference_prompts

    skipped = {}
    if set(config.methods) == set(DETECTORS):  # all of them: those the model's family cannot run are skipped
        skipped = {m: r for m in config.methods if (r := refusal(get_detector(m), model))}
        if not reference_prompts and not own_reference_prompts(model):  # and those that calibrate on ordinary prompts
            skipped.update({m: "it calibrates on ordinary prompts: give --reference-prompts FILE" for m in config.methods
                            if getattr(DETECTORS[m], "needs_reference_prompts", False) and m not in skipped})
    wanted = [m for m in config.methods if m not in skipped]
    check_model([get_detector(m) for m in wanted], model)  # methods named by the user are refused, not skipped
    out = Path(out)
    (out / "roc").mkdir(parents=True, exist_ok=True)
    rows = []
    for G in config.generations:
        for steps in config.steps:
            methods = [m for m in wanted if applies(m, steps, G)]
            if not methods:
                continue
            sampling = SamplingConfig(num_inference_steps=config.num_inference_steps, num_generations=G,
                                      seed=config.seed, same_noise=config.same_noise,
                                      track_steps=1 if steps == "first" else None, batch_size=config.batch_size)
            # 1. One pass per prompt set with every detector of this setting.
            scored = {}
            for name, prompts in {"memorized": memorized, **controls}.items():
                path = out / "runs" / f"g{G}-{steps}" / f"{name}.jsonl"
                run_detection(model, prompts.records, path, sampling, resume=True, methods=methods,
                              progress=progress, prompts_info={"set": name, "source": prompts.source},
                              asthana_weights=config.asthana_weights, asthana_space=config.asthana_space,
                              reference_prompts=reference_prompts)
                scored[name] = read_rows(path)
            # 2. Per detector and control set: the metrics, in the detector's own direction.
            for m in methods:
                det = get_detector(m)
                sign = 1.0 if det.higher_is_memorized else -1.0
                pos = [sign * r[m] for r in scored["memorized"]]
                timing = [r.prompt for r in memorized.records[:config.timing_prompts]]
                cost = detector_cost(model, m, timing, sampling, asthana_weights=config.asthana_weights,
                                     asthana_space=config.asthana_space, reference_prompts=reference_prompts) if timing \
                    else {"unet_rows_per_prompt": None, "seconds_per_prompt": None}
                for name in controls:
                    neg = [sign * r[m] for r in scored[name]]
                    metrics = detection_metrics(pos, neg, config.bootstrap)
                    rows.append({"method": m, "steps": steps, "generations": G, "control": name,
                                 "n_memorized": len(pos), "n_control": len(neg),
                                 "higher_is_memorized": det.higher_is_memorized, **metrics, **cost})
                    from diffmem.metrics import roc_metrics

                    roc_figure(roc_metrics(pos, neg), pos, neg, out / "roc" / f"{m}-{steps}-g{G}-{name}.png",
                               title=f"{m}, {steps} step{'s' if steps == 'all' else ''}, G = {G}",
                               negative_label=name, score_label=f"{m} score" + ("" if sign > 0 else ", negated"))
    table = {**provenance(model, config=asdict(config), memorized=memorized.source,
                          controls={k: v.source for k, v in controls.items()}), "rows": rows, "skipped": skipped}
    (out / "table.json").write_text(json.dumps(table, indent=1))
    (out / "table.md").write_text(format_table(rows, skipped))
    return table


def _num(v, fmt: str) -> str:
    return "-" if v is None else format(v, fmt)


def format_table(rows: list[dict], skipped: dict[str, str] | None = None) -> str:
    """The benchmark's markdown table; `skipped`: {method: why it cannot run on the model}, listed below."""
    ci = lambda r, k: f"{r[k]:.3f} [{r[k + '_ci95'][0]:.3f}, {r[k + '_ci95'][1]:.3f}]" if r[k + "_ci95"] else f"{r[k]:.3f}"
    lines = ["| method | steps | G | control | AUC [95% CI] | TPR@1%FPR [95% CI] | "
             "TPR@1%FPR closest point [95% CI] | TPR@3%FPR [95% CI] | UNet rows / prompt | s / prompt |",
             "|---|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['method']} | {r['steps']} | {r['generations']} | {r['control']} | {ci(r, 'auc')} | "
                     f"{ci(r, 'tpr_at_1fpr')} | {ci(r, 'tpr_at_1fpr_closest')} | {ci(r, 'tpr_at_3fpr')} | "
                     f"{_num(r['unet_rows_per_prompt'], '.0f')} | {_num(r['seconds_per_prompt'], '.3f')} |")
    if skipped:
        lines += ["", "Not run on this model:", ""] + [f"- {m}: {why}" for m, why in sorted(skipped.items())]
    return "\n".join(lines) + "\n"


# -- bench mitigate -------------------------------------------------------------------------------

def _all_mitigations() -> tuple[str, ...]:
    from diffmem.mitigate import METHODS

    return tuple(METHODS)


@dataclass
class BenchMitigateConfig:
    methods: tuple[str, ...] = field(default_factory=_all_mitigations)  # 'none' is always run, once, first
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sscd: str | None = None  # SSCD TorchScript checkpoint: similarity, and copies at SSCD > copy_threshold
    clip: str | None = None  # transformers CLIP folder: the CLIP score (the x axis off the lab)
    copy_threshold: float | None = None  # default: 0.5 with --sscd (Somepalli et al.); the lab has its own rule
    copy_metric: str | None = None  # default: sscd when given, else pixel_cosine
    grid_prompts: int = 12  # prompts shown per grid image in each method's folder
    params: dict = field(default_factory=dict)  # --param: fixed in every setting of the methods that take it
    dori_steps: int = 0  # > 0: each method that changes the model or the sampler also runs under the DoRI attack

    def __post_init__(self):
        from diffmem.mitigations import canonical_name, get_mitigation, param_names

        self.methods = tuple(canonical_name(m) for m in self.methods)  # the original code's spellings too
        if self.dori_steps < 0:
            raise ValueError(f"--dori {self.dori_steps}: must be >= 0 (the attack's Adam steps; the paper's 50)")
        if not self.methods:
            raise ValueError("--methods: name at least one mitigation")
        for m in self.methods:
            try:
                get_mitigation(m)
            except ValueError as e:
                raise ValueError(f"--methods {m}: {e}") from None
        if len(set(self.methods)) != len(self.methods):
            raise ValueError(f"--methods {','.join(self.methods)}: a method is named twice")
        unused = set(self.params) - {n for m in self.run_order for n in param_names(m)}
        if unused:
            raise ValueError(f"--param {', '.join(sorted(unused))}: none of the methods {', '.join(self.run_order)} "
                             "takes it")

    def fixed_params(self, name: str) -> dict:
        """The --param values that method `name` takes (added to every setting of its sweep)."""
        from diffmem.mitigations import param_names

        return {k: v for k, v in self.params.items() if k in param_names(name)}

    @property
    def run_order(self) -> tuple[str, ...]:
        """'none' (the reference) first, then the requested methods in their order."""
        return ("none", *[m for m in self.methods if m != "none"])

    def evaluate_config(self, **overrides):
        """The EvaluateConfig of one method's run (the judge and sampling of the benchmark)."""
        from diffmem.evaluate import EvaluateConfig

        threshold = self.copy_threshold if self.copy_threshold is not None else 0.5 if self.sscd else None
        return EvaluateConfig(sampling=self.sampling, sscd=self.sscd, clip=self.clip, copy_threshold=threshold,
                              copy_metric=self.copy_metric, grid_prompts=self.grid_prompts, **overrides)


def sweep_configs(name: str, sweep: list[dict], bench: BenchMitigateConfig) -> list:
    """EvaluateConfigs that run exactly the settings of `sweep` (dicts of overrides: ``MitigationConfig``
    fields for ``config_knob`` methods, ``Params`` otherwise): one config when they form a grid that
    ``evaluate`` sweeps, else one per setting."""
    from dataclasses import replace

    from diffmem.evaluate import settings_of
    from diffmem.mitigations import get_mitigation

    method = get_mitigation(name)
    sweep = [dict(s) for s in sweep] or [{}]
    if getattr(method, "config_knob", False):
        knob = method.knob
        sweep_field = {"target_loss": "target_losses", "repeat_num": "repeat_nums"}.get(knob)
        if sweep_field is None:
            raise ValueError(f"{name}: config_knob {knob!r} is not a field evaluate sweeps (target_loss, repeat_num)")
        base = bench.evaluate_config().mitigation

        def config(entries):
            fixed = {k: v for k, v in entries[0].items() if k != knob}
            default = getattr(base, knob)
            return bench.evaluate_config(methods=(name,), mitigation=replace(base, **fixed),
                                         **{sweep_field: tuple(e.get(knob, default) for e in entries)})

        fixed_parts = [{k: v for k, v in e.items() if k != knob} for e in sweep]
        if all(f == fixed_parts[0] for f in fixed_parts):
            return [config(sweep)]
        return [config([e]) for e in sweep]

    def config(params):
        return bench.evaluate_config(methods=(name,), params=params)

    names = list(dict.fromkeys(k for e in sweep for k in e))
    grid = {n: tuple(dict.fromkeys(e[n] for e in sweep if n in e)) for n in names}
    if all(set(e) == set(names) for e in sweep):
        got = sorted(sorted(s.params.items()) for s in settings_of(config(grid)))
        if got == sorted(sorted(e.items()) for e in sweep):
            return [config(grid)]
    return [config({k: (v,) for k, v in e.items()}) for e in sweep]


def _similarity(rows: list[dict]) -> dict:
    """Per metric, over the prompts: the mean of each prompt's mean, max, min and top-3 mean of its
    generations' best match to the training images."""
    out = {}
    for m in ("sscd", "pixel_cosine", "tiled_l2"):
        rs = [r[m] for r in rows if m in r]
        if rs:
            out[m] = {k: float(np.mean([r[k] for r in rs])) for k in ("mean", "max", "min", "top3_mean") if k in rs[0]}
    return out


def acceptance_counts(rows: list[dict]) -> dict | None:
    """SAIL's prompts whose every generation took an accepted latent, and those where at least one took
    the lowest-loss fallback after ``max_rounds`` (from the per-prompt rows' ``sail_fallback``); None
    when the rows do not carry it."""
    if not rows or any("sail_fallback" not in r for r in rows):
        return None
    fell_back = sum(r["sail_fallback"] > 0 for r in rows)
    return {"accepted": len(rows) - fell_back, "fell_back": fell_back}


def mitigation_rows(method: str, summaries: list[dict], rows: list[dict], reference: dict | None) -> list[dict]:
    """The benchmark's rows of one method: one per setting, from its evaluation summaries and per-prompt
    rows; `reference` is no mitigation's row (None for 'none' itself)."""
    out = []
    for summary in summaries:
        for key, s in summary["results"].get(method, {}).items():
            rs = [r for r in rows if r["method"] == method and r["setting"] == key]
            rows_pp = s.get("unet_rows_per_prompt")
            ref_rows = reference["unet_rows_per_prompt"] if reference else rows_pp
            out.append({"method": method, "setting": key, "value": s["value"], "status": "ok",
                        "num_prompts": s["num_prompts"], "num_generations": s["num_generations"],
                        "copy_rate": s["copy_rate"], "similarity": _similarity(rs),
                        "alignment": s.get("alignment_mean"), "clip_score": s.get("clip_score_mean"),
                        "final_d_mean": s["final_d_mean"], "iterations_mean": s["iterations_mean"],
                        "unet_rows_per_prompt": rows_pp,
                        "extra_unet_rows_per_prompt": None if rows_pp is None or ref_rows is None else rows_pp - ref_rows,
                        "seconds_per_prompt": s.get("seconds_per_prompt")})
            counts = acceptance_counts(rs)
            if counts is not None:
                out[-1]["prompts_accepted"], out[-1]["prompts_fell_back"] = counts["accepted"], counts["fell_back"]
    return out


def primary_metric(rows: list[dict]) -> str | None:
    """The similarity the table and figure show: SSCD when measured, else pixel cosine."""
    have = {m for r in rows for m in r.get("similarity", {})}
    return next((m for m in ("sscd", "pixel_cosine", "tiled_l2") if m in have), None)


BENCH_RESUME_KEYS = ("model", "dataset", "prompts", "config")
EXTENDABLE = ("methods", "dori_steps")  # a resumed benchmark may add methods and the DoRI runs


def _without_extendable(record: dict) -> dict:
    return {**record, "config": {k: v for k, v in record.get("config", {}).items() if k not in EXTENDABLE}}


def plan_entry(model, name: str, config: BenchMitigateConfig) -> dict:
    """One method's plan: skipped with its reason, or its sweep and folders (and the DoRI folder, with
    ``config.dori_steps``, for methods that change the model or the sampler: their published setting)."""
    from diffmem.mitigations import get_mitigation, refusal

    method = get_mitigation(name)
    reason = refusal(method, model)
    if reason is not None:
        return {"method": name, "status": "skipped", "reason": reason}
    try:
        sweep = method.sweep(model, config.sampling) if hasattr(method, "sweep") else [{}]
        sweep = [{**e, **config.fixed_params(name)} for e in sweep]
        configs = sweep_configs(name, sweep, config)
    except ValueError as e:  # a sweep that cannot be derived on this model is a refusal too
        return {"method": name, "status": "skipped", "reason": str(e)}
    folders = [name] if len(configs) == 1 else [f"{name}/{i:02d}" for i in range(len(configs))]
    entry = {"method": name, "status": "run", "sweep": sweep, "folders": folders}
    return with_dori(entry, config)


def with_dori(entry: dict, config: BenchMitigateConfig) -> dict:
    """`entry` with its DoRI runs planned (``dori_folder``; ``published_folder`` too when the method's
    published setting is not among its sweep's, so that its copy rate from the prompts is measured alike)."""
    from diffmem.evaluate import settings_of
    from diffmem.mitigate import setting_key
    from diffmem.mitigations import get_mitigation

    name = entry["method"]
    if (not config.dori_steps or entry["status"] != "run" or "dori_folder" in entry
            or not getattr(get_mitigation(name), "attacked_by_dori", False)):
        return entry
    entry = {**entry, "dori_folder": f"{name}/dori", "dori_steps": config.dori_steps}
    swept = {setting_key(m) for cfg in sweep_configs(name, entry["sweep"], config) for m in settings_of(cfg)}
    if setting_key(settings_of(dori_config(name, 0, config))[0]) not in swept:
        entry["published_folder"] = f"{name}/published"
    return entry


def dori_config(name: str, steps: int, bench: BenchMitigateConfig):
    """The EvaluateConfig of a method's published setting (with --param), under the DoRI attack of `steps`
    Adam steps (0: no attack)."""
    from dataclasses import replace

    base = bench.evaluate_config().mitigation
    params = {k: (v,) for k, v in bench.fixed_params(name).items()}
    return bench.evaluate_config(methods=(name,), mitigation=replace(base, method=name, dori_steps=steps), params=params)


@one_writer(lambda a: a["out"])
def bench_mitigate(model, eval_set, config: BenchMitigateConfig, out: str | Path, progress: bool = True,
                   resume: bool = False) -> dict:
    """Run the mitigation benchmark on `eval_set` (prompts with their training images); write under `out`:
    one ``run_evaluation`` folder per method (``<method>/``, or ``<method>/<i>/`` per setting when its
    sweep is no grid), ``plan.json`` (the settings, computed once: a resumed run reuses them),
    ``table.md``, ``results.json`` and ``tradeoff.png``. ``resume=True`` continues a killed benchmark:
    finished methods are not run again, the method in flight continues where it stopped. Methods
    whose ``check`` refuses the model are reported as skipped, with the reason. Under ``accelerate
    launch`` every method's prompts are spread over the processes; the main process writes the files.
    Returns the results (``results.json``'s content)."""
    from accelerate import PartialState

    from diffmem.evaluate import run_evaluation
    from diffmem.files import check_resume, jsonable, read_json, read_rows, write_json
    from diffmem.mitigations import get_mitigation, refusal
    from diffmem.provenance import provenance

    state = PartialState()
    out = Path(out)
    current = jsonable({"model": model.name, "dataset": eval_set.name, "prompts": [p.caption for p in eval_set.prompts],
                        "config": asdict(config)})
    plan_path, finished_path = out / "plan.json", out / "finished.json"
    # 1. The plan (per method: skipped with its reason, or its sweep and folders), on the main process;
    #    a resumed benchmark keeps the plan it recorded, so that its settings cannot drift; it may add
    #    methods (and the DoRI runs), which are planned now and run after the recorded ones.
    if state.is_main_process:
        recorded = read_json(plan_path)
        check_resume(out, plan_path.exists(), resume, _without_extendable(recorded), _without_extendable(current),
                     BENCH_RESUME_KEYS)
        if not plan_path.exists():
            methods = [plan_entry(model, name, config) for name in config.run_order]
            out.mkdir(parents=True, exist_ok=True)
            write_json(plan_path, jsonable({**current, "methods": methods}))
        else:
            planned = [with_dori(e, config) for e in recorded["methods"]]
            known = {e["method"] for e in planned}
            planned += [plan_entry(model, name, config) for name in config.run_order if name not in known]
            if planned != recorded["methods"]:
                write_json(plan_path, jsonable({**recorded, "methods": planned}))
    state.wait_for_everyone()
    plan = read_json(plan_path)
    finished = set(read_json(finished_path).get("folders", []))
    # 2. Each method's evaluation, folder by folder (every process takes its share of the prompts).
    summaries: dict[str, list[dict]] = {}
    for entry in plan["methods"]:
        if entry["status"] != "run":
            continue
        configs = sweep_configs(entry["method"], entry["sweep"], config)
        for folder, cfg in zip(entry["folders"], configs):
            if folder in finished:
                summary = read_json(out / folder / "summary.json")
            else:
                summary = run_evaluation(model, eval_set, cfg, out / folder, progress=progress, resume=resume)
                if state.is_main_process:
                    finished.add(folder)
                    write_json(finished_path, {"folders": sorted(finished)})
            summaries.setdefault(entry["method"], []).append(summary)
    dori_summaries: dict[str, list[dict]] = {}
    for entry in plan["methods"]:  # the DoRI runs after every method's own (the attack costs the most)
        runs = [(entry.get("published_folder"), 0), (entry.get("dori_folder"), entry.get("dori_steps", 0))]
        for folder, steps in runs:
            if folder is None:
                continue
            if folder in finished:
                summary = read_json(out / folder / "summary.json")
            else:
                summary = run_evaluation(model, eval_set, dori_config(entry["method"], steps, config), out / folder,
                                         progress=progress, resume=resume)
                if state.is_main_process:
                    finished.add(folder)
                    write_json(finished_path, {"folders": sorted(finished)})
            dori_summaries.setdefault(entry["method"], []).append(summary)
    state.wait_for_everyone()
    # 3. The table, results and figure (main process).
    rows: list[dict] = []
    reference = None
    for entry in plan["methods"]:
        name = entry["method"]
        if entry["status"] != "run":
            rows.append({"method": name, "status": "skipped", "reason": entry["reason"]})
            continue
        per_prompt = [r for folder in entry["folders"] for r in read_rows(out / folder / "per_prompt.jsonl")]
        got = mitigation_rows(name, summaries[name], per_prompt, reference)
        if name == "none":
            reference = got[0]
        rows += got
    first = next(iter(summaries.values()))[0] if summaries else {}
    results = {**provenance(model, dataset=eval_set.name, num_prompts=len(eval_set.prompts),
                            config=jsonable(asdict(config)), num_processes=state.num_processes),
               "copy_rule": first.get("copy_rule"), "lab_copy_threshold_rmse": first.get("lab_copy_threshold_rmse"),
               "x_axis": "alignment" if any(r.get("alignment") is not None for r in rows)
               else "clip_score" if any(r.get("clip_score") is not None for r in rows) else "final_d_mean",
               "similarity_metric": primary_metric(rows), "rows": rows,
               "dori": [dori_row(entry["method"], entry["dori_steps"], dori_summaries[entry["method"]][-1],
                                 [*summaries.get(entry["method"], []), *dori_summaries[entry["method"]][:-1]])
                        for entry in plan["methods"] if "dori_folder" in entry]}
    if state.is_main_process:
        write_json(out / "results.json", results)
        (out / "table.md").write_text(format_mitigation_table(results))
        mitigation_tradeoff_figure(results, out / "tradeoff.png")
    state.wait_for_everyone()
    return results


def dori_row(method: str, steps: int, summary: dict, own: list[dict]) -> dict:
    """One method under the DoRI attack of `steps` Adam steps (`summary`): the copy rate of its published
    setting from the prompts (found among the summaries `own`: its sweep's, or its published setting's own
    run) and from the attack's embeddings."""
    (setting, s), = summary["results"][method].items()
    plain = setting.removesuffix(f",dori={steps}")
    from_prompts = next((o["results"][method][plain]["copy_rate"] for o in own
                         if plain in o.get("results", {}).get(method, {})), None)
    return {"method": method, "setting": plain, "dori_steps": steps,
            "copy_rate_prompts": from_prompts, "copy_rate_dori": s.get("copy_rate"),
            "alignment_dori": s.get("alignment_mean"), "seconds_per_prompt": s.get("seconds_per_prompt")}


def format_mitigation_table(results: dict) -> str:
    """``table.md``: one row per method and setting (skipped methods with their reason)."""
    rows, metric = results["rows"], results["similarity_metric"] or "similarity"
    x = results["x_axis"]
    x_label = {"alignment": "alignment", "clip_score": "CLIP score", "final_d_mean": "final d"}[x]
    ok = [r for r in rows if r["status"] == "ok"]
    head = (f"Model `{results.get('model')}`, dataset `{results.get('dataset')}`, {results.get('num_prompts')} prompts x "
            f"{results['config']['sampling']['num_generations']} generations, "
            f"{results['config']['sampling']['num_inference_steps']} steps, seed {results['config']['sampling']['seed']}"
            f"{' (one x_T for every prompt)' if results['config']['sampling'].get('same_noise') else ''}. "
            f"Copy rule: {results.get('copy_rule') or 'none (give --sscd or --copy-threshold)'}. "
            f"Similarity: {metric}, each prompt's mean, max and top-3 mean over its generations, averaged over prompts. "
            "Extra UNet rows: per prompt, beyond unmitigated sampling's.\n\n")
    lines = [f"| method | setting | copy rate | {metric} mean | {metric} max | {metric} top-3 | {x_label} | "
             "extra UNet rows / prompt | s / prompt |", "|---|---|---|---|---|---|---|---|---|"]
    for r in ok:
        sim = r["similarity"].get(metric, {}) if metric else {}
        xv = r.get(x)
        lines.append(f"| {r['method']} | {r['setting']} | {_num(r['copy_rate'], '.3f')} | {_num(sim.get('mean'), '.3f')} | "
                     f"{_num(sim.get('max'), '.3f')} | {_num(sim.get('top3_mean'), '.3f')} | {_num(xv, '.3f')} | "
                     f"{_num(r['extra_unet_rows_per_prompt'], '.0f')} | {_num(r['seconds_per_prompt'], '.3f')} |")
    for r in rows:
        if r["status"] == "skipped":
            lines.append(f"| {r['method']} | skipped: {r['reason'].replace('|', '/')} | - | - | - | - | - | - | - |")
    accepted = [r for r in ok if "prompts_fell_back" in r]
    if accepted:  # SAIL: did its acceptance rule act, or the fallback?
        lines.append("\nPrompts whose generations all started from accepted latents, and prompts where at least "
                     "one took the lowest-loss fallback after max_rounds:\n")
        lines += [f"- {r['method']} {r['setting']}: {r['prompts_accepted']} accepted, {r['prompts_fell_back']} fell back"
                  for r in accepted]
    if results.get("dori"):
        lines += ["", "Under the DoRI attack (an embedding optimized to denoise each prompt's training image, against the "
                  "model as the method edits it; then sampled with the method): the published setting of each method "
                  "that changes the model or the sampler.", "",
                  "| method | setting | copy rate from the prompts | copy rate under DoRI | alignment under DoRI | s / prompt |",
                  "|---|---|---|---|---|---|"]
        lines += [f"| {r['method']} | {r['setting']} | {_num(r['copy_rate_prompts'], '.3f')} | "
                  f"{_num(r['copy_rate_dori'], '.3f')} | {_num(r['alignment_dori'], '.3f')} | "
                  f"{_num(r['seconds_per_prompt'], '.3f')} |" for r in results["dori"]]
    return head + "\n".join(lines) + "\n"


def mitigation_tradeoff_figure(results: dict, out: str | Path) -> Path:
    """Copy rate (left) and similarity (right) against alignment / CLIP score: one curve per method over
    its settings (labelled with the swept value), no mitigation as a star."""
    from diffmem.reports.plots import _pyplot

    plt = _pyplot()
    rows = [r for r in results["rows"] if r["status"] == "ok"]
    x, metric = results["x_axis"], results["similarity_metric"]
    x_label = {"alignment": "alignment (lab content check)", "clip_score": "CLIP score",
               "final_d_mean": "first-step d of what was sampled"}[x]
    panels = [("copy rate", lambda r: r["copy_rate"]),
              (f"{metric} to training image (mean of best match)" if metric else "similarity",
               lambda r: r["similarity"].get(metric, {}).get("mean") if metric else None)]
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.6), squeeze=False)
    methods = [m for m in dict.fromkeys(r["method"] for r in rows) if m != "none"]
    colours = plt.get_cmap("tab20")  # one colour and marker per method, however many there are
    style = {m: dict(color=colours(i % 20), marker="osD^v<>ph"[i % 9]) for i, m in enumerate(methods)}
    for ax, (label, y_of) in zip(axes[0], panels):
        for method in dict.fromkeys(r["method"] for r in rows):
            pts = [(r["value"] if r["value"] is not None else 0, r[x], y_of(r)) for r in rows if r["method"] == method]
            pts = sorted((p for p in pts if p[1] is not None and p[2] is not None), key=lambda p: (p[0], p[1]))
            if not pts:
                continue
            if method == "none":
                ax.plot([p[1] for p in pts], [p[2] for p in pts], "k*", ms=14, label="none (reference)", zorder=5)
                continue
            line, = ax.plot([p[1] for p in pts], [p[2] for p in pts], "-", label=method, **style[method])
            for v, xv, yv in pts:
                ax.annotate(f"{v:.3g}", (xv, yv), textcoords="offset points", xytext=(4, 4), fontsize=7,
                            color=line.get_color())
        if not ax.get_lines():
            ax.text(0.5, 0.5, "not measured", ha="center", va="center", transform=ax.transAxes)
        ax.set(xlabel=x_label, ylabel=label)
        ax.grid(alpha=0.3)
    handles, labels = axes[0][0].get_legend_handles_labels()
    if handles:  # one legend beside both panels
        fig.legend(handles, labels, fontsize=8, loc="center left", bbox_to_anchor=(1.0, 0.5))
    fig.suptitle("mitigation trade-off per method over its settings (labels: the swept value)", fontsize=10)
    fig.tight_layout()
    fig.savefig(out, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return Path(out)

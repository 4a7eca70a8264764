"""Mitigation sweeps and their evaluation as Wen et al. (sec. 5) report it.

``run_evaluation`` sweeps mitigation settings over a set of memorized prompts (``diffmem.eval_sets``),
judges each generation (``diffmem.judge``) and writes, under one folder: per-prompt tables
(``per_prompt.jsonl``/``.csv``), ``summary.json`` (per method and setting: copy rate, mean similarity
per metric, alignment or CLIP score, counts), image grids (training image next to its generations)
and the similarity-against-alignment trade-off figure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from diffmem.eval_sets import EvalSet
from diffmem.files import generation_name, jsonable, one_writer, save_generations
from diffmem.judge import Judge
from diffmem.mitigate import (AUGMENT_STYLES, METHODS, MitigationConfig, calibrated_target_loss,  # noqa: F401
                              mitigate_unit, reference_losses, setting_key, setting_value)
from diffmem.mitigations import param_names
from diffmem.provenance import provenance
from diffmem.sampling import SamplingConfig, plan_units


@dataclass
class EvaluateConfig:
    methods: tuple[str, ...] = ("none", "embedding-opt", "rand-word-add")
    target_losses: tuple[float | None, ...] = (None,)  # embedding-opt sweep; None: the model's default target
    repeat_nums: tuple[int, ...] = (4,)  # augmentation sweep (4 at inference; the paper sweeps 1-8)
    # the other methods' parameters: {name: values}; each method sweeps the product of those it takes
    params: dict = field(default_factory=dict)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)  # lr, max_iters of embedding-opt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sscd: str | None = None  # TorchScript checkpoint path
    clip: str | None = None  # transformers CLIP folder
    copy_threshold: float | None = None  # similarity above it (below, for a distance) is a copy
    copy_metric: str | None = None  # default: sscd when given, else pixel_cosine
    grid_prompts: int = 12  # prompts shown per grid image
    save_images: bool = False

    def __post_init__(self):
        from diffmem.mitigations import canonical_name

        self.methods = tuple(canonical_name(m) for m in self.methods)  # the original code's spellings too


def settings_of(config: EvaluateConfig) -> list[MitigationConfig]:
    """Every setting of the sweep (augmentations draw with the sampling seed)."""
    import itertools

    out = []
    base = replace(config.mitigation, seed=config.sampling.seed, params={})
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"--mitigation {method!r}: expected one of {', '.join(METHODS)}")
    unused = set(config.params) - {n for m in config.methods for n in param_names(m)}
    if unused:
        raise ValueError(f"--param {', '.join(sorted(unused))}: none of the methods {', '.join(config.methods)} "
                         "takes it")
    for method in config.methods:
        if method == "embedding-opt":
            out += [replace(base, method=method, target_loss=None if v is None else float(v))
                    for v in config.target_losses]
        elif method in AUGMENT_STYLES:
            out += [replace(base, method=method, repeat_num=int(v)) for v in config.repeat_nums]
        else:
            names = [n for n in param_names(method) if n in config.params]
            grids = [tuple(config.params[n]) if isinstance(config.params[n], (list, tuple)) else (config.params[n],)
                     for n in names]
            out += [replace(base, method=method, params=dict(zip(names, values)))
                    for values in itertools.product(*grids)]
    return out


def calibrate_target_loss(model, reference_prompts: list[str], sampling: SamplingConfig,
                          percentiles=(50, 75, 90, 95), unit: str = "batch") -> dict[float, float]:
    """Target losses for embedding-opt from non-memorized prompts' first-step loss (in `unit`):
    {percentile: value}.

    Memorized prompts are brought down to where ordinary prompts sit; a target above the memorized
    prompts' own loss stops the optimizer at once (the prototype finding)."""
    losses = reference_losses(model, reference_prompts, sampling, unit)
    return {float(p): float(np.percentile(losses, p)) for p in percentiles}


def summarize(rows: list[dict]) -> dict:
    """Per method and setting: copy rate, mean similarity per metric, alignment / CLIP score, counts."""
    out: dict[str, dict] = {}
    for (method, key) in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        rs = [r for r in rows if r["method"] == method and r["setting"] == key]
        n_gen = sum(r["num_generations"] for r in rs)
        s = {"value": rs[0]["value"], "num_prompts": len(rs), "num_generations": n_gen,
             "copy_rate": sum(r["copies"] for r in rs) / n_gen if "copies" in rs[0] else None,
             "similarity_mean": {m: float(np.mean([r[m]["mean"] for r in rs if m in r]))
                                 for m in ("sscd", "tiled_l2", "pixel_cosine") if any(m in r for r in rs)},
             "final_d_mean": float(np.mean([r["final_d"] for r in rs])),
             "final_loss_mean": float(np.mean([r["final_loss"] for r in rs])),
             "initial_d_mean": float(np.mean([r["initial_d"] for r in rs])),
             "iterations_mean": float(np.mean([r["iterations"] for r in rs]))}
        if "unet_rows" in rs[0]:  # cost per prompt, the sampling included
            s["unet_rows_per_prompt"] = float(np.mean([r["unet_rows"] for r in rs]))
            s["seconds_per_prompt"] = float(np.mean([r["seconds"] for r in rs]))
        if method == "embedding-opt":  # prompts already at the target: their embedding is unchanged
            s["fraction_at_target_at_once"] = float(np.mean([r["iterations"] == 0 for r in rs]))
        if "aligned" in rs[0]:
            s["alignment_mean"] = sum(r["aligned"] for r in rs) / n_gen
        if "clip_score" in rs[0]:
            s["clip_score_mean"] = float(np.mean([r["clip_score"] for r in rs]))
        if "gt_clip_score" in rs[0]:  # the training images against their captions: the score a copy would get
            s["gt_clip_score_mean"] = float(np.mean([r["gt_clip_score"] for r in rs]))
        if "copies_by_threshold" in rs[0]:
            s["copy_rate_by_threshold"] = sum(r["copies_by_threshold"] for r in rs) / n_gen
        out.setdefault(method, {})[key] = s
    return out


def best_under_copy_rate(results: dict, max_copy_rate: float = 0.05) -> dict:
    """Per method, the setting with the best alignment (lab) or CLIP score among those whose copy rate
    is <= `max_copy_rate`: the comparison "at the same copy rate" of Wen et al.'s trade-off figure."""
    out = {}
    for method, settings in results.items():
        ok = [(k, s) for k, s in settings.items() if s.get("copy_rate") is not None and s["copy_rate"] <= max_copy_rate]
        key = "alignment_mean" if any("alignment_mean" in s for _, s in ok) else "clip_score_mean"
        ok = [(k, s) for k, s in ok if key in s]
        if ok:
            k, s = max(ok, key=lambda ks: ks[1][key])
            out[method] = {"setting": k, "copy_rate": s["copy_rate"], key: s[key]}
    return {"max_copy_rate": max_copy_rate, "methods": out}


@one_writer(lambda a: a["out"])
def run_evaluation(model, eval_set: EvalSet, config: EvaluateConfig, out: str | Path, progress: bool = True,
                   resume: bool = False) -> dict:
    """Sample every mitigation setting on `eval_set`, judge the generations, write everything to `out`.

    Rows are appended to ``per_prompt.jsonl`` a work unit at a time (the generations a grid shows
    saved beside them as PNG), so a killed run keeps every finished unit; ``resume=True`` continues it
    (same model, set and settings) and ends with the files an uninterrupted run writes.

    Under ``accelerate launch`` the work units (setting x batch of prompts) are striped over the
    processes, each appending to its own ``per_prompt.jsonl.part<i>``; the main process calibrates the
    target loss (the others read it from ``run.json``), merges the parts, and alone writes the grids,
    tables, summary and figure: the same files as one process writes. Every process returns the summary.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from diffmem.faults import fault_point
    from diffmem.files import append_rows, check_resume, load_png, read_json, read_rows, write_json, write_rows
    from diffmem.reports.plots import comparison_grid, tradeoff_figure

    state = PartialState()
    main = state.is_main_process
    # 1. Inputs and output folder: a new run must not overwrite, a resumed one must match. The main
    #    process calibrates (one target for every embedding-opt setting without its own; None when
    #    nothing needs one) and records it in run.json, which the other processes read it from.
    out = Path(out)
    settings = settings_of(config)
    prompts = [p.caption for p in eval_set.prompts]
    rows_path = out / "per_prompt.jsonl"
    parts = sorted(out.glob(rows_path.name + ".part*"))
    if main:
        target = next((t for t in (calibrated_target_loss(model, m, config.sampling) for m in settings)
                       if t is not None), None)
        run = jsonable({"model": model.name, "dataset": eval_set.name, "prompts": prompts, "config": asdict(config),
                        "calibrated_target_loss": target})
        check_resume(out, (out / "run.json").exists() or rows_path.exists() or bool(parts), resume,
                     read_json(out / "run.json"), run, list(run))
        (out / "grids").mkdir(parents=True, exist_ok=True)
        write_json(out / "run.json", run)
    state.wait_for_everyone()
    if not main:
        target = read_json(out / "run.json")["calibrated_target_loss"]
    settings = [m.resolved(model, target) for m in settings]
    judge = Judge(model, eval_set, config)
    names = [f"{m.method}_{setting_key(m)}" for m in settings]
    # 2. What is left: whole units not yet in the rows (or in a process's part file), striped over the processes.
    done = {(r["method"], r["setting"], r["position"]) for p in [rows_path, *parts] for r in read_rows(p, repair=main)}
    state.wait_for_everyone()
    units = plan_units(list(range(len(prompts))), config.sampling.num_generations, config.sampling.batch_size)
    todo = [(m, name, u) for m, name in zip(settings, names) for u in units
            if not all((m.method, setting_key(m), p) in done for p in u)][state.process_index::state.num_processes]
    target_rows = rows_path if state.num_processes == 1 else rows_path.with_name(f"{rows_path.name}.part{state.process_index}")
    bar = tqdm(total=sum(len(u) for _, _, u in todo), desc="evaluate", unit="prompt", disable=not progress or not main)
    # 3. Each setting, unit by unit: mitigate and sample, judge each prompt's generations.
    for setting, name, unit in todo:
        training = [eval_set.prompts[p].training for p in unit] if setting.dori_steps else None
        results = mitigate_unit(model, [prompts[p] for p in unit], unit, setting, config.sampling, training=training)
        for r in results:
            if r.position < config.grid_prompts:
                save_generations(out / "grids" / name, r.position, r.images)
            if config.save_images:
                save_generations(out / "images" / name, r.position, r.images)
        append_rows(target_rows, [judge.row(eval_set.prompts[r.position], r, setting) for r in results
                                  if (setting.method, setting_key(setting), r.position) not in done])
        bar.update(len(unit))
        fault_point("evaluate.unit")
    bar.close()
    state.wait_for_everyone()
    if not main:  # the main process writes the rest; the others return its summary
        state.wait_for_everyone()
        return json.loads((out / "summary.json").read_text())
    # 4. Grids, tables, summary and the trade-off figure, from what is on disk (the parts merged in).
    order = {(m.method, setting_key(m)): i for i, m in enumerate(settings)}
    parts = sorted(out.glob(rows_path.name + ".part*"))
    merged = {(r["method"], r["setting"], r["position"]): r for p in [rows_path, *parts] for r in read_rows(p)}
    rows = sorted(merged.values(), key=lambda r: (order[(r["method"], r["setting"])], r["position"]))
    G = config.sampling.num_generations
    for name in names:
        shown = range(min(config.grid_prompts, len(prompts)))
        comparison_grid([eval_set.prompts[p].training[:1] for p in shown],
                        [np.stack([load_png(out / "grids" / name / generation_name(p, g)) for g in range(G)])
                         for p in shown], out / "grids" / f"{name}.png")
    summary = {"provenance": provenance(model, dataset=eval_set.name, num_prompts=len(prompts),
                                        config=jsonable(asdict(config)), calibrated_target_loss=target,
                                        num_processes=state.num_processes),
               "copy_rule": "lab judge (nearest training image is the prompt's own, RMSE under the lab threshold)"
               if judge.lab_train is not None else (f"{judge.copy_metric} beyond {config.copy_threshold}"
                                                    if config.copy_threshold is not None else None),
               "lab_copy_threshold_rmse": judge.lab_threshold,
               "results": summarize(rows)}
    summary["best_at_copy_rate_5pct"] = best_under_copy_rate(summary["results"], 0.05)
    write_rows(rows_path, rows)  # whole, under a temporary name then renamed; then the parts go
    for p in parts:
        p.unlink()
    _write_csv(out / "per_prompt.csv", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    x_key = "alignment_mean" if judge.lab_train is not None else "clip_score_mean" if judge.clip else None
    tradeoff_figure(summary["results"], out / "tradeoff.png", x_key=x_key,
                    similarity_metric="sscd" if judge.sscd else "pixel_cosine")
    state.wait_for_everyone()
    return summary


def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    flat = []
    for r in rows:
        f = {}
        for k, v in r.items():
            if isinstance(v, dict):
                f.update({f"{k}_{kk}": vv for kk, vv in v.items()})
            else:
                f[k] = v
        flat.append(f)
    fields = list(dict.fromkeys(k for f in flat for k in f))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)

"""The one-command memorization audit: detect, calibrate, explain, mitigate, report.

``run_audit`` answers a model owner's question ("which of these prompts make my model copy its
training data, why, and what do I do about it") in stages, each saved under the output folder so
that a re-run with the same folder resumes stage by stage:

1. detect     first-step score of every audited prompt and every reference prompt (``run_detection``
              with its resume), ``detect/prompts.jsonl`` and ``detect/reference.jsonl``;
2. calibrate  the decision threshold at a false-positive rate on the reference prompts, or a given
              one, ``threshold.json``;
3. track      full DDIM tracking of the flagged prompts, with their generations, ``track/flagged.jsonl``
              and ``images/generated/``;
4. explain    token significance (Wen et al. sec. 4) of each flagged prompt, ``explain.jsonl``;
5. mitigate   embedding optimization (Wen et al. sec. 5.1) of each flagged prompt and its generations,
              ``mitigate.jsonl`` and ``images/mitigated/``;
6. copies     where the training images are known (lab models): each generation's nearest training
              image and the lab's copy rule, ``copies.jsonl`` and ``images/training/``;
7. report     ``results.jsonl`` (one ``AuditRow`` per prompt) and the self-contained ``index.html``.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import numpy as np

from diffmem.detect import run_detection
from diffmem.faults import fault_point
from diffmem.files import (append_rows, jsonable, load_png, one_writer, read_json, read_rows, save_generations, save_png,
                           write_json, write_rows)
from diffmem.metrics import fpr_sample_warning, prompt_score, threshold_at_fpr
from diffmem.mitigate import MitigationConfig
from diffmem.prompts import PromptRecord, PromptSet
from diffmem.sampling import SamplingConfig, plan_units
from diffmem.targets import describe_target, mitigation_shortfalls

STAGES = ("detect", "calibrate", "track", "explain", "mitigate", "copies", "report")


@dataclass
class AuditConfig:
    fpr: float = 0.01  # false-positive rate on the reference prompts that sets the threshold
    threshold: float | None = None  # a given decision threshold instead of calibrating one
    detect_steps: int = 1  # score window [0, detect_steps): first-step detection separates well and is cheap
    top_words: int = 3  # words listed per flagged prompt in results.jsonl
    # x_T draws, schedule, seed (prompt at position i starts from seed + i), guidance, UNet samples per call
    sampling: SamplingConfig = field(default_factory=lambda: SamplingConfig(batch_size=64))
    # embedding-opt of the flagged prompts; None fields: the model's defaults (target: calibrated on the reference)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)

    def __post_init__(self):
        if not 0 < self.fpr < 1:
            raise ValueError(f"--fpr {self.fpr}: expected a rate between 0 and 1 (0.01 is 1%)")
        if not 1 <= self.detect_steps <= self.sampling.num_inference_steps:
            raise ValueError(f"--detect-steps {self.detect_steps}: must be between 1 and --num-inference-steps "
                             f"({self.sampling.num_inference_steps})")
        if self.mitigation.method != "embedding-opt":
            raise ValueError(f"the audit mitigates with embedding-opt, not {self.mitigation.method!r}")

    def tracked(self, track_steps: int | None) -> SamplingConfig:
        return replace(self.sampling, track_steps=track_steps)


@dataclass
class AuditRow:
    """One row of results.jsonl: an audited prompt's score and verdict, and for a flagged prompt the
    why (top words) and the what-to-do (mitigation). Fields left None are absent from the row."""

    index: int  # the prompt's position in the audited set; its seed is sampling seed + index
    prompt: str
    seed: int
    score: float  # detection score over the detection window
    flagged: bool  # score >= threshold
    source: dict | None = None  # the prompt's input fields (lab: set, colour, shape, trigger_words)
    # flagged prompts only:
    score_all_steps: float | None = None  # the score over the whole schedule (track stage)
    images: list[str] | None = None  # its generations
    top_words: list[str] | None = None  # the most significant words (explain stage)
    explanation_score: float | None = None
    mitigated_score: float | None = None  # the score after embedding optimization
    mitigated_flagged: bool | None = None
    mitigation_iterations: int | None = None
    mitigated_images: list[str] | None = None
    generated_copies: int | None = None  # generations copying a training image (lab copy rule)
    mitigated_copies: int | None = None
    generated_aligned: int | None = None  # generations showing the prompt's colour and shape (lab alignment check)
    mitigated_aligned: int | None = None

    def to_json(self) -> dict:
        return {k: v for k, v in asdict(self).items() if v is not None}


@dataclass
class AuditResult:
    out: Path
    rows: list[AuditRow]  # results.jsonl
    threshold: dict
    stages_run: list[str] = field(default_factory=list)  # stages computed in this call
    stages_resumed: list[str] = field(default_factory=list)  # stages found finished under `out`
    shortfalls: list = field(default_factory=list)  # diffmem.targets.Shortfall: where mitigation fell short


# -- the stages -------------------------------------------------------------------------------

def _log(progress: bool, msg: str) -> None:
    if progress:
        print(msg, flush=True)


def _detect(model, prompts: PromptSet, out: Path, config: AuditConfig, track_steps: int | None,
            images_dir: Path | None, progress: bool) -> list[dict]:
    """run_detection with resume; complete when every record has a row."""
    if out.exists() and {r["index"] for r in read_rows(out)} >= {r.position for r in prompts.records}:
        return read_rows(out)
    run_detection(model, prompts.records, out, config.tracked(track_steps), resume=True, images_dir=images_dir,
                  prompts_info={"source": prompts.source, "sha256_16": prompts.digest()}, progress=progress)
    return read_rows(out)


def calibrate(config: AuditConfig, reference_scores: list[float] | None, reference_source: str | None) -> dict:
    """The decision threshold (score >= value is flagged) and how it was chosen."""
    if config.threshold is not None:
        out = {"value": float(config.threshold), "method": "given", "description": f"given threshold {config.threshold:g}"}
    else:
        value = threshold_at_fpr(reference_scores, config.fpr)
        out = {"value": value, "method": "fpr", "fpr": config.fpr,
               "description": f"{100 * config.fpr:g}% false positives on {len(reference_scores)} reference prompts "
                              f"({reference_source})"}
        warning = fpr_sample_warning(len(reference_scores), config.fpr)
        if warning:
            out["warning"] = warning
    if reference_scores:
        s = np.asarray(reference_scores)
        out.update(reference_source=reference_source, num_reference=int(s.size),
                   reference_fpr=float((s >= out["value"]).mean()), reference_median=float(np.median(s)))
    return out


def _explain(model, flagged: list[dict], path: Path, config: AuditConfig, progress: bool) -> dict[int, dict]:
    from tqdm.auto import tqdm

    from diffmem.explain import ExplainConfig, token_significance

    done = {r["index"]: r for r in read_rows(path, repair=True)}
    todo = [r for r in flagged if r["index"] not in done]
    sampling = config.sampling
    explain = ExplainConfig(steps=(0, config.detect_steps), generations=sampling.num_generations, seed=sampling.seed,
                            num_inference_steps=sampling.num_inference_steps, guidance_scale=sampling.guidance_scale,
                            batch_size=sampling.batch_size)
    for r in tqdm(todo, desc="explain", unit="prompt", disable=not progress or not todo):
        ex = token_significance(model, r["prompt"], explain, position=r["index"])  # the score's own seed
        rec = {"index": r["index"], **ex.to_json()}
        append_rows(path, [rec])
        done[r["index"]] = rec
    return done


def _mitigate(model, flagged: list[dict], path: Path, images: Path, config: AuditConfig,
              mitigation: MitigationConfig, progress: bool) -> dict[int, dict]:
    from tqdm.auto import tqdm

    from diffmem.mitigate import mitigate_unit

    done = {r["index"]: r for r in read_rows(path, repair=True)}
    by_pos = {r["index"]: r["prompt"] for r in flagged if r["index"] not in done}
    sampling = config.tracked(None)
    images.mkdir(parents=True, exist_ok=True)
    # Units of at most batch_size // 2 generations: the optimizer's batch and the sampler's are the same.
    units = plan_units(sorted(by_pos), sampling.num_generations, sampling.batch_size)
    bar = tqdm(total=len(by_pos), desc="mitigate", unit="prompt", disable=not progress or not by_pos)
    for unit in units:
        results = mitigate_unit(model, [by_pos[p] for p in unit], unit, mitigation, sampling)
        rows = []
        for m in results:
            save_generations(images, m.position, m.images)
            rows.append({"index": m.position, "prompt": m.prompt, "initial_d": m.initial_d, "final_d": m.final_d,
                         "initial_loss": m.initial_loss, "final_loss": m.final_loss,
                         "iterations": m.iterations, "target_loss": mitigation.target_loss,
                         "target_unit": mitigation.target_unit,
                         "mitigated_score": prompt_score(m.text_noise_norm.tolist(), slice(0, config.detect_steps)),
                         "text_noise_norm": m.text_noise_norm.tolist(),
                         "images": [f"images/mitigated/{m.position:05d}_{g}.png" for g in range(len(m.images))]})
        append_rows(path, rows)
        done.update({r["index"]: r for r in rows})
        bar.update(len(unit))
    bar.close()
    return done


def mitigation_of(model, config: AuditConfig, normal: list[dict], threshold: float) -> MitigationConfig:
    """embedding-opt of the flagged prompts: the config's settings, the model's defaults for the rest,
    and where neither gives a target, one calibrated on `normal` (detect rows of normal prompts)."""
    calibrated = None
    if config.mitigation.target_loss is None and model.defaults.target_loss is None:
        from diffmem.metrics import mitigation_loss
        from diffmem.mitigate import default_target_loss

        # embedding-opt stops on its first-step loss, so the target is set on that scale: the median
        # first-step loss of the reference prompts (from their detect rows), as on every verb
        unit = config.mitigation.target_unit
        losses = [float(mitigation_loss(np.asarray(r["text_noise_norm"], dtype=np.float64)[:, 0], unit)) for r in normal]
        calibrated = default_target_loss(losses, threshold, unit, config.sampling.num_generations)
    return config.mitigation.resolved(model, calibrated)


def _copies(data, flagged: list[dict], out: Path, progress: bool) -> list[dict]:
    """Nearest training image (RMSE) of every generation before and after mitigation, and the lab's copy rule."""
    from diffmem.lab.judge import TrainingImages, copy_threshold, judge_copies

    _log(progress, "  rendering the lab's training images and calibrating the copy rule")
    train = TrainingImages.of(data)
    threshold = copy_threshold(data, train)
    (out / "images" / "training").mkdir(parents=True, exist_ok=True)
    rows = []
    for r in flagged:
        row = {"index": r["index"], "copy_threshold_rmse": threshold}
        own = np.flatnonzero(np.isin(train.owner, list(train.owners_of(r["prompt"])))).tolist()
        if own:  # the prompt's own training images (a memorized or non-memorized caption)
            for j in own:
                save_png(train.images[j], out / "images" / "training" / f"{j:06d}.png")
            row["own_training_images"] = [f"images/training/{j:06d}.png" for j in own]
        for kind in ("generated", "mitigated"):
            paths = sorted((out / "images" / kind).glob(f"{r['index']:05d}_*.png"), key=lambda p: int(p.stem.split("_")[1]))
            if not paths:
                continue
            imgs = np.stack([load_png(p) for p in paths])
            res = judge_copies(imgs, [r["prompt"]] * len(imgs), train, threshold)
            for j in set(res.nearest.tolist()):
                p = out / "images" / "training" / f"{j:06d}.png"
                if not p.exists():
                    save_png(train.images[j], p)
            row[kind] = [{"image": f"images/{kind}/{p.name}", "nearest": f"images/training/{int(j):06d}.png",
                          "nearest_caption": train.captions[j], "rmse": float(d), "copy": bool(c)}
                         for p, j, d, c in zip(paths, res.nearest, res.distance, res.is_copy)]
            row[f"{kind}_copies"] = int(res.is_copy.sum())
            src = r.get("source") or {}
            if src.get("colour") and src.get("shape"):  # the lab's alignment check: the described colour and shape
                from diffmem.lab.judge import content_correct

                row[f"{kind}_aligned"] = int(content_correct(imgs, [src["colour"]] * len(imgs),
                                                             [src["shape"]] * len(imgs)).sum())
        rows.append(row)
    return rows


def _word_list(explanation: dict, n: int) -> list[str]:
    words = [w for w in explanation["words"] if any(c.isalnum() for c in w["word"]) and w.get("read", True)]
    return [w["word"] for w in sorted(words, key=lambda w: -w["score"])[:n]]


def result_rows(scored: list[dict], threshold: float, explained: dict, mitigated: dict, copies: dict,
                tracked: dict, top_words: int) -> list[AuditRow]:
    """One row per audited prompt: score, verdict, and for flagged prompts the why and the what-to-do."""
    rows = []
    for r in sorted(scored, key=lambda r: r["index"]):
        i = r["index"]
        row = AuditRow(i, r["prompt"], r["seed"], r["score"], r["score"] >= threshold, source=r.get("source") or None)
        if row.flagged:
            if i in tracked:
                row.score_all_steps = tracked[i]["score"]
                row.images = [f"images/generated/{i:05d}_{g}.png" for g in range(len(tracked[i]["text_noise_norm"]))]
            if i in explained:
                row.top_words = _word_list(explained[i], top_words)
                row.explanation_score = explained[i]["score"]
            if i in mitigated:
                m = mitigated[i]
                row.mitigated_score = m["mitigated_score"]
                row.mitigated_flagged = m["mitigated_score"] >= threshold
                row.mitigation_iterations = m["iterations"]
                row.mitigated_images = m["images"]
            if i in copies:
                row.generated_copies = copies[i].get("generated_copies")
                row.mitigated_copies = copies[i].get("mitigated_copies")
                row.generated_aligned = copies[i].get("generated_aligned")
                row.mitigated_aligned = copies[i].get("mitigated_aligned")
        rows.append(row)
    return rows


def ground_truth(rows: list[AuditRow]) -> dict | None:
    """Where prompts carry a known `set` (lab prompt sets): flag rate per set, and the ROC of memorized
    (memorized + template) against novel scores. None when no prompt carries one."""
    from diffmem.metrics import roc_metrics

    sets: dict[str, list[AuditRow]] = {}
    for r in rows:
        if (r.source or {}).get("set") is not None:
            sets.setdefault(r.source["set"], []).append(r)
    if not sets:
        return None
    out = {"sets": {s: {"prompts": len(rs), "flagged": sum(r.flagged for r in rs)} for s, rs in sets.items()}}
    mem = [r.score for s in ("memorized", "template") for r in sets.get(s, [])]
    if mem and sets.get("novel"):
        out["roc_memorized_vs_novel"] = roc_metrics(mem, [r.score for r in sets["novel"]]).summary()
    return out


@one_writer(lambda a: a["out"])
def run_audit(model, prompts: PromptSet, reference: PromptSet | None, config: AuditConfig = AuditConfig(),
              out: str | Path = "audit", progress: bool = True) -> AuditResult:
    """Audit `prompts` on `model`; write every stage's output, results.jsonl and index.html under `out`."""
    from diffmem.provenance import provenance
    from diffmem.reports.audit_html import write_audit_report

    # 1. Check inputs, and that an existing folder holds this same audit.
    if config.threshold is None and (reference is None or not reference.records):
        raise ValueError("no way to set the decision threshold: pass reference prompts known to be normal "
                         "(--reference-prompts) to calibrate it at --fpr, or a --threshold")
    out = Path(out)
    run_info = {"model": model.name, "config": jsonable(asdict(config)), "prompts": {"source": prompts.source,
                "num_prompts": len(prompts.records), "sha256_16": prompts.digest()},
                "reference": None if reference is None else {"source": reference.source,
                "num_prompts": len(reference.records), "sha256_16": reference.digest()}}
    audit_json = out / "audit.json"
    if audit_json.exists():
        old = json.loads(audit_json.read_text())
        diff = [k for k in run_info if old.get(k) != run_info[k]]
        if diff:
            raise ValueError(f"{out} holds another audit (its {', '.join(diff)} differ); choose another --out "
                             "or delete the folder")
        run_info["started"] = old.get("started")
    else:
        out.mkdir(parents=True, exist_ok=True)
        run_info["started"] = time.strftime("%Y-%m-%dT%H:%M:%S")
        write_json(audit_json, run_info)
    state = read_json(out / "stages.json")
    result = AuditResult(out, [], {})

    def stage(name: str, k: int, what: str):
        """Log the stage; True when it is still to be done."""
        finished = name in state
        _log(progress, f"[{k}/{len(STAGES)}] {name}: {what}" + (" (done, resumed)" if finished else ""))
        (result.stages_resumed if finished else result.stages_run).append(name)
        return not finished

    def finish(name: str, t0: float) -> None:
        state[name] = {"seconds": round(time.time() - t0, 2), "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
        write_json(out / "stages.json", state)
        fault_point("audit.stage")

    # 2. Detect: first-step scores of the audited and the reference prompts.
    t0 = time.time()
    sampling = config.sampling
    todo = stage("detect", 1, f"{config.detect_steps}-step scores of {len(prompts.records)} prompts"
                 + (f" and {len(reference.records)} reference prompts" if reference else ""))
    (out / "detect").mkdir(exist_ok=True)
    scored = _detect(model, prompts, out / "detect" / "prompts.jsonl", config, config.detect_steps, None, progress and todo)
    ref_rows = (_detect(model, reference, out / "detect" / "reference.jsonl", config, config.detect_steps, None,
                        progress and todo) if reference else [])
    if todo:
        finish("detect", t0)

    # 3. Calibrate the threshold.
    t0 = time.time()
    if stage("calibrate", 2, "decision threshold"):
        threshold = calibrate(config, [r["score"] for r in ref_rows] or None, reference.source if reference else None)
        write_json(out / "threshold.json", threshold)
        finish("calibrate", t0)
    threshold = json.loads((out / "threshold.json").read_text())
    result.threshold = threshold
    flagged = [r for r in scored if r["score"] >= threshold["value"]]
    _log(progress, f"  threshold {threshold['value']:.4g} ({threshold['description']}): "
                   f"{len(flagged)} of {len(scored)} prompts flagged")
    if threshold.get("warning"):
        _log(progress, "  " + threshold["warning"])
    flagged_set = PromptSet([PromptRecord(r["index"], r["prompt"], r.get("source") or {}) for r in flagged],
                            prompts.source + " (flagged)")

    # 4. Track the flagged prompts over the whole schedule and keep their generations.
    t0 = time.time()
    if stage("track", 3, f"all {sampling.num_inference_steps} steps of {len(flagged)} flagged prompts, with images"):
        (out / "track").mkdir(exist_ok=True)
        if flagged:
            _detect(model, flagged_set, out / "track" / "flagged.jsonl", config, None, out / "images" / "generated",
                    progress)
        finish("track", t0)
    tracked = {r["index"]: r for r in read_rows(out / "track" / "flagged.jsonl")}

    # 5. Explain: token significance over the detection window.
    t0 = time.time()
    if stage("explain", 4, f"token significance of {len(flagged)} flagged prompts"):
        _explain(model, flagged, out / "explain.jsonl", config, progress)
        finish("explain", t0)
    explained = {r["index"]: r for r in read_rows(out / "explain.jsonl")}

    # 6. Mitigate: embedding optimization down to the target, then sample with the optimized embedding.
    t0 = time.time()
    mitigation = mitigation_of(model, config, ref_rows or [r for r in scored if r["score"] < threshold["value"]],
                               threshold["value"])
    target = mitigation.target_loss
    G = sampling.num_generations
    if stage("mitigate", 5, f"embedding optimization of {len(flagged)} flagged prompts to a first-step "
             f"{describe_target(target, mitigation.target_unit, G)}"):
        _mitigate(model, flagged, out / "mitigate.jsonl", out / "images" / "mitigated", config, mitigation, progress)
        finish("mitigate", t0)
    mitigated = {r["index"]: r for r in read_rows(out / "mitigate.jsonl")}
    result.shortfalls = mitigation_shortfalls(list(mitigated.values()), target, mitigation.target_unit, G,
                                              mitigation.max_iters, mitigation.lr)
    for s in result.shortfalls:
        _log(progress, "  mitigation fell short: " + s.text)

    # 7. Copies: nearest training images, where they are known.
    t0 = time.time()
    data = model.training_data()
    if stage("copies", 6, "nearest training images (lab copy rule)" if data is not None else
             "no training images known for this model; skipped"):
        rows = _copies(data, flagged, out, progress) if data is not None and flagged else []
        write_rows(out / "copies.jsonl", rows)
        finish("copies", t0)
    copies = {r["index"]: r for r in read_rows(out / "copies.jsonl")}

    # 8. Results and the report (always rewritten: cheap, and it records the latest run).
    state.pop("report", None)
    stage("report", 7, "results.jsonl and index.html")
    t0 = time.time()
    result.rows = result_rows(scored, threshold["value"], explained, mitigated, copies, tracked, config.top_words)
    records = [r.to_json() for r in result.rows]
    write_rows(out / "results.jsonl", records)
    truth = ground_truth(result.rows)
    if truth is not None:
        write_json(out / "ground_truth.json", truth)
    info = {**run_info, **provenance(model), "target_loss": target, "mitigation": asdict(mitigation), "stages": state,
            "finished": time.strftime("%Y-%m-%dT%H:%M:%S")}
    write_audit_report(out, records, threshold, [r["score"] for r in ref_rows], info, explained, mitigated,
                       copies, truth, shortfalls=[s.text for s in result.shortfalls])
    finish("report", t0)
    _log(progress, f"wrote {out / 'index.html'} and {out / 'results.jsonl'}")
    return result

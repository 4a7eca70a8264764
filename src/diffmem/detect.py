"""Memorization detection runs: tracked sampling over a prompt list, written as JSON Lines.

Each requested detector (``diffmem.detectors``; default ``wen``) records during the same pass and
adds its fields to the prompt's row: its score under its own name, and what it keeps beside (Wen's
per-generation, per-step arrays under the official ``det_outputs`` names ``text_noise_norm`` and
``uncond_noise_norm``). Rows also hold ``prompt``, ``index``, ``seed`` and ``score``, the first
method's score. Run metadata goes beside the results in ``<name>.meta.json``. Rows are appended one work
unit at a time with a single ``write``, so an interrupted run never leaves a broken line and
loses at most the unit in flight; ``resume=True`` continues it. Under ``accelerate launch`` the
work units are spread over the processes and merged into one file ordered by ``index``.
"""

from __future__ import annotations

import json
import os
from contextlib import ExitStack
from dataclasses import asdict, replace
from pathlib import Path

import torch

from diffmem.detectors import Detector, check_model, check_settings, get_detector, parse_methods
from diffmem.faults import fault_point
from diffmem.files import append_rows, check_resume, one_writer, read_json, read_rows, save_generations
from diffmem.prompts import PromptRecord
from diffmem.sampling import PromptSamples, SamplingConfig, noise_levels, plan_units, sample_unit, step_at_sigma

RESUME_KEYS = ("model", "unet", "settings", "prompts")  # metadata that must match to resume
FORMATS = ("diffmem", "official")
OFFICIAL_FIELDS = ("uncond_noise_norm", "text_noise_norm", "prompt")  # the seed's det_outputs rows, in its order


def meta_path(out: Path) -> Path:
    return out.with_name(out.stem + ".meta.json")


def full_rows_path(out: Path) -> Path:
    """Where ``--format official`` keeps the full rows (index, seed, scores, source) beside `out`."""
    return out.with_name(out.stem + ".rows.jsonl")


def write_official(rows_path: Path, out: Path) -> None:
    """`out` (replaced atomically): the rows of `rows_path` with only the seed's fields, in input order."""
    rows = sorted(read_rows(rows_path), key=lambda r: r["index"])
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps({k: r[k] for k in OFFICIAL_FIELDS}) + "\n" for r in rows))
    os.replace(tmp, out)


def result_row(record: PromptRecord, samples: PromptSamples, truncated: bool, fields: list[dict],
               levels: dict | None = None) -> dict:
    """One prompt's row; `fields` are its detectors' fields, the first detector's score is ``score``;
    `levels` the noise level of every tracked step (``sampling.noise_levels``: sigmas or timesteps)."""
    scores = {k: v for f in fields for k, v in f.items()}
    return {
        "prompt": record.prompt,
        "index": record.position,
        "seed": samples.seed,
        "score": next(iter(fields[0].values())),
        **scores,
        **(levels or {}),
        "truncated": truncated,
        **({"source": record.source} if record.source else {}),
    }


def detect_unit(model, detectors: list[Detector], prompts: list[str], positions: list[int], config: SamplingConfig,
                decode: bool = False) -> tuple[list[PromptSamples], list[list[dict]]]:
    """One work unit through the pass with every detector's recorder: the samples and, per prompt,
    each detector's row fields (in `detectors` order)."""
    G = config.num_generations
    decode = decode or any(getattr(d, "needs_images", False) for d in detectors)
    with ExitStack() as stack:
        recorders = [d.recorder(model, config, prompts) for d in detectors]
        for r in recorders:
            if hasattr(r, "__enter__"):
                stack.enter_context(r)
        samples = sample_unit(model, prompts, positions, config, decode=decode, recorders=recorders)
        images = torch.cat([s.images for s in samples]) if decode else None
        for r in recorders:
            if hasattr(r, "on_images"):
                r.on_images(images)
        fields = [[d.fields(r, slice(j * G, (j + 1) * G)) for d, r in zip(detectors, recorders)]
                  for j in range(len(positions))]
    return samples, fields


@one_writer(lambda a: a["out"])
def run_detection(model, records: list[PromptRecord], out: str | Path, config: SamplingConfig = SamplingConfig(),
                  resume: bool = False, images_dir: str | Path | None = None, prompts_info: dict | None = None,
                  unet: str | None = None, progress: bool = True, methods=None, format: str = "diffmem",
                  norm_order: float = 2.0, asthana_weights: tuple[float, float] | None = None,
                  asthana_space: str = "official", at_sigma: float | None = None,
                  reference_prompts: list[str] | None = None) -> Path:
    """Detect memorization for `records` with the detectors named in `methods` (default: wen); write
    rows to `out` (JSON Lines). Returns `out`. `norm_order` is the p of Wen et al.'s norm (2; the
    original's ``lp``); `asthana_weights` and `asthana_space` go to the asthana detector;
    `reference_prompts` (ordinary prompts) to the detectors that calibrate on them (broken-memories; a
    lab model has its own).

    ``at_sigma`` (flow models): the score is d at the step whose sigma is nearest (``sampling.step_at_sigma``),
    the steps before it sampled and recorded; it replaces ``config.track_steps``, and the run's settings
    record the step (``at_step``).

    ``format="official"``: `out` holds only the seed's fields (``uncond_noise_norm``,
    ``text_noise_norm``, ``prompt``), so the seed's analysis notebooks read it unchanged; the full
    rows, which resume works from, are kept beside it (``full_rows_path``), and `out` is written from
    them when the run completes.
    """
    from accelerate import PartialState
    from tqdm.auto import tqdm

    from diffmem.provenance import provenance

    state = PartialState()
    out = Path(out)
    methods = parse_methods(methods)
    if format not in FORMATS:
        raise ValueError(f"--format {format!r}: expected one of {', '.join(FORMATS)}")
    if format == "official" and "wen" not in methods:
        raise ValueError("--format official writes Wen et al.'s arrays: --method must include wen")
    window = None
    if at_sigma is not None:
        if config.track_steps is not None:
            raise ValueError("--at-sigma picks the tracked steps itself: drop --track-steps")
        k = step_at_sigma(model, config.num_inference_steps, at_sigma)
        config, window = replace(config, track_steps=k + 1), (k, k + 1)
    detectors = [get_detector(m, norm_order=norm_order, asthana_weights=asthana_weights, asthana_space=asthana_space,
                              score_window=window, reference_prompts=reference_prompts) for m in methods]
    check_model(detectors, model)
    check_settings(detectors, config)
    for d in detectors:
        if hasattr(d, "prepare"):
            d.prepare(model, config)
    rows_path = out if format == "diffmem" else full_rows_path(out)
    settings = {**asdict(config), "guidance_scale": config.guidance(model), "methods": list(methods), "format": format,
                **({"norm_order": norm_order} if norm_order != 2 else {}),
                **({"reference_prompts": len(reference_prompts)} if reference_prompts else {}),
                **({"at_sigma": at_sigma, "at_step": window[0]} if window else {}),
                **({"asthana_space": asthana_space} if asthana_space != "official" and "asthana" in methods else {})}
    truncated = {r.position for r in records if model.count_tokens(r.prompt) > model.max_tokens}
    meta = provenance(model, unet=unet, settings=settings, prompts=prompts_info or {}, num_prompts=len(records),
                      num_truncated=len(truncated), max_tokens=model.max_tokens, num_processes=state.num_processes)
    parts = sorted(rows_path.parent.glob(rows_path.name + ".part*"))

    # 1. Check the output: a new run must not overwrite, a resumed run must match its settings.
    if state.is_main_process:
        old = read_json(meta_path(out))
        if isinstance(old.get("settings"), dict):  # outputs written before these settings existed
            old["settings"].setdefault("methods", ["wen"])
            old["settings"].setdefault("format", "diffmem")
            old["settings"].setdefault("same_noise", False)
        check_resume(out, bool(out.exists() or rows_path.exists() or parts), resume, old, meta, RESUME_KEYS)
        out.parent.mkdir(parents=True, exist_ok=True)
        if not meta_path(out).exists() or not resume:
            meta_path(out).write_text(json.dumps({**meta, "started": meta["time"]}, indent=2))
        if truncated:
            print(f"{len(truncated)} of {len(records)} prompts are longer than {model.max_tokens} tokens "
                  f"and were truncated, as diffusers does")
    state.wait_for_everyone()

    # 2. What is left: whole work units not yet in the output (or in a process's part file).
    done = {r["index"] for p in [rows_path, *parts] for r in read_rows(p, repair=state.is_main_process)}
    state.wait_for_everyone()
    by_pos = {r.position: r for r in records}
    units = plan_units([r.position for r in records], config.num_generations, config.batch_size)
    todo = [u for u in units if not all(p in done for p in u)][state.process_index::state.num_processes]
    target = rows_path if state.num_processes == 1 else rows_path.with_name(f"{rows_path.name}.part{state.process_index}")

    # 3. Sample unit by unit, appending each unit's rows in one write.
    levels = noise_levels(model, config.num_inference_steps, config.steps_to_run)
    bar = tqdm(total=sum(map(len, todo)), desc="detect", unit="prompt", disable=not progress or not state.is_main_process)
    for unit in todo:
        results, fields = detect_unit(model, detectors, [by_pos[p].prompt for p in unit], unit, config,
                                      decode=images_dir is not None)
        if images_dir is not None:
            for s in results:
                save_generations(Path(images_dir), s.position, s.images)
        # A unit is redone whole (same batch, same numbers) but rows already written are not repeated.
        append_rows(target, [result_row(by_pos[s.position], s, s.position in truncated, f, levels)
                             for s, f in zip(results, fields) if s.position not in done])
        bar.update(len(unit))
        fault_point("detect.unit")
    bar.close()

    # 4. Several processes: merge the parts into one file ordered like a single-process run.
    state.wait_for_everyone()
    if state.is_main_process and (state.num_processes > 1 or parts):
        merge_parts(rows_path)
    if state.is_main_process and format == "official":
        write_official(rows_path, out)
    state.wait_for_everyone()
    return out


def merge_parts(out: Path) -> None:
    parts = sorted(out.parent.glob(out.name + ".part*"))
    rows = {r["index"]: r for p in [out, *parts] for r in read_rows(p)}
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text("".join(json.dumps(rows[k]) + "\n" for k in sorted(rows)))
    os.replace(tmp, out)
    for p in parts:
        p.unlink()

"""Training-time mitigation on the lab (Wen et al. 5.2): branch the lab build at a checkpoint taken
before memorization sets in (step 1,000 of the main run; on the cells-linear lab, step 2,000 already
copied 0.06 and no filter from there went below that), train the rest of the main run
with the hard-threshold filter, and with the caption-augmentation baseline, and compare with the
unfiltered main run. `benchmarks/lab_train_mitigation.sh` runs every step:

    diffmem lab build --out runs/lab                  # the default recipe; runs/lab/stages/0 = main run
    python benchmarks/lab_train_mitigation.py calibrate --reference runs/lab/stages/0 --out runs/tm
    diffmem lab build --out runs/tm/filtered --no-anneal --resume-from runs/lab/stages/0/checkpoint-1000 \
        --hard-threshold "$(python benchmarks/lab_train_mitigation.py thresholds --out runs/tm)"
    diffmem lab build --out runs/tm/augmented --no-anneal --resume-from runs/lab/stages/0/checkpoint-1000 \
        --prompt-aug-style rand-word-add --repeat-num 1
    python benchmarks/lab_train_mitigation.py evaluate --reference runs/lab/stages/0 --out runs/tm

Calibration: the filter compares d = ||eps(x_t, caption) - eps(x_t, '')|| on each training sample's
noisy input at its random timestep with the threshold. d depends strongly on the timestep (on the
lab it is ~10x larger at mid noise than near t=T for every caption), so one number mostly filters
by timestep: we take one threshold per band of 100 timesteps, the ``--percentile`` (default 80) of d
among non-memorized training pairs in that band on the unfiltered model, one timestep and noise draw
per pair as the trainer does, and leave the ``--unfiltered-bands`` (default 0, t < 100) unfiltered:
there the branch's ordinary draws have a larger d than the finished model's, so a threshold taken
from the finished model leaves out most of them, they stay untrained and the loss gap grows; opening
the band closes that gap, but p80 costs ordinary captions' alignment whether the band is open or at
p95. ``--band-percentile K=P,...`` gives
some bands another percentile (e.g. 0=95). No setting tried meets every target at once;
benchmarks/MITIGATION.md has each one measured. calibration.json has the fractions left out, per
band and for one number.
``evaluate`` reports the memorized copy rate, the non-memorized and novel prompt alignment (lab
content check) and the non-memorized denoising loss (fixed noise and timesteps) of every model, as
evaluation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def calibrate(args) -> None:
    for flag, bands in (("--unfiltered-bands", args.unfiltered_bands), ("--band-percentile", set(args.band_percentile))):
        if not bands <= set(range(args.bands)):
            raise SystemExit(f"{flag} {sorted(bands)}: bands are 0..{args.bands - 1}")
    if args.unfiltered_bands & set(args.band_percentile):
        raise SystemExit(f"bands {sorted(args.unfiltered_bands & set(args.band_percentile))} are in both "
                         "--unfiltered-bands and --band-percentile: give each band one rule")
    percentiles = [args.band_percentile.get(k, args.percentile) for k in range(args.bands)]
    import numpy as np
    import torch

    from diffmem.adapters import load_model
    from diffmem.lab.build import lab_data_for, lab_training_sets
    from diffmem.training_stats import calibrate_hard_threshold, training_step_stats

    model = load_model(args.reference)
    mem, non = lab_training_sets(lab_data_for(model))
    n = min(args.num_pairs, len(non))
    idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:n]
    non_stats = training_step_stats(model, non.images[idx], [non.captions[i] for i in idx], seed=1)
    reps = max(1, args.num_pairs // len(mem))  # several timesteps per memorized image
    mem_stats = training_step_stats(model, mem.images.repeat(reps, 1, 1, 1), mem.captions * reps, seed=2)
    T = model.scheduler.config.num_train_timesteps
    bands = calibrate_hard_threshold(non_stats, args.bands, percentiles, T)
    bands = tuple(float("inf") if k in args.unfiltered_bands else v for k, v in enumerate(bands))
    single = float(np.percentile(non_stats["d"], args.percentile))

    from diffmem.train import hard_threshold_at, timestep_band

    def left_out(stats, thresholds):
        return float((stats["d"] >= hard_threshold_at(thresholds, torch.as_tensor(stats["t"]), T).numpy()).mean())

    stored = [v if np.isfinite(v) else None for v in bands]  # JSON has no infinity; None: band not filtered
    band_of = {name: timestep_band(st["t"].astype(np.int64), args.bands, T) for name, st in (("non", non_stats), ("mem", mem_stats))}
    result = {"reference": args.reference, "percentile": args.percentile, "band_percentile": args.band_percentile,
              "hard_threshold": stored,
              "left_out": {"non_memorized": left_out(non_stats, bands), "memorized": left_out(mem_stats, bands)},
              "single_threshold": {"hard_threshold": single, "non_memorized_left_out": left_out(non_stats, single),
                                   "memorized_left_out": left_out(mem_stats, single)},
              "by_band": [{"t": [k * T // args.bands, (k + 1) * T // args.bands - 1], "threshold": stored[k],
                           "median_d_non_memorized": float(np.median(non_stats["d"][band_of["non"] == k])),
                           "median_d_memorized": float(np.median(mem_stats["d"][band_of["mem"] == k])),
                           "memorized_left_out": float((mem_stats["d"][band_of["mem"] == k] >= bands[k]).mean())}
                          for k in range(args.bands)],
              "num_non_memorized": n, "num_memorized_draws": len(mem_stats["d"])}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def evaluate(args) -> None:
    import numpy as np
    import torch

    from diffmem.adapters import load_model
    from diffmem.eval_sets import lab_eval_set
    from diffmem.evaluate import EvaluateConfig, run_evaluation
    from diffmem.lab.build import lab_data_for, lab_training_sets
    from diffmem.sampling import SamplingConfig
    from diffmem.training_stats import training_step_stats

    models = {"unfiltered": args.reference}
    for v in ("filtered", "augmented"):
        if (Path(args.out) / v / "lab_model.json").is_file():
            models[v] = str(Path(args.out) / v)
    sampling = SamplingConfig(num_inference_steps=args.num_inference_steps, num_generations=args.num_generations)
    config = EvaluateConfig(methods=("none",), sampling=sampling)
    path_json = Path(args.out) / "evaluation.json"
    report = json.loads(path_json.read_text()) if path_json.is_file() and not args.again else {}
    for name, path in models.items():
        if name in report and report[name]["model"] == path:
            continue  # measured before (--again measures every model anew)
        torch.manual_seed(0)
        model = load_model(path)
        data = lab_data_for(model)
        row = {"model": path}
        for set_name, limit in (("memorized", None), ("non-memorized", args.num_prompts), ("novel", args.num_prompts)):
            s = run_evaluation(model, lab_eval_set(data, set_name, limit), config,
                               Path(args.out) / "evaluation" / name / set_name, progress=False)["results"]["none"]["default"]
            row[set_name] = {k: s[k] for k in ("copy_rate", "alignment_mean", "num_prompts", "num_generations")}
        _, non = lab_training_sets(data)
        idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:args.num_loss_pairs]
        stats = training_step_stats(model, non.images[idx], [non.captions[i] for i in idx], seed=3)
        row["non_memorized_loss"] = float(np.mean(stats["loss"]))
        report[name] = row
        print(name, json.dumps(row))
        path_json.write_text(json.dumps(report, indent=2))  # after each model: nothing measured is lost


def band_numbers(text: str) -> set[int]:
    """'0,3' -> {0, 3}; '' -> set()."""
    return {int(k) for k in text.split(",") if k.strip()}


def band_percentiles(text: str) -> dict[int, float]:
    """'0=95' -> {0: 95.0}: bands whose percentile differs from --percentile."""
    try:
        pairs = [item.split("=") for item in text.split(",") if item.strip()]
        out = {int(k): float(v) for k, v in pairs}
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected K=P,... (band number = percentile), e.g. 0=95")
    if not all(0 <= v <= 100 for v in out.values()):
        raise argparse.ArgumentTypeError(f"{text!r}: percentiles are in [0, 100]")
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="step", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--reference", required=True, help="the unfiltered lab model folder")
    c.add_argument("--percentile", type=float, default=80.0)
    c.add_argument("--num-pairs", type=int, default=3000)
    c.add_argument("--bands", type=int, default=10, help="bands of timesteps, one threshold each")
    c.add_argument("--unfiltered-bands", type=band_numbers, default="0",
                   metavar="K,...", help="bands (0 = lowest noise) whose threshold is infinite, nothing left out "
                                         "(default 0: t < 100; '' for none)")
    c.add_argument("--band-percentile", type=band_percentiles, default="", metavar="K=P,...",
                   help="bands whose threshold is another percentile (e.g. 0=95: t < 100 at the 95th)")
    h = sub.add_parser("thresholds", help="print calibration.json's thresholds as --hard-threshold takes them")
    h.add_argument("--out", required=True)
    e = sub.add_parser("evaluate")
    e.add_argument("--reference", required=True)
    e.add_argument("--num-prompts", type=int, default=200, help="non-memorized / novel prompts for alignment")
    e.add_argument("--num-loss-pairs", type=int, default=2000)
    e.add_argument("--num-generations", type=int, default=4)
    e.add_argument("--num-inference-steps", type=int, default=50)
    e.add_argument("--again", action="store_true", help="measure models already in evaluation.json again")
    for q in (c, e):
        q.add_argument("--out", required=True)
        q.add_argument("--threads", type=int, default=1)
    args = p.parse_args()
    if args.step == "thresholds":
        thresholds = json.loads((Path(args.out) / "calibration.json").read_text())["hard_threshold"]
        print(",".join("inf" if v is None else f"{v:.4f}" for v in thresholds))
        return
    import torch

    torch.set_num_threads(args.threads)
    {"calibrate": calibrate, "evaluate": evaluate}[args.step](args)


if __name__ == "__main__":
    main()

"""Training-time mitigation in the seed's own setting, on the lab: a base model trained without
duplicated pairs (``diffmem lab build --preset base``), then the seed's memorizing fine-tune on it
through ``diffmem train`` (memorized pairs repeated, mixed 1:3 with non-memorized pairs), unfiltered
and with each mitigation. ``benchmarks/lab_finetune_mitigation.sh`` holds every command.

    python benchmarks/lab_finetune_mitigation.py calibrate --base runs/ft/base --out runs/ft
    python benchmarks/lab_finetune_mitigation.py threshold --out runs/ft --kind one     # for --hard-threshold
    python benchmarks/lab_finetune_mitigation.py evaluate --out runs/ft --runs plain=runs/ft/plain ...
    python benchmarks/lab_finetune_mitigation.py evaluate --out runs/ft --runs lora=runs/ft/base+runs/ft/lora/pytorch_lora_weights.safetensors
    python benchmarks/lab_finetune_mitigation.py copies --out runs/ft --models runs/ft/plain/checkpoint-500/model ...
    python benchmarks/lab_finetune_mitigation.py report --out runs/ft

``calibrate``: the filter's thresholds as percentiles of the *base* model's d on ordinary
(non-memorized) training pairs, one timestep and noise draw per pair as the trainer draws them (the
seed's 2 is on Stable Diffusion's scale): one number for all timesteps (``--percentile`` of all d),
and one per band of 100 timesteps (the same percentile within each band).
``evaluate``: per model, the memorized copy rate (lab copy rule), the alignment (lab content check)
of non-memorized and novel captions, the non-memorized denoising loss (fixed noise and timesteps),
and the first-step detection AUC (Wen's d, memorized against non-memorized captions).
``report``: table.md and tradeoff.png from evaluation.json.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load_run(spec: str):
    """(model, the run's folder) for 'MODEL_FOLDER' or 'BASE_FOLDER+LORA_FILE' (a LoRA fine-tune: the
    adapter loaded onto its base at scale 1; its run folder is the file's)."""
    from diffmem.adapters import load_model
    from diffmem.adapters.lora import LoraSpec, apply_loras

    base, plus, lora = spec.partition("+")
    model = load_model(base)
    if plus:
        apply_loras(model, [LoraSpec(Path(lora), 1.0)])
        return model, Path(lora).parent
    return model, Path(base)


def calibrate(args) -> None:
    import numpy as np
    import torch

    from diffmem.adapters import load_model
    from diffmem.lab.build import lab_data_for, lab_training_sets
    from diffmem.training_stats import calibrate_hard_threshold, training_step_stats

    torch.set_num_threads(args.threads)
    model = load_model(args.base)
    mem, non = lab_training_sets(lab_data_for(model))
    idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:args.num_pairs]
    stats = training_step_stats(model, non.images[idx], [non.captions[i] for i in idx], seed=1)
    reps = max(1, args.num_pairs // len(mem))
    mem_stats = training_step_stats(model, mem.images.repeat(reps, 1, 1, 1), mem.captions * reps, seed=2)
    T = model.scheduler.config.num_train_timesteps
    result = {"base": args.base, "num_pairs": len(idx), "percentiles": {}}
    for q in args.percentile:
        one = float(np.percentile(stats["d"], q))
        bands = calibrate_hard_threshold(stats, args.bands, q, T)
        result["percentiles"][f"{q:g}"] = {
            "one": one, "bands": list(bands),
            "left_out_base": {"non_memorized_one": float((stats["d"] >= one).mean()),
                              "memorized_one": float((mem_stats["d"] >= one).mean())}}
    Path(args.out).mkdir(parents=True, exist_ok=True)
    (Path(args.out) / "calibration.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


def threshold(args) -> None:
    cal = json.loads((Path(args.out) / "calibration.json").read_text())["percentiles"][f"{args.percentile:g}"]
    print(f"{cal['one']:.6g}" if args.kind == "one" else ",".join(f"{v:.6g}" for v in cal["bands"]))


def evaluate(args) -> None:
    import numpy as np
    import torch

    from diffmem.eval_sets import lab_eval_set
    from diffmem.evaluate import EvaluateConfig, run_evaluation
    from diffmem.lab.build import lab_data_for, lab_training_sets
    from diffmem.metrics import roc_metrics
    from diffmem.sampling import SamplingConfig, window_scores
    from diffmem.training_stats import training_step_stats

    torch.set_num_threads(args.threads)
    out = Path(args.out)
    path_json = out / "evaluation.json"
    report = json.loads(path_json.read_text()) if path_json.is_file() else {}
    sampling = SamplingConfig(num_inference_steps=args.num_inference_steps, num_generations=args.num_generations)
    config = EvaluateConfig(methods=("none",), sampling=sampling)
    for spec in args.runs:
        name, path = spec.split("=", 1)
        if name in report and report[name]["model"] == path and not args.again:
            continue
        torch.manual_seed(0)
        model, run_folder = load_run(path)
        data = lab_data_for(model)
        row = {"model": path}
        for set_name, limit in (("memorized", None), ("non-memorized", args.num_prompts), ("novel", args.num_prompts)):
            folder = out / "evaluation" / name / set_name
            s = run_evaluation(model, lab_eval_set(data, set_name, limit), config, folder, progress=False,
                               resume=folder.exists())["results"]["none"]["default"]
            row[set_name] = {k: s[k] for k in ("copy_rate", "alignment_mean", "num_prompts", "num_generations")}
        _, non = lab_training_sets(data)
        idx = torch.randperm(len(non), generator=torch.Generator().manual_seed(0))[:args.num_loss_pairs]
        row["non_memorized_loss"] = float(np.mean(training_step_stats(model, non.images[idx],
                                                                      [non.captions[i] for i in idx], seed=3)["loss"]))
        mem = [p.caption for p in data.memorized]
        ordinary = [p.caption for p in data.non_memorized[:args.num_prompts]]
        first = SamplingConfig(num_inference_steps=args.num_inference_steps, num_generations=4)
        scores = window_scores(model, mem + ordinary, first)
        roc = roc_metrics(scores[:len(mem)], scores[len(mem):])
        row["detection_first_step"] = {"auc": roc.auc, "tpr_at_1fpr": roc.tpr_at_1fpr}
        log = run_folder / "train_log.jsonl"
        if log.is_file():  # the filter's share of samples left out, over the whole fine-tune
            recs = [json.loads(line) for line in log.read_text().splitlines()]
            row["training"] = {"steps": recs[-1]["step"], "left_out_mean": float(np.mean([r["left_out"] for r in recs])),
                               "pairs_left_out": recs[-1].get("pairs_left_out")}
        # merged into the file as it is now (another evaluate may have written since), after each model
        report = {**(json.loads(path_json.read_text()) if path_json.is_file() else {}), name: row}
        print(name, json.dumps(row))
        path_json.write_text(json.dumps(report, indent=2))


def copies(args) -> None:
    """Memorized copy rate and alignment of model folders (e.g. a run's checkpoints), appended to
    OUT/checkpoint_copies.json: how memorization grows over a fine-tune."""
    import torch

    from diffmem.eval_sets import lab_eval_set
    from diffmem.lab.build import lab_data_for
    from diffmem.lab.judge import TrainingImages, content_correct, copy_threshold, judge_copies
    from diffmem.sampling import SamplingConfig, sample_prompts

    torch.set_num_threads(args.threads)
    path_json = Path(args.out) / "checkpoint_copies.json"
    table = json.loads(path_json.read_text()) if path_json.is_file() else {}
    for folder in args.models:
        model, _ = load_run(folder)
        data = lab_data_for(model)
        prompts = lab_eval_set(data, "memorized").prompts
        G = args.num_generations
        res = sample_prompts(model, [p.caption for p in prompts], SamplingConfig(num_generations=G))
        images = torch.cat([r.images for r in res]).numpy()
        train = TrainingImages.of(data)
        copied = judge_copies(images, [p.caption for p in prompts for _ in range(G)], train,
                              copy_threshold(data, train)).is_copy
        aligned = content_correct(images, [p.colour for p in prompts for _ in range(G)],
                                  [p.shape for p in prompts for _ in range(G)])
        table[folder] = {"copy_rate": float(copied.mean()), "alignment": float(aligned.mean()),
                         "num_prompts": len(prompts), "num_generations": G}
        print(folder, table[folder], flush=True)
        path_json.write_text(json.dumps(table, indent=2))


def left_out(training) -> str:
    """The table cell of a fine-tune's left-out samples (and pairs, under the pair-level rule)."""
    if not training or not training["left_out_mean"]:
        return "-"
    pairs = training.get("pairs_left_out")
    return f"{training['left_out_mean']:.3f}" + (f" ({pairs} pairs)" if pairs is not None else "")


def table_lines(rows: dict, reference: str = "plain") -> list[str]:
    """The markdown table of evaluation.json's rows, with percentages against the ``reference`` run."""
    ref = rows.get(reference)
    lines = ["| run | memorized copy rate | non-memorized alignment | novel alignment | non-memorized loss | "
             "first-step AUC | TPR@1%FPR | samples left out |", "|---|---|---|---|---|---|---|---|"]
    for name, r in rows.items():
        def rel(value, base):
            return f" ({100 * (value / base - 1):+.1f}%)" if ref is not None and name != reference and base else ""
        det = r["detection_first_step"]
        lines.append(f"| {name} | {r['memorized']['copy_rate']:.3f} | {r['non-memorized']['alignment_mean']:.3f}"
                     f"{rel(r['non-memorized']['alignment_mean'], ref and ref['non-memorized']['alignment_mean'])} | "
                     f"{r['novel']['alignment_mean']:.3f}{rel(r['novel']['alignment_mean'], ref and ref['novel']['alignment_mean'])} | "
                     f"{r['non_memorized_loss']:.4f}{rel(r['non_memorized_loss'], ref and ref['non_memorized_loss'])} | "
                     f"{det.get('auc', float('nan')):.3f} | {det.get('tpr_at_1fpr', float('nan')):.3f} | "
                     f"{left_out(r.get('training'))} |")
    return lines


def report(args) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = Path(args.out)
    rows = json.loads((out / "evaluation.json").read_text())
    lines = table_lines(rows, args.reference)
    (out / "table.md").write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    fig, ax = plt.subplots(figsize=(7.5, 4.2))
    for i, (name, r) in enumerate(rows.items()):  # a legend, not labels: the mitigated runs sit close together
        x, y = r["non-memorized"]["alignment_mean"], r["memorized"]["copy_rate"]
        # 10 colours and 11 markers cycle together: no two of the first 110 runs look alike
        ax.scatter([x], [y], s=45, color=f"C{i % 10}", marker="osD^v<>ph*X"[i % 11], label=name)
    ax.legend(fontsize=7, loc="center left", bbox_to_anchor=(1.01, 0.5))
    ax.axhline(0.05, color="grey", lw=0.8, ls="--")
    ax.set_xlabel("alignment of non-memorized captions (lab content check)")
    ax.set_ylabel("memorized copy rate (lab copy rule)")
    ax.set_title("Fine-tuning a base lab model on duplicated pairs")
    fig.tight_layout()
    fig.savefig(out / "tradeoff.png", dpi=120)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("calibrate")
    c.add_argument("--base", required=True)
    c.add_argument("--out", required=True)
    c.add_argument("--percentile", type=float, nargs="+", default=[90.0, 95.0, 99.0])
    c.add_argument("--bands", type=int, default=10)
    c.add_argument("--num-pairs", type=int, default=4000)
    c.add_argument("--threads", type=int, default=1)
    c.set_defaults(run=calibrate)
    t = sub.add_parser("threshold")
    t.add_argument("--out", required=True)
    t.add_argument("--kind", choices=("one", "bands"), required=True)
    t.add_argument("--percentile", type=float, default=95.0)
    t.set_defaults(run=threshold)
    e = sub.add_parser("evaluate")
    e.add_argument("--out", required=True)
    e.add_argument("--runs", nargs="+", required=True, help="NAME=MODEL_FOLDER or NAME=BASE_FOLDER+LORA_FILE")
    e.add_argument("--num-prompts", type=int, default=100)
    e.add_argument("--num-generations", type=int, default=4)
    e.add_argument("--num-inference-steps", type=int, default=50)
    e.add_argument("--num-loss-pairs", type=int, default=2000)
    e.add_argument("--threads", type=int, default=1)
    e.add_argument("--again", action="store_true")
    e.set_defaults(run=evaluate)
    k = sub.add_parser("copies")
    k.add_argument("--out", required=True)
    k.add_argument("--models", nargs="+", required=True, help="lab model folders (e.g. RUN/checkpoint-1000/model), "
                   "or BASE+LORA_FILE")
    k.add_argument("--num-generations", type=int, default=2)
    k.add_argument("--threads", type=int, default=1)
    k.set_defaults(run=copies)
    r = sub.add_parser("report")
    r.add_argument("--out", required=True)
    r.add_argument("--reference", default="plain")
    r.set_defaults(run=report)
    args = p.parse_args()
    args.run(args)


if __name__ == "__main__":
    main()

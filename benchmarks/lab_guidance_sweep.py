"""Copy rate and content accuracy of a lab model at several guidance scales (how the lab's default
guidance was chosen; README "Choosing the default guidance"):

    OMP_NUM_THREADS=1 python benchmarks/lab_guidance_sweep.py --model lab --guidance 1.0 1.25 1.5 1.75 2.0

Samples every memorized caption and the first `--num-novel` novel captions, 4 generations each,
50 DDIM steps, seed 0, and judges them with the lab's copy rule and content check. One guidance
scale takes ~2 min on one thread. Prints a Markdown table; `--out` also writes it as JSON.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lab", help="'lab' or a lab model folder")
    p.add_argument("--guidance", type=float, nargs="+", default=[1.0, 1.25, 1.5, 1.75, 2.0])
    p.add_argument("--num-novel", type=int, default=50)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--num-inference-steps", type=int, default=50)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="JSON file for the rows")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from diffmem.adapters import load_model
    from diffmem.lab.build import lab_data_for
    from diffmem.lab.judge import TrainingImages, copy_threshold
    from diffmem.lab.report import generation_figures
    from diffmem.sampling import SamplingConfig

    model = load_model(args.model)
    data = lab_data_for(model)
    train = TrainingImages.of(data)
    threshold = copy_threshold(data, train)
    sets = {"memorized": data.memorized, "novel": data.novel[: args.num_novel]}
    rows = []
    print(f"model {model.name} (default guidance {model.default_guidance_scale})\n")
    print("| guidance | memorized copies | memorized content | novel copies | novel content |\n|---|---|---|---|---|")
    for g in args.guidance:
        cfg = SamplingConfig(num_inference_steps=args.num_inference_steps, num_generations=args.num_generations,
                             seed=0, batch_size=64, guidance_scale=g)
        row = {"guidance_scale": g}
        for name, pairs in sets.items():
            fig = generation_figures(model, data, name, pairs, train, threshold, cfg)[0]
            row[name] = {"prompts": fig.num_prompts, "copy_rate": fig.copy_rate, "content_accuracy": fig.content_accuracy}
        rows.append(row)
        print(f"| {g} | {row['memorized']['copy_rate']:.3f} | {row['memorized']['content_accuracy']:.3f} | "
              f"{row['novel']['copy_rate']:.3f} | {row['novel']['content_accuracy']:.3f} |", flush=True)
        if args.out:  # after each scale: nothing measured is lost
            Path(args.out).write_text(json.dumps({"model": model.name, "rows": rows}, indent=2))


if __name__ == "__main__":
    main()

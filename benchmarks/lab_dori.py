"""DoRI on the lab: do a model's memorized images come back when an attacker optimizes the prompt
embedding (``diffmem.dori``)? For every memorized caption, its (first) training image is attacked from
the caption's own embedding; the generations from the attack's embedding are judged with the lab's copy
rule, beside the generations from the caption itself.

    OMP_NUM_THREADS=1 python benchmarks/lab_dori.py --models lab base+LORA_FILE ... --out dori.json

A model is a lab model folder (or 'lab', 'lab-flow') or BASE+LORA_FILE (a LoRA fine-tune at scale 1).
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path


def load(spec: str):
    """A lab model, or BASE+LORA_FILE (``lab_finetune_mitigation.load_run``'s syntax)."""
    import sys

    sys.path.insert(0, str(Path(__file__).parent))
    from lab_finetune_mitigation import load_run

    return load_run(spec)[0]


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", nargs="+", required=True)
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--steps", type=int, default=50, help="DoRI's Adam steps (the paper's 50)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import numpy as np
    import torch

    torch.set_num_threads(1)
    from diffmem.dori import DoriConfig, dori_attack
    from diffmem.lab.data import render_all
    from diffmem.lab.judge import TrainingImages, copy_threshold, judge_copies
    from diffmem.model import Conditioning
    from diffmem.provenance import provenance
    from diffmem.sampling import SamplingConfig, sample_unit

    out = Path(args.out)
    table = json.loads(out.read_text()) if out.is_file() else {}
    for spec in args.models:
        model = load(spec)
        data = model.training_data()
        train = TrainingImages.of(data)
        threshold = copy_threshold(data, train)
        G = args.num_generations
        sampling = SamplingConfig(num_generations=G, seed=args.seed, batch_size=64)
        rows = []
        for i, pair in enumerate(data.memorized):
            spec_img = (pair.variants or [pair.spec])[0]
            image = torch.as_tensor(render_all([spec_img], model.image_size), dtype=torch.float32)
            x0 = model.encode_images(image * 2 - 1)
            start = model.encode_prompts([pair.caption])
            attack, losses = dori_attack(model, x0, start, DoriConfig(steps=args.steps, seed=args.seed + i))
            judged = {}
            for name, cond in (("prompt", start), ("dori", attack)):
                (res,) = sample_unit(model, [pair.caption], [i], sampling, decode=True, conditioning=cond)
                judged[name] = judge_copies(res.images.numpy(), [pair.caption] * G, train, threshold).is_copy.tolist()
            rows.append({"caption": pair.caption, "copies_prompt": judged["prompt"], "copies_dori": judged["dori"],
                         "loss_first": losses[0], "loss_last": losses[-1]})
            print(spec, i, sum(judged["prompt"]), sum(judged["dori"]), flush=True)
        rate = lambda key: float(np.mean([c for r in rows for c in r[key]]))
        table[spec] = {"copy_rate_prompt": rate("copies_prompt"), "copy_rate_dori": rate("copies_dori"),
                       "num_prompts": len(rows), "num_generations": G, "dori": vars(DoriConfig(steps=args.steps)),
                       "provenance": provenance(model, config=vars(args)), "rows": rows}
        print(spec, {k: table[spec][k] for k in ("copy_rate_prompt", "copy_rate_dori")}, flush=True)
        out.write_text(json.dumps(table, indent=1))


if __name__ == "__main__":
    main()

"""How much first-step d varies with the initial noise x_T, for one prompt (``diffmem.lab.report.first_step_spread``).

    OMP_NUM_THREADS=1 python benchmarks/first_step_spread.py --model lab --out first_step_spread.json

For the memorized captions and the first `--num-novel` novel ones, `--generations` initial noises each,
first-step d at the model's first step (t = 981 of DDIM-50 on the UNet lab; sigma = 1 on the flow lab):
the mean coefficient of variation over x_T and the ratio of the spread between prompts to the spread
within one. ``diffmem lab report`` measures the same on every lab model; this script is the UNet lab's
side of the comparison in docs/flow-lab.md.
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lab")
    p.add_argument("--generations", type=int, default=16)
    p.add_argument("--num-novel", type=int, default=50)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True)
    args = p.parse_args()

    import torch

    torch.set_num_threads(1)
    from diffmem.adapters import load_model
    from diffmem.lab.report import first_step_scores, first_step_spread
    from diffmem.provenance import provenance

    model = load_model(args.model)
    data = model.training_data()
    spread = {name: first_step_spread(first_step_scores(model, pairs, args.generations, 50, args.seed)[:, :, 0])
              for name, pairs in [("memorized", data.memorized), ("novel", data.novel[:args.num_novel])]}
    out = {"provenance": provenance(model, config=vars(args)), "first_step_spread": spread}
    with open(args.out, "w") as f:
        json.dump(out, f, indent=1)
    print(json.dumps(spread, indent=1))


if __name__ == "__main__":
    main()

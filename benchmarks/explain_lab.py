"""Token significance on the lab model: is the top token a trigger word, and does deleting it stop detection?

    OMP_NUM_THREADS=1 python benchmarks/explain_lab.py --model lab --windows 0:1 0:5 0:10 --out explain_lab.json

Prints one row per step window and prompt set (memorized captions, ordinary training captions,
held-out novel captions), then how often the official notebook's computation over its 50 target
steps ranks another word first than ours; see ``diffmem.lab.attribution`` for the definitions.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import asdict


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lab", help="'lab' or a lab model folder")
    p.add_argument("--windows", nargs="+", default=["0:1", "0:5", "0:10"], help="step windows start:end")
    p.add_argument("--num-generations", type=int, default=4)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num-calibration", type=int, default=250, help="novel prompts the 1%%-FPR threshold is set on")
    p.add_argument("--num-ordinary", type=int, default=100, help="non-memorized and held-out novel prompts to compare")
    p.add_argument("--official-steps", type=int, default=50,
                   help="window [0, K) of the official-vs-ours comparison (the notebook's 50; 0: skip it)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--out", default=None, help="write the summary and per-prompt rows as JSON")
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from diffmem.adapters import load_model
    from diffmem.lab.attribution import attribution_benchmark, format_results, official_comparison
    from diffmem.provenance import provenance

    windows = [tuple(int(v) for v in w.split(":")) for w in args.windows]
    model = load_model(args.model)
    t0 = time.time()
    results = attribution_benchmark(model, windows, args.num_generations, args.seed, args.num_calibration,
                                    args.num_ordinary)
    print(f"model {model.name}, {args.num_generations} generations, seed {args.seed}, {time.time() - t0:.0f}s")
    print(format_results(results))
    official = None
    if args.official_steps:
        official = official_comparison(model, args.num_generations, args.seed, (0, args.official_steps))
        print(f"official vs ours over steps [0,{args.official_steps}) on {official.n} memorized captions: top word "
              f"differs for {official.top_word_differs:.0%}; top word is a trigger: ours {official.top1_word_is_title:.0%}, "
              f"official {official.official_top1_word_is_title:.0%}")
    if args.out:
        with open(args.out, "w") as f:
            json.dump({**provenance(model, settings=vars(args), seconds=round(time.time() - t0)),
                       "results": [{**r.summary(), "prompts": {k: [asdict(x) for x in v] for k, v in r.prompts.items()}}
                                   for r in results],
                       "official_comparison": None if official is None else asdict(official)}, f, indent=1)


if __name__ == "__main__":
    main()

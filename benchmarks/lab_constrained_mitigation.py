"""The L2-constrained embedding optimization (the original's optim_epsilon / alpha) against the plain one on the lab.

    OMP_NUM_THREADS=1 python benchmarks/lab_constrained_mitigation.py --out lab_constrained

epsilon is given relative to the mean L2 norm of the memorized captions' learnable token embeddings
(``--epsilon-fractions``); alpha takes ``--alphas``. Every run uses the lab's defaults otherwise
(target: the median first-step loss of its reference prompts, lr 0.01, at most 50 steps) and
the memorized captions, 4 generations each. Writes OUT/<setting>/ (``diffmem evaluate``'s files)
and OUT/table.md, OUT/table.json.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import replace
from pathlib import Path


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default="lab")
    p.add_argument("--out", required=True)
    p.add_argument("--epsilon-fractions", type=float, nargs="+", default=[0.05, 0.1, 0.2])
    p.add_argument("--alphas", type=float, nargs="+", default=[0.25, 0.5, 0.75])
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args()

    import torch

    torch.set_num_threads(args.threads)
    from diffmem.adapters import load_model
    from diffmem.eval_sets import load_eval_set
    from diffmem.evaluate import EvaluateConfig, run_evaluation
    from diffmem.mitigate import MitigationConfig
    from diffmem.provenance import provenance

    model = load_model(args.model)
    eval_set = load_eval_set(model, None)
    emb = model.encode_prompts([p.caption for p in eval_set.prompts]).embeddings  # (P, T, D)
    learnable = [j for j in range(emb.shape[1]) if j not in set(model.frozen_token_positions)]
    token_norm = float(emb[:, learnable].norm(dim=-1).mean())
    settings = [("plain", None, 0.5)] + [(f"eps{f:g}_alpha{a:g}", f * token_norm, a)
                                         for f in args.epsilon_fractions for a in args.alphas]
    out = Path(args.out)
    rows = []
    for name, epsilon, alpha in settings:
        t0 = time.time()
        config = EvaluateConfig(methods=("embedding-opt",), mitigation=MitigationConfig(epsilon=epsilon, alpha=alpha))
        summary = run_evaluation(model, eval_set, config, out / name, progress=False)
        (s,) = summary["results"]["embedding-opt"].values()
        rows.append({"setting": name, "epsilon": epsilon, "epsilon_fraction": None if epsilon is None else epsilon / token_norm,
                     "alpha": alpha, "copy_rate": s["copy_rate"], "alignment": s["alignment_mean"],
                     "final_loss": s["final_loss_mean"], "iterations": s["iterations_mean"],
                     "target_loss": s["value"], "seconds": round(time.time() - t0)})
        print(json.dumps(rows[-1]), flush=True)
    lines = ["| setting | epsilon (x mean token norm) | alpha | copy rate | alignment | final loss | iterations |",
             "|---|---|---|---|---|---|---|"]
    for r in rows:
        eps = "-" if r["epsilon"] is None else f"{r['epsilon']:.3f} ({r['epsilon_fraction']:g})"
        lines.append(f"| {r['setting']} | {eps} | {r['alpha'] if r['epsilon'] is not None else '-'} | "
                     f"{r['copy_rate']:.3f} | {r['alignment']:.3f} | {r['final_loss']:.3f} | {r['iterations']:.1f} |")
    (out / "table.md").write_text("\n".join(lines) + "\n")
    (out / "table.json").write_text(json.dumps({**provenance(model, settings=vars(args)), "mean_token_norm": token_norm,
                                                "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()

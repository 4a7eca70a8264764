"""Cost of the detectors that read the one pass, together, against Wen et al.'s d alone over the
same steps (target: <= 1.3x), printed as a Markdown table.

    OMP_NUM_THREADS=1 python benchmarks/detector_overhead.py [--models tiny-sd,sd14-unet] [--repeats 3]

tiny-sd: 4 prompts x 2 generations x 10 steps of a tiny random SD folder. sd14-unet: an SD v1.4-size
UNet (random weights, built on the spot) with 1 prompt, 1 generation and a 10-step schedule. The
one-trajectory detectors are those that only read the pass's tensors and attention (wen, ren-le,
ren-ae, bright-ending); membench, jeon-fd and jeon make UNet calls of their own and carlini decodes
images, so they are timed alone, as extra cost over wen.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

ONE_TRAJECTORY = ["wen", "ren-le", "ren-ae", "bright-ending"]
EXTRA_CALLS = ["membench", "jeon-fd", "jeon", "carlini"]


def timed(fn, repeats: int) -> float:
    fn()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return float(np.median(out))


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="tiny-sd,sd14-unet")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--no-extras", action="store_true", help="only wen against the one-trajectory detectors")
    args = p.parse_args()
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import full_size_sd14_folder  # noqa: E402

    from diffmem.adapters import load_model
    from diffmem.detect import detect_unit
    from diffmem.detectors import get_detector
    from diffmem.sampling import SamplingConfig
    from diffmem.testing import make_tiny_sd_folder

    tmp = Path(tempfile.mkdtemp())
    print(f"torch threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| model | detectors | seconds | ratio to wen alone |")
    print("|---|---|---|---|")
    for name in args.models.split(","):
        if name == "tiny-sd":
            model = load_model(str(make_tiny_sd_folder(tmp / "tiny")))
            prompts, cfg, repeats = [f"a photo of thing {i}" for i in range(4)], \
                SamplingConfig(num_inference_steps=10, num_generations=2, batch_size=16), args.repeats
        elif name == "sd14-unet":
            model = load_model(str(full_size_sd14_folder(tmp)))
            prompts, cfg, repeats = ["an astronaut riding a horse"], \
                SamplingConfig(num_inference_steps=10, num_generations=1, batch_size=2), 1
        else:
            raise SystemExit(f"unknown model {name}")
        run = lambda names: detect_unit(model, [get_detector(n) for n in names], prompts,
                                        list(range(len(prompts))), cfg)
        base = timed(lambda: run(["wen"]), repeats)
        print(f"| {name} | wen | {base:.2f} | 1.00 |", flush=True)
        together = timed(lambda: run(ONE_TRAJECTORY), repeats)
        print(f"| {name} | {', '.join(ONE_TRAJECTORY)} (one pass) | {together:.2f} | {together / base:.2f} (<= 1.3) |",
              flush=True)
        for extra in [] if args.no_extras else EXTRA_CALLS:
            t = timed(lambda: run(["wen", extra]), repeats)
            print(f"| {name} | wen, {extra} | {t:.2f} | {t / base:.2f} |", flush=True)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

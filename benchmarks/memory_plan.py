"""The weights' memory of a diffusers folder at a dtype, per component, and what first-step detection keeps on
the device, and what stays there while sampling with ``--offload text-encoders`` (``diffmem.adapters.memory.memory_plan``). Reads only
the safetensors headers, so it runs on a laptop against a 30 GB folder.

    python benchmarks/memory_plan.py FOLDER [--dtype bfloat16]
"""

from __future__ import annotations

import argparse
import json


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("folder")
    p.add_argument("--dtype", default="bfloat16", choices=("float32", "float16", "bfloat16"))
    args = p.parse_args()

    import torch

    from diffmem.adapters.memory import memory_plan

    print(json.dumps(memory_plan(args.folder, getattr(torch, args.dtype)), indent=2))


if __name__ == "__main__":
    main()

"""The ``diffmem`` command: one module per verb, each parsing arguments and making one library call."""

from __future__ import annotations

import argparse
import importlib
import sys

VERBS = ("detect", "roc", "lab", "train", "mitigate", "evaluate", "explain", "serve", "audit", "bench")  # modules under diffmem.cli


def common_model_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("model")
    g.add_argument("--model", default="lab", help="'lab' (built-in lab model, default), 'lab-flow' (its "
                   "flow-matching twin), a diffusers Stable "
                   "Diffusion 1.x/2.x, SDXL, SD3/SD3.5, FLUX.1 or PixArt folder, a lab model folder, or a hub id in the local "
                   "Hugging Face cache")
    g.add_argument("--unet", default=None, help="a fine-tuned denoiser folder (a UNet; PixArt, SD3: a transformer) to use "
                   "instead of the model's")
    g.add_argument("--null-embedding", default=None, metavar="FILE",
                   help="a safetensors file holding the unconditional branch to measure and sample against instead "
                   "of the family's (e.g. PixArt's trained y_embedding): 'y_embedding' or 'embeddings' (T, D), "
                   "optionally 'mask' (T,); recorded with the model's identity")
    g.add_argument("--lora", action="append", default=None, metavar="FILE[:SCALE]",
                   help="a LoRA adapter (.safetensors, diffusers/peft or kohya layout) applied to the denoiser at SCALE "
                   "(default 1); repeatable; each file's hash and scale are recorded with every result")
    g.add_argument("--device", default="auto", help="cpu, cuda, cuda:1, ... (auto: accelerate's device for this process)")
    g.add_argument("--dtype", default="float32", choices=("float32", "float16", "bfloat16"))
    g.add_argument("--offload", default="none", choices=("none", "text-encoders"),
                   help="text-encoders: SD3 and FLUX text encoders stay on the CPU and visit the device only to "
                   "encode (docs/model-families.md, 'Memory')")


def load_model_from_args(args):
    import torch
    from accelerate import PartialState

    from diffmem.adapters import load_model

    # The first PartialState fixes the process group: on a machine without GPUs (or with --device cpu)
    # it must be a CPU one (gloo), so that `accelerate launch` / torchrun spreads work over CPU processes.
    state = PartialState(cpu=args.device == "cpu" or (args.device == "auto" and not torch.cuda.is_available()))
    device = str(state.device) if args.device == "auto" else args.device
    if state.num_processes > 1 and device == "cpu":
        torch.set_num_threads(max(1, (torch.get_num_threads()) // state.num_processes))
    if getattr(args, "no_progress", False):  # transformers' and diffusers' own bars ("Loading weights") too
        import diffusers
        import transformers

        transformers.utils.logging.disable_progress_bar()
        diffusers.utils.logging.disable_progress_bar()
    model = load_model(args.model, unet=args.unet, device=device, dtype=args.dtype,
                       offload=getattr(args, "offload", "none"))
    if getattr(args, "null_embedding", None):
        from diffmem.adapters import read_null

        model.use_null(*read_null(args.null_embedding))
    if getattr(args, "lora", None):
        from diffmem.adapters.lora import apply_loras, parse_lora

        apply_loras(model, [parse_lora(text) for text in args.lora])
    return model


def build_parser() -> argparse.ArgumentParser:
    import diffmem

    parser = argparse.ArgumentParser(prog="diffmem", description="Detect, explain and mitigate memorization "
                                     "in text-to-image diffusion models (Wen et al., ICLR 2024).")
    parser.add_argument("--version", action="version", version=f"diffmem {diffmem.__version__}")
    sub = parser.add_subparsers(dest="verb", required=True, metavar="VERB")
    for verb in VERBS:
        importlib.import_module(f"diffmem.cli.{verb}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return int(args.run(args) or 0)
    except (FileNotFoundError, FileExistsError, ValueError, KeyError, NotADirectoryError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else e
        print(f"diffmem {args.verb}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"diffmem {args.verb}: interrupted; results written so far are kept", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())

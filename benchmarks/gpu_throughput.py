"""First-step detection throughput on a GPU, for an SD v1.4-size UNet with random weights built on the spot.

    python benchmarks/gpu_throughput.py --out throughput.md [--dtype float16] [--batches 1 2 4 8 16 32 64]

Per batch size B (prompts per UNet call, one generation each, so 2B UNet samples a call): prompts per
second of diffmem's first-step detection (text encoding, x_T under the seed contract, the tracked
pass's first step, d), of the bare UNet calls alone (the floor), and the arithmetic limit (the
UNet's FLOPs per prompt, counted by PyTorch, at the matrix rate measured here on the spot); the
time 1,000 prompts would take; peak GPU memory. Then tracked sampling (50 steps) against diffusers'
StableDiffusionPipeline on the same prompts and seeds. Needs a CUDA device; prints why not otherwise.
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch


def timed(fn, repeats: int = 5) -> float:
    """Median seconds of `fn` after one warm-up, synchronizing the device."""
    fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        torch.cuda.synchronize()
        out.append(time.perf_counter() - t0)
    return sorted(out)[len(out) // 2]


def matmul_rate(dtype) -> float:
    """FLOP/s of an 8192^3 matrix product in `dtype` on this device (the arithmetic reference)."""
    a = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    b = torch.randn(8192, 8192, device="cuda", dtype=dtype)
    return 2 * 8192 ** 3 / timed(lambda: a @ b, 10)


def unet_flops(unet, x, t, emb) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        unet(x, t, encoder_hidden_states=emb)
    return float(counter.get_total_flops())


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="throughput.md")
    p.add_argument("--dtype", default="float16", choices=("float16", "bfloat16"))
    p.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16, 32, 64])
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("no CUDA device: the GPU throughput table needs one; nothing measured")
        return 0
    sys.path.insert(0, str(Path(__file__).parent))
    from speed import full_size_sd14_folder  # noqa: E402

    from diffmem.adapters import load_model
    from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts

    dtype = getattr(torch, args.dtype)
    folder = full_size_sd14_folder(Path(tempfile.mkdtemp()))
    model = load_model(str(folder), device="cuda", dtype=args.dtype)
    rate = matmul_rate(dtype)
    model.scheduler.set_timesteps(50)
    t = model.scheduler.timesteps[0]
    lines = [f"device {torch.cuda.get_device_name()}, {args.dtype}, torch {torch.__version__}; "
             f"matrix rate measured {rate / 1e12:.0f} TFLOP/s", "",
             "| batch (prompts) | diffmem prompts/s | bare UNet prompts/s | arithmetic limit prompts/s | "
             "diffmem / bare | 1,000 prompts (s) | peak memory (GiB) |", "|---|---|---|---|---|---|---|"]
    for B in args.batches:
        prompts = [f"a photo of thing number {i}" for i in range(4 * B)]
        cfg = SamplingConfig(num_generations=1, track_steps=1, batch_size=2 * B)
        x = torch.cat([initial_noise(model, 1, i) for i in range(B)])
        x2 = torch.cat([x, x])
        emb = torch.cat([model.empty_conditioning().embeddings.expand(B, -1, -1),
                         model.encode_prompts(prompts[:B]).embeddings])
        torch.cuda.reset_peak_memory_stats()
        ours = timed(lambda: sample_prompts(model, prompts, cfg, decode=False), 3) / len(prompts)
        peak = torch.cuda.max_memory_allocated() / 2 ** 30
        with torch.no_grad():
            bare = timed(lambda: model.unet(x2, t, encoder_hidden_states=emb)) / B
        limit = unet_flops(model.unet, x2, t, emb) / B / rate
        lines.append(f"| {B} | {1 / ours:.1f} | {1 / bare:.1f} | {1 / limit:.1f} | {ours / bare:.2f} | "
                     f"{1000 * ours:.1f} | {peak:.2f} |")
        print(lines[-1], flush=True)

    # tracked sampling against the pipeline: 2 prompts x 4 generations x 50 steps
    from diffusers import DDIMScheduler, StableDiffusionPipeline

    pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                   torch_dtype=dtype).to("cuda")
    pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
    pipe.set_progress_bar_config(disable=True)
    prompts = ["an astronaut riding a horse", "a red cat on a mat"]
    cfg = SamplingConfig(num_generations=4, batch_size=8)

    def reference():
        for i, pr in enumerate(prompts):
            pipe(pr, num_inference_steps=50, num_images_per_prompt=4, output_type="latent",
                 generator=torch.Generator("cpu").manual_seed(i))

    ours = timed(lambda: sample_prompts(model, prompts, cfg, decode=False), 2)
    ref = timed(reference, 2)
    lines += ["", f"tracked sampling, 2 prompts x 4 generations x 50 steps: diffmem {ours:.2f} s, "
                  f"StableDiffusionPipeline {ref:.2f} s, ratio {ours / ref:.3f}"]
    Path(args.out).write_text("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

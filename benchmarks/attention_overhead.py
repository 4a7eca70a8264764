"""Cost of cross-attention access (diffmem.attention) in first-step detection, as a Markdown table.

    python benchmarks/attention_overhead.py [--channels 32,64] [--sample-size 32] [--prompts 8]
                                            [--generations 4] [--repeats 7] [--threads 1]

Times first-step detection (``SamplingConfig(track_steps=1)``, no decoding) on a random-weight SD
1.x-layout model from ``diffmem.testing.make_tiny_sd_folder`` in three modes:

- fused: nothing requested, diffusers' own processors (``scaled_dot_product_attention``);
- record: ``CrossAttentionRecorder`` on every cross-attention layer, passed to the pass;
- edit: ``attention_edit`` with Ren et al.'s kind of edit (start-token logit x1.25, last keys masked).

The prompts run through the loop ``sample_prompts`` makes (``plan_units`` + ``sample_unit``), with
``recorders=`` given to ``sample_unit``. The modes run interleaved (rotating order, after a warm-up
each) and the median wall time per prompt is reported, so load from other processes hits all alike.
"""

from __future__ import annotations

import argparse
import tempfile
import time

import numpy as np
import torch


def detect(model, prompts, cfg, recorders=()):
    from diffmem.sampling import plan_units, sample_unit

    out = []
    for unit in plan_units(list(range(len(prompts))), cfg.num_generations, cfg.batch_size):
        out += sample_unit(model, [prompts[p] for p in unit], unit, cfg, recorders=recorders)
    return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--channels", default="32,64", help="UNet block_out_channels")
    ap.add_argument("--sample-size", type=int, default=32, help="latent side")
    ap.add_argument("--prompts", type=int, default=8)
    ap.add_argument("--generations", type=int, default=4)
    ap.add_argument("--repeats", type=int, default=7)
    ap.add_argument("--threads", type=int, default=1)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)

    from diffmem.adapters import load_model
    from diffmem.attention import AttentionEdit, CrossAttentionRecorder, attention_edit, cross_attention_layers
    from diffmem.sampling import SamplingConfig
    from diffmem.testing import make_tiny_sd_folder

    channels = tuple(int(c) for c in args.channels.split(","))
    with tempfile.TemporaryDirectory() as tmp:
        model = load_model(str(make_tiny_sd_folder(f"{tmp}/model", unet_channels=channels,
                                                   sample_size=args.sample_size)))
    prompts = [f"prompt number {i}: a {c} {a} in a field" for i, (c, a) in enumerate(
        zip(["red", "blue", "green", "gold", "grey", "pink", "white", "black"] * 8,
            ["cat", "house", "car", "tree", "boat", "bird", "horse", "lamp"] * 8))][:args.prompts]
    G = args.generations
    cfg = SamplingConfig(num_inference_steps=50, track_steps=1, guidance_scale=7.5, num_generations=G,
                         batch_size=2 * G)
    T = model.max_tokens
    edit = AttentionEdit(token=0, scale=1.25, mask_keys=list(range(T - 8, T)))
    kept = {}

    def fused():
        detect(model, prompts, cfg)

    def record():
        with CrossAttentionRecorder(model) as rec:
            detect(model, prompts, cfg, recorders=[rec])
        kept["bytes"] = sum(m.numel() * m.element_size() for m in rec.maps[0].values())

    def edited():
        with attention_edit(model, edit):
            detect(model, prompts, cfg)

    modes = {"fused (nothing requested)": fused, "record all cross-attention layers": record,
             "edit (start token x1.25, 8 keys masked)": edited}
    times = {name: [] for name in modes}
    with torch.no_grad():
        for fn in modes.values():  # warm-up
            fn()
        names = list(modes)
        for r in range(args.repeats):
            for name in names[r % 3:] + names[:r % 3]:  # rotate the order
                t0 = time.perf_counter()
                modes[name]()
                times[name].append((time.perf_counter() - t0) / len(prompts))

    base = float(np.median(times[names[0]]))
    print(f"UNet block_out_channels {channels}, latent {args.sample_size}x{args.sample_size}, "
          f"{len(cross_attention_layers(model))} cross-attention layers, {len(prompts)} prompts x {G} generations, "
          f"first step of 50, batch {2 * G}, {args.threads} thread(s), median of {args.repeats}\n")
    print("| mode | s / prompt | vs fused |")
    print("|---|---|---|")
    for name in names:
        med = float(np.median(times[name]))
        print(f"| {name} | {med:.4f} | {med / base:.3f}x |")
    print(f"\nrecorded maps of the last unit's step 0: {kept['bytes'] / 2 ** 20:.2f} MiB (float32)")


if __name__ == "__main__":
    main()

"""Speed of tracking and first-step detection, printed as a Markdown table (BENCHMARKS.md holds the results).

    python benchmarks/speed.py [--models lab,tiny-sd,sd14-unet] [--threads N] [--repeats R]

(a) tracked sampling vs diffusers' own StableDiffusionPipeline call, same prompts/seeds/steps
    (target <= 1.02x); for the lab model, vs the bare guided DDIM loop without tracking;
(b) first-step detection per prompt vs the bare batched UNet forward passes it needs (target <= 1.10x);
(c) time to detect 100 prompts with the paper's protocol (50 steps, 4 generations, one prompt at a
    time) vs first-step detection with 1 and 4 generations, with the AUC each reaches on the lab.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from diffmem.model import Conditioning


def paired(fn_a, fn_b, repeats: int) -> tuple[float, float]:
    """Median wall times (s) of `fn_a` and `fn_b`, run alternately after one warm-up each, so that
    load from other processes hits both alike."""
    fn_a(), fn_b()
    ta, tb = [], []
    for _ in range(repeats):
        for fn, out in ((fn_a, ta), (fn_b, tb)):
            t0 = time.perf_counter()
            fn()
            out.append(time.perf_counter() - t0)
    return float(np.median(ta)), float(np.median(tb))


def bare_guided_loop(model, x, cond, uncond, timesteps, guidance):
    """The same DDIM + CFG loop with nothing recorded: the cost tracking is compared against."""
    with torch.no_grad():
        for t in timesteps:
            eps = model.predict_noise(torch.cat([x, x]), t, Conditioning.cat([uncond, cond]))
            eu, ec = eps.chunk(2)
            x = model.scheduler.step(eu + guidance * (ec - eu), t, x, return_dict=False)[0]
    return x


def bench_tracking(model, folder, prompts, steps, gens, repeats):
    from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts

    guidance = model.default_guidance_scale
    cfg = SamplingConfig(num_inference_steps=steps, num_generations=gens, guidance_scale=guidance,
                         batch_size=2 * gens)
    run_ours = lambda: sample_prompts(model, prompts, cfg, decode=False)
    if folder is not None:
        from diffusers import DDIMScheduler, StableDiffusionPipeline

        pipe = StableDiffusionPipeline.from_pretrained(folder, safety_checker=None, requires_safety_checker=False,
                                                       torch_dtype=model.dtype)
        pipe.scheduler = DDIMScheduler.from_config(pipe.scheduler.config)
        pipe.set_progress_bar_config(disable=True)

        def ref():
            for i, p in enumerate(prompts):
                pipe(p, num_inference_steps=steps, guidance_scale=guidance, num_images_per_prompt=gens,
                     generator=torch.Generator("cpu").manual_seed(i), output_type="latent")
        name = "StableDiffusionPipeline"
    else:
        def ref():
            model.scheduler.set_timesteps(steps)
            for i, p in enumerate(prompts):
                x = initial_noise(model, gens, i)
                cond = model.encode_prompts([p]).repeat_interleave(gens)
                bare_guided_loop(model, x, cond, model.empty_conditioning().expand(gens),
                                 model.scheduler.timesteps, guidance)
        name = "bare guided DDIM loop"
    ours, base = paired(run_ours, ref, repeats)
    return ours, base, name


def bench_first_step(model, prompts, gens, batch_size, repeats):
    from diffmem.sampling import SamplingConfig, initial_noise, sample_prompts

    cfg = SamplingConfig(num_generations=gens, track_steps=1, batch_size=batch_size)
    model.scheduler.set_timesteps(50)
    t = model.scheduler.timesteps[0]
    per_call = batch_size // 2
    x = torch.cat([initial_noise(model, gens, i) for i in range(len(prompts))])
    emb = model.encode_prompts(prompts).repeat_interleave(gens)
    unc = model.empty_conditioning().expand(len(x))

    def bare():
        with torch.no_grad():
            for i in range(0, len(x), per_call):
                xi = x[i:i + per_call]
                model.predict_noise(torch.cat([xi, xi]), t, Conditioning.cat([unc[i:i + per_call], emb[i:i + per_call]]))
    def ours_run():
        sample_prompts(model, prompts, cfg, decode=False)
        model.scheduler.set_timesteps(50)

    def bare_with_text():  # the text encoder's forward passes are needed too
        with torch.no_grad():
            model.encode_prompts(prompts)
        bare()

    ours, base = paired(ours_run, bare, repeats)
    _, base_text = paired(ours_run, bare_with_text, repeats)
    return ours / len(prompts), base / len(prompts), base_text / len(prompts)


def bench_protocols(model, n_prompts, repeats_unused=1):
    """Time for n prompts: paper protocol (50 steps, 4 gens, one prompt at a time) vs first step."""
    from diffmem.lab.build import lab_data_for
    from diffmem.lab.report import first_step_scores
    from diffmem.metrics import roc_metrics
    from diffmem.sampling import SamplingConfig, sample_prompts

    data = lab_data_for(model)
    mem = [p.caption for p in data.memorized]
    novel = [p.caption for p in data.novel[: max(n_prompts - len(mem), 1)]]
    prompts = (mem + novel)[:n_prompts]
    labels = np.r_[np.ones(min(len(mem), n_prompts)), np.zeros(len(prompts) - min(len(mem), n_prompts))]
    rows = []
    for name, cfg in [("paper: 50 steps, 4 generations, one prompt per call",
                       SamplingConfig(num_generations=4, batch_size=8)),
                      ("first step, 1 generation", SamplingConfig(num_generations=1, track_steps=1, batch_size=16)),
                      ("first step, 4 generations", SamplingConfig(num_generations=4, track_steps=1, batch_size=16))]:
        t0 = time.perf_counter()
        res = sample_prompts(model, prompts, cfg, decode=False)
        dt = time.perf_counter() - t0
        scores = np.array([r.text_noise_norm.mean().item() for r in res])
        auc = roc_metrics(scores[labels == 1], scores[labels == 0]).auc if 0 < labels.sum() < len(labels) else float("nan")
        rows.append((name, dt, auc))
    return rows


def full_size_sd14_folder(root: Path) -> Path:
    """An SD v1.4-architecture UNet (860M parameters, random weights) with tiny VAE and text encoder."""
    from diffusers import UNet2DConditionModel

    from diffmem.testing import make_tiny_sd_folder

    folder = make_tiny_sd_folder(root / "sd14", sample_size=64, cross_attention_dim=768)
    unet = UNet2DConditionModel(sample_size=64, cross_attention_dim=768)  # diffusers' defaults = SD v1.x UNet
    unet.save_pretrained(folder / "unet")
    return folder


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", default="lab,tiny-sd,sd14-unet")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--protocol-prompts", type=int, default=100)
    ap.add_argument("--lab-model", default="lab", help="lab model folder (default: the shipped one)")
    ap.add_argument("--only-protocols", action="store_true", help="run only (c) on the lab model")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from diffmem.adapters import load_model
    from diffmem.testing import make_tiny_sd_folder

    tmp = Path(tempfile.mkdtemp())
    print(f"device {args.device}, dtype {args.dtype}, torch threads {torch.get_num_threads()}, torch {torch.__version__}\n")
    print("| model | measurement | diffmem | baseline | ratio (target) |")
    print("|---|---|---|---|---|")
    for name in args.models.split(","):
        if name == "lab":
            folder, model = None, load_model(args.lab_model, device=args.device, dtype=args.dtype)
            steps, gens, prompts = 50, 4, [f"the velvet harbor: a red circle {i}" for i in range(4)]
        elif name == "tiny-sd":
            folder = make_tiny_sd_folder(tmp / "tiny")
            model = load_model(str(folder), device=args.device, dtype=args.dtype)
            steps, gens, prompts = 50, 4, [f"a photo of thing {i}" for i in range(4)]
        elif name == "sd14-unet":
            folder = full_size_sd14_folder(tmp)
            model = load_model(str(folder), device=args.device, dtype=args.dtype)
            steps, gens, prompts = 3, 1, ["a photo of an astronaut riding a horse"]
        else:
            raise SystemExit(f"unknown model {name}")
        repeats = 1 if name == "sd14-unet" else args.repeats  # ~5 s per UNet sample on a 2-core CPU
        if args.only_protocols:
            if name == "lab":
                for proto, dt, auc in bench_protocols(model, args.protocol_prompts):
                    print(f"| lab | (c) {args.protocol_prompts} prompts: {proto} | {dt:.1f} s | AUC {auc:.3f} |")
            continue
        ours, base, base_name = bench_tracking(model, folder, prompts, steps, gens, repeats)
        print(f"| {name} | (a) tracked sampling, {len(prompts)} prompts x {gens} gens x {steps} steps | {ours:.3f} s | "
              f"{base:.3f} s ({base_name}) | {ours / base:.3f} (<= 1.02) |")
        for bs in ((2, 4) if name == "sd14-unet" else (2, 8, 16, 32)):
            fp = [f"prompt {i}" for i in range(max(bs // 2, 4) if name != "sd14-unet" else bs // 2)]
            ours_fs, bare_fs, bare_text_fs = bench_first_step(model, fp, 1, bs, repeats)
            print(f"| {name} | (b) first-step detection per prompt, batch {bs} | {ours_fs * 1e3:.2f} ms | "
                  f"{bare_fs * 1e3:.2f} ms (bare UNet calls) / {bare_text_fs * 1e3:.2f} ms (+ text encoder) | "
                  f"{ours_fs / bare_fs:.3f} / {ours_fs / bare_text_fs:.3f} (<= 1.10) |")
        if name == "lab":
            rows = bench_protocols(model, args.protocol_prompts)
            base_t = rows[0][1]
            for proto, dt, auc in rows:
                print(f"| lab | (c) {args.protocol_prompts} prompts: {proto} | {dt:.1f} s, AUC {auc:.3f} | "
                      f"{base_t:.1f} s (paper protocol) | {dt / base_t:.3f} |")


if __name__ == "__main__":
    main()

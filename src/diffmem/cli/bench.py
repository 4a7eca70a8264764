"""``diffmem bench``: benchmarks that compare methods on the same prompts, seeds and model."""

from __future__ import annotations


def add_parser(sub) -> None:
    from diffmem.bench import BenchDetectConfig
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import add_same_noise_arg

    base = BenchDetectConfig()
    p = sub.add_parser("bench", help="compare detectors or mitigations on the same prompts, seeds and model")
    kinds = p.add_subparsers(dest="bench", required=True, metavar="BENCHMARK")
    d = kinds.add_parser("detect", help="every detector at the settings it is defined for: AUC, TPR@1%%/3%%FPR "
                         "(and TPR@1%%FPR by the closest-point rule) with bootstrap intervals, cost", description="Detect memorized against control prompts "
                         "with every requested detector and write table.md, table.json and ROC figures to --out. "
                         "Default on the lab: its memorized captions against non-memorized, novel and out-of-style "
                         "ones.")
    common_model_args(d)
    d.add_argument("--memorized", default=None, help="memorized prompts (a prompt file); default: the lab's")
    d.add_argument("--non-memorized", default=None, help="control prompts (a prompt file, or 'random'); default: "
                   "the lab's non-memorized, novel and out-of-style captions")
    d.add_argument("--prompt-key", default="caption")
    d.add_argument("--limit", type=int, default=100, help="prompts per control set (default 100)")
    d.add_argument("--reference-prompts", default=None, metavar="FILE", help="ordinary prompts (a prompt file) for "
                   "the detectors that calibrate on them (broken-memories; a lab model has its own)")
    d.add_argument("--methods", default=None, help=f"comma-separated (default: all: {', '.join(base.methods)})")
    d.add_argument("--steps", default=None, help="first, all or first,all (default): the first step for detectors "
                   "defined there, the whole trajectory for every detector")
    d.add_argument("--generations", default=None, help="comma-separated (default 1,4)")
    d.add_argument("--num-inference-steps", type=int, default=None, help=f"default {base.num_inference_steps}")
    d.add_argument("--seed", type=int, default=None, help="the prompt at position i starts from seed + i (default 0)")
    add_same_noise_arg(d)
    d.add_argument("--batch-size", type=int, default=None, help=f"UNet samples per call (default {base.batch_size})")
    d.add_argument("--bootstrap", type=int, default=None, help=f"resamples for the 95%% intervals (default {base.bootstrap})")
    d.add_argument("--timing-prompts", type=int, default=None, help="memorized prompts each detector is timed alone on "
                   f"for its cost (default {base.timing_prompts}; 0: no cost columns, faster on large models)")
    d.add_argument("--asthana-weights", default=None, help="g1,g2 of asthana where the model has neither published "
                   "weights nor reference prompts (SDXL, ...)")
    d.add_argument("--asthana-space", choices=("official", "noise"), default=None,
                   help="where asthana takes its norm and cosine on v-prediction models (SD 2.x): official (default): "
                   "the UNet's raw output, as the official code; noise: the converted noise")
    d.add_argument("--out", required=True)
    d.add_argument("--no-progress", action="store_true")
    add_mitigate_parser(kinds)
    p.set_defaults(run=run)


def add_mitigate_parser(kinds) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import DATASET_HELP, add_sampling_args
    from diffmem.mitigate import METHODS
    from diffmem.sampling import SamplingConfig

    m = kinds.add_parser("mitigate", help="every mitigation over its settings: copy rate, similarity, alignment / "
                         "CLIP score, extra UNet rows and seconds per prompt, trade-off plot",
                         description="Run every requested mitigation over the settings it sweeps (and no mitigation "
                         "once, the reference) on the same prompts and seeds, judge the generations against the "
                         "prompts' training images, and write table.md, results.json and tradeoff.png to --out, "
                         "beside one evaluate folder per method. Default on the lab: its memorized captions.")
    common_model_args(m)
    m.add_argument("--dataset", default=None, help=DATASET_HELP)
    m.add_argument("--limit", type=int, default=None, help="only the first N prompts")
    m.add_argument("--methods", default=None, help=f"comma-separated (default: all: {', '.join(METHODS)}); 'none', "
                   "the reference, is always run")
    m.add_argument("--sscd", default=None, help="SSCD TorchScript checkpoint: SSCD similarity, and copies at SSCD > "
                   "0.5 off the lab")
    m.add_argument("--clip", default=None, help="local transformers CLIP model folder for the CLIP score")
    m.add_argument("--copy-threshold", type=float, default=None, help="similarity beyond this is a copy (default 0.5 "
                   "with --sscd); lab models use the lab's copy rule in any case")
    m.add_argument("--copy-metric", default=None, choices=("sscd", "tiled_l2", "pixel_cosine"))
    m.add_argument("--param", action="append", default=[], metavar="NAME=VALUE",
                   help="fix a parameter in every setting of the methods that take it (repeatable), e.g. "
                   "protocol=per-prompt for gni; the table's setting column names it")
    m.add_argument("--dori", type=int, nargs="?", const=50, default=0, metavar="STEPS",
                   help="also run each method that changes the model or the sampler, at its published setting, under "
                   "the DoRI attack (an embedding optimized for STEPS Adam steps, default 50, to denoise each prompt's "
                   "training image): the copies it brings back")
    m.add_argument("--out", required=True, help="output folder")
    m.add_argument("--resume", action="store_true", help="continue the benchmark already in --out (finished methods "
                   "are not run again; --methods may add methods, and --dori the attack, to it)")
    add_sampling_args(m, SamplingConfig(), same_noise=True)
    m.add_argument("--no-progress", action="store_true")


def config_from_args(args):
    from dataclasses import replace

    from diffmem.bench import BenchDetectConfig
    from diffmem.cli.options import given

    split = lambda v: tuple(x.strip() for x in v.split(",") if x.strip())
    options = given(args, ("num_inference_steps", "seed", "same_noise", "batch_size", "bootstrap", "timing_prompts"))
    if args.methods:
        options["methods"] = split(args.methods)
    if args.steps:
        options["steps"] = split(args.steps)
    if args.generations:
        try:
            options["generations"] = tuple(int(g) for g in split(args.generations))
        except ValueError:
            raise ValueError(f"--generations {args.generations!r}: expected comma-separated numbers, e.g. 1,4") from None
    if args.asthana_weights:
        from diffmem.cli.options import parse_weights

        options["asthana_weights"] = parse_weights(args.asthana_weights)
    if args.asthana_space:
        options["asthana_space"] = args.asthana_space
    return replace(BenchDetectConfig(), **options)


def mitigate_config_from_args(args):
    from dataclasses import replace

    from diffmem.bench import BenchMitigateConfig
    from diffmem.cli.options import given, params_from_args, sampling_from_args

    options = given(args, ("sscd", "clip", "copy_threshold", "copy_metric"))
    options["params"] = params_from_args(args)
    options["dori_steps"] = args.dori
    if args.methods:
        options["methods"] = tuple(x.strip() for x in args.methods.split(",") if x.strip())
    base = BenchMitigateConfig()
    return replace(base, sampling=sampling_from_args(args, base.sampling), **options)


def run_mitigate(args) -> int:
    from pathlib import Path

    from accelerate import PartialState

    from diffmem.bench import bench_mitigate
    from diffmem.cli.main import load_model_from_args
    from diffmem.eval_sets import load_eval_set

    config = mitigate_config_from_args(args)  # checked before loading anything
    model = load_model_from_args(args)
    eval_set = load_eval_set(model, args.dataset, args.limit)
    results = bench_mitigate(model, eval_set, config, args.out, progress=not args.no_progress, resume=args.resume)
    if PartialState().is_main_process:
        print((Path(args.out) / "table.md").read_text())
        skipped = [r["method"] for r in results["rows"] if r["status"] == "skipped"]
        print(f"wrote {args.out}/table.md, results.json and tradeoff.png ({len(results['rows']) - len(skipped)} "
              f"settings" + (f"; skipped: {', '.join(skipped)}" if skipped else "") + ")")
    return 0


def run(args) -> int:
    if args.bench == "mitigate":
        return run_mitigate(args)
    from diffmem.bench import bench_detect
    from diffmem.cli.main import load_model_from_args
    from diffmem.metrics import fpr_sample_warning
    from diffmem.prompts import PromptSet, needs_model, read_prompts

    config = config_from_args(args)  # checked before loading anything
    if (args.memorized is None) != (args.non_memorized is None):
        raise ValueError("give both --memorized and --non-memorized, or neither (the lab's sets)")
    for path in (args.memorized, args.non_memorized):  # files are checked before the model loads
        if path is not None and not needs_model(path):
            read_prompts(path, args.prompt_key)
    from diffmem.cli.detect import reference_prompts

    reference = reference_prompts(args)
    model = load_model_from_args(args)
    if args.memorized is None:
        data = model.training_data()
        if data is None:
            raise ValueError(f"--memorized and --non-memorized are required: {args.model} is not a lab model")
        from diffmem.prompts import PromptRecord

        as_set = lambda name, limit=None: PromptSet([PromptRecord(i, p.caption) for i, p in
                                                     enumerate(data.prompt_set(name)[:limit])], f"lab:{name}")
        memorized = as_set("memorized")
        controls = {n: as_set(n, args.limit) for n in ("non-memorized", "novel", "out-of-style")}
    else:
        memorized = PromptSet(read_prompts(args.memorized, args.prompt_key, model=model, seed=config.seed), args.memorized)
        records = read_prompts(args.non_memorized, args.prompt_key, model=model, seed=config.seed)[:args.limit]
        controls = {"non-memorized": PromptSet(records, args.non_memorized)}
    table = bench_detect(model, memorized, controls, config, args.out, progress=not args.no_progress,
                         reference_prompts=reference)
    print((__import__("pathlib").Path(args.out) / "table.md").read_text())
    print(f"wrote {args.out}/table.md, table.json and roc/ ({len(table['rows'])} rows)")
    for name, prompts in controls.items():
        warning = fpr_sample_warning(len(prompts.records), 0.01, f"{name} prompts")
        if warning:
            print(warning)
    return 0

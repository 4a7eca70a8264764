"""``diffmem serve``: a local web page to type prompts and see their memorization score and token significance,
and generate with a mitigation (embedding-opt by default; ``--mitigation none`` turns the button off)."""

from __future__ import annotations

import ipaddress


def add_parser(sub) -> None:
    from diffmem.cli.main import common_model_args
    from diffmem.cli.options import add_explain_args
    from diffmem.explain import ExplainConfig
    from diffmem.mitigate import METHODS
    from diffmem.mitigations import canonical_name

    p = sub.add_parser("serve", help="local web page: a prompt's memorization score, verdict, tokens and images",
                       description="Start a local web app over a JSON API (POST /api/analyze, /api/mitigate). The "
                       "verdict compares the score with a threshold: --threshold, or calibrated at --fpr on "
                       "--calibration-prompts, or (lab models) on the lab's novel prompts. 'Generate with "
                       "mitigation' samples the same images with --mitigation applied.")
    common_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    t = p.add_argument_group("threshold")
    t.add_argument("--threshold", type=float, default=None, help="flag prompts with score >= this")
    t.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="normal prompts to calibrate the threshold on (default for lab models: the lab's novel prompts)")
    t.add_argument("--prompt-key", default="caption", help="field/column of --calibration-prompts")
    t.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the calibrated threshold")
    add_explain_args(p, ExplainConfig())
    p.add_argument("--image-steps", type=int, default=50, help="DDIM steps of the images shown")
    p.add_argument("--no-images", action="store_true", help="show no images (faster on large models)")
    m = p.add_argument_group("mitigation (the page's 'Generate with mitigation' button)")
    m.add_argument("--mitigation", choices=METHODS, type=canonical_name, default="embedding-opt",
                   help="embedding-opt (default): AdamW on the prompt embedding until the first-step d <= "
                   "--target-loss (Wen et al. 5.1); rand-word-add, rand-numb-add, rand-word-repeat: insert "
                   "--repeat-num random tokens / numbers / prompt words (Somepalli et al. 2023); "
                   "none: the button stays off")
    m.add_argument("--target-loss", type=float, default=None,
                   help="embedding-opt: stop once the first-step loss <= this, in the original code's unit (the norm over "
                   "all generations at once, about sqrt(generations) times a score; the page shows it as a score). "
                   "Default: the model's (Stable Diffusion: the original 3); where the model has none (the lab), as "
                   "in diffmem audit: the median first-step loss of the prompts the threshold was calibrated on, "
                   "where an ordinary prompt sits; with --threshold, half the threshold")
    m.add_argument("--mitigation-lr", type=float, default=None,
                   help="embedding-opt: AdamW learning rate (default: the model's; 0.05 on SD, 0.01 on the lab)")
    m.add_argument("--mitigation-max-iters", type=int, default=None,
                   help="embedding-opt: AdamW steps at most (default: the model's; 10 on SD, 50 on the lab)")
    m.add_argument("--repeat-num", type=int, default=None,
                   help="rand-word-add, rand-numb-add, rand-word-repeat: items inserted (default 4)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(run=run)


def run(args) -> int:
    from diffmem.cli.explain import config_from_args as explain_config_from_args
    from diffmem.cli.main import load_model_from_args
    from diffmem.mitigate import calibrated_target_loss, default_target_loss
    from diffmem.web.server import (ExplainApp, Threshold, calibrate_threshold, lab_examples, lab_reference_threshold,
                                    make_server, mitigation_hook, page_sampling, significance_scale)

    # 1. Check inputs before loading anything
    config = explain_config_from_args(args)
    mitigation = mitigation_config_from_args(args, config.seed)
    if not 0 < args.fpr < 1:
        raise ValueError(f"--fpr {args.fpr}: must be between 0 and 1")
    if args.image_steps < 1:
        raise ValueError(f"--image-steps {args.image_steps}: must be >= 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"

    from diffmem.prompts import needs_model, read_prompts

    normal: list[str] = []  # the calibration prompts, when given (the lab's own otherwise)
    if args.threshold is None and args.calibration_prompts and not needs_model(args.calibration_prompts):
        normal = [r.prompt for r in read_prompts(args.calibration_prompts, args.prompt_key)]

    # 2. The model and the threshold
    model = load_model_from_args(args)
    if args.threshold is not None:
        threshold = Threshold(args.threshold, "given with --threshold")
    elif args.calibration_prompts:
        normal = normal or [r.prompt for r in read_prompts(args.calibration_prompts, args.prompt_key, model=model,
                                                           seed=config.seed)]
        print(f"calibrating the threshold on {len(normal)} prompts of {args.calibration_prompts} ...")
        threshold = calibrate_threshold(model, normal, config, args.fpr, source=args.calibration_prompts, progress=True)
    elif model.training_data() is not None:
        print("calibrating the threshold on the lab's reference (novel) prompts ...")
        threshold = lab_reference_threshold(model, config, args.fpr, progress=True)
    else:
        raise ValueError("this model is not a lab model: pass --threshold, or --calibration-prompts FILE of "
                         "normal (non-memorized) prompts to calibrate one")
    print(f"threshold {threshold.value:.4g} ({threshold.source})")
    if threshold.fpr and threshold.num_reference is not None:
        from diffmem.metrics import fpr_sample_warning

        warning = fpr_sample_warning(threshold.num_reference, threshold.fpr)
        if warning:
            print(warning)

    # 3. The mitigation behind the page's button
    app = ExplainApp(model, threshold, config, image_steps=None if args.no_images else args.image_steps,
                     examples=lab_examples(model))
    if app.examples:  # one colour scale for every prompt: a memorized example's top token at full red
        print("setting the page's colour scale on the memorized example ...", flush=True)
        app.colour_scale = significance_scale(model, app.examples[0]["prompt"], config)
    if mitigation is not None:
        if mitigation.method == "embedding-opt":
            origin = "given with --target-loss" if args.target_loss is not None else f"{model.name}'s default"
            calibrated = None
            if args.target_loss is None and model.defaults.target_loss is None:
                # the median first-step loss of the prompts the threshold was calibrated on (as the audit does)
                print("calibrating the mitigation target on the same prompts ...", flush=True)
                calibrated = calibrated_target_loss(model, mitigation, page_sampling(config, None), normal or None)
                origin = "median first-step loss of the calibration prompts"
                if calibrated is None:
                    calibrated = default_target_loss([], threshold.value, mitigation.target_unit, config.generations)
                    origin = "half the threshold"
            mitigation = mitigation.resolved(model, calibrated)
            from diffmem.targets import describe_target

            print(f"mitigation embedding-opt: down to a first-step "
                  f"{describe_target(mitigation.target_loss, mitigation.target_unit, config.generations)} ({origin}), "
                  f"lr {mitigation.lr:g}, at most {mitigation.max_iters} iterations")
        else:
            print(f"mitigation {mitigation.method}: {mitigation.repeat_num} items inserted into the prompt")
        app.mitigate = mitigation_hook(mitigation, app.image_steps)

    # 4. Serve until interrupted
    server = make_server(app, args.host, args.port, verbose=args.verbose)
    host, port = server.server_address[:2]
    if not loopback:
        print(f"warning: bound to {host}, reachable from other machines; the API has no authentication")
    print(f"serving on http://{host}:{port}/  (Ctrl-C to stop)", flush=True)
    try:
        server.serve_forever()
    finally:
        server.server_close()
    return 0


def mitigation_config_from_args(args, seed: int):
    """The MitigationConfig of the page's button (target_loss still to derive when not given); None for none."""
    from diffmem.mitigate import AUGMENT_STYLES, MitigationConfig
    from diffmem.mitigations import canonical_name

    method = canonical_name(args.mitigation)
    given = {"--target-loss": args.target_loss, "--mitigation-lr": args.mitigation_lr,
             "--mitigation-max-iters": args.mitigation_max_iters, "--repeat-num": args.repeat_num}
    applies = {"embedding-opt": ("--target-loss", "--mitigation-lr", "--mitigation-max-iters"),
               **{s: ("--repeat-num",) for s in AUGMENT_STYLES}}.get(method, ())
    stray = [k for k, v in given.items() if v is not None and k not in applies]
    if stray:
        raise ValueError(f"{', '.join(stray)} {'has' if len(stray) == 1 else 'have'} no effect with --mitigation "
                         f"{method}" + (f" (it takes {', '.join(applies)})" if applies else ""))
    config = MitigationConfig(method=method, seed=seed)  # augmentations draw with the page's seed
    if args.target_loss is not None:
        if args.target_loss < 0:
            raise ValueError(f"--target-loss {args.target_loss}: must be >= 0 (d is a norm; 0 runs every iteration)")
        config.target_loss = args.target_loss
    if args.mitigation_lr is not None:
        if not args.mitigation_lr > 0:
            raise ValueError(f"--mitigation-lr {args.mitigation_lr}: must be > 0")
        config.lr = args.mitigation_lr
    if args.mitigation_max_iters is not None:
        if args.mitigation_max_iters < 1:
            raise ValueError(f"--mitigation-max-iters {args.mitigation_max_iters}: must be >= 1 "
                             "(--mitigation none turns mitigation off)")
        config.max_iters = args.mitigation_max_iters
    if args.repeat_num is not None:
        if args.repeat_num < 1:
            raise ValueError(f"--repeat-num {args.repeat_num}: must be >= 1 (items inserted into the prompt; "
                             "--mitigation none turns mitigation off)")
        config.repeat_num = args.repeat_num
    return None if method == "none" else config

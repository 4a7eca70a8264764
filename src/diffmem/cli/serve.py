"""``diffmem serve``: a local web page to type prompts and see their memorization score and token significance."""

from __future__ import annotations

import ipaddress


def add_parser(sub) -> None:
    from diffmem.cli.explain import add_explain_args
    from diffmem.cli.main import common_model_args

    p = sub.add_parser("serve", help="local web page: a prompt's memorization score, verdict, tokens and images",
                       description="Start a local web app over a JSON API (POST /api/analyze). The verdict "
                       "compares the score with a threshold: --threshold, or calibrated at --fpr on "
                       "--calibration-prompts, or (lab models) on the lab's novel prompts.")
    common_model_args(p)
    p.add_argument("--host", default="127.0.0.1", help="interface to bind (default 127.0.0.1: this machine only)")
    p.add_argument("--port", type=int, default=8765, help="port (0: any free one)")
    t = p.add_argument_group("threshold")
    t.add_argument("--threshold", type=float, default=None, help="flag prompts with score >= this")
    t.add_argument("--calibration-prompts", default=None, metavar="FILE",
                   help="normal prompts to calibrate the threshold on (default for lab models: the lab's novel prompts)")
    t.add_argument("--prompt-key", default="caption", help="field/column of --calibration-prompts")
    t.add_argument("--fpr", type=float, default=0.01, help="false-positive rate of the calibrated threshold")
    add_explain_args(p)
    p.add_argument("--image-steps", type=int, default=50, help="DDIM steps of the images shown")
    p.add_argument("--no-images", action="store_true", help="show no images (faster on large models)")
    p.add_argument("--verbose", action="store_true", help="log every request")
    p.set_defaults(run=run)


def run(args) -> int:
    from diffmem.cli.explain import explain_config_from_args
    from diffmem.cli.main import load_model_from_args
    from diffmem.web.server import ExplainApp, Threshold, calibrate_threshold, lab_novel_threshold, make_server

    # 1. Check inputs before loading anything
    config = explain_config_from_args(args)
    if not 0 < args.fpr < 1:
        raise ValueError(f"--fpr {args.fpr}: must be between 0 and 1")
    if args.image_steps < 1:
        raise ValueError(f"--image-steps {args.image_steps}: must be >= 1")
    try:
        loopback = ipaddress.ip_address(args.host).is_loopback
    except ValueError:
        loopback = args.host == "localhost"

    # 2. The model and the threshold
    model = load_model_from_args(args)
    if args.threshold is not None:
        threshold = Threshold(args.threshold, "given with --threshold")
    elif args.calibration_prompts:
        from diffmem.prompts import read_prompts

        normal = [r.prompt for r in read_prompts(args.calibration_prompts, args.prompt_key)]
        print(f"calibrating the threshold on {len(normal)} prompts of {args.calibration_prompts} ...")
        threshold = calibrate_threshold(model, normal, config, args.fpr, source=args.calibration_prompts)
    elif getattr(model, "extra_meta", {}).get("data") is not None:
        print("calibrating the threshold on the lab's novel prompts ...")
        threshold = lab_novel_threshold(model, config, args.fpr)
    else:
        raise ValueError("this model is not a lab model: pass --threshold, or --calibration-prompts FILE of "
                         "normal (non-memorized) prompts to calibrate one")
    print(f"threshold {threshold.value:.4g} ({threshold.source})")

    # 3. Serve until interrupted
    app = ExplainApp(model, threshold, config, image_steps=None if args.no_images else args.image_steps)
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

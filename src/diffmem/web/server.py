"""``diffmem serve``: a stdlib HTTP server with one static page over a JSON API.

    GET  /              the page (static/index.html; no external network, no CDN)
    GET  /api/info      model, threshold and its provenance, settings, whether mitigation is available
    POST /api/analyze   {"prompt": str} -> score, verdict, threshold, tokens with significance, words, images
    POST /api/mitigate  {"prompt": str} -> images generated with mitigation, the method, first-step d before
                        and after, iterations, modified prompt, the mitigated score and its verdict
                        (501 while ExplainApp.mitigate is None)

Startable from Python (tests, notebooks)::

    app = ExplainApp(model, Threshold(0.3, "given"))
    app.mitigate = mitigation_hook(MitigationConfig("embedding-opt", target_loss=0.1), app.image_steps)
    server, url = start_server(app, port=0)   # serves in a daemon thread
    ...
    server.shutdown()
"""

from __future__ import annotations

import base64
import io
import json
import threading
import time
from dataclasses import asdict, dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from importlib import resources
from typing import Callable

from diffmem.explain import ExplainConfig, prompt_scores, token_significance
from diffmem.mitigate import AUGMENT_STYLES, MitigationConfig

MAX_PROMPT_CHARS = 2000
MAX_BODY_BYTES = 64 * 1024

# The mitigation hook: (model, prompt, ExplainConfig) -> {"images": [data URLs], ...anything else to show}.
# mitigation_hook makes the real one; the page enables its button when ExplainApp.mitigate is set.
Mitigate = Callable[[object, str, ExplainConfig], dict]


@dataclass
class Threshold:
    value: float  # a prompt is flagged memorized when score >= value
    source: str  # how it was chosen, shown on the page
    fpr: float | None = None  # target false-positive rate of the calibration
    num_reference: int | None = None  # normal prompts it was calibrated on
    median: float | None = None  # their median score


def calibrate_threshold(model, normal_prompts: list[str], config: ExplainConfig = ExplainConfig(),
                        fpr: float = 0.01, source: str = "normal prompts", progress: bool = False) -> Threshold:
    """The score threshold with false-positive rate below `fpr` on `normal_prompts`, same settings as the page."""
    import numpy as np

    from diffmem.metrics import threshold_at_fpr

    from tqdm.auto import tqdm

    from diffmem.sampling import plan_units

    # prompt i from seed + i, as the audit's reference; unit by unit (the batches sample_prompts makes) for the bar
    sampling = config.sampling()
    units = plan_units(list(range(len(normal_prompts))), sampling.num_generations, sampling.batch_size)
    scores: list[float] = []
    with tqdm(total=len(normal_prompts), desc="calibrating the threshold", unit="prompt", disable=not progress) as bar:
        for unit in units:
            scores += prompt_scores(model, [normal_prompts[j] for j in unit], config, positions=unit)
            bar.update(len(unit))
    return Threshold(threshold_at_fpr(scores, fpr), f"{source} at {fpr:.0%} FPR", fpr, len(normal_prompts),
                     float(np.median(scores)))


def lab_reference_threshold(model, config: ExplainConfig = ExplainConfig(), fpr: float = 0.01,
                            limit: int | None = None, progress: bool = False) -> Threshold:
    """Calibrate on the lab model's reference prompts (novel titles never seen in training), the
    prompts ``diffmem audit`` calibrates on: the same settings give the same threshold."""
    from diffmem.lab.prompts import own_reference_prompts

    normal = (own_reference_prompts(model) or [])[:limit]
    if not normal:
        raise ValueError(f"model {model.name} is not a lab model: it has no reference prompts of its own")
    return calibrate_threshold(model, normal, config, fpr, source=f"{len(normal)} lab reference (novel) prompts",
                               progress=progress)


def lab_examples(model) -> list[dict]:
    """Prompts to try on a lab model's page: a memorized caption, a template caption and a novel one
    (a title never seen in training), each with its set; [] for other models."""
    data = model.training_data()
    if data is None:
        return []
    about = {"memorized": "duplicated in training: the model copies its one image",
             "template": "one caption trained on a few variants of one layout: the model copies the layout",
             "novel": "a title never seen in training: a new image"}
    memorized = data.prompt_set("memorized")
    out = []
    for kind in ("memorized", "template"):
        pair = next((p for p in memorized if p.kind == kind), None)
        if pair is not None:
            out.append({"set": kind, "prompt": pair.caption, "about": about[kind]})
    novel = data.prompt_set("novel")
    if novel:  # the last: not among the calibration prompts
        out.append({"set": "novel", "prompt": novel[-1].caption, "about": about["novel"]})
    return out


def significance_scale(model, prompt: str, config: ExplainConfig = ExplainConfig()) -> float:
    """The page's colour scale: the top token significance of `prompt` (a memorized one), so that every
    prompt's tokens are coloured on the same scale, a real trigger at full red."""
    ex = token_significance(model, prompt, config)
    return max((t.score for t in ex.tokens if not t.special), default=0.0)


def png_data_url(image) -> str:
    """(3, H, W) tensor in [0, 1] -> a data: URL of its PNG."""
    from PIL import Image

    arr = (image.permute(1, 2, 0).float().numpy() * 255).round().clip(0, 255).astype("uint8")
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


@dataclass
class ExplainApp:
    """What the page shows for a prompt; one request at a time uses the model (its scheduler has state)."""

    model: object
    threshold: Threshold
    config: ExplainConfig = field(default_factory=ExplainConfig)
    image_steps: int | None = 50  # DDIM steps of the images shown; None: no images
    mitigate: Mitigate | None = None  # the hook for "generate with mitigation"
    examples: list[dict] = field(default_factory=list)  # prompts to try: {"set": ..., "prompt": ...} (lab_examples)
    colour_scale: float | None = None  # token significance shown at full colour (significance_scale); None: the page's running maximum
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False)

    def info(self) -> dict:
        from diffmem.metrics import fpr_sample_warning

        t = self.threshold
        warning = fpr_sample_warning(t.num_reference, t.fpr) if t.fpr and t.num_reference is not None else None
        return {"model": self.model.name, "threshold": asdict(t), "threshold_warning": warning,
                "settings": {**asdict(self.config), "image_steps": self.image_steps},
                "mitigation_available": self.mitigate is not None, "max_tokens": self.model.max_tokens,
                "examples": self.examples, "colour_scale": self.colour_scale}

    def analyze(self, prompt: str) -> dict:
        t0 = time.perf_counter()
        with self._lock:
            ex = token_significance(self.model, prompt, self.config)  # position 0: seed + 0
            images = self._images(prompt) if self.image_steps else []
        return {**ex.to_json(), **self.verdict(ex.score), "images": images,
                "num_tokens": self.model.count_tokens(prompt), "max_tokens": self.model.max_tokens,
                "elapsed_s": round(time.perf_counter() - t0, 3)}

    def verdict(self, score: float) -> dict:
        """The page's decision on a score: flagged memorized at or above the threshold."""
        memorized = score >= self.threshold.value
        return {"threshold": self.threshold.value, "memorized": memorized,
                "verdict": "memorized" if memorized else "not memorized"}

    def mitigated(self, prompt: str) -> dict:
        if self.mitigate is None:
            raise NotImplementedError("mitigation is off on this server (no ExplainApp.mitigate hook; "
                                      "diffmem serve --mitigation none)")
        t0 = time.perf_counter()
        with self._lock:
            res = {"prompt": prompt, **self.mitigate(self.model, prompt, self.config)}
        if res.get("mitigated_score") is not None:  # the verdict on what the mitigated images were sampled with
            res.update(self.verdict(res["mitigated_score"]))
        return {**res, "elapsed_s": round(time.perf_counter() - t0, 3)}

    def _images(self, prompt: str) -> list[str]:
        from diffmem.sampling import sample_prompts

        cfg = page_sampling(self.config, self.image_steps)
        samples = sample_prompts(self.model, [prompt], cfg, decode=True)[0]  # same x_T as the explanation
        return [png_data_url(img) for img in samples.images]


def page_sampling(config: ExplainConfig, image_steps: int | None = 50):
    """The sampling of the page's images (and of its mitigation): the explanation's generations, seed and
    guidance over `image_steps` DDIM steps, or only up to the score window's end without images."""
    from diffmem.sampling import SamplingConfig

    return SamplingConfig(num_inference_steps=image_steps or config.num_inference_steps,
                          guidance_scale=config.guidance_scale, num_generations=config.generations, seed=config.seed,
                          track_steps=None if image_steps else config.steps[1])


def mitigation_hook(mitigation: MitigationConfig, image_steps: int | None = 50) -> Mitigate:
    """The page's "generate with mitigation": ``mitigate_unit`` on one prompt, sampled as the page's images.

    Pass the app's ``image_steps``: the images use the same DDIM steps, generations, seed (x_T) and
    guidance as ``ExplainApp._images``, so they compare one to one. With ``image_steps=None`` (no
    images) only the steps of the score window are sampled. The result holds the first-step d
    before and after (``initial_score``, ``final_score``: what embedding-opt drives to its target,
    ``target_score``: that target as a mean first-step d; ``shortfall``: a line when it was not reached)
    and ``mitigated_score``, the page's score (its window of steps) of the mitigated sampling; it is
    None when the images' schedule differs from the score's (image_steps != num_inference_steps).
    """
    from diffmem.metrics import prompt_score
    from diffmem.mitigate import mitigate_unit
    from diffmem.targets import mitigation_shortfalls, target_as_score

    def mitigate(model, prompt: str, config: ExplainConfig) -> dict:
        steps = image_steps or config.num_inference_steps
        sampling = page_sampling(config, image_steps)
        (m,) = mitigate_unit(model, [prompt], [0], mitigation, sampling, decode=bool(image_steps))  # seed + 0
        score = None  # d (G, S) is tracked along the images' schedule; the page's window lives in its own
        if steps == config.num_inference_steps:
            score = prompt_score(m.text_noise_norm.tolist(), slice(*config.steps))
        opt = mitigation.method == "embedding-opt"
        resolved = mitigation.resolved(model) if opt else mitigation
        short = mitigation_shortfalls([{"index": 0, "prompt": prompt, "iterations": m.iterations, "initial_d": m.initial_d,
                                        "final_d": m.final_d, "initial_loss": m.initial_loss, "final_loss": m.final_loss}],
                                      resolved.target_loss, resolved.target_unit, config.generations, resolved.max_iters,
                                      resolved.lr, flags=("--mitigation-max-iters", "--mitigation-lr")) if opt else []
        return {"images": [png_data_url(img) for img in m.images] if m.images is not None else [],
                "method": mitigation.method, "modified_prompt": m.modified_prompt,
                "initial_score": m.initial_d, "final_score": m.final_d, "iterations": m.iterations,
                "initial_loss": m.initial_loss, "final_loss": m.final_loss,
                "target_loss": resolved.target_loss if opt else None,
                "target_unit": resolved.target_unit if opt else None,
                # the target as a mean first-step d, the unit of the score and the threshold
                "target_score": target_as_score(resolved.target_loss, resolved.target_unit, config.generations) if opt else None,
                "shortfall": short[0].text if short else None,
                "repeat_num": mitigation.repeat_num if mitigation.method in AUGMENT_STYLES else None,
                "mitigated_score": score}

    return mitigate


class _Handler(BaseHTTPRequestHandler):
    app: ExplainApp  # set on the subclass that make_server builds
    server_version = "diffmem"

    def log_message(self, fmt, *args):  # quiet by default; the CLI turns it on
        if getattr(self.server, "verbose", False):
            super().log_message(fmt, *args)

    def _send(self, status: int, body: bytes, content_type: str) -> None:
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        self.wfile.write(body)

    def _json(self, status: int, obj: dict) -> None:
        self._send(status, json.dumps(obj).encode(), "application/json")

    def do_GET(self):
        path = self.path.split("?", 1)[0]
        if path in ("/", "/index.html"):
            page = resources.files("diffmem.web").joinpath("static/index.html").read_bytes()
            self._send(200, page, "text/html; charset=utf-8")
        elif path == "/api/info":
            self._json(200, self.app.info())
        elif path == "/favicon.ico":
            self._send(204, b"", "image/x-icon")
        else:
            self._json(404, {"error": f"no such page: {path}"})

    def do_POST(self):
        path = self.path.split("?", 1)[0]
        if path not in ("/api/analyze", "/api/mitigate"):
            return self._json(404, {"error": f"no such endpoint: {path}"})
        try:
            prompt = self._read_prompt()
        except ValueError as e:
            return self._json(400, {"error": str(e)})
        try:
            if path == "/api/analyze":
                return self._json(200, self.app.analyze(prompt))
            return self._json(200, self.app.mitigated(prompt))
        except NotImplementedError as e:
            return self._json(501, {"error": str(e)})
        except Exception as e:  # the page shows it; the server keeps running
            return self._json(500, {"error": f"{type(e).__name__}: {e}"})

    def _read_prompt(self) -> str:
        length = int(self.headers.get("Content-Length") or 0)
        if length > MAX_BODY_BYTES:
            raise ValueError(f"request body of {length} bytes; at most {MAX_BODY_BYTES}")
        try:
            body = json.loads(self.rfile.read(length) or b"{}")
        except json.JSONDecodeError as e:
            raise ValueError(f"request body is not JSON: {e.msg}") from None
        prompt = body.get("prompt") if isinstance(body, dict) else None
        if not isinstance(prompt, str) or not prompt.strip():
            raise ValueError('expected {"prompt": "<non-empty text>"}')
        if len(prompt) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt of {len(prompt)} characters; at most {MAX_PROMPT_CHARS}")
        return prompt


def make_server(app: ExplainApp, host: str = "127.0.0.1", port: int = 8765, verbose: bool = False) -> ThreadingHTTPServer:
    """A server bound to host:port (port 0: any free port; read it from ``server.server_address``)."""
    handler = type("Handler", (_Handler,), {"app": app})
    server = ThreadingHTTPServer((host, port), handler)
    server.daemon_threads = True
    server.verbose = verbose
    return server


def start_server(app: ExplainApp, host: str = "127.0.0.1", port: int = 0) -> tuple[ThreadingHTTPServer, str]:
    """Serve in a daemon thread; returns the server (call ``shutdown()``) and the page's URL."""
    server = make_server(app, host, port)
    threading.Thread(target=server.serve_forever, name="diffmem-serve", daemon=True).start()
    h, p = server.server_address[:2]
    return server, f"http://{h}:{p}/"

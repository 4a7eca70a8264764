"""Mitigation runs and their evaluation as Wen et al. (sec. 5) report it.

``run_mitigation`` writes one mitigation's images, final d, iterations and embeddings.
``run_evaluation`` sweeps mitigation settings over a set of memorized prompts and writes, under one
folder: per-prompt tables (``per_prompt.jsonl``/``.csv``), ``summary.json`` (per method and setting:
copy rate, mean similarity per metric, alignment or CLIP score, counts), image grids (training image
next to its generations) and the similarity-against-alignment trade-off figure.
"""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

from diffmem.files import jsonable, save_generations
from diffmem.mitigate import AUGMENT_STYLES, METHODS, MitigatedPrompt, MitigationConfig, calibrated_target_loss, mitigate_unit
from diffmem.provenance import provenance
from diffmem.sampling import SamplingConfig, plan_units, window_scores

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


# -- evaluation sets ------------------------------------------------------------------------------

@dataclass
class EvalPrompt:
    caption: str
    training: torch.Tensor  # (M, 3, H, W) in [0, 1]: the prompt's training image(s); M may be 0
    colour: str | None = None  # lab: the described colour and shape (alignment)
    shape: str | None = None
    key: str = ""  # where it came from (file name, ground-truth index)


@dataclass
class EvalSet:
    name: str
    prompts: list[EvalPrompt]
    lab_data: object | None = None  # diffmem.lab.data.LabData when the lab's judge applies


def _load_image(path: Path, size: int) -> torch.Tensor:
    from PIL import Image

    from diffmem.similarity import resize_center_crop

    img = np.asarray(Image.open(path).convert("RGB"), dtype=np.float32) / 255.0
    x = torch.from_numpy(img).permute(2, 0, 1)[None]
    return resize_center_crop(x, size, size)[0]  # as training sees it: shorter side to `size`, center crop


def lab_eval_set(data, name: str = "memorized", limit: int | None = None) -> EvalSet:
    """A lab prompt set with each caption's training images (none for novel / out-of-style captions)."""
    from diffmem.lab.data import render_all

    prompts = []
    for pair in data.prompt_set(name)[:limit]:
        specs = (pair.variants or [pair.spec]) if name in ("memorized", "non-memorized") else []
        prompts.append(EvalPrompt(pair.caption, torch.from_numpy(render_all(specs)), pair.spec.colour, pair.spec.shape,
                                  key=pair.kind))
    return EvalSet(f"lab:{name}", prompts, lab_data=data)


def folder_eval_set(folder: Path, size: int, limit: int | None = None) -> EvalSet:
    """The seed's layout (image + caption .txt pairs); a caption's training images are all images with it."""
    images = sorted(p for p in folder.iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise FileNotFoundError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) with caption .txt files")
    groups: dict[str, list[Path]] = {}
    for p in images:
        txt = p.with_suffix(".txt")
        if not txt.is_file():
            raise FileNotFoundError(f"{folder}: image {p.name} has no caption file {txt.name}")
        groups.setdefault(txt.read_text(encoding="utf-8").strip(), []).append(p)
    prompts = [EvalPrompt(c, torch.stack([_load_image(p, size) for p in ps]), key=ps[0].name)
               for c, ps in list(groups.items())[:limit]]
    return EvalSet(str(folder), prompts)


def ground_truth_eval_set(jsonl: Path, size: int, limit: int | None = None) -> EvalSet:
    """A .jsonl of ``caption`` and ``index`` with training images in ``gt_images/<index>/*.png`` beside it."""
    prompts = []
    for lineno, line in enumerate(jsonl.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        row = json.loads(line)
        if "caption" not in row or "index" not in row:
            raise ValueError(f"{jsonl}:{lineno}: need keys 'caption' and 'index', found {', '.join(row)}")
        folder = jsonl.parent / "gt_images" / str(row["index"])
        files = sorted(p for p in folder.glob("*") if p.suffix.lower() in IMAGE_SUFFIXES) if folder.is_dir() else []
        if not files:
            raise FileNotFoundError(f"{jsonl}:{lineno}: no ground-truth images in {folder}")
        prompts.append(EvalPrompt(row["caption"], torch.stack([_load_image(p, size) for p in files]),
                                  key=str(row["index"])))
        if limit and len(prompts) >= limit:
            break
    return EvalSet(str(jsonl), prompts)


def with_lab_judge(eval_set: EvalSet, data) -> EvalSet:
    """`eval_set` judged by the lab's copy rule and content check when every caption is one of the lab
    data's (e.g. a ``diffmem lab data`` export given as --dataset); else unchanged."""
    pairs = {p.caption: p for name in ("memorized", "non-memorized", "novel", "out-of-style")
             for p in data.prompt_set(name)}
    if not eval_set.prompts or any(p.caption not in pairs for p in eval_set.prompts):
        return eval_set
    prompts = [replace(p, colour=pairs[p.caption].spec.colour, shape=pairs[p.caption].spec.shape)
               for p in eval_set.prompts]
    return EvalSet(eval_set.name, prompts, lab_data=data)


def load_eval_set(model, dataset: str | None, limit: int | None = None) -> EvalSet:
    """--dataset: None or 'lab:<set>' (a lab model's own prompts), a pair folder, or a ground-truth .jsonl.
    On a lab model, a set whose captions are all the lab's is judged by the lab's copy rule."""
    data = model.training_data()
    if dataset is None or dataset.startswith("lab:"):
        if data is None:
            raise ValueError(f"--dataset is required: model {model.name} is not a lab model with its own memorized set")
        return lab_eval_set(data, dataset[4:] if dataset else "memorized", limit)
    path = Path(dataset)
    loaded = None
    if path.is_dir():
        loaded = folder_eval_set(path, model.image_size, limit)
    elif path.suffix == ".jsonl" and path.is_file():
        loaded = ground_truth_eval_set(path, model.image_size, limit)
    if loaded is not None:
        return loaded if data is None else with_lab_judge(loaded, data)
    raise FileNotFoundError(f"--dataset {dataset}: expected a folder of image + .txt pairs, a ground-truth .jsonl "
                            "(caption, index; gt_images/<index>/*.png beside it), or lab:<set>")


# -- sweep ----------------------------------------------------------------------------------------

@dataclass
class EvaluateConfig:
    methods: tuple[str, ...] = ("none", "embedding-opt", "rand_word_add")
    target_losses: tuple[float | None, ...] = (None,)  # embedding-opt sweep; None: the model's default target
    repeat_nums: tuple[int, ...] = (4,)  # augmentation sweep (4 at inference; the paper sweeps 1-8)
    mitigation: MitigationConfig = field(default_factory=MitigationConfig)  # lr, max_iters of embedding-opt
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    sscd: str | None = None  # TorchScript checkpoint path
    clip: str | None = None  # transformers CLIP folder
    copy_threshold: float | None = None  # similarity above it (below, for a distance) is a copy
    copy_metric: str | None = None  # default: sscd when given, else pixel_cosine
    grid_prompts: int = 12  # prompts shown per grid image
    save_images: bool = False


def settings_of(config: EvaluateConfig) -> list[MitigationConfig]:
    """Every setting of the sweep (augmentations draw with the sampling seed)."""
    out = []
    base = replace(config.mitigation, seed=config.sampling.seed)
    for method in config.methods:
        if method not in METHODS:
            raise ValueError(f"--mitigation {method!r}: expected one of {', '.join(METHODS)}")
        if method == "none":
            out.append(replace(base, method="none"))
        elif method == "embedding-opt":
            out += [replace(base, method=method, target_loss=None if v is None else float(v))
                    for v in config.target_losses]
        else:
            out += [replace(base, method=method, repeat_num=int(v)) for v in config.repeat_nums]
    return out


def setting_key(m: MitigationConfig) -> str:
    if m.method == "embedding-opt":
        return f"target_loss={m.target_loss:g}"
    if m.method in AUGMENT_STYLES:
        return f"repeat_num={m.repeat_num}"
    return "default"


def setting_value(m: MitigationConfig) -> float | None:
    return m.target_loss if m.method == "embedding-opt" else m.repeat_num if m.method in AUGMENT_STYLES else None


def calibrate_target_loss(model, reference_prompts: list[str], sampling: SamplingConfig,
                          percentiles=(50, 75, 90, 95)) -> dict[float, float]:
    """Target losses for embedding-opt from non-memorized prompts' first-step d: {percentile: value}.

    Memorized prompts whose first-step d is brought down to where ordinary prompts sit; a target
    above the memorized prompts' own d stops the optimizer at once (the prototype finding)."""
    d = window_scores(model, reference_prompts, replace(sampling, track_steps=1))
    return {float(p): float(np.percentile(d, p)) for p in percentiles}


class Judge:
    """All per-generation measurements of one evaluation set, set up once."""

    def __init__(self, model, eval_set: EvalSet, config: EvaluateConfig):
        from diffmem import similarity

        self.config, self.eval_set = config, eval_set
        self.sscd = similarity.SSCD(config.sscd, model.device) if config.sscd else None
        self.clip = similarity.CLIPScorer(config.clip, model.device) if config.clip else None
        self.metrics = {"tiled_l2": similarity.tiled_l2, "pixel_cosine": similarity.pixel_cosine}
        if self.sscd is not None:
            self.metrics = {"sscd": self.sscd.similarity, **self.metrics}
        self.copy_metric = config.copy_metric or ("sscd" if self.sscd else "pixel_cosine")
        if self.copy_metric not in self.metrics:
            raise ValueError(f"--copy-metric {self.copy_metric}: expected one of {', '.join(self.metrics)}")
        self.lab_train = self.lab_threshold = None
        if eval_set.lab_data is not None:
            from diffmem.lab.judge import TrainingImages, copy_threshold

            self.lab_train = TrainingImages.of(eval_set.lab_data)
            self.lab_threshold = copy_threshold(eval_set.lab_data, self.lab_train)

    def row(self, prompt: EvalPrompt, result: MitigatedPrompt, setting: MitigationConfig) -> dict:
        images = result.images  # (G, 3, H, W)
        row = {"method": setting.method, "setting": setting_key(setting), "value": setting_value(setting),
               "position": result.position, "prompt": prompt.caption, "modified_prompt": result.modified_prompt,
               "source": prompt.key, "num_generations": len(images), "initial_d": result.initial_d,
               "final_d": result.final_d, "iterations": result.iterations}
        best = {}
        if len(prompt.training):
            for name, fn in self.metrics.items():
                r = fn(images, prompt.training)
                row[name] = r.summary()
                best[name] = r
        if self.config.copy_threshold is not None and self.copy_metric in best:
            r = best[self.copy_metric]
            copies = r.best > self.config.copy_threshold if r.higher_is_better else r.best < self.config.copy_threshold
            row["copies_by_threshold"] = int(copies.sum())
        if self.lab_train is not None:
            from diffmem.lab.judge import content_correct, judge_copies

            arr = images.numpy()
            row["copies"] = int(judge_copies(arr, [prompt.caption] * len(arr), self.lab_train, self.lab_threshold).is_copy.sum())
            row["aligned"] = int(content_correct(arr, [prompt.colour] * len(arr), [prompt.shape] * len(arr)).sum())
        elif "copies_by_threshold" in row:
            row["copies"] = row["copies_by_threshold"]
        if self.clip is not None:
            row["clip_score"] = float(self.clip.score(images, [prompt.caption] * len(images)).mean())
        return row


def summarize(rows: list[dict]) -> dict:
    """Per method and setting: copy rate, mean similarity per metric, alignment / CLIP score, counts."""
    out: dict[str, dict] = {}
    for (method, key) in dict.fromkeys((r["method"], r["setting"]) for r in rows):
        rs = [r for r in rows if r["method"] == method and r["setting"] == key]
        n_gen = sum(r["num_generations"] for r in rs)
        s = {"value": rs[0]["value"], "num_prompts": len(rs), "num_generations": n_gen,
             "copy_rate": sum(r["copies"] for r in rs) / n_gen if "copies" in rs[0] else None,
             "similarity_mean": {m: float(np.mean([r[m]["mean"] for r in rs if m in r]))
                                 for m in ("sscd", "tiled_l2", "pixel_cosine") if any(m in r for r in rs)},
             "final_d_mean": float(np.mean([r["final_d"] for r in rs])),
             "initial_d_mean": float(np.mean([r["initial_d"] for r in rs])),
             "iterations_mean": float(np.mean([r["iterations"] for r in rs]))}
        if method == "embedding-opt":  # prompts already at the target: their embedding is unchanged
            s["fraction_at_target_at_once"] = float(np.mean([r["iterations"] == 0 for r in rs]))
        if "aligned" in rs[0]:
            s["alignment_mean"] = sum(r["aligned"] for r in rs) / n_gen
        if "clip_score" in rs[0]:
            s["clip_score_mean"] = float(np.mean([r["clip_score"] for r in rs]))
        if "copies_by_threshold" in rs[0]:
            s["copy_rate_by_threshold"] = sum(r["copies_by_threshold"] for r in rs) / n_gen
        out.setdefault(method, {})[key] = s
    return out


def best_under_copy_rate(results: dict, max_copy_rate: float = 0.05) -> dict:
    """Per method, the setting with the best alignment (lab) or CLIP score among those whose copy rate
    is <= `max_copy_rate`: the comparison "at the same copy rate" of Wen et al.'s trade-off figure."""
    out = {}
    for method, settings in results.items():
        ok = [(k, s) for k, s in settings.items() if s.get("copy_rate") is not None and s["copy_rate"] <= max_copy_rate]
        key = "alignment_mean" if any("alignment_mean" in s for _, s in ok) else "clip_score_mean"
        ok = [(k, s) for k, s in ok if key in s]
        if ok:
            k, s = max(ok, key=lambda ks: ks[1][key])
            out[method] = {"setting": k, "copy_rate": s["copy_rate"], key: s[key]}
    return {"max_copy_rate": max_copy_rate, "methods": out}


def run_evaluation(model, eval_set: EvalSet, config: EvaluateConfig, out: str | Path, progress: bool = True) -> dict:
    """Sample every mitigation setting on `eval_set`, judge the generations, write everything to `out`."""
    from tqdm.auto import tqdm

    from diffmem.reports.plots import comparison_grid, tradeoff_figure

    # 1. Inputs and output folder.
    out = Path(out)
    (out / "grids").mkdir(parents=True, exist_ok=True)
    settings = settings_of(config)
    # one calibrated target for every embedding-opt setting without its own (None when nothing needs one)
    target = next((t for t in (calibrated_target_loss(model, m, config.sampling) for m in settings) if t is not None),
                  None)
    settings = [m.resolved(model, target) for m in settings]
    judge = Judge(model, eval_set, config)
    prompts = [p.caption for p in eval_set.prompts]
    units = plan_units(list(range(len(prompts))), config.sampling.num_generations, config.sampling.batch_size)
    rows: list[dict] = []
    bar = tqdm(total=len(settings) * len(prompts), desc="evaluate", unit="prompt", disable=not progress)
    # 2. Each setting: mitigate and sample unit by unit, judge each prompt's generations.
    for setting in settings:
        results: list[MitigatedPrompt] = []
        for unit in units:
            results += mitigate_unit(model, [prompts[p] for p in unit], unit, setting, config.sampling)
            bar.update(len(unit))
        rows += [judge.row(eval_set.prompts[r.position], r, setting) for r in results]
        name = f"{setting.method}_{setting_key(setting)}"
        comparison_grid([eval_set.prompts[r.position].training[:1] for r in results[:config.grid_prompts]],
                        [r.images for r in results[:config.grid_prompts]], out / "grids" / f"{name}.png")
        if config.save_images:
            for r in results:
                save_generations(out / "images" / name, r.position, r.images)
    bar.close()
    # 3. Tables, summary and the trade-off figure.
    summary = {"provenance": provenance(model, dataset=eval_set.name, num_prompts=len(prompts),
                                        config=jsonable(asdict(config)), calibrated_target_loss=target),
               "copy_rule": "lab judge (nearest training image is the prompt's own, RMSE under the lab threshold)"
               if judge.lab_train is not None else (f"{judge.copy_metric} beyond {config.copy_threshold}"
                                                    if config.copy_threshold is not None else None),
               "lab_copy_threshold_rmse": judge.lab_threshold,
               "results": summarize(rows)}
    summary["best_at_copy_rate_5pct"] = best_under_copy_rate(summary["results"], 0.05)
    (out / "per_prompt.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    _write_csv(out / "per_prompt.csv", rows)
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    x_key = "alignment_mean" if judge.lab_train is not None else "clip_score_mean" if judge.clip else None
    tradeoff_figure(summary["results"], out / "tradeoff.png", x_key=x_key,
                    similarity_metric="sscd" if judge.sscd else "pixel_cosine")
    return summary
def _write_csv(path: Path, rows: list[dict]) -> None:
    import csv

    flat = []
    for r in rows:
        f = {}
        for k, v in r.items():
            if isinstance(v, dict):
                f.update({f"{k}_{kk}": vv for kk, vv in v.items()})
            else:
                f[k] = v
        flat.append(f)
    fields = list(dict.fromkeys(k for f in flat for k in f))
    with open(path, "w", newline="", encoding="utf-8") as fh:
        w = csv.DictWriter(fh, fieldnames=fields)
        w.writeheader()
        w.writerows(flat)


# -- one mitigation, as `diffmem mitigate` runs it ------------------------------------------------

def run_mitigation(model, prompts: list[str], config: MitigationConfig, sampling: SamplingConfig, out: str | Path,
                   progress: bool = True) -> Path:
    """Mitigate and sample `prompts`; write images, ``results.jsonl`` (final d, iterations, modified
    prompt) and ``embeddings.safetensors`` (the conditional embedding each prompt was sampled with)."""
    from safetensors.torch import save_file
    from tqdm.auto import tqdm

    out = Path(out)
    if (out / "results.jsonl").exists():
        raise FileExistsError(f"{out}/results.jsonl exists; choose another --out")
    out.mkdir(parents=True, exist_ok=True)
    config = config.resolved(model, calibrated_target_loss(model, config, sampling))
    units = plan_units(list(range(len(prompts))), sampling.num_generations, sampling.batch_size)
    results: list[MitigatedPrompt] = []
    bar = tqdm(total=len(prompts), desc=f"mitigate ({config.method})", unit="prompt", disable=not progress)
    for unit in units:
        results += mitigate_unit(model, [prompts[p] for p in unit], unit, config, sampling)
        bar.update(len(unit))
    bar.close()
    for r in results:
        save_generations(out / "images", r.position, r.images)
    save_file({f"prompt_{r.position:05d}": r.embedding.float().contiguous() for r in results},
              str(out / "embeddings.safetensors"))
    rows = [{"position": r.position, "seed": sampling.seed + r.position, "prompt": r.prompt,
             "modified_prompt": r.modified_prompt, "method": config.method, "initial_d": r.initial_d,
             "final_d": r.final_d, "iterations": r.iterations, "embedding": f"prompt_{r.position:05d}",
             "images": [f"images/{r.position:05d}_{g}.png" for g in range(len(r.images))]} for r in results]
    (out / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (out / "meta.json").write_text(json.dumps(provenance(model, mitigation=asdict(config),
                                                         sampling=asdict(sampling)), indent=2))
    return out


# -- training-time statistics (hard-threshold calibration, non-memorized loss) -------------------

@torch.no_grad()
def training_step_stats(model, images: torch.Tensor, captions: list[str], seed: int = 0,
                        batch_size: int = 64) -> dict[str, np.ndarray]:
    """What the trainer sees for each pair at one uniformly drawn timestep: d (the hard-threshold
    filter's quantity, Wen et al. 5.2) and the denoising loss, with seeded noise and timesteps.

    images (N, 3, H, W) in [0, 1]. Returns {"d": (N,), "loss": (N,), "t": (N,)}.
    """
    from diffmem.metrics import text_noise_norm

    noise_scheduler = model.training_scheduler()
    gen = torch.Generator().manual_seed(seed)
    empty = model.empty_conditioning()
    out = {"d": [], "loss": [], "t": []}
    for i in range(0, len(images), batch_size):
        x = model.encode_images(images[i:i + batch_size].to(model.device, model.dtype) * 2 - 1).float()
        noise = torch.randn(x.shape, generator=gen).to(x.device)
        t = torch.randint(0, noise_scheduler.config.num_train_timesteps, (len(x),), generator=gen).to(x.device)
        noisy = noise_scheduler.add_noise(x, noise, t).to(model.dtype)
        cond = model.encode_prompts(captions[i:i + batch_size])
        out_c = model.model_output(noisy, t, cond).float()
        eps_c = model.output_to_noise(out_c, noisy.float(), t)
        eps_u = model.predict_noise(noisy, t, empty.expand(len(x))).float()
        out["d"].append(text_noise_norm(eps_c, eps_u).cpu())
        target = model.training_target(x, noise, t).float()
        out["loss"].append((out_c - target).pow(2).flatten(1).mean(1).cpu())
        out["t"].append(t.cpu())
    return {k: torch.cat(v).double().numpy() for k, v in out.items()}


def calibrate_hard_threshold(stats: dict[str, np.ndarray], num_bands: int = 10,
                             percentile: float | Sequence[float] = 99.0,
                             num_train_timesteps: int = 1000) -> tuple[float, ...]:
    """One hard threshold per band of timesteps (low noise first, as ``TrainConfig.hard_threshold``
    takes them): the `percentile` of d among ordinary (non-memorized) samples whose t is in the band;
    `percentile` is one number for every band or one per band.

    `stats` is ``training_step_stats`` of non-memorized pairs. d depends strongly on t (on the lab
    it is ~10x larger at mid noise than at high noise), so a single number mostly filters by timestep.
    """
    from diffmem.train import timestep_band

    per_band = [float(percentile)] * num_bands if np.isscalar(percentile) else [float(q) for q in percentile]
    if len(per_band) != num_bands or not all(0 <= q <= 100 for q in per_band):
        raise ValueError(f"percentile {percentile!r}: give one number in [0, 100], or {num_bands} (one per band)")
    band = timestep_band(stats["t"].astype(np.int64), num_bands, num_train_timesteps)
    out = []
    for k in range(num_bands):
        d = stats["d"][band == k]
        if len(d) < 10:
            raise ValueError(f"only {len(d)} samples with t in band {k} of {num_bands}: use more pairs or fewer bands")
        out.append(float(np.percentile(d, per_band[k])))
    return tuple(out)

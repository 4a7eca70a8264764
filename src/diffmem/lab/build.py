"""Build the memorization lab: generate its data and train its model with the seed's recipe."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path

import torch

from diffmem.adapters.lab import (DENOISERS, FLOW_SCHEDULE, LabModelConfig, lab_model_class, load_lab_denoiser,
                                  new_lab_denoiser, new_lab_scheduler)
from diffmem.lab.data import BLOCKLIST_VERSION, LabData, LabDataConfig, make_lab_data, render_all
from diffmem.lab import WEIGHTS_DIR  # noqa: F401  (re-exported: the shipped default lab model)
from diffmem.train import ImagePairs, TrainConfig, complete_checkpoints, memorization_mix, train


@dataclass(frozen=True)
class AnnealStage:
    """Training after the main run: from its (EMA) weights, with a fresh optimizer and a cosine decay."""
    max_train_steps: int
    learning_rate: float
    lr_warmup_steps: int = 50


@dataclass
class LabBuildConfig:
    data: LabDataConfig = field(default_factory=LabDataConfig)
    model: LabModelConfig = field(default_factory=LabModelConfig)
    repeats: int = 280  # two-tone data: 36 memorized images x 280 = 10,080; x3 non-memorized = 30,240
    non_mem_ratio: float = 3.0  # the seed's --non_mem_ratio=3
    max_train_steps: int = 9000  # ~90 min on one CPU thread at batch 32
    train_batch_size: int = 32
    learning_rate: float = 1.5e-3  # 2e-3 without warm-up diverged at step ~1,230 (loss jumped to 1.0)
    lr_scheduler: str = "constant_with_warmup"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 300
    adam_beta2: float = 0.99  # faster second-moment tracking: fewer late loss spikes
    use_ema: bool = True
    checkpointing_steps: int = 1000
    seed: int = 0
    # stages run after the main one, each from the previous one's weights (see build_lab)
    anneal: tuple[AnnealStage, ...] = ()
    # training-time mitigation (Wen et al. 5.2) and its baseline; None / None for the lab itself
    hard_threshold: float | tuple[float, ...] | None = None
    prompt_aug_style: str | None = None
    repeat_num: int = 1


def _cells_recipe(noise_schedule: str, guidance_scale: float, block_offensive_words: int = 0,
                  denoiser: str = "unet") -> LabBuildConfig:
    """The cell-background lab's recipe (README "Build") under one of the lab's noise schedules;
    `guidance_scale` is the model's default (it does not change training); `block_offensive_words`:
    the version of the title blocklist (0: none, as for the models built before it)."""
    return LabBuildConfig(
        data=LabDataConfig(num_template=2, template_variants=3, background_cells=4,
                           block_offensive_words=block_offensive_words),
        model=LabModelConfig(noise_schedule=noise_schedule, default_guidance_scale=guidance_scale, denoiser=denoiser),
        repeats=385, max_train_steps=8000, lr_scheduler="cosine",
        anneal=(AnnealStage(2000, 5e-4), AnnealStage(3000, 3e-4)),
    )


PRESETS = {
    # The shipped model: a 4x4-cell background (a pattern identifies its image), 22 memorized captions
    # (20 exact, 2 templates x 3 images) repeated 385 times, 8,000 steps with lr 1.5e-3 decayed by a
    # cosine, then 2,000 steps from 5e-4 and 3,000 from 3e-4, Stable Diffusion's scaled-linear betas,
    # sampled at guidance 1.25 (README "Build" and "Choosing the default guidance"); title words of
    # the blocklist's newest version left out.
    "default": _cells_recipe("scaled_linear", 1.25, BLOCKLIST_VERSION),
    # The shipped model until 2026-12-06: the same recipe, its titles drawn before the blocklist
    # existed (docs/history.md).
    "cells-unblocked": _cells_recipe("scaled_linear", 1.25),
    # The shipped model until 2026-11-29: the same recipe with DDPM's linear betas, guidance 2.0.
    # Its first-step detection misses the bar (TPR@1%FPR 0.68-0.77; README "History").
    "cells-linear": _cells_recipe("linear", 2.0),
    # The first shipped model (until 2026-11-28): a two-tone background, constant lr. Detects well at
    # the first step but reproduces no training image under the copy rule (README "History").
    "two-tone": LabBuildConfig(),
    # A base model for the seed's training-time experiment: the cell-background data with the first
    # title blocklist (its build predates the second), without duplicated pairs, 7,000 steps at lr 1.5e-3 with a cosine decay, one stage
    # (about an hour on one thread). The memorized pairs exist in its data and are never trained on:
    # `diffmem train` fine-tunes it on them (docs/mitigation.md "At training").
    "base": LabBuildConfig(
        data=LabDataConfig(num_template=2, template_variants=3, background_cells=4, block_offensive_words=1),
        model=LabModelConfig(noise_schedule="scaled_linear", default_guidance_scale=1.25),
        repeats=0, max_train_steps=7000, lr_scheduler="cosine",
    ),
    # The flow lab: the shipped recipe and data (blocklist included) with an MMDiT (diffusers'
    # SD3Transformer2DModel, 6 joint blocks of width 128) trained on the rectified-flow objective,
    # sampled with FlowMatch Euler (docs/lab.md, "Rebuilding the lab").
    "flow": _cells_recipe(FLOW_SCHEDULE, 1.25, BLOCKLIST_VERSION, denoiser="sd3-transformer"),
    # Small enough for the test suite (a few minutes on 2 cores), still copies its memorized pairs.
    "fast": LabBuildConfig(
        data=LabDataConfig(num_memorized=2, num_template=0, num_non_memorized=300, num_novel=32,
                           num_out_of_style=16, num_title_words=400),
        repeats=150, max_train_steps=800, train_batch_size=16, lr_warmup_steps=100, checkpointing_steps=0,
    ),
}


def lab_training_sets(data: LabData, image_size: int = 16) -> tuple[ImagePairs, ImagePairs]:
    """(memorized, non-memorized) training pairs; a template caption contributes all its variants."""
    mem_caps, mem_specs = [], []
    for pair in data.memorized:
        for spec in pair.variants or [pair.spec]:
            mem_caps.append(pair.caption)
            mem_specs.append(spec)
    non = data.non_memorized
    return (ImagePairs(render_all(mem_specs, image_size), mem_caps),
            ImagePairs(render_all([p.spec for p in non], image_size), [p.caption for p in non]))


def build_lab(out: str | Path, config: LabBuildConfig = PRESETS["default"], resume: bool = False,
              num_threads: int | None = None, progress: bool = True, init_from: str | Path | None = None,
              resume_from: str | Path | None = None) -> Path:
    """Generate the lab data, train the lab model from scratch (or continue from the weights of the
    lab model folder `init_from`, with a fresh optimizer), write a lab model folder to `out`.

    `resume_from`: a checkpoint folder of another build with the same recipe; training continues from
    its step, optimizer and schedule into `out` (to branch a run, e.g. switch the filter on at step 2000).
    With ``config.anneal`` stages, the main run goes to ``out/stages/0`` and stage i to ``out/stages/i``
    (each from the previous one's weights); the last one's model is copied to `out`. A finished stage
    (its lab_model.json written) is not run again.
    """
    if not config.anneal:
        return _train_lab(out, config, resume, num_threads, progress, init_from, resume_from)
    import shutil
    out = Path(out)
    stages = [config] + [replace(config, max_train_steps=a.max_train_steps, learning_rate=a.learning_rate,
                                 lr_scheduler="cosine", lr_warmup_steps=a.lr_warmup_steps) for a in config.anneal]
    previous = init_from
    for i, stage in enumerate(stages):
        folder = out / "stages" / str(i)
        if not (folder / "lab_model.json").is_file():
            _train_lab(folder, replace(stage, anneal=()), resume or i > 0, num_threads, progress, previous,
                       resume_from if i == 0 else None)
        previous = folder
    for part in (DENOISERS[config.model.denoiser][1], "scheduler"):
        if (out / part).is_dir():
            shutil.rmtree(out / part)
        shutil.copytree(Path(previous) / part, out / part)
    meta = json.loads((Path(previous) / "lab_model.json").read_text())
    meta["build"] = _build_meta(config)  # the whole recipe, not the last stage's
    (out / "lab_model.json").write_text(json.dumps(meta, indent=2))
    return out


def _build_meta(config: LabBuildConfig) -> dict:
    return {k: v for k, v in asdict(config).items() if k not in ("data", "model")}


def _train_lab(out, config: LabBuildConfig, resume: bool, num_threads, progress: bool, init_from, resume_from) -> Path:
    if num_threads:
        torch.set_num_threads(num_threads)
    torch.manual_seed(config.seed)
    data = make_lab_data(config.data)
    mem, non_mem = lab_training_sets(data, config.model.image_size)
    dataset = memorization_mix(mem, non_mem, end=None, repeats=config.repeats, non_mem_ratio=config.non_mem_ratio)
    unet = new_lab_denoiser(config.model)
    if init_from is not None:
        unet.load_state_dict(load_lab_denoiser(Path(init_from) / DENOISERS[config.model.denoiser][1]).float().state_dict())
    model = lab_model_class(config.model)(unet, new_lab_scheduler(config.model.noise_schedule), config.model)
    model.extra_meta = {"data": asdict(config.data), "build": _build_meta(config)}
    train_config = TrainConfig(
        output_dir=str(out), max_train_steps=config.max_train_steps, train_batch_size=config.train_batch_size,
        learning_rate=config.learning_rate, lr_scheduler=config.lr_scheduler,
        lr_warmup_steps=config.lr_warmup_steps, adam_beta2=config.adam_beta2, use_ema=config.use_ema, ema_decay=0.999, caption_dropout=config.model.caption_dropout,
        checkpointing_steps=config.checkpointing_steps, checkpoints_total_limit=0, seed=config.seed,
        resume_from_checkpoint=("latest" if resume and complete_checkpoints(Path(out))
                                else str(resume_from) if resume_from else None),
        hard_threshold=config.hard_threshold, prompt_aug_style=config.prompt_aug_style, repeat_num=config.repeat_num,
    )
    return train(model, dataset, train_config, progress=progress)


def lab_data_for(model) -> LabData:
    """The lab data a lab model was trained on; a clear error for any other model."""
    data = model.training_data()
    if data is None:
        raise ValueError(f"model {model.name} carries no lab data config: is it a lab model?")
    return data

"""Fine-tuning with the memorization-inducing mix of the seed (Wen et al. sec. 5.2) and its mitigations.

The data recipe: the first ``end`` memorized pairs, each repeated ``repeats`` times, mixed with
``non_mem_ratio`` times as many non-memorized pairs. Training-time mitigation: samples whose
text-conditional noise norm d is at or above ``hard_threshold`` are left out of the loss.
"""

from __future__ import annotations

import json
import os
import random
import re
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F

from diffmem.faults import fault_point
from diffmem.files import image_caption_pairs, one_writer, open_rgb_image, write_json
from diffmem.metrics import text_noise_norm
from diffmem.model import Conditioning


@dataclass
class TrainConfig:
    output_dir: str
    max_train_steps: int = 1000
    train_batch_size: int = 8  # per process (the seed's fine-tuning recipe on Stable Diffusion)
    learning_rate: float = 1e-5  # the seed's, for a pretrained SD UNet
    lr_scheduler: str = "constant"  # any name diffusers.optimization.get_scheduler knows
    lr_warmup_steps: int = 0
    adam_weight_decay: float = 1e-2
    adam_beta2: float = 0.999
    gradient_accumulation_steps: int = 1
    max_grad_norm: float = 1.0
    use_ema: bool = False
    ema_decay: float = 0.9999  # diffusers' EMAModel default (the seed's); the lab build uses 0.999
    mixed_precision: str = "no"  # "no" | "fp16" | "bf16"
    gradient_checkpointing: bool = False
    checkpointing_steps: int = 0  # 0: only at the end
    checkpoints_total_limit: int = 2
    resume_from_checkpoint: str | None = None  # a checkpoint folder or "latest"
    caption_dropout: float = 0.0  # probability of training on the empty caption (classifier-free guidance)
    seed: int = 0
    # drop samples with d >= this from the loss (Wen et al. 5.2): one number, or one per band of timesteps
    # (K numbers: band k holds t in [k*T/K, (k+1)*T/K), T the scheduler's training timesteps)
    hard_threshold: float | tuple[float, ...] | None = None
    # the pair-level rule (with hard_threshold): a pair (all repeats of one image-caption pair) is left
    # out for good once d exceeded the threshold in at least this share of its first >= min_draws draws
    pair_filter_share: float | None = None
    pair_filter_min_draws: int = 10
    # IET-AGC's anti-gradient control (Liu et al., ECCV 2024): leave out samples whose loss x agc_ratio is
    # under the running mean of the losses at their timestep (an EMA with decay agc_ema_decay, from 0)
    agc_ratio: float | None = None  # the official mem_ratio: 1.25 in its README
    agc_ema_decay: float = 0.8
    # IET's iterative ensemble (Liu et al., ECCV 2024): the pairs dealt into this many shards, one copy of the
    # denoiser trained per shard, the copies' weights averaged after each of ensemble_rounds rounds (FedAvg).
    # max_train_steps counts the optimizer steps of all copies and rounds together (each copy takes
    # max_train_steps / (shards x rounds) per round), so the run costs what a plain run of that length does.
    ensemble_shards: int | None = None  # 4 in its README (its code's default 2)
    ensemble_rounds: int = 25  # its README's (its code's default 5)
    prompt_aug_style: str | None = None  # e.g. "rand-word-add" (training baseline); see augment_prompt
    repeat_num: int = 1
    prompt_aug_prob: float = 1.0  # share of samples augmented (the seed: all; Somepalli et al.: 0.1)
    embedding_noise: float = 0.0  # Gaussian noise of this std added to the caption embeddings (Somepalli et al.)
    caption_per_line: bool = False  # a caption text of several lines holds several captions: one drawn per use
    # the seed's (diffusers' train_text_to_image.py) loss options
    snr_gamma: float | None = None  # min-SNR loss weighting (Hang et al. 2023); 5.0 is the usual value
    noise_offset: float = 0.0  # offset noise: + noise_offset * N(0, 1) of shape (B, C, 1, 1)
    input_perturbation: float = 0.0  # x_t from noise + input_perturbation * N(0, 1); target keeps the plain noise
    # validation: images of these prompts saved every `validation_epochs` epochs, under validation/
    validation_prompts: tuple[str, ...] = ()
    validation_epochs: int = 1
    validation_inference_steps: int = 50
    log_every: int = 10
    num_threads: int | None = None  # torch threads per process; 1 when several run on one CPU
    # a LoRA adapter of this rank on the denoiser's attention projections instead of the whole denoiser
    # (diffusers' LoRA scripts: alpha = rank, Gaussian init); written as a file --lora and diffusers read
    lora_rank: int | None = None

    def __post_init__(self):
        from diffmem.mitigations.augment import TRAIN_AUGMENT_STYLES

        if self.prompt_aug_style is not None:
            from diffmem.mitigations import canonical_name

            self.prompt_aug_style = canonical_name(self.prompt_aug_style)  # rand_word_add, the original spelling, too
        if self.prompt_aug_style is not None and self.prompt_aug_style not in TRAIN_AUGMENT_STYLES:
            raise ValueError(f"--prompt-aug-style {self.prompt_aug_style!r}: expected one of "
                             f"{', '.join(TRAIN_AUGMENT_STYLES)}")
        if not 0 <= self.prompt_aug_prob <= 1:
            raise ValueError(f"--prompt-aug-prob {self.prompt_aug_prob}: must be between 0 and 1")
        if self.embedding_noise < 0:
            raise ValueError(f"--embedding-noise {self.embedding_noise}: must be >= 0")
        if self.pair_filter_share is not None:
            if not 0 < self.pair_filter_share <= 1:
                raise ValueError(f"--pair-filter-share {self.pair_filter_share}: must be in (0, 1]")
            if self.hard_threshold is None:
                raise ValueError("--pair-filter-share needs --hard-threshold (the d that counts as exceeded)")
        if self.lora_rank is not None and self.lora_rank < 1:
            raise ValueError(f"--lora-rank {self.lora_rank}: must be >= 1")
        if self.agc_ratio is not None and not self.agc_ratio > 0:
            raise ValueError(f"--agc-ratio {self.agc_ratio}: must be > 0 (1.25 is IET-AGC's)")
        if not 0 <= self.agc_ema_decay < 1:
            raise ValueError(f"--agc-ema-decay {self.agc_ema_decay}: must be in [0, 1)")
        if self.pair_filter_min_draws < 1:
            raise ValueError(f"--pair-filter-min-draws {self.pair_filter_min_draws}: must be >= 1")
        if self.ensemble_shards is not None:
            K, R = self.ensemble_shards, self.ensemble_rounds
            if K < 2 or R < 1:
                raise ValueError(f"--ensemble-shards {K} --ensemble-rounds {R}: need at least 2 shards and 1 round")
            if self.max_train_steps % (K * R):
                raise ValueError(f"--max-train-steps {self.max_train_steps}: an ensemble of {K} shards x {R} rounds "
                                 f"needs a multiple of {K * R} (each copy trains max_train_steps / {K * R} per round)")
            if self.checkpointing_steps or self.resume_from_checkpoint:
                raise ValueError("--checkpointing-steps / --resume-from-checkpoint: an ensemble run (--ensemble-shards) "
                                 "is not checkpointed; give --checkpointing-steps 0")


# -- data ----------------------------------------------------------------------------------------

class ImagePairs(torch.utils.data.Dataset):
    """Image-caption pairs in memory: images (N, 3, H, W) float in [0, 1], captions list of N."""

    def __init__(self, images, captions: list[str]):
        self.images = torch.as_tensor(np.asarray(images), dtype=torch.float32)
        self.captions = list(captions)
        if len(self.images) != len(self.captions):
            raise ValueError(f"{len(self.images)} images but {len(self.captions)} captions")

    def __len__(self):
        return len(self.captions)

    def __getitem__(self, i):
        return self.images[i], self.captions[i]


class FolderPairs(torch.utils.data.Dataset):
    """The seed's layout: ``00000001.jpg`` + ``00000001.txt`` pairs in one folder, sorted by name."""

    def __init__(self, folder, resolution: int, center_crop: bool = True, random_flip: bool = False):
        pairs = image_caption_pairs(Path(folder))  # checks the layout; images are read (and checked) when used
        self.images = [p for p, _ in pairs]
        self.captions = [c for _, c in pairs]
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self):
        return len(self.images)

    def __getitem__(self, i):
        img = open_rgb_image(self.images[i])
        return _to_tensor(img, self.resolution, self.center_crop, self.random_flip), self.captions[i]


class HFDatasetPairs(FolderPairs):
    """A local Hugging Face dataset (``save_to_disk`` folder) with an image and a text column."""

    def __init__(self, path, resolution: int, center_crop=True, random_flip=False, image_key="image",
                 caption_key="text"):
        import datasets

        ds = datasets.load_from_disk(str(path))
        if isinstance(ds, datasets.DatasetDict):
            ds = ds["train"] if "train" in ds else ds[next(iter(ds))]
        for key in (image_key, caption_key):
            if key not in ds.column_names:
                raise KeyError(f"dataset {path}: no column {key!r}; columns are {ds.column_names}")
        self.ds, self.image_key = ds, image_key
        self.captions = list(ds[caption_key])
        self.resolution, self.center_crop, self.random_flip = resolution, center_crop, random_flip

    def __len__(self):
        return len(self.ds)

    def __getitem__(self, i):
        img = self.ds[i][self.image_key].convert("RGB")
        return _to_tensor(img, self.resolution, self.center_crop, self.random_flip), self.captions[i]


def _to_tensor(img, resolution: int, center_crop: bool, random_flip: bool) -> torch.Tensor:
    from PIL import Image

    w, h = img.size
    scale = resolution / min(w, h)
    # bilinear, as the seed's torchvision Resize(resolution, BILINEAR) on a PIL image
    img = img.resize((max(resolution, round(w * scale)), max(resolution, round(h * scale))), Image.BILINEAR)
    w, h = img.size
    if center_crop:
        left, top = (w - resolution) // 2, (h - resolution) // 2
    else:
        left, top = random.randint(0, w - resolution), random.randint(0, h - resolution)
    img = img.crop((left, top, left + resolution, top + resolution))
    x = torch.from_numpy(np.asarray(img, dtype=np.float32) / 255.0).permute(2, 0, 1)
    return x.flip(-1) if random_flip and random.random() < 0.5 else x


def open_pairs(path, resolution: int, center_crop=True, random_flip=False) -> torch.utils.data.Dataset:
    """A training data source: a folder of image + .txt pairs, or a local HF dataset folder."""
    path = Path(path)
    if (path / "dataset_info.json").exists() or (path / "dataset_dict.json").exists():
        return HFDatasetPairs(path, resolution, center_crop, random_flip)
    return FolderPairs(path, resolution, center_crop, random_flip)


def memorization_mix(memorized, non_memorized, end: int | None, repeats: int, non_mem_ratio: float):
    """The seed's recipe: pairs [0, end) of `memorized` repeated `repeats` times plus
    ``non_mem_ratio * that many`` pairs of `non_memorized` (cycled if it is shorter); without
    memorized pairs (or with ``repeats=0``), every non-memorized pair once."""
    parts = []
    if memorized is not None and len(memorized) and repeats > 0:
        mem = torch.utils.data.Subset(memorized, range(min(end or len(memorized), len(memorized))))
        parts += [mem] * repeats
        n_non = int(round(non_mem_ratio * len(mem) * repeats))
    else:
        n_non = len(non_memorized) if non_memorized is not None else 0
    if non_memorized is not None and n_non:
        idx = [i % len(non_memorized) for i in range(n_non)]
        parts.append(torch.utils.data.Subset(non_memorized, idx))
    if not parts:
        raise ValueError("no training data: give --dataset and/or --non-mem-dataset")
    return torch.utils.data.ConcatDataset(parts)


def pair_keys(dataset) -> np.ndarray:
    """One integer per item of `dataset` (N,) naming the pair beneath its Subset / ConcatDataset
    wrappers: the R repeats of a memorized pair share one key, pairs of different sources never do."""
    offsets: dict[int, int] = {}  # id of a source -> its first key; sources numbered in order of appearance
    size = [0]  # keys given so far

    def keys(ds) -> np.ndarray:
        if isinstance(ds, torch.utils.data.ConcatDataset):
            return np.concatenate([keys(d) for d in ds.datasets]) if ds.datasets else np.zeros(0, np.int64)
        if isinstance(ds, torch.utils.data.Subset):
            return keys(ds.dataset)[np.asarray(ds.indices, dtype=np.int64)]
        if id(ds) not in offsets:
            offsets[id(ds)], size[0] = size[0], size[0] + len(ds)
        return offsets[id(ds)] + np.arange(len(ds), dtype=np.int64)

    return keys(dataset)


class PairFilter:
    """The pair-level rule: per pair, draws and draws whose d exceeded the threshold; a pair is left
    out for good once it has at least `min_draws` draws and exceeded in at least `share` of them.
    Its state travels in training checkpoints."""

    def __init__(self, num_pairs: int, share: float, min_draws: int):
        self.share, self.min_draws = share, min_draws
        self.draws = torch.zeros(num_pairs, dtype=torch.long)
        self.exceeded = torch.zeros(num_pairs, dtype=torch.long)
        self.left_out = torch.zeros(num_pairs, dtype=torch.bool)

    def update(self, keys: torch.Tensor, over: torch.Tensor) -> None:
        """Count one draw of each key (B,) int, `over` (B,) bool where its d was at or above the threshold."""
        keys = keys.long().cpu()
        self.draws.index_add_(0, keys, torch.ones_like(keys))
        self.exceeded.index_add_(0, keys, over.long().cpu())
        newly = (self.draws >= self.min_draws) & (self.exceeded >= self.share * self.draws)
        self.left_out |= newly

    def is_left_out(self, keys: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the pairs of these keys are left out of the loss."""
        return self.left_out[keys.long().cpu()]

    def state_dict(self):
        return {"draws": self.draws, "exceeded": self.exceeded, "left_out": self.left_out}

    def load_state_dict(self, state):
        self.draws, self.exceeded, self.left_out = (state[k].clone() for k in ("draws", "exceeded", "left_out"))


class LossEMAFilter:
    """IET-AGC's anti-gradient control (Liu et al., ECCV 2024; official ``clients_acce_es.py``): a running
    mean of the per-sample loss per training timestep, ``mean[t] <- decay * mean[t] + (1 - decay) * loss``
    from 0, updated after the batch's mask and in the batch's order; a sample is kept when
    ``loss * ratio >= mean[t]`` (the low-loss samples, the ones already learnt by heart, are left out).
    Timesteps are integers in [0, num_train_timesteps) (a flow model's 1000 sigma, rounded down). Its
    state travels in training checkpoints."""

    def __init__(self, num_train_timesteps: int, ratio: float, decay: float):
        self.ratio, self.decay = ratio, decay
        self.mean = torch.zeros(num_train_timesteps, dtype=torch.float64)

    def keep_and_update(self, loss: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """(B,) bool kept, for per-sample losses (B,) at timesteps t (B,); then the running means move."""
        loss = loss.detach().double().cpu()
        idx = t.detach().cpu().long().clamp(0, len(self.mean) - 1)
        keep = loss * self.ratio >= self.mean[idx]
        for i, k in zip(idx.tolist(), loss.tolist()):  # in order: a timestep drawn twice moves twice
            self.mean[i] = self.decay * self.mean[i] + (1 - self.decay) * k
        return keep

    def state_dict(self):
        return {"mean": self.mean}

    def load_state_dict(self, state):
        self.mean = state["mean"].clone()


# -- training ------------------------------------------------------------------------------------

class EMA:
    """Exponential moving average of parameters, with the usual warm-up of the decay."""

    def __init__(self, params, decay: float):
        self.params = [p for p in params]
        self.shadow = [p.detach().clone().float() for p in self.params]
        self.decay, self.step = decay, 0

    @torch.no_grad()
    def update(self):
        self.step += 1
        d = min(self.decay, (1 + self.step) / (10 + self.step))
        for s, p in zip(self.shadow, self.params):
            s.mul_(d).add_(p.detach().float(), alpha=1 - d)

    def copy_to(self, params):
        with torch.no_grad():
            for s, p in zip(self.shadow, params):
                p.copy_(s.to(p.dtype))

    def state_dict(self):
        return {"shadow": self.shadow, "decay": self.decay, "step": self.step}

    def load_state_dict(self, state):
        """Shadows placed beside their parameters (a state may come from the CPU: accelerate loads it there)."""
        self.shadow = [s.to(p.device, copy=True) for s, p in zip(state["shadow"], self.params)]
        self.decay, self.step = state["decay"], state["step"]


def trainable(module: torch.nn.Module) -> list[torch.nn.Parameter]:
    """The parameters that learn: all of a fine-tuned denoiser's, a LoRA adapter's only."""
    return [p for p in module.parameters() if p.requires_grad]


class EmbeddingCache:
    """Frozen-encoder prompt conditioning, computed once per distinct caption (kept in float16 on the CPU)."""

    def __init__(self, model):
        self.model, self.store = model, {}

    def __call__(self, captions: list[str]) -> Conditioning:
        todo = sorted({c for c in captions if c not in self.store})
        for i in range(0, len(todo), 256):
            chunk = todo[i:i + 256]
            cond = self.model.encode_prompts(chunk).detach().to("cpu", torch.float16)
            for j, c in enumerate(chunk):
                self.store[c] = cond[j]
        return Conditioning.cat([self.store[c] for c in captions]).to(self.model.device, torch.float32)


def flow_noised(x0: torch.Tensor, noise: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
    """The rectified-flow forward process x_sigma = (1 - sigma) x0 + sigma eps (Liu et al. 2023; SD3's
    ``FlowMatchEulerDiscreteScheduler.scale_noise``), for (B, C, H, W) x0 and noise, sigma (B,)."""
    s = sigma.reshape(-1, *([1] * (x0.ndim - 1))).to(x0.dtype)
    return (1 - s) * x0 + s * noise


def timestep_band(t, num_bands: int, num_train_timesteps: int):
    """Band k of timestep t when [0, T) is cut into `num_bands` equal bands: t in [k*T/K, (k+1)*T/K).
    Integer t (a tensor or an array) in, the same kind out."""
    return (t * num_bands) // num_train_timesteps


def hard_threshold_at(threshold, t: torch.Tensor, num_train_timesteps: int) -> torch.Tensor:
    """The filter's threshold for each sample: (B,) float from timesteps t (B,) int.

    `threshold` is one number, or a sequence of K numbers, one per band of timesteps: band k holds
    t in [k*T/K, (k+1)*T/K) with T = num_train_timesteps.
    """
    values = torch.as_tensor(threshold if isinstance(threshold, (list, tuple)) else [threshold], dtype=torch.float32)
    if values.ndim != 1 or len(values) == 0:
        raise ValueError(f"hard_threshold {threshold!r}: expected a number or a non-empty list of numbers")
    band = timestep_band(t.long().cpu(), len(values), num_train_timesteps)
    return values[band.clamp(0, len(values) - 1)].to(t.device)


def snr(alphas_cumprod: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
    """Signal-to-noise ratio alpha_bar_t / (1 - alpha_bar_t) of integer timesteps t (B,) -> (B,) float."""
    a = alphas_cumprod.to(t.device)[t].float()
    return a / (1 - a)


def min_snr_weights(snr_t: torch.Tensor, gamma: float, prediction_type: str) -> torch.Tensor:
    """Min-SNR-gamma loss weights (Hang et al. 2023) as diffusers' train_text_to_image.py computes
    them: min(SNR, gamma) / SNR for a noise target, min(SNR, gamma) / (SNR + 1) for a velocity target.
    (B,) -> (B,)."""
    clipped = torch.clamp(snr_t, max=gamma)
    if prediction_type == "epsilon":
        return clipped / snr_t
    if prediction_type == "v_prediction":
        return clipped / (snr_t + 1)
    raise ValueError(f"min-SNR weighting: unsupported prediction_type {prediction_type!r}")


def parse_hard_threshold(text: str) -> float | tuple[float, ...]:
    """'2' -> 2.0; '0.3,0.5,4' -> (0.3, 0.5, 4.0), one threshold per band of timesteps (low t first)."""
    try:
        values = tuple(float(v) for v in text.split(","))
    except ValueError:
        raise ValueError(f"--hard-threshold {text!r}: expected a number or comma-separated numbers "
                         "(one per band of timesteps, low noise first)") from None
    return values[0] if len(values) == 1 else values


CHECKPOINT_NAME = re.compile(r"checkpoint-(\d+)")
STATE_FILE = "diffmem_train_state.json"  # written last into a checkpoint: its completion mark


def complete_checkpoints(output_dir: Path) -> list[Path]:
    """The complete checkpoints of a run, oldest first. A checkpoint is written under a temporary name
    and renamed when whole; a folder without its state file (left by a run killed while writing one
    with an older diffmem) is passed over with a warning."""
    found = []
    for p in Path(output_dir).glob("checkpoint-*"):
        m = CHECKPOINT_NAME.fullmatch(p.name)
        if not m or not p.is_dir():
            continue  # e.g. checkpoint-N.partial, a write that never finished
        if not (p / STATE_FILE).is_file():
            print(f"warning: {p} is incomplete (no {STATE_FILE}); it is ignored")
            continue
        found.append((int(m.group(1)), p))
    return [p for _, p in sorted(found)]


def _latest_checkpoint(output_dir: Path) -> Path | None:
    ckpts = complete_checkpoints(output_dir)
    return ckpts[-1] if ckpts else None


@dataclass
class Batch:
    """One step's share of the data on this process, and the draws that go with it."""

    index: torch.Tensor  # (B,) positions in the dataset
    images: torch.Tensor  # (B, 3, H, W) in [-1, 1]
    captions: list[str]  # after caption choice and augmentation
    gen: torch.Generator  # this step's tensor draws (embedding noise, dropout, noise, timesteps), seeded by step and rank


@dataclass
class StepResult:
    loss: float | None  # the mean loss over the kept samples; None when the filter kept none (skipped)
    keep: torch.Tensor  # (B,) bool: the samples the loss was taken over


class TrainingRun:
    """The state of one ``train`` run: the accelerator, the denoiser being trained and its optimizer,
    EMA and the pair filter, the data order, and the log. ``train`` calls its steps in order."""

    def __init__(self, model, dataset, config: TrainConfig, save_model=None):
        from accelerate import Accelerator
        from diffusers.optimization import get_scheduler

        self.model, self.dataset, self.config = model, dataset, config
        self.out = Path(config.output_dir)
        self.accelerator = acc = Accelerator(gradient_accumulation_steps=config.gradient_accumulation_steps,
                                             mixed_precision=config.mixed_precision, cpu=model.device.type == "cpu")
        self.save_model = save_model or (lambda denoiser, folder: model.save(folder, denoiser=denoiser))
        if config.snr_gamma is not None and model.prediction_type == "flow":
            raise ValueError(f"--snr-gamma: min-SNR weighting is defined on a DDPM noise schedule; {model.name} "
                             "is a flow-matching model")
        self.noise_scheduler = model.training_scheduler()
        denoiser = model.denoiser
        if config.lora_rank:  # only the adapter's weights learn; the file is what is saved
            from diffmem.adapters.lora import add_lora, save_lora

            denoiser.requires_grad_(False)
            add_lora(denoiser, config.lora_rank)
            denoiser.train()
            self.save_model = save_model or save_lora
        else:
            denoiser.train().requires_grad_(True)
        if config.gradient_checkpointing:
            denoiser.enable_gradient_checkpointing()
        optimizer = torch.optim.AdamW(trainable(denoiser), lr=config.learning_rate,
                                      weight_decay=config.adam_weight_decay, betas=(0.9, config.adam_beta2))
        lr_sched = get_scheduler(config.lr_scheduler, optimizer, num_warmup_steps=config.lr_warmup_steps,
                                 num_training_steps=config.max_train_steps)
        self.denoiser, self.optimizer, self.lr_sched = acc.prepare(denoiser, optimizer, lr_sched)
        self.ema = EMA(trainable(acc.unwrap_model(self.denoiser)), config.ema_decay) if config.use_ema else None
        if self.ema is not None:
            acc.register_for_checkpointing(self.ema)
        self.keys_of = self.pairs = None
        if config.pair_filter_share is not None:
            self.keys_of = torch.from_numpy(pair_keys(dataset))
            self.pairs = PairFilter(int(self.keys_of.max()) + 1 if len(self.keys_of) else 0, config.pair_filter_share,
                                    config.pair_filter_min_draws)
            acc.register_for_checkpointing(self.pairs)
        self.agc = None
        if config.agc_ratio is not None:
            self.agc = LossEMAFilter(self.noise_scheduler.config.num_train_timesteps, config.agc_ratio,
                                     config.agc_ema_decay)
            acc.register_for_checkpointing(self.agc)
        self.embed = EmbeddingCache(model)
        self.null = model.empty_conditioning().detach().to(dtype=torch.float32)
        self.world, self.rank = acc.num_processes, acc.process_index
        self.global_batch = config.train_batch_size * self.world
        self.draw_from(torch.arange(len(dataset)), config.seed)
        self.tags: dict = {}  # written into every log record (an ensemble's round and copy)
        self._t0, self._losses = time.time(), []

    def draw_from(self, positions: torch.Tensor, seed: int) -> None:
        """Batches from these dataset positions (N,) long with this seed's data order and draws, as a
        run with `seed` on ``Subset(dataset, positions)`` would draw them."""
        self.positions, self.seed = positions, seed
        self.steps_per_epoch = max(len(positions) // self.global_batch, 1)
        self._perm, self._perm_epoch = None, -1

    # 1. Resume: accelerate's state of a complete checkpoint, when asked for.
    def resume(self) -> int:
        """The step to start from (0, or the resumed checkpoint's)."""
        config, out, acc = self.config, self.out, self.accelerator
        if not config.resume_from_checkpoint:
            return 0
        ckpt = _latest_checkpoint(out) if config.resume_from_checkpoint == "latest" else Path(config.resume_from_checkpoint)
        partial = list(out.glob("checkpoint-*.partial"))
        if ckpt is None and partial:  # killed while writing its first checkpoint: nothing complete to go on from
            acc.print(f"no complete checkpoint in {out} (only {partial[0].name}): training starts from step 0")
            return 0
        if ckpt is None or not ckpt.is_dir():
            raise FileNotFoundError(f"no checkpoint to resume from at {config.resume_from_checkpoint} (output {out})")
        if not (ckpt / STATE_FILE).is_file():
            raise FileNotFoundError(f"{ckpt}: not a complete checkpoint (no {STATE_FILE})")
        acc.load_state(str(ckpt))
        step = int(json.loads((ckpt / STATE_FILE).read_text())["step"])
        acc.print(f"resumed from {ckpt} at step {step}")
        return step

    def write_config(self) -> None:
        self.out.mkdir(parents=True, exist_ok=True)
        if self.accelerator.is_main_process:
            (self.out / "train_config.json").write_text(json.dumps(asdict(self.config), indent=2))

    # 2. The batch: a per-epoch permutation seeded by the epoch, so resume is exact.
    def batch(self, step: int) -> Batch:
        config = self.config
        epoch, k = divmod(step, self.steps_per_epoch)
        if epoch != self._perm_epoch:
            order = torch.randperm(len(self.positions), generator=torch.Generator().manual_seed(self.seed + epoch))
            self._perm, self._perm_epoch = self.positions[order], epoch
        idx = self._perm[k * self.global_batch + self.rank * config.train_batch_size:][: config.train_batch_size]
        items = [self.dataset[int(i)] for i in idx]
        images = torch.stack([im for im, _ in items]).to(self.accelerator.device) * 2 - 1  # (B, 3, H, W) in [-1, 1]
        captions = [c for _, c in items]
        seed = self.seed * 1_000_003 + step * self.world + self.rank
        rng = random.Random(seed)
        if config.caption_per_line:  # several captions of one image: one drawn for this use
            captions = [rng.choice([line for line in c.split("\n") if line.strip()] or [c]) for c in captions]
        if config.prompt_aug_style:
            from diffmem.mitigations.augment import augment_prompt

            captions = [augment_prompt(c, config.prompt_aug_style, config.repeat_num, self.model, rng)
                        if config.prompt_aug_prob >= 1 or rng.random() < config.prompt_aug_prob else c
                        for c in captions]
        return Batch(idx, images, captions, torch.Generator().manual_seed(seed))

    # 3. Frozen conditioning with caption dropout, and the forward process at uniform timesteps.
    @torch.no_grad()
    def conditioning(self, batch: Batch) -> Conditioning:
        """The captions' conditioning (embedding noise added), the null's in the dropped rows (CFG)."""
        cond = self.embed(batch.captions)  # B rows
        if self.config.embedding_noise:
            noise_e = torch.randn(cond.embeddings.shape, generator=batch.gen).to(cond.embeddings.device)
            cond = cond.with_embeddings(cond.embeddings + self.config.embedding_noise * noise_e)
        drop = torch.rand(len(batch.captions), generator=batch.gen) < self.config.caption_dropout
        return cond.where(drop.to(self.model.device), self.null)

    def noised(self, batch: Batch):
        """(x_t, t, target) of the batch's latents: noise (offset, perturbed) at uniformly drawn timesteps."""
        config, gen, model = self.config, batch.gen, self.model
        with torch.no_grad():
            latents = model.encode_images(batch.images.to(model.dtype), generator=gen).float()
        noise = torch.randn(latents.shape, generator=gen).to(latents.device)
        if config.noise_offset:  # one offset per sample and channel
            noise = noise + config.noise_offset * torch.randn(latents.shape[:2] + (1, 1), generator=gen).to(noise.device)
        num_t = self.noise_scheduler.config.num_train_timesteps
        if model.prediction_type == "flow":  # sigma uniform in (0, 1], the transformer's timestep 1000 sigma
            sigma = 1 - torch.rand(len(latents), generator=gen).to(latents.device)
            t = sigma * num_t
        else:
            t = torch.randint(0, num_t, (len(latents),), generator=gen).to(latents.device)
        noise_in = noise
        if config.input_perturbation:  # perturbed noise into x_t, the plain noise as the target
            noise_in = noise + config.input_perturbation * torch.randn(latents.shape, generator=gen).to(noise.device)
        if model.prediction_type == "flow":
            noisy = flow_noised(latents, noise_in, sigma)
        else:
            noisy = self.noise_scheduler.add_noise(latents, noise_in, t)
        # the noise, the velocity on v-prediction models, eps - x0 on flow models
        return noisy, t, model.training_target(latents, noise, t)

    # 4. The loss, the training-time filter (Wen et al. 5.2) and one optimizer update.
    def kept(self, batch: Batch, noisy, t, cond: Conditioning, pred: torch.Tensor) -> torch.Tensor:
        """(B,) bool: the samples whose d (a noise difference on the same x_t and t) is under the
        threshold, and whose pair the pair-level rule has not left out."""
        model, acc = self.model, self.accelerator
        with torch.no_grad(), acc.autocast():
            pred_u = model.model_output(noisy, t, self.null.expand(len(cond)), denoiser=self.denoiser).float()
        limit = hard_threshold_at(self.config.hard_threshold, t, self.noise_scheduler.config.num_train_timesteps)
        if model.prediction_type == "flow":  # d on the velocity, as detection measures it on flow models
            keep = text_noise_norm(pred.detach(), pred_u) < limit
        else:
            keep = text_noise_norm(model.output_to_noise(pred.detach(), noisy, t), model.output_to_noise(pred_u, noisy, t)) < limit
        if self.pairs is not None:  # every process counts every process's draws, so all agree on the rule
            keys = self.keys_of[batch.index].to(keep.device)
            self.pairs.update(acc.gather(keys), acc.gather(~keep))
            keep = keep & ~self.pairs.is_left_out(keys).to(keep.device)
        return keep

    def learn(self, batch: Batch) -> StepResult:
        config, acc = self.config, self.accelerator
        cond = self.conditioning(batch)
        noisy, t, target = self.noised(batch)
        loss_value = None
        with acc.accumulate(self.denoiser):
            with acc.autocast():
                pred = self.model.model_output(noisy, t, cond, denoiser=self.denoiser).float()
            per_sample = F.mse_loss(pred, target, reduction="none").flatten(1).mean(1)  # (B,)
            if config.snr_gamma is not None:  # per sample, so the filter keeps each kept sample's own weight
                per_sample = per_sample * min_snr_weights(snr(self.noise_scheduler.alphas_cumprod, t), config.snr_gamma,
                                                          self.model.prediction_type)
            keep = torch.ones_like(per_sample, dtype=torch.bool)
            if config.hard_threshold is not None:
                keep = self.kept(batch, noisy, t, cond, pred)
            if self.agc is not None:
                keep = keep & self.agc.keep_and_update(per_sample, t).to(keep.device)
            if acc.reduce(keep.sum().float(), reduction="sum").item() != 0:
                loss = (per_sample * keep).sum() / keep.sum().clamp(min=1)
                acc.backward(loss)
                if acc.sync_gradients and config.max_grad_norm:
                    acc.clip_grad_norm_(self.denoiser.parameters(), config.max_grad_norm)
                self.optimizer.step()
                self.lr_sched.step()
                self.optimizer.zero_grad(set_to_none=True)
                loss_value = float(loss.detach())
                self._losses.append(loss_value)
        if self.ema is not None and acc.sync_gradients:  # also on steps the filter left empty, as the seed does
            self.ema.update()
        return StepResult(loss_value, keep)

    # 5. The log, validation images and checkpoints after a step.
    def report(self, done: int, result: StepResult, bar) -> None:
        config, acc = self.config, self.accelerator
        skipped = result.loss is None
        left_out = 1.0 - float(result.keep.float().mean())
        if acc.is_main_process and (done % config.log_every == 0 or skipped or done == config.max_train_steps):
            losses = self._losses
            rec = {"step": done, **self.tags, "loss": float(np.mean(losses)) if losses else None, "lr": self.lr_sched.get_last_lr()[0],
                   "left_out": left_out, "skipped": skipped,
                   "samples_per_s": len(losses) * self.global_batch / max(time.time() - self._t0, 1e-9)}
            if self.pairs is not None:
                rec["pairs_left_out"] = int(self.pairs.left_out.sum())
            bar.set_postfix(loss=f"{rec['loss']:.4f}" if rec["loss"] is not None else "-", left_out=f"{left_out:.2f}")
            with open(self.out / "train_log.jsonl", "a") as f:
                f.write(json.dumps(rec) + "\n")
            self._losses, self._t0 = [], time.time()
        if (config.validation_prompts and acc.is_main_process
                and done % (self.steps_per_epoch * config.validation_epochs) == 0):
            _validation_images(self.model, acc.unwrap_model(self.denoiser), config, self.out / "validation" / f"step-{done}")
        if config.checkpointing_steps and done % config.checkpointing_steps == 0 and done < config.max_train_steps:
            _checkpoint(acc, self.denoiser, self.ema, self.out / f"checkpoint-{done}", done, self.save_model, config)

    # An ensemble's copies take turns in this one run: their weights and their own state swap in and out.
    def weights(self) -> list[torch.nn.Parameter]:
        return trainable(self.accelerator.unwrap_model(self.denoiser))

    @torch.no_grad()
    def set_weights(self, values: list[torch.Tensor]) -> None:
        for p, v in zip(self.weights(), values):
            p.copy_(v)

    def copy_state(self) -> dict:
        """What one copy keeps between its turns, copied to the CPU (K optimizer states take no device
        memory): its optimizer and learning-rate schedule, EMA, and the filters' running state. Loading it
        puts each tensor back beside its parameters."""
        return _copy_to_cpu({"optimizer": self.optimizer.state_dict(), "lr": self.lr_sched.state_dict(),
                             **{k: getattr(self, k).state_dict() for k in ("ema", "agc", "pairs")
                                if getattr(self, k) is not None}})

    def load_copy_state(self, state: dict) -> None:
        self.optimizer.load_state_dict(state["optimizer"])
        self.lr_sched.load_state_dict(state["lr"])
        for k in ("ema", "agc", "pairs"):
            if getattr(self, k) is not None:
                getattr(self, k).load_state_dict(state[k])

    # 6. The final model: the EMA weights (the raw ones beside them), then the denoiser back to inference.
    def finish(self) -> Path:
        acc = self.accelerator
        acc.wait_for_everyone()
        if acc.is_main_process:
            final = acc.unwrap_model(self.denoiser)
            if self.ema is not None:  # the raw weights beside the EMA ones (the seed evaluates checkpoint-N/unet, the raw)
                self.save_model(final.eval(), self.out / RAW_FOLDER)
                self.ema.copy_to(trainable(final))
            self.save_model(final.eval(), self.out)
        self.denoiser.eval().requires_grad_(False)
        return self.out


@one_writer(lambda a: a["config"].output_dir)
def train(model, dataset, config: TrainConfig, save_model=None, progress: bool = True) -> Path:
    """Fine-tune ``model.denoiser`` on ``dataset`` (pairs of (3, H, W) images in [0, 1] and captions).

    `save_model(denoiser, folder)` writes a loadable model (defaults to ``model.save``). Returns the
    output folder. Runs under ``accelerate launch`` for several processes.
    """
    from tqdm.auto import tqdm

    if config.num_threads:
        torch.set_num_threads(config.num_threads)
    run = TrainingRun(model, dataset, config, save_model)  # accelerator, optimizer, EMA, filters
    start = run.resume()
    run.write_config()
    bar = tqdm(total=config.max_train_steps, initial=start, desc="train", unit="step",
               disable=not (progress and run.accelerator.is_main_process))
    if config.ensemble_shards:
        train_ensemble(run, bar)
    else:
        for step in range(start, config.max_train_steps):
            result = run.learn(run.batch(step))
            fault_point("train.step")
            bar.update(1)
            run.report(step + 1, result, bar)
    bar.close()
    return run.finish()


def _copy_to_cpu(state):
    """A copy of a nested state (dicts, lists, tuples) whose tensors are copied to the CPU."""
    if isinstance(state, torch.Tensor):
        return state.detach().to("cpu", copy=True)
    if isinstance(state, dict):
        return {k: _copy_to_cpu(v) for k, v in state.items()}
    if isinstance(state, (list, tuple)):
        return type(state)(_copy_to_cpu(v) for v in state)
    return state


def ensemble_shards(keys: np.ndarray, num_shards: int, seed: int) -> list[torch.Tensor]:
    """IET's data split: the dataset positions of each shard, (N_k,) long. The pairs (`keys`, one per
    item, from `pair_keys`) are dealt to the shards in a seeded random order, so every repeat of a pair
    falls in one shard and the shards hold equal numbers of pairs (to one)."""
    pairs = np.unique(keys)
    if len(pairs) < num_shards:
        raise ValueError(f"--ensemble-shards {num_shards}: the data holds only {len(pairs)} distinct pairs")
    shard_of = np.zeros(int(pairs.max()) + 1, dtype=np.int64)
    shard_of[np.random.default_rng(seed).permutation(pairs)] = np.arange(len(pairs)) % num_shards
    return [torch.from_numpy(np.flatnonzero(shard_of[keys] == s)) for s in range(num_shards)]


def average_weights(copies: list[list[torch.Tensor]]) -> list[torch.Tensor]:
    """FedAvg with equal weights, as IET's server averages its clients: the element-wise mean of K
    copies' parameter lists (each a list of tensors of the same shapes)."""
    return [torch.stack([c.float() for c in ps]).mean(0).to(ps[0].dtype) for ps in zip(*copies)]


def train_ensemble(run: TrainingRun, bar) -> None:
    """IET's iterative ensemble (Liu et al., ECCV 2024; official ``diff_train_fed_acce_es.py``): each round,
    copy k starts from the averaged weights and trains on shard k with its own optimizer, schedule and
    filters (kept across rounds, as the official clients keep theirs), drawing as a run with seed + k on
    that shard would; then the copies' weights are averaged. The copies take turns on this run's device.
    With EMA, the copies' averages are averaged too. Leaves the run holding the final average."""
    config = run.config
    K, R = config.ensemble_shards, config.ensemble_rounds
    per_turn = config.max_train_steps // (K * R)
    shards = ensemble_shards(pair_keys(run.dataset), K, config.seed)
    start = [p.detach().clone() for p in run.weights()]
    states = [run.copy_state() for _ in range(K)]
    done = 0
    for r in range(R):
        ends = []
        for k in range(K):
            run.set_weights(start)
            run.load_copy_state(states[k])
            run.draw_from(shards[k], config.seed + k)
            run.tags = {"round": r + 1, "copy": k}
            for j in range(per_turn):
                result = run.learn(run.batch(r * per_turn + j))
                fault_point("train.step")
                done += 1
                bar.update(1)
                run.report(done, result, bar)
            states[k] = run.copy_state()
            ends.append([p.detach().clone() for p in run.weights()])
        start = average_weights(ends)
    run.set_weights(start)
    if run.ema is not None:
        run.ema.load_state_dict({**states[0]["ema"], "shadow": average_weights([s["ema"]["shadow"] for s in states])})


RAW_FOLDER = "raw"  # with EMA: the raw (non-EMA) weights, a loadable model in OUTPUT/raw


def _validation_images(model, denoiser, config: TrainConfig, folder: Path) -> None:
    """One image per validation prompt from the weights being trained, prompt i from seed + i, as PNG."""
    from diffmem.files import save_png
    from diffmem.sampling import SamplingConfig, sample_prompts

    was_training = denoiser.training
    denoiser.eval()
    with torch.no_grad():
        res = sample_prompts(model, list(config.validation_prompts),
                             SamplingConfig(num_inference_steps=config.validation_inference_steps, num_generations=1,
                                            seed=config.seed))
    denoiser.train(was_training)
    folder.mkdir(parents=True, exist_ok=True)
    for i, r in enumerate(res):
        save_png(r.images[0], folder / f"{i:03d}.png")
    (folder / "prompts.txt").write_text("".join(p + "\n" for p in config.validation_prompts))


def _checkpoint(accelerator, denoiser, ema, folder: Path, step: int, save_model, config: TrainConfig):
    """Accelerate's state (resume) and a loadable model (evaluation) in `folder`, written whole under
    a temporary name (``folder.partial``), the state file last, then renamed: a run killed while
    writing leaves only the partial folder, which resume ignores."""
    import copy
    import shutil

    partial = folder.with_name(folder.name + ".partial")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process and partial.exists():
        shutil.rmtree(partial)
    accelerator.wait_for_everyone()
    accelerator.save_state(str(partial))
    fault_point("train.checkpoint")
    accelerator.wait_for_everyone()
    if accelerator.is_main_process:
        snap = copy.deepcopy(accelerator.unwrap_model(denoiser))
        if ema is not None:
            save_model(snap.eval(), partial / "model" / RAW_FOLDER)
            ema.copy_to(trainable(snap))
        save_model(snap.eval(), partial / "model")
        write_json(partial / STATE_FILE, {"step": step})
        if folder.exists():  # a checkpoint of the same step from a run that was resumed before it
            shutil.rmtree(folder)
        os.replace(partial, folder)
        if config.checkpoints_total_limit:
            for old in complete_checkpoints(folder.parent)[: -config.checkpoints_total_limit]:
                shutil.rmtree(old)
    accelerator.wait_for_everyone()

"""LoRA adapters on any family's denoiser (``--lora PATH[:SCALE]``), and the files ``train --lora-rank`` writes.

A LoRA file is read as diffusers' ``load_lora_weights`` reads it: a safetensors file in the diffusers /
peft layout (``unet.…lora_A.weight`` or ``transformer.…``), or in the kohya layout (``lora_unet_…``),
which the family's pipeline class converts (``lora_state_dict``). The denoiser's part is applied;
text-encoder layers in the file are counted and left out (diffmem's conditioning is the base encoders').
Each applied file is recorded in the model's identity: its name, the first 16 hex digits of its sha256
and its scale.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

# denoiser class -> (the diffusers pipeline class whose lora_state_dict converts its files, key prefix)
LORA_PIPELINES = {
    "UNet2DConditionModel": ("StableDiffusionPipeline", "unet"),
    "SD3Transformer2DModel": ("StableDiffusion3Pipeline", "transformer"),
    "FluxTransformer2DModel": ("FluxPipeline", "transformer"),
}
SDXL_PIPELINE = "StableDiffusionXLPipeline"  # the UNet of the SDXL family: SDXL's block mapping for kohya files
TEXT_ENCODER_PREFIXES = ("text_encoder", "lora_te")


@dataclass(frozen=True)
class LoraSpec:
    """One ``--lora`` value: a file and the scale its weights are applied with (1: as trained)."""

    path: Path
    scale: float = 1.0


def parse_lora(text: str) -> LoraSpec:
    """'adapter.safetensors' or 'adapter.safetensors:0.5' -> LoraSpec (a scale after the last ':')."""
    path, sep, scale = str(text).rpartition(":")
    if sep and path:
        try:
            return LoraSpec(Path(path).expanduser(), float(scale))
        except ValueError:
            pass  # a ':' of the path itself
    return LoraSpec(Path(text).expanduser())


def file_sha256_16(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()[:16]


def read_lora(spec: LoraSpec, denoiser, family: str) -> tuple[dict, dict | None, int]:
    """(the denoiser's LoRA tensors with their prefix, network alphas or None, number of text-encoder
    tensors left out) of one file, converted to diffusers' layout as the family's pipeline converts it."""
    import diffusers
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    where = f"--lora {spec.path}"
    if not spec.path.is_file():
        raise FileNotFoundError(f"{where}: no such file")
    if spec.path.suffix != ".safetensors":
        raise ValueError(f"{where}: expected a .safetensors LoRA file (diffmem does not read pickled weights)")
    try:
        raw = load_file(str(spec.path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{where}: not a readable safetensors file ({e})") from None
    kind = type(denoiser).__name__
    if kind not in LORA_PIPELINES:
        raise ValueError(f"{where}: LoRA on a {kind} ({family}) is not supported: diffusers loads LoRA onto "
                         f"{', '.join(LORA_PIPELINES)}")
    pipeline, prefix = LORA_PIPELINES[kind]
    if family == "stable-diffusion-xl":
        pipeline = SDXL_PIPELINE
    try:
        converted = getattr(diffusers, pipeline).lora_state_dict(raw)
    except Exception as e:  # diffusers' conversion raises many kinds on foreign layouts
        raise ValueError(f"{where}: not a LoRA layout diffusers reads ({type(e).__name__}: {e})") from None
    state, alphas = converted if isinstance(converted, tuple) else (converted, None)
    ours = {k: v for k, v in state.items() if k.startswith(prefix + ".")}
    text = sum(k.startswith(TEXT_ENCODER_PREFIXES) for k in state)
    if not any("lora" in k for k in ours):
        raise ValueError(f"{where}: no LoRA weights for the {prefix} in it ({len(raw)} tensors, e.g. "
                         f"{next(iter(raw), 'none')})")
    alphas = {k: v for k, v in (alphas or {}).items() if k.startswith(prefix + ".")} or None
    return ours, alphas, text


def adapter_names(n: int) -> list[str]:
    """The peft adapter names of n applied ``--lora`` files, in their order."""
    return [f"lora{i}" for i in range(n)]


def apply_loras(model, specs: list[LoraSpec]) -> list[dict]:
    """Load each LoRA file onto ``model.denoiser`` at its scale; returns (and sets ``model.loras`` to)
    their records for the model's identity. Refuses, naming the file, a file that does not fit."""
    if not specs:
        return []
    denoiser, records, names = model.denoiser, [], adapter_names(len(specs))
    for name, spec in zip(names, specs):
        state, alphas, text = read_lora(spec, denoiser, model.family)
        prefix = LORA_PIPELINES[type(denoiser).__name__][1]
        try:
            denoiser.load_lora_adapter(state, prefix=prefix, network_alphas=alphas, adapter_name=name)
        except Exception as e:  # shapes or module names that are not this denoiser's
            raise ValueError(f"--lora {spec.path}: does not fit {model.name}'s {type(denoiser).__name__} "
                             f"({type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''})") from None
        records.append({"file": spec.path.name, "sha256_16": file_sha256_16(spec.path), "scale": spec.scale,
                        **({"text_encoder_tensors_not_applied": text} if text else {})})
    denoiser.set_adapters(names, weights=[s.scale for s in specs])
    denoiser.to(model.device, model.dtype).requires_grad_(False)
    model.loras = records
    return records


def set_lora_scale(model, scale: float) -> None:
    """Every applied LoRA at `scale` times its ``--lora`` scale (0: the base model; 1: as loaded)."""
    loras = getattr(model, "loras", None)
    if not loras:
        raise ValueError(f"{model.name}: no LoRA applied (--lora PATH[:SCALE])")
    model.denoiser.set_adapters(adapter_names(len(loras)), weights=[scale * r["scale"] for r in loras])


# the projections diffusers' LoRA training scripts adapt: attention q, k, v and out (train_text_to_image_lora.py),
# and on joint-attention transformers the text stream's too (train_dreambooth_lora_sd3.py)
LORA_TARGETS = ("to_k", "to_q", "to_v", "to_out.0")
JOINT_LORA_TARGETS = (*LORA_TARGETS, "add_k_proj", "add_q_proj", "add_v_proj", "to_add_out")


def add_lora(denoiser, rank: int) -> None:
    """A new LoRA adapter of `rank` (alpha = rank, Gaussian init of A, B = 0) on the denoiser's
    attention projections, its weights trainable; the denoiser's own stay as they are."""
    from peft import LoraConfig

    kind = type(denoiser).__name__
    if kind not in LORA_PIPELINES:
        raise ValueError(f"--lora-rank: LoRA training on a {kind} is not supported: diffusers saves LoRA for "
                         f"{', '.join(LORA_PIPELINES)}")
    targets = LORA_TARGETS if kind == "UNet2DConditionModel" else JOINT_LORA_TARGETS  # peft matches name suffixes
    denoiser.add_adapter(LoraConfig(r=rank, lora_alpha=rank, init_lora_weights="gaussian", target_modules=list(targets)))


LORA_FILE = "pytorch_lora_weights.safetensors"  # the name diffusers' save_lora_weights gives it


def save_lora(denoiser, folder) -> Path:
    """Write the denoiser's LoRA adapter as ``folder/pytorch_lora_weights.safetensors`` in diffusers'
    layout (``load_lora_weights`` and ``--lora`` read it)."""
    import diffusers
    from diffusers.utils import convert_state_dict_to_diffusers
    from peft.utils import get_peft_model_state_dict

    pipeline, prefix = LORA_PIPELINES[type(denoiser).__name__]
    layers = convert_state_dict_to_diffusers(get_peft_model_state_dict(denoiser))
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    getattr(diffusers, pipeline).save_lora_weights(folder, **{f"{prefix}_lora_layers": layers})
    return folder / LORA_FILE

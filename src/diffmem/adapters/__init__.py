"""Model adapters: one file per model family, one ``load_model`` to pick the right one."""

from __future__ import annotations

from pathlib import Path

import torch

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
DEFAULT_MODEL = "lab"  # the built-in memorization lab model


def resolve_dtype(name: str | torch.dtype, device: str | torch.device) -> torch.dtype:
    """Parse a dtype name and check that the device can run a convolution in it."""
    dtype = name if isinstance(name, torch.dtype) else DTYPES.get(str(name))
    if dtype is None:
        raise ValueError(f"--dtype {name!r}: expected one of {', '.join(DTYPES)}")
    try:
        x = torch.zeros(1, 1, 4, 4, device=device, dtype=dtype)
        torch.nn.functional.conv2d(x, torch.zeros(1, 1, 3, 3, device=device, dtype=dtype))
    except (RuntimeError, TypeError) as e:
        raise ValueError(f"--dtype {name} is not supported on device {device}: {e}") from e
    return dtype


def resolve_model_path(model: str) -> tuple[str, Path]:
    """(family, folder) for a --model value: 'lab' or 'lab-flow' (the shipped lab models), a lab, SD, SDXL,
    SD3 or PixArt folder, or a cached hub id.

    A diffusers folder's family comes from its model_index.json ``_class_name``: a PixArt pipeline is
    "pixart", ``StableDiffusion3Pipeline`` "stable-diffusion-3", ``FluxPipeline`` "flux", a class name containing "XL"
    "stable-diffusion-xl", anything else "stable-diffusion"."""
    from diffmem.lab import BUILT_IN

    if model in BUILT_IN:
        folder = BUILT_IN[model]
        if not (folder / "lab_model.json").is_file():
            preset = "flow" if model == "lab-flow" else "default"
            raise FileNotFoundError(f"--model {model}: the built-in lab model is not installed at {folder}; "
                                    f"run `diffmem lab build --preset {preset} --out DIR` and pass --model DIR")
        return "lab", folder
    path = Path(model).expanduser()
    if path.exists():
        if not path.is_dir():
            raise NotADirectoryError(f"--model {model}: is a file; expected a model folder or hub id")
        from diffmem.adapters.lab import is_lab_folder

        return ("lab" if is_lab_folder(path) else _diffusers_family(path)), path
    snapshot = _cached_hub_snapshot(model)
    return _diffusers_family(snapshot), snapshot


def _diffusers_family(path: Path) -> str:
    from diffmem.adapters.flux import is_flux_folder
    from diffmem.adapters.pixart import is_pixart_folder
    from diffmem.adapters.stable_diffusion_3 import is_sd3_folder
    from diffmem.adapters.stable_diffusion_xl import is_sdxl_folder

    if is_pixart_folder(path):
        return "pixart"
    if is_sd3_folder(path):
        return "stable-diffusion-3"
    if is_flux_folder(path):
        return "flux"
    return "stable-diffusion-xl" if is_sdxl_folder(path) else "stable-diffusion"


def _cached_hub_snapshot(repo_id: str) -> Path:
    """The local Hugging Face cache's snapshot of `repo_id`; never downloads."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.constants import HF_HUB_CACHE

    if repo_id.count("/") != 1 or repo_id.startswith((".", "/", "~")):
        raise FileNotFoundError(f"--model {repo_id}: no such folder, and not a hub id of the form owner/name")
    try:
        return Path(snapshot_download(repo_id, local_files_only=True))
    except Exception as e:  # LocalEntryNotFoundError and friends
        raise FileNotFoundError(
            f"--model {repo_id}: not a local folder and not in the Hugging Face cache ({HF_HUB_CACHE}). "
            f"diffmem never downloads at run time; on a machine with internet run "
            f"`hf download {repo_id}` (or `huggingface-cli download {repo_id}`), then copy the cache "
            f"or pass the downloaded folder to --model.") from e


OFFLOADING = ("stable-diffusion-3", "flux")  # the families with a memory plan (diffmem.adapters.base.TransformerVAE)


def load_model(model: str = DEFAULT_MODEL, unet: str | None = None, device: str = "cpu",
               dtype: str | torch.dtype = "float32", offload: str = "none"):
    """Load any supported model behind the common interface (``diffmem.model.DiffusionModel``).
    ``offload="text-encoders"`` (SD3, FLUX) keeps the text encoders on the CPU between encodings."""
    from diffmem.adapters.base import OFFLOAD

    if offload not in OFFLOAD:
        raise ValueError(f"--offload {offload!r}: expected one of {', '.join(OFFLOAD)}")
    torch_dtype = resolve_dtype(dtype, device)
    family, path = resolve_model_path(model)
    if offload != "none" and family not in OFFLOADING:
        raise ValueError(f"--offload {offload}: offered for {' and '.join(OFFLOADING)} folders (large text encoders); "
                         f"{model} is a {family} model")
    try:
        return _load_family(family, path, model, unet, device, torch_dtype, offload)
    except FileNotFoundError:
        raise
    except OSError as e:  # unreadable or unsafe weights: diffusers and transformers load pickles weights-only
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"--model {model}{f' --unet {unet}' if unet else ''}: cannot load its weights ({first}); "
                         "diffmem reads safetensors, and pickled .bin weights only as plain tensors") from None


NULL_KEYS = ("y_embedding", "y_embedder.y_embedding", "embeddings")  # PixArt's learned null caption, or any


def read_null(path: str | Path):
    """(conditioning, name) of a null embedding file (``--null-embedding``): a safetensors file with
    one of ``NULL_KEYS`` (T, D) and optionally ``mask`` (T,) (default: every token attended to).
    Named "y_embedding" for PixArt's key, else ``file:<stem>``."""
    from safetensors.torch import load_file

    from diffmem.model import Conditioning

    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--null-embedding {path}: no such file")
    tensors = load_file(str(path))
    key = next((k for k in NULL_KEYS if k in tensors), None)
    if key is None:
        raise ValueError(f"--null-embedding {path}: expected a tensor named one of {', '.join(NULL_KEYS)}, "
                         f"found {', '.join(sorted(tensors)) or 'none'}")
    emb = tensors[key]
    emb = emb[None] if emb.ndim == 2 else emb
    if emb.ndim != 3 or len(emb) != 1:
        raise ValueError(f"--null-embedding {path}: {key} of shape {tuple(tensors[key].shape)}, expected (T, D)")
    mask = tensors.get("mask", torch.ones(emb.shape[1], dtype=torch.long)).long().reshape(1, -1)
    name = "y_embedding" if key != "embeddings" else f"file:{path.stem}"
    return Conditioning(emb, mask=mask), name


# family -> "module:loader"; a loader takes (folder, denoiser folder or None, device=, dtype=). Adding a
# family is its adapter file, a line here and its recognition in _diffusers_family.
LOADERS = {
    "stable-diffusion": "diffmem.adapters.stable_diffusion:load_stable_diffusion",
    "stable-diffusion-xl": "diffmem.adapters.stable_diffusion_xl:load_stable_diffusion_xl",
    "pixart": "diffmem.adapters.pixart:load_pixart",
    "stable-diffusion-3": "diffmem.adapters.stable_diffusion_3:load_stable_diffusion_3",
    "flux": "diffmem.adapters.flux:load_flux",
}


def _load_family(family: str, path, model: str, unet, device, torch_dtype, offload: str = "none"):
    import importlib

    if family == "lab":
        from diffmem.adapters.lab import load_lab_model
        from diffmem.lab import BUILT_IN

        return load_lab_model(path, unet, device=device, dtype=torch_dtype, name=model if model in BUILT_IN else None)
    module, loader = LOADERS[family].split(":")
    options = {"offload": offload} if family in OFFLOADING else {}
    return getattr(importlib.import_module(module), loader)(path, unet, device=device, dtype=torch_dtype, **options)

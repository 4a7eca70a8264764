"""How much memory a diffusers folder's components need, read from their safetensors headers (no weights
loaded): the figures behind the memory plan of the large transformer families (``--offload``)."""

from __future__ import annotations

import json
import math
import struct
from pathlib import Path

import torch

COMPONENTS = ("transformer", "unet", "text_encoder", "text_encoder_2", "text_encoder_3", "vae")


def safetensors_parameters(path: str | Path) -> int:
    """The number of elements of every tensor in one .safetensors file, from its JSON header."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    return sum(math.prod(entry["shape"]) for name, entry in header.items() if name != "__metadata__")


def component_parameters(folder: str | Path) -> dict[str, int]:
    """{component: parameters} for the components of a diffusers folder that hold safetensors weights."""
    folder = Path(folder)
    out = {}
    for comp in COMPONENTS:
        files = sorted((folder / comp).glob("*.safetensors")) if (folder / comp).is_dir() else []
        if files:
            out[comp] = sum(safetensors_parameters(f) for f in files)
    return out


def memory_plan(folder: str | Path, dtype: torch.dtype = torch.bfloat16) -> dict:
    """Weights in GiB at `dtype`: per component; what first-step detection keeps on the device (everything
    but the VAE, which is never loaded without a decode); and with ``--offload text-encoders`` what stays
    there while sampling (the denoiser alone: the encoders' share is free for activations and larger
    batches). Encoding still holds the denoiser and the encoders together. Activations come on top."""
    size = torch.tensor([], dtype=dtype).element_size()
    gib = {c: n * size / 2**30 for c, n in component_parameters(folder).items()}
    denoiser = gib.get("transformer", gib.get("unet", 0.0))
    encoders = sum(v for c, v in gib.items() if c.startswith("text_encoder"))
    return {"dtype": str(dtype).replace("torch.", ""), "components_gib": gib,
            "detection_gib": denoiser + encoders, "offloaded_sampling_gib": denoiser,
            "generation_gib": sum(gib.values())}

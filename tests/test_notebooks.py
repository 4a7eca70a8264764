"""The example notebooks: stored with their figures, in sync with their generator, and they run.

Executing them takes a few minutes on 2 CPU cores, so that test is marked slow; the lab notebooks
need the built-in lab model (or DIFFMEM_LAB_MODEL) and are skipped without it.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
from pathlib import Path

import pytest

EXAMPLES = Path(__file__).parent.parent / "examples"
FIGURES = {"detect": 3, "explain": 3, "mitigate": 1, "stable_diffusion": 4}  # image/png outputs each must show
LAB_NOTEBOOKS = ("detect", "explain", "mitigate")


def _generator():
    spec = importlib.util.spec_from_file_location("make_notebooks", EXAMPLES / "make_notebooks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _pngs(nb) -> int:
    return sum("image/png" in out.get("data", {}) for cell in nb.cells if cell.cell_type == "code"
               for out in cell.get("outputs", []))


def _errors(nb) -> list[str]:
    return [f"cell {i}: {out.ename}: {out.evalue}" for i, cell in enumerate(nb.cells) if cell.cell_type == "code"
            for out in cell.get("outputs", []) if out.output_type == "error"]


def _lab_model_available() -> bool:
    from diffmem.lab.build import WEIGHTS_DIR

    return "DIFFMEM_LAB_MODEL" in os.environ or (WEIGHTS_DIR / "lab_model.json").is_file()


@pytest.mark.parametrize("name", list(FIGURES))
def test_stored_notebook_matches_generator_and_shows_figures(name):
    nbformat = pytest.importorskip("nbformat")
    stored = nbformat.read(EXAMPLES / f"{name}.ipynb", as_version=4)
    fresh = _generator().build(name)
    assert [(c.cell_type, c.source) for c in stored.cells] == [(c.cell_type, c.source) for c in fresh.cells], \
        f"examples/{name}.ipynb is out of date: run `python examples/make_notebooks.py {name}`"
    assert not _errors(stored)
    assert _pngs(stored) >= FIGURES[name], f"examples/{name}.ipynb is stored without its figures"


@pytest.mark.slow
@pytest.mark.parametrize("name", list(FIGURES))
def test_notebook_executes(name, tmp_path, monkeypatch):
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    if name in LAB_NOTEBOOKS and not _lab_model_available():
        pytest.skip("the built-in lab model is not installed and DIFFMEM_LAB_MODEL is not set")
    for var in ("DIFFMEM_SD_MODEL", "DIFFMEM_SD_DATA", "DIFFMEM_SD_GROUND_TRUTH", "DIFFMEM_SSCD", "DIFFMEM_DEVICE",
                "DIFFMEM_SD_NUM_PROMPTS"):
        monkeypatch.delenv(var, raising=False)  # the offline path: a tiny random SD folder, built-in prompts
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    path = shutil.copy(EXAMPLES / f"{name}.ipynb", tmp_path)
    nb = nbformat.read(path, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            cell.outputs = []
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(tmp_path)}}).execute()  # raises on a failing cell
    assert not _errors(nb)
    assert _pngs(nb) == FIGURES[name]


def test_text_noise_norm_figure_writes_png(tmp_path):
    import numpy as np

    from diffmem.reports.plots import text_noise_norm_figure

    rng = np.random.default_rng(0)
    curves = {"memorized": rng.random((4, 50)), "normal": rng.random((4, 50))}
    images = {k: rng.random((4, 3, 16, 16)) for k in curves}
    out = text_noise_norm_figure(curves, images, tmp_path / "fig1.png")
    assert out.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert text_noise_norm_figure(curves, None, tmp_path / "curves.png").is_file()  # curves alone

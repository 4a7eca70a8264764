"""The one provenance record that every output's metadata and every benchmark result carries."""

from __future__ import annotations

import functools
import subprocess
import time
from pathlib import Path


@functools.lru_cache(maxsize=1)
def git_commit() -> str | None:
    """The commit of the diffmem checkout this code runs from, when it is one."""
    try:
        out = subprocess.run(["git", "rev-parse", "HEAD"], cwd=Path(__file__).parent, capture_output=True,
                             text=True, timeout=5)
    except (OSError, subprocess.SubprocessError):
        return None
    return out.stdout.strip() or None


def provenance(model=None, **settings) -> dict:
    """diffmem version, git commit, time and, given a model, its identity (``DiffusionModel.identity``:
    name, family, hash of configs and weight file names and sizes), device and dtype; `settings` are
    added as they are (they must be JSON-serializable)."""
    import diffmem

    out = {"diffmem_version": diffmem.__version__, "git_commit": git_commit(),
           "time": time.strftime("%Y-%m-%dT%H:%M:%S")}
    if model is not None:
        out.update(model=model.name, model_identity=model.identity(), device=str(model.device),
                   dtype=str(model.dtype).replace("torch.", ""))
    return {**out, **settings}

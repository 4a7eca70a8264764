"""The method x family table of docs/model-families.md: which detector and which mitigation runs on which
model family, and why the others refuse, asked of the registries themselves (``refusal``), so the table
cannot drift from the code."""

from __future__ import annotations

FAMILIES = (("lab", "lab"), ("sd", "SD 1.x/2.x"), ("sdxl", "SDXL"), ("pixart", "PixArt"), ("sd3", "SD3/3.5"),
            ("flux-dev", "FLUX.1-dev"), ("flux-schnell", "FLUX.1-schnell"), ("lab-flow", "flow lab"))


def method_cells(models: dict) -> dict[tuple[str, str], dict[str, str | None]]:
    """{(kind, method): {family: refusal reason or None}} for every registered detector and mitigation over
    `models` ({family key of FAMILIES: a loaded model})."""
    from diffmem.detectors import DETECTORS
    from diffmem.detectors.registry import refusal as detector_refusal
    from diffmem.mitigations import MITIGATIONS, get_mitigation
    from diffmem.mitigations import refusal as mitigation_refusal

    cells = {}
    for name, cls in DETECTORS.items():
        cells[("detector", name)] = {f: detector_refusal(cls, m) for f, m in models.items()}
    for name in MITIGATIONS:
        method = get_mitigation(name)
        cells[("mitigation", name)] = {f: _reason(mitigation_refusal(method, m)) for f, m in models.items()}
    return cells


def _reason(text: str | None) -> str | None:
    """A mitigation's refusal without its "cannot run on FAMILY (NAME): " prefix (the name is a path)."""
    if text is None:
        return None
    return text.split("): ", 1)[1] if text.startswith("cannot run on ") and "): " in text else text


def method_family_table(models: dict) -> str:
    """Markdown: one row per method, one column per family; "runs", "with `--lora`" or "no (n)", the
    reasons numbered below the table."""
    cells = method_cells(models)
    reasons: list[str] = []
    families = [(k, label) for k, label in FAMILIES if k in models]
    lines = ["| method | kind | " + " | ".join(label for _, label in families) + " |",
             "|---|---|" + "---|" * len(families)]
    for (kind, name), row in cells.items():
        out = []
        for key, _ in families:
            reason = row[key]
            if reason is None:
                out.append("runs")
            elif "--lora" in reason:
                out.append("with `--lora`")
            else:
                if reason not in reasons:
                    reasons.append(reason)
                out.append(f"no ({reasons.index(reason) + 1})")
        lines.append(f"| `{name}` | {kind} | " + " | ".join(out) + " |")
    lines += ["", *(f"{i}. {r}" for i, r in enumerate(reasons, 1))]
    return "\n".join(lines) + "\n"


def tiny_family_models(folder) -> dict:
    """One model of every family: the shipped labs and random-weight tiny folders of the others, written
    under `folder` (offline, about 20 seconds on a CPU)."""
    from pathlib import Path

    from diffmem.adapters import load_model
    from diffmem.testing import (make_tiny_flux_folder, make_tiny_pixart_folder, make_tiny_sd3_folder,
                                 make_tiny_sd_folder, make_tiny_sdxl_folder)

    folder = Path(folder)
    makers = {"sd": make_tiny_sd_folder, "sdxl": make_tiny_sdxl_folder, "pixart": make_tiny_pixart_folder,
              "sd3": make_tiny_sd3_folder, "flux-dev": make_tiny_flux_folder,
              "flux-schnell": lambda p: make_tiny_flux_folder(p, dev=False)}
    models = {"lab": load_model("lab")}
    for key, make in makers.items():
        models[key] = load_model(str(make(folder / key)))
    models["lab-flow"] = load_model("lab-flow")
    return models

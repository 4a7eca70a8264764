"""Reading users' files and writing diffmem's outputs: text, images, JSON Lines rows, JSON, PNG.

Rows are appended with one ``write`` and an fsync, so a killed run leaves whole lines only; whole
files are written to a temporary name and renamed. Users' text files are read as UTF-8 with or
without a byte-order mark and with any line ending; images in any mode PIL reads are made RGB;
what cannot be read raises ``InputFileError`` naming the file (and line).
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import numpy as np
import torch


IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg", ".webp", ".bmp")


class InputFileError(ValueError):
    """A user's input that cannot be read; the message names the file (and line)."""


def read_text_lines(path: Path) -> list[str]:
    """The lines of a UTF-8 text file (a byte-order mark and Windows or old Mac line endings allowed);
    bytes that are not UTF-8 raise ``InputFileError`` naming the file, line and column."""
    path = Path(path)
    data = path.read_bytes()
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    lines = data.splitlines()
    out = []
    for lineno, line in enumerate(lines, 1):
        try:
            out.append(line.decode("utf-8"))
        except UnicodeDecodeError as e:
            raise InputFileError(f"{path}:{lineno}: not UTF-8 text (byte 0x{line[e.start]:02x} at column {e.start + 1}); "
                                 "save the file as UTF-8") from None
    return out


def open_rgb_image(path: Path):
    """A PIL image in RGB from any file PIL reads: palette, grey, 16-bit grey (scaled, not clipped),
    RGBA / LA (alpha dropped), CMYK. Empty, truncated or unreadable files raise ``InputFileError``."""
    from PIL import Image, UnidentifiedImageError

    path = Path(path)
    if path.stat().st_size == 0:
        raise InputFileError(f"{path}: empty image file (0 bytes)")
    try:
        with Image.open(path) as img:
            img.load()
            if img.mode in ("I;16", "I;16L", "I;16B", "I;16N", "I"):
                arr = np.asarray(img, dtype=np.float64)
                top = 65535.0 if img.mode.startswith("I;16") or arr.max() > 255 else 255.0
                return Image.fromarray(np.clip(arr / top * 255 + 0.5, 0, 255).astype("uint8"), "L").convert("RGB")
            if img.mode == "F":
                arr = np.asarray(img, dtype=np.float64)
                return Image.fromarray(np.clip(arr * 255 + 0.5, 0, 255).astype("uint8"), "L").convert("RGB")
            return img.convert("RGB")
    except (UnidentifiedImageError, OSError, SyntaxError, ValueError) as e:
        raise InputFileError(f"{path}: unreadable image ({type(e).__name__}: {e})") from None


def image_caption_pairs(folder: Path) -> list[tuple[Path, str]]:
    """The seed's layout: ``NAME.<image>`` with ``NAME.txt`` holding its caption, sorted by name.
    Raises ``InputFileError`` for a missing or empty folder, a caption without an image, an image
    without a caption, and two images of one name (``a.png`` and ``a.jpg``)."""
    folder = Path(folder)
    if not folder.is_dir():
        raise InputFileError(f"{folder}: no such folder")
    images: dict[str, list[Path]] = {}
    captions: dict[str, Path] = {}
    for p in folder.iterdir():
        if p.suffix.lower() in IMAGE_SUFFIXES:
            images.setdefault(p.stem, []).append(p)
        elif p.suffix.lower() == ".txt":
            captions[p.stem] = p
    if not images and not captions:
        raise InputFileError(f"{folder}: no images ({', '.join(IMAGE_SUFFIXES)}) and caption .txt files")
    twice = sorted(stem for stem, ps in images.items() if len(ps) > 1)
    if twice:
        names = ", ".join(sorted(p.name for p in images[twice[0]]))
        raise InputFileError(f"{folder}: {len(twice)} names have more than one image ({names}); keep one per caption")
    alone = sorted(set(captions) - set(images))
    if alone:
        raise InputFileError(f"{folder}: caption {captions[alone[0]].name} has no image"
                             + (f" (and {len(alone) - 1} more)" if len(alone) > 1 else ""))
    bare = sorted(set(images) - set(captions))
    if bare:
        raise InputFileError(f"{folder}: image {images[bare[0]][0].name} has no caption file {bare[0]}.txt"
                             + (f" (and {len(bare) - 1} more)" if len(bare) > 1 else ""))
    return [(images[stem][0], "\n".join(read_text_lines(captions[stem])).strip()) for stem in sorted(images)]


def json_lines(path: Path, error: type[InputFileError] = InputFileError):
    """(line number, value) of each non-blank line of a user's JSON Lines file, read as
    ``read_text_lines`` reads text; a line that is not JSON raises `error` naming the file and line."""
    for lineno, line in enumerate(read_text_lines(path), 1):
        if not line.strip():
            continue
        try:
            yield lineno, json.loads(line)
        except json.JSONDecodeError as e:
            raise error(f"{path}:{lineno}: invalid JSON ({e.msg} at column {e.colno})") from None


def read_rows(path: Path, repair: bool = False) -> list[dict]:
    """Complete rows of a JSON Lines file; with `repair`, cut off a trailing partial line."""
    path = Path(path)
    if not path.exists():
        return []
    data = path.read_bytes()
    end = data.rfind(b"\n") + 1
    if repair and end < len(data):
        with open(path, "r+b") as f:
            f.truncate(end)
    rows = []
    for lineno, line in enumerate(data[:end].splitlines(), 1):
        if line.strip():
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: broken result line ({e.msg}); the file was not written by diffmem") from None
    return rows


def append_rows(path: Path, rows: list[dict]) -> None:
    """Append rows with one write() call, then fsync: a crash leaves whole lines only."""
    payload = "".join(json.dumps(r) + "\n" for r in rows).encode()
    fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, payload)
        os.fsync(fd)
    finally:
        os.close(fd)


def write_rows(path: Path, rows: list[dict]) -> None:
    """Write a whole JSON Lines file (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text("".join(json.dumps(r) + "\n" for r in rows))
    tmp.replace(path)


def write_json(path: Path, obj) -> None:
    """Write a JSON file (temporary name, then rename)."""
    path = Path(path)
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(json.dumps(obj, indent=2))
    tmp.replace(path)


def jsonable(x):
    """`x` with everything JSON cannot hold (tuples, paths, dtypes) turned into lists and strings."""
    return json.loads(json.dumps(x, default=str))


def image_to_uint8(image: torch.Tensor | np.ndarray) -> np.ndarray:
    """(3, H, W) in [0, 1] -> (H, W, 3) uint8."""
    arr = image.permute(1, 2, 0).float().numpy() if isinstance(image, torch.Tensor) else np.transpose(image, (1, 2, 0))
    return (np.clip(arr, 0, 1) * 255).round().astype("uint8")


def save_png(image: torch.Tensor | np.ndarray, path: Path) -> None:
    """Save a (3, H, W) image in [0, 1] as PNG."""
    from PIL import Image

    Image.fromarray(image_to_uint8(image)).save(path)


def load_png(path: Path) -> np.ndarray:
    """(3, H, W) float32 in [0, 1]."""
    return np.asarray(open_rgb_image(path), dtype=np.float32).transpose(2, 0, 1) / 255.0


def generation_name(position: int, generation: int) -> str:
    """File name of generation g of the prompt at `position`: ``<position:05d>_<g>.png``."""
    return f"{position:05d}_{generation}.png"


def save_generations(folder: Path, position: int, images) -> list[Path]:
    """Save a prompt's (G, 3, H, W) generations in `folder`; returns their paths."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    paths = [folder / generation_name(position, g) for g in range(len(images))]
    for img, p in zip(images, paths):
        save_png(img, p)
    return paths


def check_resume(out: Path, started: bool, resume: bool, recorded: dict, current: dict, keys) -> None:
    """A run into an output that already holds one (`started`) must be ``--resume`` of that same run:
    the values of `keys` in its `recorded` metadata must equal `current`'s (both JSON-like). Raises
    naming what differs; writes nothing."""
    if not started:
        return
    if not resume:
        raise FileExistsError(f"{out} holds a run already; pass --resume to continue it, or choose another --out")
    diff = [k for k in keys if recorded.get(k) != current[k]]
    if diff:
        raise ValueError(f"cannot resume {out}: its {', '.join(diff)} differ from this run's "
                         f"({'; '.join(f'{k}: {recorded.get(k)!r} vs {current[k]!r}' for k in diff)})")


def read_json(path: Path) -> dict:
    """A JSON file's object, or {} when there is no such file."""
    path = Path(path)
    return json.loads(path.read_text()) if path.exists() else {}


# -- one writer per output -------------------------------------------------------------------------

class OutputLock:
    """``with OutputLock(path):`` marks `path` (an output file or folder) as being written by this
    process, in ``<path>.lock`` (pid and host), created exclusively. A second run on the same output
    is refused while the first lives; a lock whose process is gone (a killed run) is taken over, so
    ``--resume`` is never blocked by it."""

    def __init__(self, path: Path):
        path = Path(path)
        self.path = path.with_name(path.name + ".lock")
        self.held = False

    def _owner(self) -> tuple[int, str] | None:
        try:
            pid, host = self.path.read_text().split("\n")[:2]
            return int(pid), host
        except (OSError, ValueError):
            return None

    def __enter__(self) -> "OutputLock":
        import socket

        me = f"{os.getpid()}\n{socket.gethostname()}\n"
        self.path.parent.mkdir(parents=True, exist_ok=True)
        for _ in range(2):
            try:
                fd = os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o644)
            except FileExistsError:
                owner = self._owner()
                if owner is not None and owner[1] != socket.gethostname():
                    raise FileExistsError(f"{self.path.with_suffix('')}: a diffmem run on {owner[1]} (process "
                                          f"{owner[0]}) is writing this output; if it is gone, delete {self.path}")
                if owner is not None and owner[0] != os.getpid() and _alive(owner[0]):
                    raise FileExistsError(f"{self.path.with_suffix('')}: another diffmem run (process {owner[0]}) "
                                          f"is writing this output; wait for it or choose another output") from None
                self.path.unlink(missing_ok=True)  # its process is gone (or it is ours): a stale lock
                continue
            os.write(fd, me.encode())
            os.close(fd)
            self.held = True
            return self
        raise FileExistsError(f"{self.path}: could not take the output lock")

    def __exit__(self, *exc) -> None:
        if self.held:
            self.path.unlink(missing_ok=True)
            self.held = False


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def one_writer(output_of):
    """Decorator: the call holds an ``OutputLock`` on ``output_of(arguments)`` (its output file or
    folder; `arguments` maps parameter names to values) while it runs. Under ``accelerate launch``
    only the main process takes it."""
    import functools
    import inspect

    def decorate(fn):
        signature = inspect.signature(fn)

        @functools.wraps(fn)
        def run(*args, **kwargs):
            from accelerate import PartialState

            bound = signature.bind(*args, **kwargs)
            bound.apply_defaults()
            if not PartialState().is_main_process:
                return fn(*args, **kwargs)
            with OutputLock(Path(output_of(bound.arguments))):
                return fn(*args, **kwargs)
        return run
    return decorate

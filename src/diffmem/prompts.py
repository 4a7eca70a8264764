"""Reading prompt lists: .jsonl, .txt, .csv, .parquet, or a local Hugging Face dataset folder."""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path

from diffmem.files import InputFileError, json_lines, read_text_lines

SUFFIXES = (".jsonl", ".txt", ".csv", ".parquet")
RANDOM_SET = "random"  # the built-in random control set (the original's `--dataset random`)
RANDOM_SET_SIZE = 2000


@dataclass
class PromptRecord:
    position: int  # 0-based position in the input; the prompt's seed is seed + position
    prompt: str
    source: dict = field(default_factory=dict)  # the input row's other fields (e.g. index, url, trigger_words)


@dataclass
class PromptSet:
    """Prompts with where they came from (a file, or a lab prompt set)."""

    records: list[PromptRecord]
    source: str

    def digest(self) -> str:
        h = hashlib.sha256()
        for r in self.records:
            h.update(f"{r.position}\t{r.prompt}\n".encode())
        return h.hexdigest()[:16]


class PromptFileError(InputFileError):
    """Malformed prompt input; the message names the file and line or column."""


def random_prompts(tokenizer, max_tokens: int, num: int = RANDOM_SET_SIZE, seed: int = 0) -> list[str]:
    """The original's `random` control set: for each prompt a length k drawn uniformly from
    [0, max_tokens), then k token ids drawn without replacement from the whole vocabulary (special
    tokens included), decoded. Drawn from ``random.Random(seed + 5)``, the state the original's
    ``set_random_seed(seed)`` leaves Python's generator in, so with the same tokenizer (CLIP's, 77
    tokens) the prompts are the original's; some are empty (k = 0)."""
    rng = random.Random(seed + 5)
    out = []
    for _ in range(num):
        k = rng.randrange(max_tokens)
        out.append(tokenizer.decode(rng.sample(range(tokenizer.vocab_size), k)))
    return out


def needs_model(path: str | Path | None) -> bool:
    """Whether a --prompts value is a built-in set drawn from the model's tokenizer (read it after loading)."""
    return path is not None and str(path) == RANDOM_SET and not Path(path).exists()


def read_prompts(path: str | Path, prompt_key: str = "caption", start: int = 0, end: int | None = None,
                 model=None, seed: int = 0) -> list[PromptRecord]:
    """Prompts at positions [start, end) of the input. Rows keep their position in the whole input.

    ``"random"`` (when no such file exists) is the built-in random control set, drawn from `model`'s
    tokenizer with `seed` (``random_prompts``)."""
    if needs_model(path):
        if model is None:
            raise PromptFileError(f"the built-in {RANDOM_SET!r} prompt set is drawn from the model's tokenizer: "
                                  "read it after loading the model")
        texts = random_prompts(model.tokenizer, model.max_tokens, seed=seed)
        return _select([PromptRecord(i, t) for i, t in enumerate(texts)], Path(RANDOM_SET), start, end)
    path = Path(path)
    if not path.exists():
        raise PromptFileError(f"{path}: no such file or folder")
    if path.is_dir():
        records = _read_hf_dataset(path, prompt_key)
    elif path.suffix == ".jsonl":
        records = _read_jsonl(path, prompt_key)
    elif path.suffix == ".txt":
        records = [PromptRecord(i, line) for i, line in enumerate(l for l in read_text_lines(path) if l.strip())]
    elif path.suffix in (".csv", ".parquet"):
        records = _read_table(path, prompt_key)
    else:
        raise PromptFileError(f"{path}: unknown prompt file type {path.suffix!r}; expected one of "
                              f"{', '.join(SUFFIXES)} or a local Hugging Face dataset folder")
    if not records:
        raise PromptFileError(f"{path}: no prompts in the file")
    return _select(records, path, start, end)


def _select(records: list[PromptRecord], path: Path, start: int, end: int | None) -> list[PromptRecord]:
    if start < 0 or (end is not None and end < start):
        raise PromptFileError(f"--start {start} --end {end}: not a valid range")
    selected = records[start:end]
    if not selected:
        raise PromptFileError(f"{path}: --start {start} --end {end} selects none of its {len(records)} prompts")
    return selected


def _read_jsonl(path: Path, key: str) -> list[PromptRecord]:
    records = []
    for lineno, row in json_lines(path, PromptFileError):
        if not isinstance(row, dict):
            raise PromptFileError(f"{path}:{lineno}: expected a JSON object, got {type(row).__name__}")
        if key not in row:
            raise PromptFileError(f"{path}:{lineno}: no key {key!r} (keys: {', '.join(row)}); set --prompt-key")
        if not isinstance(row[key], str):
            raise PromptFileError(f"{path}:{lineno}: {key!r} is {type(row[key]).__name__}, expected a string")
        records.append(PromptRecord(len(records), row[key], {k: v for k, v in row.items() if k != key}))
    return records


DATA_EXTRA = 'pip install "diffmem[data]"'


def _read_csv_stdlib(path: Path, key: str) -> list[PromptRecord]:
    """A .csv file without pandas (the default install): every field a string."""
    import csv

    try:
        with open(path, newline="", encoding="utf-8-sig") as f:
            rows = list(csv.DictReader(f))
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {e.start} of the file); save it as UTF-8") from None
    except csv.Error as e:
        raise PromptFileError(f"{path}: cannot read as csv: {e}") from None
    if not rows:
        return []
    if key not in rows[0]:
        raise PromptFileError(f"{path}: no column {key!r} (columns: {', '.join(map(str, rows[0]))}); set --prompt-key")
    return [PromptRecord(i, row[key] or "", {k: v for k, v in row.items() if k != key and k is not None and v != ""})
            for i, row in enumerate(rows)]


def _read_table(path: Path, key: str) -> list[PromptRecord]:
    try:
        import pandas as pd
    except ImportError:
        if path.suffix == ".csv":
            return _read_csv_stdlib(path, key)
        raise PromptFileError(f"{path}: reading .parquet needs pandas and pyarrow, not installed: {DATA_EXTRA}") from None
    try:
        df = pd.read_csv(path, encoding="utf-8-sig") if path.suffix == ".csv" else pd.read_parquet(path)
    except pd.errors.EmptyDataError:
        return []
    except UnicodeDecodeError as e:
        raise PromptFileError(f"{path}: not UTF-8 text (byte {e.start} of the file); save it as UTF-8") from None
    except ImportError:
        raise PromptFileError(f"{path}: reading .parquet needs pyarrow, not installed: {DATA_EXTRA}") from None
    except Exception as e:
        raise PromptFileError(f"{path}: cannot read as {path.suffix[1:]}: {e}") from e
    if key not in df.columns:
        raise PromptFileError(f"{path}: no column {key!r} (columns: {', '.join(map(str, df.columns))}); set --prompt-key")
    out = []
    for i, row in enumerate(df.to_dict(orient="records")):
        if not isinstance(row[key], str):
            raise PromptFileError(f"{path}: row {i + 1}, column {key!r}: {row[key]!r} is not a string")
        out.append(PromptRecord(i, row[key], {k: v for k, v in row.items() if k != key and _jsonable(v)}))
    return out


def _read_hf_dataset(path: Path, key: str) -> list[PromptRecord]:
    try:
        import datasets
    except ImportError:
        raise PromptFileError(f"{path}: a folder; reading it as a Hugging Face dataset needs the datasets package, "
                              f"not installed: {DATA_EXTRA}") from None

    try:
        ds = datasets.load_from_disk(str(path))
    except Exception as e:
        raise PromptFileError(f"{path}: a folder, but not a Hugging Face dataset saved with save_to_disk ({e})") from e
    if isinstance(ds, datasets.DatasetDict):
        split = "test" if "test" in ds else next(iter(ds))
        ds = ds[split]
    if key not in ds.column_names:
        raise PromptFileError(f"{path}: no column {key!r} (columns: {', '.join(ds.column_names)}); set --prompt-key")
    return [PromptRecord(i, text) for i, text in enumerate(ds[key])]


def _jsonable(v) -> bool:
    try:
        json.dumps(v)
        return v == v  # drop NaN
    except (TypeError, ValueError):
        return False

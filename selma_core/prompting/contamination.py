"""Evaluation benchmarks' prompts, so no expert is trained on the test set.

Reads the prompts of benchmark files from paths (never copied into the project): DSG-1k
annotations (``.csv`` with a ``text`` column), TIFA text inputs or question files (``.json``, a list
of objects with ``caption``), GenEval metadata (``.jsonl`` with ``prompt``), and plain ``.txt`` files
(T2I-CompBench: one prompt per line).
"""

from __future__ import annotations

import csv
import json
from pathlib import Path

from selma_core.errors import ConfigError
from selma_core.prompting.rouge import RougeLIndex

_TEXT_KEYS = ("prompt", "caption", "text")


def _text_of(row: object, path: Path) -> str | None:
    if isinstance(row, str):
        return row
    if isinstance(row, dict):
        for key in _TEXT_KEYS:
            if isinstance(row.get(key), str):
                return row[key]
        return None
    raise ConfigError(f"benchmark file {path}: expected objects with a prompt/caption/text, got {row!r:.80}")


def read_benchmark_prompts(path: str | Path) -> list[str]:
    """Every distinct prompt in one benchmark file, in file order."""
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"prompts.contamination.benchmarks: file {path} not found")
    try:
        if path.suffix == ".csv":
            with open(path, newline="", encoding="utf-8") as f:
                reader = csv.DictReader(f)
                column = next((k for k in _TEXT_KEYS if k in (reader.fieldnames or [])), None)
                if column is None:
                    raise ConfigError(f"benchmark file {path}: no column named one of {_TEXT_KEYS}")
                texts = [row[column] for row in reader]
        elif path.suffix == ".jsonl":
            with open(path, encoding="utf-8") as f:
                texts = [_text_of(json.loads(line), path) for line in f if line.strip()]
        elif path.suffix == ".json":
            data = json.loads(path.read_text(encoding="utf-8"))
            if not isinstance(data, (list, dict)):
                raise ConfigError(
                    f"benchmark file {path}: expected a list of objects with a prompt/caption/text (or a "
                    f"mapping of them), got {type(data).__name__}"
                )
            rows = data.values() if isinstance(data, dict) else data
            texts = [_text_of(row, path) for row in rows]
        elif path.suffix == ".txt":
            texts = path.read_text(encoding="utf-8").splitlines()
        else:
            raise ConfigError(f"benchmark file {path}: unknown format (expected .csv, .json, .jsonl or .txt)")
    except UnicodeDecodeError as e:
        raise ConfigError(f"benchmark file {path}: expected UTF-8 text: {e}") from e
    except (json.JSONDecodeError, csv.Error) as e:
        raise ConfigError(f"benchmark file {path}: cannot be read: {e}") from e
    seen: dict[str, None] = {}
    for text in texts:
        if text and text.strip():
            seen.setdefault(text.strip(), None)
    if not seen:
        raise ConfigError(f"benchmark file {path}: no prompts in it")
    return list(seen)


def benchmark_index(paths: list[str], threshold: float) -> RougeLIndex:
    index = RougeLIndex(threshold)
    for path in paths:
        for text in read_benchmark_prompts(path):
            index.add(text)
    return index

"""Local data files: which files of a directory are data (its own `train*` / `test*` files in one of the formats
read), and their rows, each file read by its format's own reader (`json`, pyarrow's Parquet reader). A file its
reader refuses, or that holds no rows, is one `DataError` naming the file and what the reader said.
Cheap to import: the entry points' door reads a local `data.path` with it before anything loads (`check_local`),
and `loading.py` reads the same files with it again when the run loads its data.
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

import pyarrow
import pyarrow.parquet

from gsm8k_lora.data.gsm8k import row_problem
from gsm8k_lora.errors import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")
GSM8K_COLUMNS = ("question", "answer")


def split_files(root: Path, split: str) -> list[Path]:
    """The directory's own `train*`/`test*` files; its subdirectories (a run's checkpoints, say) are not data."""
    return sorted(p for p in root.glob(f"{split}*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)


def read_text(path: Path) -> str:
    """A file's text as UTF-8 (a byte-order mark allowed), or DataError naming the line that is not."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as err:
        line = data[:err.start].count(b"\n") + 1
        column = err.start - (data.rfind(b"\n", 0, err.start) + 1) + 1
        raise DataError(f"{path}:{line}: not UTF-8 text (byte 0x{data[err.start]:02x} at column {column}: "
                        f"{err.reason}); save it as UTF-8") from err


def read_jsonl(path: Path) -> list[dict]:
    """One JSON object a line (blank lines skipped). Read line by line with `json` rather than by datasets' JSON
    builder so that a broken line is named by its number."""
    rows = []
    for lineno, line in enumerate(read_text(path).splitlines(), start=1):
        if not line.strip():
            continue
        row = _parse_json(path, line, lineno)
        if not isinstance(row, dict):
            raise DataError(f"{path}:{lineno}: expected a JSON object, got {_kind(row)}")
        rows.append(row)
    return rows


def _parse_json(path: Path, text: str, lineno: int | None = None):
    """`text` as JSON, or DataError naming the file, the line (a JSONL file's own, else the decoder's) and why."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{path}:{lineno or err.lineno}: malformed JSON ({err.msg} at column {err.colno})") from err


def _read_json_array(path: Path, text: str) -> list[dict]:
    rows = _parse_json(path, text)
    if not isinstance(rows, list):
        raise DataError(f"{path}: expected a JSON array of objects (or one object a line), got {_kind(rows)}")
    bad = next((i for i, row in enumerate(rows) if not isinstance(row, dict)), None)
    if bad is not None:
        raise DataError(f"{path}: item {bad} of its JSON array is {_kind(rows[bad])}, not an object")
    return rows


def _read_parquet(path: Path) -> list[dict]:
    try:
        return pyarrow.parquet.read_table(path).to_pylist()
    except (pyarrow.ArrowException, OSError) as err:
        first = next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)
        raise DataError(f"{path}: pyarrow cannot read it as Parquet ({first})") from err


def read_rows(path: Path) -> list[dict]:
    """The rows of one data file (.jsonl, .json: an array or one object a line, .parquet); DataError naming the
    file where its reader refuses it or it holds no rows."""
    if path.suffix == ".parquet":
        rows = _read_parquet(path)
    else:
        text = read_text(path)
        whole = path.suffix == ".json" and not text.lstrip().startswith("{")
        rows = _read_json_array(path, text) if whole else read_jsonl(path)
    if not rows:
        raise DataError(f"{path} holds no rows" + (" (it is empty)" if path.stat().st_size == 0 else ""))
    return rows


def gsm8k_rows(path: Path, max_bad_fraction: float) -> list[dict]:
    """A file's rows, refused (DataError naming it) where none has GSM8K's columns, or where more of them than
    `data.max_bad_fraction` are not GSM8K rows (`gsm8k.row_problem`, the rule the run drops rows by)."""
    rows = read_rows(path)
    if not any(all(c in row for c in GSM8K_COLUMNS) for row in rows):
        found = sorted({key for row in rows for key in row})
        raise DataError(f"{path}: no row has the columns {' and '.join(map(repr, GSM8K_COLUMNS))}; its columns: "
                        f"{', '.join(map(str, found[:8])) or 'none'}")
    refuse_bad_rows(Counter(p for p in map(row_problem, rows) if p is not None), len(rows), max_bad_fraction,
                    str(path))
    return rows


def refuse_bad_rows(problems: Counter, total: int, max_bad_fraction: float, where: str) -> None:
    """DataError naming `where` when more of its `total` rows than `data.max_bad_fraction` are not GSM8K rows
    (`problems`: each `gsm8k.row_problem` and how many rows it was): a file at the door, a split as it loads."""
    bad = sum(problems.values())
    if total and bad / total > max_bad_fraction:
        reasons = ", ".join(f"{n} {why}" for why, n in problems.most_common())
        raise DataError(f"{where}: {bad} of {total} rows are not GSM8K rows ({reasons}), more than "
                        f"data.max_bad_fraction={max_bad_fraction}")


def local_files(path: Path) -> dict[str, list[Path]]:
    """The data files of a local `data.path`: the file itself (as train), or a directory's own train*/test*."""
    if path.is_file():
        return {"train": [path], "test": []}
    return {split: split_files(path, split) for split in ("train", "test")}


def check_local(path: str, max_bad_fraction: float) -> None:
    """Every file of a local `data.path`, read and checked as the run will read it (DataError: one line)."""
    for files in local_files(Path(path).expanduser()).values():
        for file in files:
            gsm8k_rows(file, max_bad_fraction)


def _kind(value: object) -> str:
    return {dict: "an object", list: "an array", str: "a string", type(None): "null", bool: "a boolean"}.get(
        type(value), "a number")

"""Which files of a local directory are data: its own `train*` / `test*` files in one of the formats read.
Cheap to import (the entry points' door checks `data.path` with it before anything loads)."""

from __future__ import annotations

from pathlib import Path

LOCAL_SUFFIXES = (".jsonl", ".json", ".parquet")


def split_files(root: Path, split: str) -> list[Path]:
    """The directory's own `train*`/`test*` files; its subdirectories (a run's checkpoints, say) are not data."""
    return sorted(p for p in root.glob(f"{split}*") if p.is_file() and p.suffix in LOCAL_SUFFIXES)

"""Compare the runs of a sweep: `python -m gsm8k_lora.compare outputs/multirun/<sweep dir>`.

Reads only what each job wrote in its directory, prints a table, marks the best run, and writes
`comparison.csv`, `comparison.md`, `accuracy_grid.png` and `val_loss_curves.png` into the sweep directory
(the comparison itself is built in `reporting/compare.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsm8k_lora import cli, records
from gsm8k_lora.errors import DataError
from gsm8k_lora.reporting.compare import compare, to_markdown


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        cli.fail(DataError(f"{args.sweep_dir} is not a directory"))
    try:
        comparison = compare(args.sweep_dir)
    except FileNotFoundError as err:
        cli.fail(DataError(str(err)))
    for name, text in comparison.files.items():
        records.write_text(args.sweep_dir / name, text)
    records.write_figures(args.sweep_dir, comparison.figures)
    print(to_markdown(comparison.rows, comparison.best))
    failed = [r for r in comparison.rows if r["status"] != "done"]
    print(f"{len(comparison.rows)} runs, {len(failed)} not done; best: {comparison.best}; written to {args.sweep_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

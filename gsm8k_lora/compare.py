"""Compare the runs of a sweep: `python -m gsm8k_lora.compare outputs/multirun/<sweep dir>`.

Reads only what each job wrote in its directory, prints a table, ranks the settings (the best tested against every
other on the same questions, a tie said as one), and writes
`comparison.csv`, `comparison.md`, `accuracy_grid.png` and `val_loss_curves.png` into the sweep directory
(the comparison itself is built in `reporting/compare.py`).
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsm8k_lora import tracking
from gsm8k_lora.config import LoggerConfig
from gsm8k_lora.errors import DataError, fail
from gsm8k_lora.reporting.compare import compare, to_markdown
from gsm8k_lora.rundir import read_config, read_sweep, write_plots, write_text


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.compare", description=__doc__.splitlines()[0])
    parser.add_argument("sweep_dir", type=Path)
    parser.add_argument("--save-view", action="store_true",
                        help="save the sweep's W&B dashboard view (needs W&B online and .[dashboard])")
    parser.add_argument("--entity", help="the W&B entity to save the view to (default: the sweep's logger.entity)")
    args = parser.parse_args(argv)
    if not args.sweep_dir.is_dir():
        fail(DataError(f"{args.sweep_dir} is not a directory"))
    try:
        comparison = compare(args.sweep_dir)
    except DataError as err:  # a job's file that its reader refuses names itself (`rundir.read_json`)
        fail(err)
    except FileNotFoundError as err:
        fail(DataError(str(err)))
    for name, text in comparison.files.items():
        write_text(args.sweep_dir / name, text)
    write_plots(args.sweep_dir, comparison.plots)
    print(to_markdown(comparison))
    for row in comparison.rows:
        if row["status"] != "done":
            print(f"job {row['job']} {row['status']}: {row['error'] or 'no result (see its directory)'}")
    failed = sum(r["status"] != "done" for r in comparison.rows)
    print(f"{len(comparison.rows)} runs, {failed} not done; best: {comparison.headline}; written to {args.sweep_dir}")
    if args.save_view:
        logger = read_config(comparison.jobs[0]["dir"]).get("logger") or {}
        cfg = LoggerConfig(**{**logger, **({"entity": args.entity} if args.entity else {})})
        group = read_sweep(args.sweep_dir).get("group") or args.sweep_dir.name
        tracking.save_view(cfg, args.sweep_dir, group, comparison.swept, tracking.resolve_mode(cfg) == "online")
    return 0


if __name__ == "__main__":
    sys.exit(main())

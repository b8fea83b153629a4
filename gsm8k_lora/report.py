"""The analysis report of a run or a sweep: `python -m gsm8k_lora.report RUN_OR_SWEEP_DIR`.

Written at the end of every `train` run too. Reads only the directory's files and writes `report.md`
beside them, with its plots (a sweep's also `comparison.csv` and `comparison.md`); what it says is built in
`reporting/report.py`.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from gsm8k_lora.errors import DataError, fail
from gsm8k_lora.reporting.report import build, build_sweep
from gsm8k_lora.rundir import FAILED, read_config, read_json, write_plots, write_text


def write_report(target: Path, price: float) -> tuple[Path, list[Path]]:
    """report.md (and, for a sweep, the comparison files) and the plots; returns the report and plot paths."""
    if (target / "multirun.yaml").exists():
        text, files, plots, _ = build_sweep(target)
        for name, content in files.items():
            write_text(target / name, content)
    else:
        text, plots = build(target, price)
    return write_text(target / "report.md", text), write_plots(target, plots)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.report", description=__doc__.splitlines()[0])
    parser.add_argument("run_dir", type=Path, help="a run directory, or a sweep directory (with multirun.yaml)")
    parser.add_argument("--gpu-hour-price", type=float, default=None,
                        help="price per GPU-hour in USD (default: the run's report.gpu_hour_price_usd)")
    args = parser.parse_args(argv)
    try:
        path = report(args.run_dir, args.gpu_hour_price)
    except DataError as err:  # a file of the run that its reader refuses names itself (`rundir.read_json`)
        fail(err)
    except FileNotFoundError as err:
        fail(DataError(str(err)))
    print(f"report: {path}")
    return 0


def report(run_dir: Path, price: float | None) -> Path:
    """The report of `run_dir` written; DataError where the directory holds nothing to report."""
    if not run_dir.is_dir():
        raise DataError(f"{run_dir} is not a directory")
    sweep = (run_dir / "multirun.yaml").exists()
    if not sweep and not (run_dir / "metrics.json").exists():
        failure = read_json(run_dir / FAILED).get("error")
        why = f"it failed: {failure}" if failure else "its training never finished (no metrics.json)"
        raise DataError(f"{run_dir} holds no results to report: {why}")
    if price is None:  # the run's own setting, as it ran
        price = (read_config(run_dir).get("report") or {}).get("gpu_hour_price_usd")
    if price is None and not sweep:
        raise DataError(f"{run_dir / 'config.yaml'} gives no report.gpu_hour_price_usd; give --gpu-hour-price")
    return write_report(run_dir, price)[0]


if __name__ == "__main__":
    sys.exit(main())

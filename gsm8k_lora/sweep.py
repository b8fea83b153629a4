"""A sweep as one thing: its start, which every job shares, and its end, the comparison built for the user.

A Hydra callback (`hydra.callbacks.sweep` in conf/config.yaml), so every multirun gets it, whatever its
sweeper or launcher:
- `on_multirun_start`: `sweep.json` at the sweep's root: its name, start and W&B group
  (`lr_epochs 2026-12-01 18:30`), which every job reads, and which a sweep run again into the same directory
  keeps;
- `on_multirun_end`: from the jobs' directories alone, the comparison (`comparison.csv`, `comparison.md`, the
  plots it could draw, `report.md`), a W&B summary run in the sweep's group (the table and the plots), and the
  dashboard view (`tracking.save_view`); a sweep with failed jobs lists each with its reason and exits with 1.
"""

from __future__ import annotations

import sys
from datetime import datetime
from pathlib import Path

from hydra.experimental.callback import Callback
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import naming, records, tracking
from gsm8k_lora.config import LoggerConfig
from gsm8k_lora.reporting.report import build_sweep


def logger_config(config: DictConfig) -> LoggerConfig:
    return LoggerConfig(**OmegaConf.to_container(config.logger, resolve=True))


class SweepCallback(Callback):
    def on_multirun_start(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if records.read_sweep(sweep_dir):
            return  # run again into the same directory: the same sweep, the same group
        started = datetime.now()
        name = naming.sweep_name(config)
        group = OmegaConf.select(config, "logger.group") or naming.sweep_group(name, started)
        sweep_dir.mkdir(parents=True, exist_ok=True)
        records.write_json(sweep_dir / records.SWEEP, {"name": name, "started": started.isoformat(timespec="seconds"),
                                                    "group": group, "swept": naming.swept_keys(config)})

    def on_multirun_end(self, config: DictConfig, **kwargs) -> None:
        sweep_dir = Path(config.hydra.sweep.dir)
        if not any(p.is_dir() and p.name.isdigit() for p in sweep_dir.iterdir()):
            return  # no job ran
        text, files, figures, comparison = build_sweep(sweep_dir)
        for name, content in files.items():
            records.write_text(sweep_dir / name, content)
        drawn = records.write_figures(sweep_dir, figures)
        records.write_text(sweep_dir / "report.md", text)
        sweep = records.read_sweep(sweep_dir)
        tracking.log_sweep_summary(logger_config(config), sweep_dir, sweep, comparison, drawn)
        failed = [row for row in comparison.rows if row["status"] != "done"]
        print(f"sweep: {len(comparison.rows) - len(failed)} of {len(comparison.rows)} jobs done; comparison and "
              f"report in {sweep_dir}")
        if failed:
            for row in failed:
                print(f"  job {row['job']} {row['status']}: {row['error'] or 'no result (see its directory)'}",
                      file=sys.stderr)
            sys.exit(1)

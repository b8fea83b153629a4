"""Weights & Biases: the one module that talks to it.

W&B never needs an account here: with no API key configured the run logs offline (files that
`wandb sync` uploads later), and any failure to start falls back to offline with one line saying so.
A failure mid-run turns W&B off with one line, never the training: the run directory keeps every figure.
No key or token is ever written: the run directory holds the resolved config, not the environment.
The recipe holds one `Tracker` and hands it what to log; with `logger=none` (or on a rank other than 0)
the tracker is off and each call does nothing.
"""

from __future__ import annotations

import netrc
import os
import sys
from pathlib import Path

import wandb

from gsm8k_lora.config import LoggerConfig

PREDICTION_COLUMNS = ("id", "model", "question", "gold", "completion", "pred", "correct", "lm_eval_strict_correct",
                      "lm_eval_flexible_correct", "hit_token_limit", "repetition_loop", "num_steps", "error_category",
                      "problem_type")


def has_wandb_key() -> bool:
    if os.environ.get("WANDB_API_KEY"):
        return True
    try:
        return netrc.netrc().authenticators("api.wandb.ai") is not None
    except (OSError, netrc.NetrcParseError):
        return False


def resolve_mode(cfg: LoggerConfig) -> str:
    if os.environ.get("WANDB_MODE") in ("offline", "disabled", "online"):
        return os.environ["WANDB_MODE"]
    if cfg.mode != "auto":
        return cfg.mode
    return "online" if has_wandb_key() else "offline"


class Tracker:
    """One W&B run, or none (`run is None`): every method is then a no-op."""

    def __init__(self, run=None):
        self.run = run

    def callback(self):
        """transformers' W&B callback for the Trainer, guarded (`safe_wandb_callback`); None when off."""
        return safe_wandb_callback() if self.run is not None else None

    def summary(self, figures: dict) -> None:
        if self.run is not None:
            self.run.summary.update({k: v for k, v in figures.items() if isinstance(v, (int, float, str))})

    def predictions(self, predictions: dict[str, list[dict]]) -> None:
        if self.run is not None:
            rows = [[r[c] for c in PREDICTION_COLUMNS] for records in predictions.values() for r in records]
            self.run.log({"eval/predictions": wandb.Table(columns=list(PREDICTION_COLUMNS), data=rows)})

    def images(self, paths: list[Path]) -> None:
        if self.run is not None:
            self.run.log({f"plots/{p.stem}": wandb.Image(str(p)) for p in paths})

    def finish(self, exit_code: int = 0) -> None:
        # Hydra runs multirun jobs in one process: an unfinished run would swallow the next job's logs.
        if self.run is not None:
            self.run.finish(exit_code=exit_code)
            self.run = None


def start(cfg: LoggerConfig, run_dir: Path, name: str, config: dict) -> Tracker:
    """Start a W&B run (a tracker that is off when logging is off); fall back to offline if online fails."""
    if cfg.backend != "wandb":
        return Tracker()
    mode = resolve_mode(cfg)
    if mode == "offline":
        quiet_offline()
    kwargs = dict(project=cfg.project, entity=cfg.entity, group=cfg.group, tags=list(cfg.tags), name=name,
                  config=config, dir=str(run_dir), reinit="finish_previous")
    try:
        run = wandb.init(mode=mode, settings=_settings(cfg), **kwargs)
    except Exception as err:  # bad key, no network, server error: the training result must not depend on W&B
        if mode != "online":
            raise
        print(f"W&B online start failed ({type(err).__name__}); logging offline instead", file=sys.stderr)
        mode = "offline"
        quiet_offline()
        run = wandb.init(mode=mode, settings=_settings(cfg), **kwargs)
    if mode == "offline":
        print(f"W&B is logging offline to {run.dir}; upload later with: wandb sync {Path(run.dir).parent}")
    else:
        print(f"W&B run: {run.url}")
    link = run.url if mode == "online" else f"offline: wandb sync {Path(run.dir).parent}"
    (run_dir / "wandb_run.txt").write_text(f"{link}\n", encoding="utf-8")
    return Tracker(run)


def _settings(cfg: LoggerConfig) -> wandb.Settings:
    # silent: W&B's own banner (syncing mode, local directory, `wandb leet`) would stand beside the package's one
    # line that says where the run logs and how to sync it
    return wandb.Settings(init_timeout=cfg.init_timeout_s, silent=True)


def quiet_offline() -> None:
    """Offline, W&B warns "URL not available in offline run" each time anything asks for the run's URL (TRL's
    model card does, at every checkpoint), a line a user can do nothing about; the package already said the
    run is offline and how to sync it. W&B's terminal warnings are a process setting (`wandb.setup`): off
    for an offline run, so they are not shown."""
    wandb.setup(wandb.Settings(show_warnings=False, quiet=True))


def safe_wandb_callback():
    """transformers' WandbCallback, except that a W&B failure mid-run (service crash, lost network, quota)
    turns W&B logging off with one line instead of ending the training."""
    # Imported here, not at the top: transformers' W&B integration prints "[INFO] Running in WANDB offline
    # mode" to stdout when it is imported, which would land in the output of every command (`--cfg`, `--help`).
    from transformers.integrations import WandbCallback

    class SafeWandbCallback(WandbCallback):
        failed = False

    for name in ("setup", "on_train_begin", "on_train_end", "on_log", "on_save", "on_predict"):
        setattr(SafeWandbCallback, name, _guarded(getattr(WandbCallback, name)))
    return SafeWandbCallback()


def _guarded(original):
    def method(self, *args, **kwargs):
        if self.failed:
            return None
        try:
            return original(self, *args, **kwargs)
        except Exception as err:
            self.failed = True
            print(f"W&B failed ({type(err).__name__}: {err}); training goes on without W&B, and the run "
                  f"directory keeps every figure", file=sys.stderr)
            return None

    return method

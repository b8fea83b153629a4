"""What keeps a paid run from being lost: complete-checkpoint markers, resume, graceful stop on
SIGINT/SIGTERM, a stop on a non-finite loss, and an out-of-memory message that says what to change.

transformers writes a checkpoint's files one by one, so a run killed mid-save leaves a half-written
`checkpoint-N`. The `.complete` marker is written after the Trainer has finished saving, and resume
only picks checkpoints that carry it.
"""

from __future__ import annotations

import math
import os
import signal
import sys
from collections.abc import Callable
from pathlib import Path

from transformers import TrainerCallback

from gsm8k_lora.errors import RunStopped
from gsm8k_lora.records import CHECKPOINT_MARKER as MARKER
from gsm8k_lora.records import complete_checkpoints


def resume_checkpoint(setting: str, checkpoint_dir: Path) -> str | None:
    """`never`: start fresh; `auto`: the last complete checkpoint, if any; else a checkpoint path."""
    if setting == "never":
        return None
    if setting == "auto":
        done = complete_checkpoints(checkpoint_dir)
        return str(done[-1]) if done else None
    if not (Path(setting) / "trainer_state.json").exists():
        raise RunStopped(f"trainer.resume={setting!r} is not a checkpoint directory (no trainer_state.json)", 2)
    return setting


class CheckpointGuard(TrainerCallback):
    """Marks saved checkpoints complete; stops cleanly on SIGINT/SIGTERM and on a non-finite loss."""

    def __init__(self, checkpoint_dir: Path, main_process: bool, on_stop_now: Callable[[], None] | None = None):
        self.checkpoint_dir, self.main_process = checkpoint_dir, main_process
        self.on_stop_now = on_stop_now  # says the one line (and records the stop) before the process ends
        self.signal_name: str | None = None
        self._previous: dict = {}

    def _handle(self, signum, frame) -> None:
        if self.signal_name is not None:  # a second signal: stop now
            if self.on_stop_now is None:
                raise KeyboardInterrupt
            # Ended here rather than by an exception, which library code in flight (a save, a progress bar,
            # a finaliser) may print as a traceback or swallow: the line said is the last word.
            self.on_stop_now()
            sys.stdout.flush()
            sys.stderr.flush()
            os._exit(128 + signum)  # 130 for SIGINT, 143 for SIGTERM, as the first signal's stop
        self.signal_name = signal.Signals(signum).name
        print(f"\n{self.signal_name} received: saving a checkpoint after this step, then stopping "
              f"(send it again to stop at once)", file=sys.stderr, flush=True)

    def on_train_begin(self, args, state, control, **kwargs):
        for sig in (signal.SIGINT, signal.SIGTERM):
            self._previous[sig] = signal.signal(sig, self._handle)

    def on_train_end(self, args, state, control, **kwargs):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def on_step_end(self, args, state, control, **kwargs):
        if self.signal_name is not None:
            control.should_save = True
            control.should_training_stop = True

    def on_save(self, args, state, control, **kwargs):
        if self.main_process:
            folder = self.checkpoint_dir / f"checkpoint-{state.global_step}"
            if folder.is_dir():
                (folder / MARKER).write_text(f"{state.global_step}\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                last = complete_checkpoints(self.checkpoint_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
                raise RunStopped(f"{key} became {value} at step {state.global_step}; {kept}. Lower "
                                 f"trainer.learning_rate or check the data; training was stopped")


def oom_message(cfg) -> str:
    t, m = cfg.trainer, cfg.model
    hints = [f"trainer.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
             f"trainer.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} (same global batch)"]
    if not t.gradient_checkpointing:
        hints.append("trainer.gradient_checkpointing=true")
    if not m.load_in_4bit:
        hints.append("model=falcon3_1b_qlora (4-bit base weights)")
    if t.max_length and t.max_length > 512:
        hints.append("trainer.max_length=512")
    return "CUDA ran out of memory during training. To use less memory: " + "; or ".join(hints)

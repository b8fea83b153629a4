"""What keeps a paid run from being lost: complete-checkpoint markers, resume, graceful stop on
SIGINT/SIGTERM, a stop on a non-finite loss, the size of a checkpoint (the room it needs:
`RunDirectory.room_problem`), and an out-of-memory message that says what to change.

transformers writes a checkpoint's files one by one, so a run killed mid-save leaves a half-written
`checkpoint-N`. The `.complete` marker is written after the Trainer has finished saving, and resume
only picks checkpoints that carry it.
"""

from __future__ import annotations

import math
import tempfile
from pathlib import Path

from transformers import TrainerCallback

from gsm8k_lora import parallel
from gsm8k_lora.config import ModelConfig, TrainerConfig
from gsm8k_lora.errors import RunStopped
from gsm8k_lora.rundir import CHECKPOINT_MARKER as MARKER
from gsm8k_lora.rundir import complete_checkpoints
from gsm8k_lora.stopping import STOP


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
    """Marks saved checkpoints complete; stops cleanly on a SIGINT/SIGTERM (`stopping.STOP`: after the current
    step, or between two batches of the validation loss) and on a non-finite loss."""

    def __init__(self, checkpoint_dir: Path):
        self.checkpoint_dir = checkpoint_dir

    def on_step_end(self, args, state, control, **kwargs):
        if STOP.requested:
            control.should_save = True
            control.should_training_stop = True

    def on_prediction_step(self, args, state, control, **kwargs):
        STOP.check()  # a stop asked for during the validation loss: within one batch, not after the whole pass

    def on_save(self, args, state, control, **kwargs):
        self.mark(state.global_step)

    def mark(self, step: int) -> None:
        """The checkpoint of `step` marked complete, once every rank has written its part of it (each its own RNG
        state): every rank calls this after the Trainer's save, and rank 0 marks after the barrier."""
        parallel.barrier()
        if parallel.is_main_process():
            folder = self.checkpoint_dir / f"checkpoint-{step}"
            if folder.is_dir():
                (folder / MARKER).write_text(f"{step}\n")

    def on_log(self, args, state, control, logs=None, **kwargs):
        if not parallel.is_main_process():  # every rank logs the same gathered loss: rank 0 says it once
            return
        for key in ("loss", "eval_loss"):
            value = (logs or {}).get(key)
            if isinstance(value, float) and not math.isfinite(value):
                last = complete_checkpoints(self.checkpoint_dir)
                kept = f"the last good checkpoint is {last[-1]}" if last else "no checkpoint was saved before it"
                raise RunStopped(f"{key} became {value} at step {state.global_step}; {kept}. Lower "
                                 f"trainer.learning_rate or check the data; training was stopped")


def checkpoint_bytes(trainable: int, tokenizer) -> int:
    """About what one checkpoint of this run takes: the adapter (float32), AdamW's two moments, the tokenizer's
    files, and the states (scheduler, RNG, trainer) and model card."""
    with tempfile.TemporaryDirectory() as tmp:
        tokenizer.save_pretrained(tmp)
        tokenizer_bytes = sum(p.stat().st_size for p in Path(tmp).iterdir() if p.is_file())
    return 12 * trainable + tokenizer_bytes + 64 * 1024


def oom_message(t: TrainerConfig, m: ModelConfig) -> str:
    """What to say when CUDA runs out of memory during training: what would use less, for these settings."""
    hints = [f"trainer.per_device_train_batch_size={max(1, t.per_device_train_batch_size // 2)} "
             f"trainer.gradient_accumulation_steps={t.gradient_accumulation_steps * 2} (same global batch)"]
    if not t.gradient_checkpointing:
        hints.append("trainer.gradient_checkpointing=true")
    if not m.load_in_4bit:
        hints.append("model=falcon3_1b_qlora (4-bit base weights)")
    if t.max_length and t.max_length > 512:
        hints.append("trainer.max_length=512")
    return "CUDA ran out of memory during training. To use less memory: " + "; or ".join(hints)

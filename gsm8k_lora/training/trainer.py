"""TRL's SFTTrainer, with its per-step figures made optional (`trainer.step_metrics=false`).

At every training micro-batch SFTTrainer reads its entropy, next-token accuracy and token count back to the
host (`.item()`), and transformers reads the tokens seen back too: each read waits for the GPU to finish the
forward pass before the backward pass can be queued, so the host cannot run ahead of the device. Neither
library has a switch for it, so this subclass computes the training loss as TRL's own default path does (its
fused LM head's log-probabilities, summed over the completion tokens, over the number of items) without the
reads, and counts the tokens seen on the device, read at logging steps only. Evaluation (the validation loss and
its next-token accuracy) is TRL's, unchanged. Any other TRL loss (label smoothing, a custom `compute_loss_func`,
DFT, an MoE aux loss, sequence parallelism) goes to TRL: the subclass takes only the path it reproduces.
"""

from __future__ import annotations

import torch
from trl import SFTTrainer

__all__ = ["QuietSFTTrainer", "SFTTrainer"]


class QuietSFTTrainer(SFTTrainer):
    """SFTTrainer without host reads in its training step (see the module's docstring)."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self._tokens: torch.Tensor | int = 0  # tokens trained on since the last log, not yet read

    def _plain_nll(self) -> bool:
        args = self.args
        return (self.compute_loss_func is None and self.label_smoother is None and args.loss_type == "nll"
                and not self.aux_loss_enabled and self.accelerator.parallelism_config is None)

    def compute_loss(self, model, inputs, return_outputs=False, num_items_in_batch=None):
        if not (self.model.training and self._plain_nll()):
            return super().compute_loss(model, inputs, return_outputs, num_items_in_batch)
        inputs["use_cache"] = False
        mask = inputs.get("attention_mask")  # padded batches; padding-free ones have no pad to leave out
        self._tokens = self._tokens + (mask.sum() if mask is not None else inputs["input_ids"].numel())
        outputs = model(**inputs, fused_lm_head=True)
        count = outputs.label_mask.sum() if num_items_in_batch is None else num_items_in_batch
        loss = -outputs.log_probs.sum() / torch.as_tensor(count).clamp(min=1)
        if self.args.average_tokens_across_devices and num_items_in_batch is not None:
            loss = loss * (self.accelerator.num_processes // self.get_tp_size())
        return (loss, outputs) if return_outputs else loss

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        """The tokens seen, read at a logging step (the loss is read there anyway)."""
        self.state.num_input_tokens_seen += int(self._tokens)
        self._tokens = 0
        logs.setdefault("num_input_tokens_seen", self.state.num_input_tokens_seen)
        super().log(logs, start_time)

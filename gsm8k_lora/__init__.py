"""LoRA fine-tuning on GSM8K with TRL and Hydra, measured honestly. The map: ARCHITECTURE.md."""

import logging
import warnings


def quiet_libraries() -> None:
    """Silence, in this one place, what libraries print that a user can neither act on nor learn from; the
    package's own lines stay. Called when the package is imported, because bitsandbytes speaks at import:
    - bitsandbytes warns on every CPU import (PEFT imports it) that an optional kernel package is missing,
      though it falls back to its own CPU code;
    - TRL reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning;
    - TRL warns that one example per micro-batch "annihilates" padding-free training, where `trainer=cpu_real`
      chose exactly that because `make bench` measured it faster than packs of 4 on a CPU (docs/results.md).
    W&B's offline "URL not available" warnings are turned off where an offline run starts (`tracking.py`), and
    matplotlib's categorical-units notes are avoided where the plots are drawn (`reporting/plots.py`)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "annihilate the benefits of padding-free" not in record.getMessage())


quiet_libraries()

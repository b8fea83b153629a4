"""LoRA fine-tuning on GSM8K with TRL and Hydra, measured honestly."""

import logging

# PEFT imports bitsandbytes whenever it is installed, and on a CPU bitsandbytes then warns that an
# optional accelerated kernel package is missing (it falls back to its own CPU code). The warning would
# open every run, 4-bit or not; only that logger is quietened.
logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)

"""A fault for the data-parallel tests, loaded by Python at start-up when this folder is on PYTHONPATH: the rank
named by GSM8K_LORA_TEST_FAIL_RANK fails in its training step GSM8K_LORA_TEST_FAIL_STEP, as a bad batch would."""

import os

if os.environ.get("GSM8K_LORA_TEST_FAIL_RANK") == os.environ.get("RANK"):
    from transformers import Trainer

    from gsm8k_lora.errors import DataError

    _step = Trainer.training_step

    def training_step(self, *args, **kwargs):
        if self.state.global_step >= int(os.environ.get("GSM8K_LORA_TEST_FAIL_STEP", "0")):
            raise DataError(f"a batch this rank cannot train on (the test's fault, step {self.state.global_step})")
        return _step(self, *args, **kwargs)

    Trainer.training_step = training_step

"""LoRA fine-tuning on GSM8K with TRL and Hydra, measured honestly. The map: ARCHITECTURE.md."""

import importlib.abc
import importlib.util
import logging
import sys
import warnings


def quiet_libraries() -> None:
    """Silence, in this one place, what libraries print that a user can neither act on nor learn from; the
    package's own lines stay. Called when the package is imported, because bitsandbytes speaks at import:
    - bitsandbytes warns on every CPU import (PEFT imports it) that it could not load its Hub kernel (which this
      package refuses it: `BitsandbytesOffTheHub`), though it falls back to its own CPU code;
    - TRL reads `model.is_gradient_checkpointing`, which transformers 5 deprecates with a FutureWarning;
    - TRL warns that one example per micro-batch "annihilates" padding-free training, where `trainer=cpu_real`
      chose exactly that because `make bench` measured it faster than packs of 4 on a CPU (docs/results.md).
    W&B's offline "URL not available" warnings are turned off where an offline run starts (`tracking.py`), and
    matplotlib's categorical-units notes are avoided where the plots are drawn (`reporting/plots.py`)."""
    logging.getLogger("bitsandbytes.backends.cpu.ops").setLevel(logging.ERROR)
    warnings.filterwarnings("ignore", message=r".*`is_gradient_checkpointing` is deprecated", category=FutureWarning)
    logging.getLogger("trl.trainer.sft_trainer").addFilter(
        lambda record: "annihilate the benefits of padding-free" not in record.getMessage())


def _refuse_hub_kernel(repo_id: str, *args, **kwargs):
    raise RuntimeError(f"{repo_id} is not fetched: Hub kernels are off unless a run pins them (model.hub_kernels)")


class BitsandbytesOffTheHub(importlib.abc.MetaPathFinder):
    """bitsandbytes 0.50, which PEFT imports, fetches `kernels-community/quantization-bitsandbytes` (any version 1)
    from the Hub at import, on every CPU with AVX512-BF16 (a GPU machine's host CPU too), and runs it for CPU 4-bit
    matmuls; nothing in bitsandbytes turns that off. Hub kernels are this package's decision (`model/kernels.py`),
    so while bitsandbytes is imported the `kernels` package's `get_kernel` refuses, and bitsandbytes keeps its
    own CPU code, as it does wherever the fetch fails. Installed when the package is imported (standard library
    only: the door stays light); a no-op where bitsandbytes was imported first."""

    finding = False  # find_spec asks the other finders for bitsandbytes' own spec, not this one again

    def find_spec(self, name, path=None, target=None):
        if name != "bitsandbytes" or self.finding:
            return None
        self.finding = True
        try:
            spec = importlib.util.find_spec(name)
        finally:
            self.finding = False
        if spec is None or spec.loader is None:
            return spec
        exec_module = spec.loader.exec_module

        def exec_off_the_hub(module) -> None:
            try:
                import kernels
            except ImportError:  # no `kernels`: bitsandbytes has nothing to fetch with
                return exec_module(module)
            get_kernel, kernels.get_kernel = kernels.get_kernel, _refuse_hub_kernel
            try:
                exec_module(module)
            finally:
                kernels.get_kernel = get_kernel
                if self in sys.meta_path:  # bitsandbytes is loaded: nothing more to watch
                    sys.meta_path.remove(self)

        spec.loader.exec_module = exec_off_the_hub
        return spec


quiet_libraries()
if "bitsandbytes" not in sys.modules:
    sys.meta_path.insert(0, BitsandbytesOffTheHub())

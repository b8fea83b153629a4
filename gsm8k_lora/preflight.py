"""What this machine cannot do for a validated config, found before anything is loaded, and said once.

A newcomer's first command on a laptop (`python -m gsm8k_lora.train lora.r=8`: the GPU preset, the hub's
model and data) meets several problems; `problems(cfg)` collects every one, so they are said at once:
- device: settings that need a CUDA GPU (bf16, fp16, TF32) or bitsandbytes kernels for this device;
- sources: a hub model or dataset while the hub does not answer and the local cache lacks it; a local path
  that does not exist or holds no data; a `trainer.resume` path that is not a checkpoint.
`message(...)` turns them into one line that names each key and what runs here instead. Then `check_files(cfg)`
reads the files the config hands the package (`data/files.py`, `model/files.py`), cheaply, and a broken one is
one line naming it (DataError or ModelLoadError). Only cheap libraries are imported at the top: this runs in the
entry points' door, before torch is needed.
"""

from __future__ import annotations

import importlib.util
import os
from dataclasses import dataclass
from pathlib import Path

from huggingface_hub.errors import HFValidationError
from huggingface_hub.utils import validate_repo_id

from gsm8k_lora import hub
from gsm8k_lora.config import BUILTIN_FALCON3_SHAPE, BUILTIN_TINY, Config, DataConfig, ModelConfig
from gsm8k_lora.data.files import LOCAL_SUFFIXES, check_local, split_files
from gsm8k_lora.model import files as model_files
from gsm8k_lora.model import kernels

BUILTIN = "builtin:"


@dataclass(frozen=True)
class Problem:
    key: str
    value: object
    why: str  # what it needs that this machine lacks, e.g. "needs a CUDA GPU"
    kind: str  # device | offline | kernels | path: chooses the advice

    def __str__(self) -> str:
        return f"{self.key}={self.value!r} {self.why}"


def _cuda() -> tuple[bool, bool, int]:
    """(a CUDA GPU, one with bf16, its compute capability major)."""
    import torch  # deferred: the door answers a typo without the 2 s torch takes to import

    if not torch.cuda.is_available():
        return False, False, 0
    return True, torch.cuda.is_bf16_supported(), torch.cuda.get_device_capability()[0]


def cpu_has_bf16() -> bool:
    """Native bf16 matmuls on this CPU (AVX512-BF16 or AMX): the instructions, not a guess from the model name."""
    import torch  # deferred, as above

    return bool(torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported())


# Answer engines made for a GPU: transformers' continuous batching (paged attention, CUDA graphs) ran at half the padded
# path's speed on this project's CPUs, and under the test suite's worker processes one of them died in it.
CUDA_ENGINES = {"paged": "needs a CUDA GPU (transformers' continuous batching is built for one; eval.engine=slots "
                         "is the CPU's fastest)"}


def device_problems(cfg: Config, training: bool) -> list[Problem]:
    problems = []
    if training:
        t = cfg.trainer
        cuda, cuda_bf16, major = _cuda()
        cuda = cuda and not t.use_cpu
        if t.bf16 and not (cuda and cuda_bf16):
            if not cuda and t.use_cpu and cpu_has_bf16():
                pass  # bf16 autocast on a CPU with bf16 instructions
            elif t.use_cpu:
                problems.append(Problem("trainer.bf16", t.bf16, "needs a CPU with bf16 instructions (AVX512-BF16 "
                                        "or AMX), which this one lacks", "device"))
            else:
                problems.append(Problem("trainer.bf16", t.bf16, "needs a CUDA GPU with bf16", "device"))
        if t.fp16 and not cuda:
            problems.append(Problem("trainer.fp16", t.fp16, "needs a CUDA GPU", "device"))
        if t.tf32 and not (cuda and major >= 8):
            problems.append(Problem("trainer.tf32", t.tf32, "needs an Ampere or newer CUDA GPU", "device"))
        if t.use_liger_kernel and not cuda:
            problems.append(Problem("trainer.use_liger_kernel", True, "needs a CUDA GPU (Liger's kernels are Triton's)",
                                    "device"))
        elif t.use_liger_kernel and importlib.util.find_spec("liger_kernel") is None:
            problems.append(Problem("trainer.use_liger_kernel", True, "needs liger-kernel: pip install -e .[liger]",
                                    "path"))
    if cfg.eval.enabled and cfg.eval.engine in CUDA_ENGINES and not _cuda()[0]:
        problems.append(Problem("eval.engine", cfg.eval.engine, CUDA_ENGINES[cfg.eval.engine], "device"))
    if cfg.model.load_in_4bit:
        why = four_bit_problem(cfg.trainer.use_cpu)
        if why:
            problems.append(Problem("model.load_in_4bit", True, why, "device"))
    return problems


def four_bit_problem(use_cpu: bool) -> str | None:
    """Why 4-bit weights cannot be loaded here (bitsandbytes missing, or no kernels for this device), or None."""
    cuda, _, _ = _cuda()
    if cuda and not use_cpu:
        return None
    try:
        import bitsandbytes  # an optional extra (.[qlora]), imported only when 4-bit weights are asked for
    except ImportError:
        return "needs bitsandbytes: pip install -e .[qlora]"
    if "cpu" not in getattr(bitsandbytes, "supported_torch_devices", ()):
        return f"needs a CUDA GPU (bitsandbytes {bitsandbytes.__version__} has no CPU kernels)"
    return None


def _is_repo_id(text: str) -> bool:
    try:
        validate_repo_id(text)
    except HFValidationError:
        return False
    return not text.startswith((".", "~", "/"))


def gguf_path(cfg: ModelConfig) -> Path | None:
    """`model.gguf_file` as a path, or as a file name inside the directory `model.name_or_path`; None if neither."""
    given = Path(cfg.gguf_file).expanduser()
    return next((p for p in (given, Path(cfg.name_or_path).expanduser() / given) if p.is_file()), None)


def model_problems(cfg: ModelConfig) -> list[Problem]:
    template = cfg.chat_template_path
    if template and not Path(template).expanduser().is_file():
        return [Problem("model.chat_template_path", template, "is no such file", "path")]
    if cfg.gguf_file:
        if gguf_path(cfg) is None:
            return [Problem("model.gguf_file", cfg.gguf_file, "is no such file (nor a file inside model.name_or_path)",
                            "path")]
        return []
    name = cfg.name_or_path
    if name.startswith(BUILTIN):
        known = (BUILTIN_TINY, BUILTIN_FALCON3_SHAPE)
        return [] if name in known else [Problem("model.name_or_path", name, f"is no built-in model; allowed: "
                                                 f"{', '.join(known)}", "path")]
    if cfg.source == "pypi":
        return []
    local = Path(name).expanduser()
    if local.is_dir():
        if not (local / "config.json").is_file():
            return [Problem("model.name_or_path", name, "is a directory without config.json: not a model directory",
                            "path")]
        return []
    if not _is_repo_id(name):
        return [Problem("model.name_or_path", name, "is no such directory, nor a hub id", "path")]
    if cfg.source == "auto" or hub.probe() or hub.model_in_cache(name, cfg.revision):
        return []  # auto: the PyPI copy where the hub does not answer
    return [Problem("model.name_or_path", name, "is on the hub, which does not answer, and not in the local cache",
                    "offline")]


def kernel_problems(cfg: ModelConfig) -> list[Problem]:
    """Pinned Hub kernels an offline run cannot load (`model/kernels.py`), and a request the environment forbids."""
    if not cfg.hub_kernels:
        return []
    given = [(f"model.hub_kernels.{layer}", spec) for layer, spec in cfg.hub_kernels.items()]
    switch = os.environ.get("USE_HUB_KERNELS", "YES")
    if switch.lower() not in ("true", "1", "y", "yes", "on"):  # transformers' own reading of the variable
        return [Problem(key, spec, f"is refused by USE_HUB_KERNELS={switch} in the environment, which transformers "
                        "obeys silently", "path") for key, spec in given]
    absent = {pin.layer for pin in kernels.missing(cfg.hub_kernels)}
    if not absent or hub.probe():
        return []
    return [Problem(key, spec, "is not in the local kernel cache", "kernels") for key, spec in given
            if key.rpartition(".")[2] in absent]


def data_problems(cfg: DataConfig) -> list[Problem]:
    if cfg.source == "synthetic":
        return []
    path = Path(cfg.path).expanduser()
    if cfg.source == "local":
        if not path.exists():
            return [Problem("data.path", cfg.path, "does not exist", "path")]
        if path.is_file():
            ok = path.suffix in LOCAL_SUFFIXES
        else:
            ok = bool(split_files(path, "train"))
        if not ok:
            return [Problem("data.path", cfg.path, f"holds no train* file of its own ({', '.join(LOCAL_SUFFIXES)}; "
                            "a directory in the hub repository's layout loads with data=gsm8k data.path=DIR)", "path")]
        return []
    if path.exists() or hub.probe() or hub.dataset_in_cache(cfg.path):
        return []
    return [Problem("data.path", cfg.path, "is on the hub, which does not answer, and not in the local cache",
                    "offline")]


def resume_problems(setting: str) -> list[Problem]:
    if setting in ("auto", "never") or (Path(setting) / "trainer_state.json").is_file():
        return []
    return [Problem("trainer.resume", setting, "is not a checkpoint directory (no trainer_state.json); allowed: auto, "
                    "never, or a checkpoint path", "path")]


def problems(cfg: Config, training: bool = True) -> list[Problem]:
    """Everything this machine cannot do for `cfg`, in the order a run would meet it."""
    found = device_problems(cfg, training) + data_problems(cfg.data) + model_problems(cfg.model)
    found += kernel_problems(cfg.model)
    return found + (resume_problems(cfg.trainer.resume) if training else [])


def check_files(cfg: Config, training: bool = True) -> None:
    """The files `cfg` hands the package, read by their formats' own readers before anything loads: local data,
    a model directory or GGUF file, a chat template, a checkpoint to resume from. The first broken one is a
    DataError or ModelLoadError, one line naming it. Called once `problems` found nothing."""
    if cfg.data.source == "local":
        check_local(cfg.data.path, cfg.data.max_bad_fraction)
    model = cfg.model
    if model.gguf_file:
        model_files.check_gguf(gguf_path(model))
    elif not model.name_or_path.startswith(BUILTIN) and Path(model.name_or_path).expanduser().is_dir():
        model_files.check_model_dir(Path(model.name_or_path).expanduser())
    if model.chat_template_path:
        model_files.template_text(Path(model.chat_template_path).expanduser())
    if training and cfg.trainer.resume not in ("auto", "never"):
        model_files.check_checkpoint(Path(cfg.trainer.resume))


CPU_ALTERNATIVES = ("make demo (the tiny model, a minute), make real (SmolLM2-135M-Instruct on the real GSM8K, "
                    "on this CPU), or add experiment=real_cpu data=local data.path=<a GSM8K copy: train/test .jsonl>")
CPU_SWEEP_ALTERNATIVES = ("make sweep EXP=smoke (the tiny model's 2 x 2 grid), or add experiment=real_cpu data=local "
                          "data.path=<a GSM8K copy: train/test .jsonl>")
OFFLINE_ALTERNATIVES = ("model.name_or_path=<a model directory>, data=local data.path=<train/test .jsonl files>, or "
                        "model=smollm2_135m (a copy on PyPI); make demo needs nothing")

KERNEL_ALTERNATIVES = ("fetch the pinned kernels first where the hub answers (`kernels download`, into the same "
                       "cache), or run without Hub kernels: model.hub_kernels={}")

PLURAL = {"needs": "need", "is": "are"}


def _plural(why: str) -> str:
    verb, _, rest = why.partition(" ")
    return f"{PLURAL.get(verb, verb)} {rest}"


def message(found: list[Problem], sweep: bool = False) -> str:
    """One line: every key this machine cannot serve, grouped by reason, then what runs here."""
    reasons: dict[str, list[Problem]] = {}
    for problem in found:
        reasons.setdefault(problem.why, []).append(problem)
    parts = []
    for why, group in reasons.items():
        keys = ", ".join(f"{p.key}={p.value!r}" for p in group)
        parts.append(f"{keys} {_plural(why) if len(group) > 1 else why}")
    kinds = {p.kind for p in found}
    if "device" in kinds:
        advice = f"Runs here: {CPU_SWEEP_ALTERNATIVES if sweep else CPU_ALTERNATIVES}"
    elif "offline" in kinds:
        advice = f"Offline, use local copies: {OFFLINE_ALTERNATIVES}"
    elif "kernels" in kinds:
        advice = f"Offline, {KERNEL_ALTERNATIVES}"
    else:
        advice = ""
    where = ""
    if kinds & {"device", "offline", "kernels"}:
        unreachable = kinds & {"offline", "kernels"}
        where = " on this machine" + (f" ({hub.endpoint()} does not answer)" if unreachable else "")
    line = f"this {'sweep' if sweep else 'config'} cannot run{where}: " + "; ".join(parts)
    return line + (f". {advice}" if advice else "")

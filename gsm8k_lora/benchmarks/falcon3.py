"""Benchmarks on a Falcon3-1B-shaped model (`model/shaped.py`: the real architecture, random weights, nothing
downloaded), where the package's speed levers are measured side by side.

On any machine: the base weights' memory in bf16 and in 4-bit NF4, as `model=falcon3_1b_qlora` loads them. On a
CUDA machine also, each as one variant of the seed's experiment at this shape (`experiment=falcon3_shape`: the GPU
preset `trainer=default`, and the eval settings it answers with) changed in one setting, trained on the same rows
for the same steps, in the order of `PLAN`:
- training levers (`LEVERS`): attention over padding-free batches (`flex_attention` against sdpa's dense
  block-diagonal mask), Liger's kernels, TRL's per-step figures left out (`trainer.step_metrics=false`), more rows
  a step, torch.compile, and the first three together; against TRL's plain defaults, and QLoRA: LoRA tokens/s,
  model FLOPs utilisation and peak memory of each;
- answer engines (`eval.engine`, `eval.merge_adapter`) on GSM8K test questions with a LoRA adapter attached, each
  row stopped at its reference solution's token count (random weights never stop by themselves): seconds and
  tokens/s of each engine, and how many questions each answers as padded `model.generate` does, in bf16;
- where the time of one training step and of the decode steps goes (`benchmarks/profiles.py`).
The answer engines' side is `benchmarks/answers.py`.
A `deadline` keeps the whole within the time the one-call GPU check gives it: what did not fit is named as not
measured. `progress` is handed the figures after each measurement, so a bench stopped from outside keeps them.
The test suite runs the same code on the CPU at a scaled-down shape.

MFU = 4 * N * real tokens/s / peak bf16 FLOP/s, where N counts only the parameters that do a matmul:
every Linear layer's weight, the LM head included (tied or not, counted once), but not the input
embedding (a table lookup, 0.27 B parameters in Falcon3-1B) nor the norms (elementwise). 4N per trained
token is LoRA with a frozen base: 2N forward + 2N for the activation gradients, no weight gradients;
recompute, attention scores and the adapters themselves are not counted.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from gsm8k_lora.benchmarks.answers import Answers, answer_rows
from gsm8k_lora.benchmarks.profiles import KernelProfile
from gsm8k_lora.benchmarks.real import matmul_params
from gsm8k_lora.benchmarks.training import bench_settings, gsm8k_like_rows, run_variant, variants
from gsm8k_lora.config import Config, compose
from gsm8k_lora.model.loading import load_model, weight_memory
from gsm8k_lora.model.shaped import FALCON3_1B, build, ensure
from gsm8k_lora.preflight import CUDA_ENGINES, four_bit_problem
from gsm8k_lora.training.sft import build_sft_config, trainer_class

# Dense bf16 peak of each GPU (vendor data sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0}
# Each training lever: the overrides that turn it on over the GPU preset.
LEVERS = {
    "package_default": [],
    "quiet_steps": ["trainer.step_metrics=false"],
    "flex_attention": ["model.attn_implementation=flex_attention"],
    "liger": ["trainer.use_liger_kernel=true"],
    "flex_liger_quiet": ["model.attn_implementation=flex_attention", "trainer.use_liger_kernel=true",
                         "trainer.step_metrics=false"],
    "rows_32": ["trainer.per_device_train_batch_size=32"],
    "compile": ["trainer.torch_compile=true"],
}
# What the CUDA bench measures, in order of value: the package's preset first (every ratio's reference), then the
# training levers and the answer engines in turns (each chooses a CUDA default), then what only informs (more rows a
# step, TRL's defaults, the profiles), then what compiles for minutes before its first step (torch.compile), and
# last the 4-bit copy (QLoRA, and the 4-bit weights' memory). Each runs while the deadline leaves it the time the
# last measurement of its kind took, so a bench cut short has measured what chooses the defaults.
PLAN = (("train", "package_default"), ("train", "flex_attention"), ("answer", "padded"), ("answer", "slots"),
        ("answer", "paged"), ("train", "quiet_steps"), ("train", "liger"), ("train", "flex_liger_quiet"),
        ("answer", "slots_merged"), ("answer", "static"), ("train", "rows_32"), ("train", "trl_defaults"),
        ("profile", "train_step"), ("profile", "decode"), ("train", "compile"), ("train", "qlora"),
        ("memory", "qlora"))
FLOOR_S = {"train": 20, "answer": 30, "profile": 20, "memory": 20}  # the least a kind needs before one is timed
NOT_REACHED = "not reached: the bench was stopped before it"
Progress = Callable[[dict], None]


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class Deadline:
    """Seconds left of the time the bench was given (None: no limit), and whether a measurement fits in them: it
    needs what the last of its kind took, or the kind's floor before any was timed."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds
        self.took: dict[str, float] = {}

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()

    def problem(self, kind: str) -> str | None:
        need, left = max(FLOOR_S[kind], self.took.get(kind, 0.0)), self.left()
        return None if left >= need else f"out of time: {left:.0f} s left, about {need:.0f} s needed"


def _meta_model(arch: dict):
    with torch.device("meta"):  # shapes only, no memory
        return LlamaForCausalLM(LlamaConfig(**arch))


def param_count(arch: dict) -> int:
    return sum(p.numel() for p in _meta_model(arch).parameters())


def matmul_param_count(arch: dict) -> int:
    """N of the MFU formula (`real.matmul_params`) for this architecture."""
    return matmul_params(_meta_model(arch))


def weight_memory_4bit(model_dir: Path, cfg: Config) -> dict:
    """Base-weight memory as `model=falcon3_1b_qlora` loads the model (`cfg`, with this directory): bf16, and
    4-bit NF4 with double quantisation."""
    model_cfg = dataclasses.replace(cfg.model, name_or_path=str(model_dir))
    model = load_model(str(model_dir), model_cfg)
    m = weight_memory(model, torch.bfloat16)
    del model
    return {"qlora_weights_gib_bf16": m["weights_gib_unquantised"], "qlora_weights_gib_4bit": m["weights_gib"],
            "qlora_weight_memory_saving": 1 - m["weights_gib"] / m["weights_gib_unquantised"]}


def lever_problem(overrides: list[str]) -> str | None:
    """Why a lever cannot run here (its package missing), or None."""
    if "trainer.use_liger_kernel=true" in overrides and importlib.util.find_spec("liger_kernel") is None:
        return "liger-kernel is not installed (pip install -e .[liger])"
    return None


def train_variant(name: str, cfg: Config, model_dir: Path, rows: list[dict], steps: int, peak: float | None,
                  n_matmul: int, four_bit: bool = False, callbacks: list | None = None, make_args=None) -> dict:
    """One training variant of `cfg` (its SFTConfig built as a run builds it, unless `make_args` gives another),
    with its FLOPs figures; a failure is kept as the variant's error, and the next variant runs."""
    own = make_args is None
    make_args = make_args or (lambda out: build_sft_config(cfg.trainer, Path(out), **bench_settings(steps)))
    try:
        result = run_variant(name, make_args, cfg, str(model_dir), rows, steps, load_in_4bit=four_bit,
                             callbacks=callbacks, trainer_class=trainer_class(cfg.trainer) if own else None)
    except Exception as err:  # a lever that does not work here is a finding, not the end of the bench
        return {"variant": name, "error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
    finally:
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
    tflops = 4 * n_matmul * result["real_tokens_per_s"] / 1e12  # see the module docstring
    return {**result, "model_tflops": tflops, "mfu": tflops / peak if peak else None}


def figure_key(kind: str, name: str) -> str:
    """The key a measurement's figures (or the reason it has none) go under."""
    return {"train": f"falcon3_{name}", "answer": f"gen_{name}", "memory": "qlora",
            "profile": "falcon3_train_step_profile" if name == "train_step" else "gen_decode_profile"}[kind]


def mark(out: dict, kind: str, name: str, why: str) -> None:
    """Record that a measurement has no figures, and why (a training variant as its own entry)."""
    if kind == "train":
        out[figure_key(kind, name)] = {"variant": name, "skipped": why}
    else:
        out[f"{figure_key(kind, name)}_skipped"] = why


def bench_falcon3(tiny_dir: Path, steps: int, quick: bool, arch: dict = FALCON3_1B,
                  preset: tuple[str, ...] = ("experiment=falcon3_shape",), training: bool | None = None,
                  prompts: int | None = None, gsm8k_dir: Path | None = None, deadline_s: float | None = None,
                  levers: dict[str, list[str]] | None = None, progress: Progress | None = None) -> dict:
    """Weight memory everywhere; where `training` (default: on CUDA) the measurements of `PLAN`. `preset`: the
    overrides every variant starts from (what the runs compose); `levers`: the training variants (default
    `LEVERS`); `progress`: handed the figures so far after each measurement."""
    cuda = torch.cuda.is_available()
    training = cuda if training is None else training
    levers = LEVERS if levers is None else levers
    progress = progress or (lambda figures: None)
    deadline = Deadline(deadline_s)  # building the model counts: a run that finds it cached saves that time
    n_matmul = matmul_param_count(arch)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    out: dict = {"falcon3_device": name, "falcon3_params": param_count(arch), "falcon3_matmul_params": n_matmul,
                 "peak_bf16_tflops": peak_tflops(name) if cuda else None}
    no_4bit = four_bit_problem(use_cpu=not cuda)
    with tempfile.TemporaryDirectory() as tmp:
        # Falcon3's own shape is the one a run builds (and keeps) for `builtin:falcon3_1b_shape`; others are built here
        model_dir = ensure() if arch == FALCON3_1B else build(Path(tmp) / "shaped", tiny_dir, arch)
        if not training:  # the weights' memory only
            if no_4bit is None:
                out.update(weight_memory_4bit(model_dir, compose(["model=falcon3_1b_qlora"])))
            else:
                mark(out, "memory", "qlora", f"model.load_in_4bit {no_4bit}")
            return out
        n = prompts or (64 if quick else 1319)
        cfg = compose(list(preset))
        answers = Answers(model_dir, cfg, answer_rows(gsm8k_dir, n), min(256, n))
        bench = Falcon3Bench(model_dir, cfg, list(preset), steps, out["peak_bf16_tflops"], n_matmul, answers)
        plan = [(kind, what) for kind, what in PLAN
                if (kind != "train" or what in levers or what in ("trl_defaults", "qlora"))
                and (kind != "profile" or cuda)]
        for kind, what in plan:
            mark(out, kind, what, NOT_REACHED)
        progress(out)
        for kind, what in plan:
            problem = bench.problem(kind, what, no_4bit) or deadline.problem(kind)
            if problem:
                mark(out, kind, what, problem)
                continue
            start = time.perf_counter()
            figures = bench.measure(kind, what, levers.get(what, []))
            deadline.took[kind] = time.perf_counter() - start
            out.pop(f"{figure_key(kind, what)}_skipped", None)
            out.update(figures)
            progress(out)
    return out


class Falcon3Bench:
    """The measurements of `PLAN` on one model directory: each training variant trains a freshly loaded model, the
    answer engines share one (`Answers`)."""

    def __init__(self, model_dir: Path, cfg: Config, preset: list[str], steps: int, peak: float | None,
                 n_matmul: int, answers: Answers):
        self.model_dir, self.cfg, self.preset, self.steps, self.peak = model_dir, cfg, preset, steps, peak
        self.n_matmul, self.answers = n_matmul, answers
        self.rows = gsm8k_like_rows(64 * steps)

    def problem(self, kind: str, what: str, no_4bit: str | None) -> str | None:
        """Why a measurement cannot run on this machine, or None."""
        if kind == "answer" and what in CUDA_ENGINES and not torch.cuda.is_available():
            return f"eval.engine={what} {CUDA_ENGINES[what]}"
        if what == "qlora" and no_4bit is not None:
            return f"model.load_in_4bit {no_4bit}"
        return lever_problem(LEVERS.get(what, [])) if kind == "train" else None

    def measure(self, kind: str, what: str, overrides: list[str]) -> dict:
        if kind == "answer":
            try:
                return self.answers.measure(what)
            except Exception as err:  # an engine that fails here is a finding, not the end of the bench
                return {f"gen_{what}_error": f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"}
        if kind == "profile":
            return self.answers.profile() if what == "decode" else self.profile_step()
        if kind == "memory":
            return weight_memory_4bit(self.model_dir, compose(["model=falcon3_1b_qlora"]))
        if what == "trl_defaults":
            make_args = variants(self.cfg, self.steps)["trl_defaults"]
            return {f"falcon3_{what}": self.train(what, self.cfg, make_args=make_args)}
        if what == "qlora":
            return {f"falcon3_{what}": self.train(what, self.cfg, four_bit=True)}
        return {f"falcon3_{what}": self.train(what, compose([*self.preset, *overrides]))}

    def train(self, name: str, cfg: Config, **kwargs) -> dict:
        return train_variant(name, cfg, self.model_dir, self.rows, self.steps, self.peak, self.n_matmul, **kwargs)

    def profile_step(self) -> dict:
        profiler = KernelProfile(step=2)
        train_variant("profile", self.cfg, self.model_dir, self.rows, 3, self.peak, self.n_matmul, callbacks=[profiler])
        return {"falcon3_train_step_profile": profiler.figures}

"""Benchmarks on a Falcon3-1B-shaped model (`model/shaped.py`: the real architecture, random weights, nothing
downloaded), where the package's speed levers are measured side by side.

On any machine: the base weights' memory in bf16 and in 4-bit NF4, as `model=falcon3_1b_qlora` loads them. On a
CUDA machine also, each as one variant of the GPU preset (`trainer=default`) changed in one setting, trained on the
same rows for the same steps:
- training levers (`LEVERS`): attention over padding-free batches (`flex_attention` against sdpa's dense
  block-diagonal mask), Liger's kernels, TRL's per-step figures left out (`trainer.step_metrics=false`), more rows
  a step, torch.compile, and the first three together; against TRL's plain defaults, and QLoRA: LoRA tokens/s,
  model FLOPs utilisation and peak memory of each;
- answer engines (`eval.engine`, `eval.merge_adapter`) on GSM8K test questions with a LoRA adapter attached, each
  row stopped at its reference solution's token count (random weights never stop by themselves): seconds and
  tokens/s of each engine, and how many questions each answers as padded `model.generate` does, in bf16;
- where the time of one training step and of the decode steps goes (CUDA kernels by kind, and the share of wall
  time the GPU was busy: the rest is the host).
A `deadline` keeps the whole within the time the one-call GPU check gives it: what did not fit is named as not
measured, in the order of value above. The test suite runs the same code on the CPU at a scaled-down shape.

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
from pathlib import Path

import torch
from peft import get_peft_model
from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback

from gsm8k_lora.benchmarks.generation import same_answers, timed
from gsm8k_lora.benchmarks.real import matmul_params
from gsm8k_lora.benchmarks.training import bench_settings, gsm8k_like_rows, run_variant, synchronize, variants
from gsm8k_lora.config import ENGINES, Config, compose
from gsm8k_lora.evaluation.generation import build_prompt, generate
from gsm8k_lora.model.loading import load, load_model, weight_memory
from gsm8k_lora.model.shaped import FALCON3_1B, build, ensure
from gsm8k_lora.preflight import CUDA_ENGINES, four_bit_problem
from gsm8k_lora.training.sft import build_lora_config, build_sft_config, trainer_class

# Dense bf16 peak of each GPU (vendor data sheets), for MFU.
PEAK_BF16_TFLOPS = {"H100 SXM": 989.4, "H100 80GB HBM3": 989.4, "H200": 989.4, "H100 PCIe": 756.0,
                    "H100 NVL": 835.0, "A100": 312.0, "L40S": 362.0}
# Each training lever: the overrides that turn it on over the GPU preset, in the order they are measured.
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
KERNEL_KINDS = (("matmul", ("gemm", "cutlass", "xmma", "cublas", "matmul")),
                ("attention", ("flash", "fmha", "attention", "flex", "sdpa")),
                ("dropout RNG", ("bernoulli", "dropout", "philox")), ("optimizer", ("adam", "multi_tensor")))


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_BF16_TFLOPS.items() if k in device_name), None)


class Deadline:
    """Seconds left of the time the bench was given; None: no limit."""

    def __init__(self, seconds: float | None):
        self.end = None if seconds is None else time.perf_counter() + seconds

    def left(self) -> float:
        return float("inf") if self.end is None else self.end - time.perf_counter()


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


class KernelProfile(TrainerCallback):
    """CUDA kernel time of one optimizer step by kind, and the share of its wall time the GPU was busy."""

    def __init__(self, step: int):
        self.step, self.figures = step, {}

    def on_step_begin(self, args, state, control, **kwargs):
        if state.global_step == self.step - 1:
            synchronize()
            self.profile = profile_kernels()
            self.profile.__enter__()
            self.start = time.perf_counter()

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            synchronize()
            self.profile.__exit__(None, None, None)
            self.figures = kernel_shares(self.profile, time.perf_counter() - self.start)


def profile_kernels():
    activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
    return torch.profiler.profile(activities=activities)


def kernel_shares(profile, wall_s: float) -> dict:
    """Each kind of CUDA kernel's time as a share of `wall_s`, and the GPU's busy share (all kernels)."""
    spent = dict.fromkeys([kind for kind, _ in KERNEL_KINDS] + ["other kernels"], 0.0)
    for event in profile.key_averages():
        if event.device_type != torch.autograd.DeviceType.CUDA:
            continue
        name = event.key.lower()
        kind = next((k for k, keys in KERNEL_KINDS if any(key in name for key in keys)), "other kernels")
        spent[kind] += event.self_device_time_total / 1e6
    busy = sum(spent.values())
    return {"wall_s": wall_s, "gpu_busy": busy / wall_s, **{k: v / wall_s for k, v in spent.items()}}


def answer_rows(gsm8k_dir: Path | None, n: int) -> list[dict]:
    """Test questions with reference solutions: GSM8K's own where a local copy is given, else GSM8K-like rows."""
    if gsm8k_dir is not None and (gsm8k_dir / "test.jsonl").exists():
        import json

        lines = (gsm8k_dir / "test.jsonl").read_text(encoding="utf-8").splitlines()
        return [json.loads(line) for line in lines[:n]]
    return gsm8k_like_rows(n, seed=3)


def bench_engines(model_dir: Path, cfg: Config, rows: list[dict], batch_size: int, deadline: Deadline) -> dict:
    """Answers by each engine with a LoRA adapter attached (the fine-tuned pass), each row stopped at its reference
    solution's token count (under `eval.max_new_tokens`), in bf16; and the slot loop on the adapter merged."""
    model, tokenizer = load(dataclasses.replace(cfg.model, name_or_path=str(model_dir)))
    model = get_peft_model(model.to("cuda" if torch.cuda.is_available() else "cpu"), build_lora_config(cfg.lora))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # PEFT starts B at zero: an adapter that changes nothing would merge to nothing
            torch.nn.init.normal_(param, std=0.02)
    model.config.use_cache = True
    ecfg = dataclasses.replace(cfg.eval, batch_size=batch_size, dtype="model")
    prompts = [build_prompt(tokenizer, r["question"], ecfg, [], None) for r in rows]
    limits = [len(tokenizer(r["answer"]).input_ids) + 1 for r in rows]  # the solution and its EOS
    generate(model, tokenizer, prompts[:4], dataclasses.replace(ecfg, max_new_tokens=4))  # warm-up
    out = {"gen_questions": len(rows), "gen_batch_size": batch_size, "gen_max_new_tokens": ecfg.max_new_tokens,
           "gen_reference_tokens_mean": sum(min(n, ecfg.max_new_tokens) for n in limits) / len(limits),
           "gen_note": "random weights never stop: each row is stopped at its reference solution's token count"}
    results = {}
    runs = [(engine, False) for engine in ("padded", *(e for e in ENGINES if e != "padded"))] + [("slots", True)]
    for engine, merge in runs:
        name = f"{engine}_merged" if merge else engine
        if engine in CUDA_ENGINES and not torch.cuda.is_available():
            out[f"gen_{name}_skipped"] = f"eval.engine={engine} {CUDA_ENGINES[engine]}"
            continue
        if deadline.left() < 30:
            out[f"gen_{name}_skipped"] = "out of time"
            continue
        try:
            synchronize()
            results[name] = timed(model, tokenizer, prompts, dataclasses.replace(ecfg, engine=engine,
                                                                                 merge_adapter=merge), limits)
            synchronize()
        except Exception as err:
            out[f"gen_{name}_error"] = f"{type(err).__name__}: {str(err).strip().splitlines()[0][:300]}"
            continue
        out.update({f"gen_{name}_seconds": results[name]["seconds"], f"gen_{name}_tokens": results[name]["kept_tokens"],
                    f"gen_{name}_tokens_per_s": results[name]["tokens_per_s"]})
        if "padded" in results and name != "padded":
            out[f"gen_{name}_same_answers_as_padded"] = same_answers(results[name], results["padded"])
    if torch.cuda.is_available() and "slots" in results and deadline.left() > 20:
        with profile_kernels() as profile:
            start = time.perf_counter()
            generate(model, tokenizer, prompts[:batch_size], dataclasses.replace(ecfg, max_new_tokens=32))
            synchronize()
        out["gen_decode_profile"] = kernel_shares(profile, time.perf_counter() - start)
    return out


def bench_falcon3(tiny_dir: Path, steps: int, quick: bool, arch: dict = FALCON3_1B,
                  preset: tuple[str, ...] = ("trainer=default",), training: bool | None = None,
                  prompts: int | None = None, gsm8k_dir: Path | None = None, deadline_s: float | None = None,
                  levers: dict[str, list[str]] | None = None) -> dict:
    """Weight memory everywhere; where `training` (default: on CUDA) the training levers, the answer engines, the
    profiles, TRL's defaults and QLoRA. `preset`: the overrides every lever starts from (the GPU preset a run
    composes); `levers`: the training variants (default `LEVERS`)."""
    cuda = torch.cuda.is_available()
    training = cuda if training is None else training
    deadline = Deadline(deadline_s)
    n_matmul = matmul_param_count(arch)
    name = torch.cuda.get_device_name(0) if cuda else "cpu"
    peak = peak_tflops(name) if cuda else None
    out: dict = {"falcon3_device": name, "falcon3_params": param_count(arch), "falcon3_matmul_params": n_matmul,
                 "peak_bf16_tflops": peak}
    cfg = compose(list(preset))
    no_4bit = four_bit_problem(use_cpu=not cuda)
    with tempfile.TemporaryDirectory() as tmp:
        # Falcon3's own shape is the one a run builds (and keeps) for `builtin:falcon3_1b_shape`; others are built here
        model_dir = ensure() if arch == FALCON3_1B else build(Path(tmp) / "shaped", tiny_dir, arch)
        if no_4bit is None:
            out.update(weight_memory_4bit(model_dir, compose(["model=falcon3_1b_qlora"])))
        else:
            out["qlora_skipped"] = f"model.load_in_4bit {no_4bit}"
        if not training:
            return out
        rows = gsm8k_like_rows(64 * steps)
        for lever, overrides in (LEVERS if levers is None else levers).items():
            problem = lever_problem(overrides) or ("out of time" if deadline.left() < 20 else None)
            out[f"falcon3_{lever}"] = ({"variant": lever, "skipped": problem} if problem else
                                       train_variant(lever, compose([*preset, *overrides]), model_dir, rows, steps,
                                                     peak, n_matmul))
        n = prompts or (64 if quick else 1319)
        out.update(bench_engines(model_dir, cfg, answer_rows(gsm8k_dir, n), min(256, n), deadline))
        if cuda and deadline.left() > 20:
            profiler = KernelProfile(step=2)
            train_variant("profile", cfg, model_dir, rows, 3, peak, n_matmul, callbacks=[profiler])
            out["falcon3_train_step_profile"] = profiler.figures
        for variant in ("trl_defaults", "qlora"):
            if variant == "qlora" and no_4bit is not None:
                continue
            if deadline.left() < 20:
                out[f"falcon3_{variant}"] = {"variant": variant, "skipped": "out of time"}
                continue
            make_args = variants(cfg, steps)["trl_defaults"] if variant == "trl_defaults" else None
            out[f"falcon3_{variant}"] = train_variant(variant, cfg, model_dir, rows, steps, peak, n_matmul,
                                                      four_bit=variant == "qlora", make_args=make_args)
    return out

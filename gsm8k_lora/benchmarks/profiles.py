"""Where the time of a CUDA step goes: kernel time by kind, and the share of wall time the GPU was busy (the rest is
the host). Used by the Falcon3-shaped bench (`benchmarks/falcon3.py`) for one training step and the decode steps."""

from __future__ import annotations

import time

import torch
from transformers import TrainerCallback

from gsm8k_lora.benchmarks.training import synchronize

KERNEL_KINDS = (("matmul", ("gemm", "cutlass", "xmma", "cublas", "matmul")),
                ("attention", ("flash", "fmha", "attention", "flex", "sdpa")),
                ("dropout RNG", ("bernoulli", "dropout", "philox")), ("optimizer", ("adam", "multi_tensor")))


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

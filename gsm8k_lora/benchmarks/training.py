"""Training throughput for `make bench`: real (non-padding) tokens per second and padding efficiency.

Each variant trains the same freshly loaded model on the same rows for the same number of steps,
in one process, so the ratio between variants holds on a noisy machine. The package's variant is built
by the same `build_sft_config` as a run, from the trainer preset a run of this device composes; the
other is TRL's plain `SFTConfig` defaults. Both differ from a run only in `bench_settings` (a fixed
number of steps, no evaluation or checkpoints, the same seed). Tokens are counted where the training loop
runs (`TokenCounter`), whatever process built the batch: `real` are example tokens, `computed` are the
positions the model ran, padding included.
"""

from __future__ import annotations

import dataclasses
import gc
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

import torch
from datasets import Dataset
from transformers import AutoTokenizer, TrainerCallback
from transformers.trainer_pt_utils import get_length_grouped_indices
from trl import SFTConfig, SFTTrainer
from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

from gsm8k_lora.config import Config, compose
from gsm8k_lora.data import synthetic
from gsm8k_lora.data.formatting import render_prompt, to_prompt_completion
from gsm8k_lora.data.gsm8k import format_answer, parse_answer
from gsm8k_lora.model.loading import load_model, load_tokenizer
from gsm8k_lora.training.sft import build_lora_config, build_sft_config

# A variant's SFTConfig, given the directory it may write to.
ArgsFactory = Callable[[str], SFTConfig]


def gsm8k_like_rows(n: int, seed: int = 0) -> list[dict]:
    """Rows whose solution lengths spread like GSM8K's (about 2 to 8 reasoning lines, a long tail):
    each row chains 1-4 generated problems into one question and one worked solution."""
    rng = random.Random(seed)
    pool = synthetic.generate(4 * n, seed=seed + 7)
    rows = []
    for i in range(n):
        k = rng.choices([1, 2, 3, 4], weights=[4, 3, 2, 1])[0]
        parts = pool[4 * i: 4 * i + k]
        question = " Then: ".join(p["question"] for p in parts)
        answers = [parse_answer(p["answer"]) for p in parts]
        steps = [line for a in answers for line in a.solution.strip().splitlines()]
        total = sum(int(a.final) for a in answers)
        rows.append({"question": question, "answer": format_answer("\n".join(steps) + f"\nIn all: {total}.", total)})
    return rows


def synchronize() -> None:
    """Wait for queued CUDA work, so a clock read after it covers that work; nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class AfterWarmup(TrainerCallback):
    """A TrainerCallback that notes the clock and the token count when the first optimizer step ends,
    so one-off costs (kernel selection, allocator growth, optimizer state) stay out of the rate."""

    def __init__(self, counter: TokenCounter):
        self.counter, self.time, self.real = counter, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            synchronize()
            self.time, self.real = time.perf_counter(), self.counter.real


class TokenCounter:
    """The tokens of each micro-batch the Trainer trains on, counted in its training step: the collator runs in
    the data loader's worker processes when `dataloader_num_workers` > 0, where a count is lost to this process.
    Real tokens are the attention mask's ones (padded batches) or every position (padding-free batches, which
    carry position ids and no pad); summed on the batch's device and read once, so counting adds no sync."""

    def __init__(self, trainer):
        self._step, self._real, self.computed = trainer.training_step, 0, 0
        trainer.training_step = self

    def __call__(self, model, inputs, *args, **kwargs):
        ids = inputs["input_ids"]
        self.computed += ids.numel()
        mask = inputs.get("attention_mask")
        self._real = self._real + (mask.sum() if mask is not None else ids.numel())
        return self._step(model, inputs, *args, **kwargs)

    @property
    def real(self) -> int:
        return int(self._real)


def bench_settings(steps: int) -> dict:
    """How every variant differs from a run: a fixed number of steps, each logged, no evaluation or
    checkpoints, the same seed and data order, no progress bar."""
    return dict(max_steps=steps, logging_steps=steps, eval_strategy="no", eval_on_start=False, save_strategy="no",
                load_best_model_at_end=False, report_to=[], seed=0, data_seed=0, disable_tqdm=True,
                use_cpu=not torch.cuda.is_available())


def variants(cfg: Config, steps: int) -> dict[str, ArgsFactory]:
    """TRL's plain SFTConfig defaults against this package's trainer preset (`cfg.trainer`), with the same
    number of examples per optimizer step (the preset's batch x accumulation) and the same learning rate."""
    trainer = cfg.trainer
    per_step = trainer.per_device_train_batch_size * trainer.gradient_accumulation_steps
    settings = bench_settings(steps)
    plain = dict(per_device_train_batch_size=per_step, learning_rate=trainer.learning_rate)
    if not torch.cuda.is_available():
        plain["bf16"] = False  # hold precision equal on CPU: the comparison is about batching and checkpointing
    return {
        # TRL's own defaults: not a translation of this package's config, so not `build_sft_config`
        "trl_defaults": lambda out: SFTConfig(output_dir=out, **plain, **settings),
        "package_default": lambda out: build_sft_config(trainer, Path(out), **settings),
    }


def run_variant(name: str, make_args: ArgsFactory, cfg: Config, model_dir: str, rows: list[dict], steps: int,
                load_in_4bit: bool = False, callbacks: list[TrainerCallback] | None = None,
                trainer_class: type[SFTTrainer] | None = None) -> dict:
    """Train a freshly loaded model (loaded as a run loads it: `cfg.model` with this directory) with the
    variant's SFTConfig (`steps` optimizer steps), the run's LoRA config and trainer class (TRL's SFTTrainer unless
    given); real tokens/s after one warm-up step, and the most GPU memory it held at once."""
    if steps < 2:
        raise ValueError(f"steps={steps} is invalid: must be >= 2, the first step is an untimed warm-up")
    cuda = torch.cuda.is_available()
    gc.collect()  # the previous variant's model and trainer hold reference cycles; free them before measuring
    if cuda:
        torch.cuda.empty_cache()
    held = torch.cuda.memory_allocated() if cuda else 0  # what others hold (a model answering beside), left out
    model_cfg = dataclasses.replace(cfg.model, name_or_path=model_dir, load_in_4bit=load_in_4bit, gguf_file=None,
                                    source="hub")
    tokenizer = load_tokenizer(model_dir, model_cfg)
    model = load_model(model_dir, model_cfg, tokenizer=tokenizer)
    ds = to_prompt_completion(Dataset.from_list(rows), tokenizer, None)
    # An SFTConfig with tf32 set changes torch's process-wide TF32 switches: restored after each variant, so one
    # variant's setting does not carry into the next
    tf32 = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    with tempfile.TemporaryDirectory() as tmp:
        trainer = (trainer_class or SFTTrainer)(model=model, args=make_args(tmp), train_dataset=ds,
                                                processing_class=tokenizer, peft_config=build_lora_config(cfg.lora),
                                                callbacks=callbacks)
        counter = TokenCounter(trainer)
        warmup = AfterWarmup(counter)
        trainer.add_callback(warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        synchronize()
        seconds = time.perf_counter() - warmup.time
    torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = tf32
    return {"variant": name, "steps": steps, "timed_steps": steps - 1, "seconds": seconds, "real_tokens": counter.real,
            "computed_tokens": counter.computed,
            "padding_efficiency": counter.real / counter.computed if counter.computed else None,
            "real_tokens_per_s": (counter.real - warmup.real) / seconds,
            "peak_memory_gib": (torch.cuda.max_memory_allocated() - held) / 2**30 if cuda else None}


def collator(padding_free: bool):
    """The collator SFTTrainer builds for text rows (TRL's), padding with id 0 (any id: only shapes count)."""
    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)


def epoch_padding_efficiency(lengths: list[int], batch_size: int, strategy: str, padding_free: bool,
                             collate=None, seed: int = 0) -> float:
    """Real / computed tokens over a whole epoch: batches drawn by the Trainer's own sampler code
    (transformers' length grouping) or at random, each run through the collator (TRL's unless
    `collate` is given); computed tokens are the positions of the `input_ids` it produced."""
    collate = collate or collator(padding_free)
    generator = torch.Generator().manual_seed(seed)
    order = (get_length_grouped_indices(lengths, batch_size, generator=generator) if strategy == "group_by_length"
             else torch.randperm(len(lengths), generator=generator).tolist())
    real = computed = 0
    for start in range(0, len(order), batch_size):
        batch = [{"input_ids": [1] * lengths[i]} for i in order[start:start + batch_size]]
        real += sum(len(example["input_ids"]) for example in batch)
        computed += collate(batch)["input_ids"].numel()
    return real / computed


def device_config(cuda: bool) -> Config:
    """The config a run on this device composes: the GPU preset, or the tiny model's CPU preset."""
    return compose([f"trainer={'default' if cuda else 'cpu_smoke'}"])


def bench_training(model_dir: str, cfg: Config, steps: int, epoch_rows: int = 6726) -> dict:
    """Epoch-level padding efficiency on GSM8K-size data, and tokens/s over `steps` steps of it."""
    trainer_cfg = cfg.trainer
    rows = gsm8k_like_rows(epoch_rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(render_prompt(tokenizer, r["question"], None) + r["answer"]).input_ids) + 1
               for r in rows]
    results = {name: run_variant(name, make_args, cfg, model_dir, rows, steps)
               for name, make_args in variants(cfg, steps).items()}
    base, ours = results["trl_defaults"], results["package_default"]
    return {
        "train_rows_per_epoch": epoch_rows,
        "train_mean_tokens_per_row": sum(lengths) / len(lengths),
        "train_padding_efficiency_trl_defaults": epoch_padding_efficiency(
            lengths, trainer_cfg.per_device_train_batch_size * trainer_cfg.gradient_accumulation_steps, "random",
            padding_free=False),
        "train_padding_efficiency_default": epoch_padding_efficiency(
            lengths, trainer_cfg.per_device_train_batch_size, trainer_cfg.train_sampling_strategy,
            padding_free=trainer_cfg.padding_free or trainer_cfg.packing),  # TRL's BFD packing is padding-free
        "train_padding_efficiency_measured_trl_defaults": base["padding_efficiency"],
        "train_padding_efficiency_measured_default": ours["padding_efficiency"],
        "train_real_tokens_per_s_trl_defaults": base["real_tokens_per_s"],
        "train_real_tokens_per_s_default": ours["real_tokens_per_s"],
        "train_speedup_x": ours["real_tokens_per_s"] / base["real_tokens_per_s"],
        "train_variants": list(results.values()),
    }

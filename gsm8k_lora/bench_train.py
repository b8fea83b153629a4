"""Training throughput for `make bench`: real (non-padding) tokens per second and padding efficiency.

Each variant trains the same freshly loaded model on the same rows for the same number of steps,
in one process, so the ratio between variants holds on a noisy machine. Tokens are counted at the
collator (wrapped, not replaced): `real` are example tokens, `computed` are the positions the
model ran, padding included.
"""

from __future__ import annotations

import gc
import random
import tempfile
import time
from pathlib import Path

import torch
from transformers import TrainerCallback

from gsm8k_lora import synthetic
from gsm8k_lora.config import LoraConfig, TrainerConfig


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
        steps = [line for p in parts for line in p["answer"].rsplit("####", 1)[0].strip().splitlines()]
        total = sum(int(p["answer"].rsplit("####", 1)[1]) for p in parts)
        rows.append({"question": question, "answer": "\n".join(steps) + f"\nIn all: {total}.\n#### {total}"})
    return rows


def synchronize() -> None:
    """Wait for queued CUDA work, so a clock read after it covers that work; nothing on a CPU."""
    if torch.cuda.is_available():
        torch.cuda.synchronize()


class AfterWarmup(TrainerCallback):
    """A TrainerCallback that notes the clock and the token count when the first optimizer step ends,
    so one-off costs (kernel selection, allocator growth, optimizer state) stay out of the rate."""

    def __init__(self, counter: CountingCollator):
        self.counter, self.time, self.real = counter, None, 0

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == 1:
            synchronize()
            self.time, self.real = time.perf_counter(), self.counter.real


class CountingCollator:
    def __init__(self, inner, pad_id: int):
        self.inner, self.pad_id = inner, pad_id
        self.real = self.computed = 0

    def __call__(self, examples):
        batch = self.inner(examples)
        self.real += sum(len(e["input_ids"]) for e in examples)
        self.computed += batch["input_ids"].numel()
        return batch


def run_variant(name: str, sft_kwargs: dict, model_dir: str, rows: list[dict], steps: int, lr: float,
                load_in_4bit: bool = False) -> dict:
    from datasets import Dataset
    from trl import SFTConfig, SFTTrainer

    from gsm8k_lora.config import ModelConfig
    from gsm8k_lora.data import to_prompt_completion
    from gsm8k_lora.model import load_model, load_tokenizer
    from gsm8k_lora.train import build_lora_config

    if steps < 2:
        raise ValueError(f"steps={steps} is invalid: must be >= 2, the first step is an untimed warm-up")
    cuda = torch.cuda.is_available()
    gc.collect()  # the previous variant's model and trainer hold reference cycles; free them before measuring
    if cuda:
        torch.cuda.empty_cache()
    # loaded as a run loads it (dtype "auto": bf16 on a bf16 GPU, else fp32; 4-bit through the same path;
    # a pad token distinct from EOS)
    model_cfg = ModelConfig(name_or_path=model_dir, load_in_4bit=load_in_4bit)
    tokenizer = load_tokenizer(model_dir, model_cfg)
    model = load_model(model_dir, model_cfg, tokenizer=tokenizer)
    ds = to_prompt_completion(Dataset.from_list(rows), tokenizer, None)
    with tempfile.TemporaryDirectory() as tmp:
        args = SFTConfig(output_dir=tmp, max_steps=steps, learning_rate=lr, report_to=[], save_strategy="no",
                         eval_strategy="no", logging_steps=steps, use_cpu=not cuda, seed=0, disable_tqdm=True,
                         **sft_kwargs)
        trainer = SFTTrainer(model=model, args=args, train_dataset=ds, processing_class=tokenizer,
                             peft_config=build_lora_config(LoraConfig()))
        counter = CountingCollator(trainer.data_collator, tokenizer.pad_token_id)
        trainer.data_collator = counter
        warmup = AfterWarmup(counter)
        trainer.add_callback(warmup)
        if cuda:
            torch.cuda.reset_peak_memory_stats()
        trainer.train()
        synchronize()
        seconds = time.perf_counter() - warmup.time
    return {"variant": name, "steps": steps, "timed_steps": steps - 1, "seconds": seconds, "real_tokens": counter.real,
            "computed_tokens": counter.computed, "padding_efficiency": counter.real / max(counter.computed, 1),
            "real_tokens_per_s": (counter.real - warmup.real) / seconds,
            "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else None}


def variants(cfg: TrainerConfig) -> dict[str, dict]:
    """TRL's plain SFTConfig defaults against this package's preset for the device, with the same
    number of examples per optimizer step (the preset's batch x accumulation)."""
    per_step = cfg.per_device_train_batch_size * cfg.gradient_accumulation_steps
    plain = {"per_device_train_batch_size": per_step}
    if not torch.cuda.is_available():
        plain["bf16"] = False  # hold precision equal on CPU: the comparison is about batching and checkpointing
    ours = {"per_device_train_batch_size": cfg.per_device_train_batch_size,
            "gradient_accumulation_steps": cfg.gradient_accumulation_steps, "bf16": cfg.bf16,
            "activation_checkpointing": cfg.gradient_checkpointing, "padding_free": cfg.padding_free,
            "packing": cfg.packing, "train_sampling_strategy": cfg.train_sampling_strategy,
            "max_length": cfg.max_length}
    return {"trl_defaults": plain, "package_default": ours}


def collator(padding_free: bool):
    """The collator SFTTrainer builds for text rows (TRL's), padding with id 0 (any id: only shapes count)."""
    from trl.trainer.sft_trainer import DataCollatorForLanguageModeling

    return DataCollatorForLanguageModeling(pad_token_id=0, padding_free=padding_free)


def epoch_padding_efficiency(lengths: list[int], batch_size: int, strategy: str, padding_free: bool,
                             collate=None, seed: int = 0) -> float:
    """Real / computed tokens over a whole epoch: batches drawn by the Trainer's own sampler code
    (transformers' length grouping) or at random, each run through the collator (TRL's unless
    `collate` is given); computed tokens are the positions of the `input_ids` it produced."""
    from transformers.trainer_pt_utils import get_length_grouped_indices

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


def bench_training(model_dir: str, trainer_cfg: TrainerConfig, steps: int, epoch_rows: int = 6726) -> dict:
    """Epoch-level padding efficiency on GSM8K-size data, and tokens/s over `steps` steps of it."""
    from transformers import AutoTokenizer

    from gsm8k_lora.data import render_prompt

    rows = gsm8k_like_rows(epoch_rows)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    lengths = [len(tokenizer(render_prompt(tokenizer, r["question"], None) + r["answer"]).input_ids) + 1
               for r in rows]
    lr = trainer_cfg.learning_rate
    results = {name: run_variant(name, kwargs, model_dir, rows, steps, lr)
               for name, kwargs in variants(trainer_cfg).items()}
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


def default_trainer_config(cuda: bool) -> TrainerConfig:
    """The trainer preset this package uses on the device, composed from conf/ as a run would be."""
    from hydra import compose, initialize_config_dir

    from gsm8k_lora.config import register_configs, validate

    register_configs()
    conf = Path(__file__).resolve().parents[1] / "conf"
    with initialize_config_dir(config_dir=str(conf), version_base="1.3"):
        cfg = compose(config_name="config", overrides=[f"trainer={'default' if cuda else 'cpu_smoke'}"])
    return validate(cfg).trainer

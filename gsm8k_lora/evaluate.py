"""GSM8K accuracy from generated, graded answers: `python -m gsm8k_lora.evaluate [adapter=DIR] [overrides]`.

The same questions are answered by the base model (adapter disabled) and the fine-tuned model;
every grading rule gets its accuracy with a 95% Wilson interval, and the pair a difference and an
exact McNemar test (`evaluation/`). Writes `predictions.jsonl` and `eval_metrics.json` to the run directory.
"""

from __future__ import annotations

import sys
from pathlib import Path

import hydra
import torch
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig, OmegaConf
from peft import PeftModel

from gsm8k_lora import cli, records
from gsm8k_lora.config import register_configs, validate
from gsm8k_lora.data.loading import build_splits
from gsm8k_lora.errors import EXPECTED, INTERRUPTED, ConfigError
from gsm8k_lora.evaluation.answers import eval_rows, evaluate
from gsm8k_lora.evaluation.scoring import summary_lines
from gsm8k_lora.model.loading import four_bit_device, load
from gsm8k_lora.model.sources import resolve as resolve_weights
from gsm8k_lora.records import resolve_adapter, run_directory

# What an evaluation of a run directory takes from the run's own config.yaml unless the command line sets it.
RUN_KEYS = ("model", "data", "eval.prompt", "eval.num_fewshot")


def inherit_run_config(raw: DictConfig, overrides: list[str]) -> DictConfig:
    """Evaluate a run on what it was trained on: its model, data, prompt and system prompt, unless an
    override on the command line names them; an adapter is refused on any other base model."""
    run_dir = run_directory(raw.adapter)
    if run_dir is None:
        return raw
    run = OmegaConf.load(run_dir / "config.yaml")
    given = [o.lstrip("+~").split("=", 1)[0] for o in overrides]
    merged = raw.copy()
    for key in RUN_KEYS:
        if any(g == key or key.startswith(g + ".") for g in given):  # replaced as a whole (model=tiny)
            continue
        OmegaConf.update(merged, key, OmegaConf.select(run, key), merge=True)
        for leaf in (g for g in given if g.startswith(key + ".")):  # model.dtype=...: the run's, but this key
            OmegaConf.update(merged, leaf, OmegaConf.select(raw, leaf), merge=False)
    for key in ("model.name_or_path", "model.gguf_file"):
        ours, theirs = OmegaConf.select(merged, key), OmegaConf.select(run, key)
        if ours != theirs:
            raise ConfigError(f"{key}={ours!r} is invalid: the adapter in {run_dir} was trained on {key}={theirs!r}; "
                              f"drop the model override to evaluate it on its own base model")
    print(f"evaluate: model, data and prompt from {run_dir / 'config.yaml'} (command-line overrides win)")
    return merged


def run(raw: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    """Compose (the run's own config where an adapter has one), validate, load, answer, write."""
    merged = inherit_run_config(raw, overrides or [])
    cfg = validate(merged)
    if cfg.model.load_in_4bit:
        four_bit_device()  # bitsandbytes installed, with kernels for this device
    adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
    splits = build_splits(cfg.data)
    rows = eval_rows(splits, cfg.eval)
    weights = resolve_weights(cfg.model, cfg.cache_dir)
    model, tokenizer = load(cfg.model, cfg.cache_dir, resolved=weights)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is already placed by its device map
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    records.write_run_record(run_dir, merged, weights.as_dict())  # the config as evaluated
    predictions, metrics = evaluate(cfg, model, tokenizer, splits, rows, adapters=adapter is not None)
    records.write_eval(run_dir, predictions, metrics)
    for line in summary_lines(metrics):
        print(line)
    return metrics


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    hydra_cfg = HydraConfig.get()
    try:
        run(raw, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except EXPECTED as err:
        cli.fail(err)
    except KeyboardInterrupt:
        print("stopped: interrupted before the answers were graded; no results were written", file=sys.stderr)
        sys.exit(INTERRUPTED)


if __name__ == "__main__":
    register_configs()  # the schemas must be in Hydra's ConfigStore before it composes
    cli.run(main)  # a config mistake: one line, exit code 2

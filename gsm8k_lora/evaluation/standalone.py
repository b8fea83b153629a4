"""An evaluation on its own (`python -m gsm8k_lora.evaluate`): load the model (and adapter), answer, grade,
write `eval_metrics.json` and `predictions.jsonl`, say where."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from omegaconf import DictConfig
from peft import PeftModel

from gsm8k_lora import naming, records, tracking
from gsm8k_lora.config import Config
from gsm8k_lora.data.loading import build_splits, questions
from gsm8k_lora.evaluation import baseline_cache, protocols
from gsm8k_lora.evaluation.answers import evaluate, model_note
from gsm8k_lora.evaluation.scoring import summary_lines
from gsm8k_lora.model import kernels
from gsm8k_lora.model.loading import load, to_device
from gsm8k_lora.model.sources import resolve as resolve_weights
from gsm8k_lora.naming import RunNaming
from gsm8k_lora.records import resolve_adapter
from gsm8k_lora.stopping import STOP


def run(cfg: Config, merged: DictConfig, run_dir: Path, run_naming: RunNaming) -> dict:
    """Load, answer, write; `merged` is the config as evaluated (a run's own, with the command line's changes)."""
    adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
    splits = build_splits(cfg.data)
    rows = questions(splits, cfg.eval.split, cfg.eval.limit)
    weights = resolve_weights(cfg.model, cfg.cache_dir)
    model, tokenizer = load(cfg.model, cfg.cache_dir, resolved=weights)
    if adapter:
        model = PeftModel.from_pretrained(model, adapter)
    to_device(model)
    loaded = {**weights.as_dict(), "hub_kernels": kernels.describe(model, cfg.model.hub_kernels)}
    resolved = records.write_run_record(run_dir, merged, loaded)  # the config as evaluated
    tracker = tracking.start(cfg.logger, run_dir, run_naming, {**resolved, **naming.identifying(cfg, None, len(rows))})
    exit_code = 1
    try:
        with STOP.safe_section():  # a signal stops the answers within one decoding step
            predictions, metrics = evaluate(cfg.eval, cfg.data.system_prompt, model, tokenizer, splits, rows,
                                            adapters=adapter is not None,
                                            weights=baseline_cache.weights_identity(weights.path, cfg.model.revision,
                                                                                   cfg.model.hub_kernels),
                                            note=model_note(cfg.model.name_or_path))
        records.write_eval(run_dir, predictions, metrics)
        tracker.summary(metrics)
        tracker.predictions(predictions)
        tracker.results({}, metrics)
        exit_code = 0
    finally:
        tracker.finish(exit_code)
    for line in summary_lines(metrics, protocols.describe(dataclasses.asdict(cfg.eval), short=True), cfg.eval.split):
        print(line)
    print(f"evaluation written to {run_dir} (eval_metrics.json, predictions.jsonl)")
    return metrics

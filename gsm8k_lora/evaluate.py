"""GSM8K accuracy from generated, graded answers: `python -m gsm8k_lora.evaluate [adapter=DIR] [overrides]`.

The same questions are answered by the base model (adapter disabled) and the fine-tuned model;
both get strict and flexible accuracy with 95% Wilson intervals, and the pair gets a difference
and an exact McNemar test. Writes `predictions.jsonl` and `eval_metrics.json` to the run directory.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import hydra
from omegaconf import DictConfig

from gsm8k_lora import tracking
from gsm8k_lora.config import Config, ConfigError, EvalConfig, register_configs, validate
from gsm8k_lora.generation import build_prompt, generate
from gsm8k_lora.grading import extract_flexible, grade
from gsm8k_lora.stats import majority_vote, paired_comparison, wilson_interval

TINY_NOTE = ("The built-in tiny model's accuracy says nothing about Falcon3 or any real model: "
             "it only shows the pipeline measures what fine-tuning changed.")


def score(rows: list[dict], generations: list[dict], model_name: str) -> list[dict]:
    """One prediction record per question: the first completion graded, plus self-consistency votes."""
    records = []
    for row, gen in zip(rows, generations, strict=True):
        first = gen["completions"][0]
        g = grade(first, row["gold"])
        record = {
            "id": row["id"], "model": model_name, "question": row["question"], "gold": row["gold"],
            "completion": first, "pred": g.pred, "correct": g.correct, "pred_strict": g.pred_strict,
            "correct_strict": g.correct_strict, "explicit_answer": g.explicit,
            "generated_tokens": gen["generated_tokens"][0], "num_steps": row["num_steps"],
            "category": row.get("category") or None,
        }
        if len(gen["completions"]) > 1:
            preds = [extract_flexible(c) for c in gen["completions"]]
            vote = majority_vote(preds)
            record.update(samples=gen["completions"], sample_preds=preds, majority_pred=vote,
                          majority_correct=grade(f"#### {vote}", row["gold"]).correct if vote else False,
                          any_correct=any(grade(c, row["gold"]).correct for c in gen["completions"]))
        records.append(record)
    return records


def summarize(records: list[dict], prefix: str) -> dict:
    n = len(records)
    out = {f"{prefix}_n": n}
    for key, name in (("correct", "gsm8k_accuracy_flexible"), ("correct_strict", "gsm8k_accuracy_strict")):
        k = sum(r[key] for r in records)
        low, high = wilson_interval(k, n)
        out.update({f"{prefix}_{name}": k / n if n else 0.0, f"{prefix}_{name}_ci95_low": low,
                    f"{prefix}_{name}_ci95_high": high})
    out[f"{prefix}_answer_format_rate"] = sum(r["explicit_answer"] for r in records) / n if n else 0.0
    out[f"{prefix}_generated_tokens_mean"] = sum(r["generated_tokens"] for r in records) / n if n else 0.0
    if records and "majority_correct" in records[0]:
        k = len(records[0]["samples"])
        out[f"{prefix}_gsm8k_maj@{k}"] = sum(r["majority_correct"] for r in records) / n
        out[f"{prefix}_gsm8k_pass@{k}"] = sum(r["any_correct"] for r in records) / n
    return out


def pick_shots(train_rows: list[dict], cfg: EvalConfig) -> list[dict]:
    """Few-shot examples come from the train split only, never from the questions under test."""
    return [] if cfg.prompt == "zero_shot_cot" else train_rows[: cfg.num_fewshot]


def evaluate_model(model, tokenizer, rows: list[dict], shots: list[dict], cfg: EvalConfig,
                   system_prompt: str | None, adapters: bool) -> dict[str, list[dict]]:
    """Predictions of the fine-tuned model and (adapter disabled) the baseline, on the same questions."""
    prompts = [build_prompt(tokenizer, r["question"], cfg, shots, system_prompt) for r in rows]
    model.config.use_cache = True
    out: dict[str, list[dict]] = {}
    if not adapters or cfg.compare_baseline:
        context = model.disable_adapter() if adapters else contextlib.nullcontext()
        with context:
            out["baseline"] = score(rows, generate(model, tokenizer, prompts, cfg, "Baseline answers"), "baseline")
    if adapters:
        out["finetuned"] = score(rows, generate(model, tokenizer, prompts, cfg, "Fine-tuned answers"), "finetuned")
    return out


def eval_metrics(predictions: dict[str, list[dict]]) -> dict:
    metrics: dict = {}
    for name, records in predictions.items():
        metrics.update(summarize(records, name))
    if {"baseline", "finetuned"} <= predictions.keys():
        for key, suffix in (("correct", "flexible"), ("correct_strict", "strict")):
            pair = paired_comparison([r[key] for r in predictions["baseline"]],
                                     [r[key] for r in predictions["finetuned"]])
            metrics.update({f"paired_{suffix}_{k}": v for k, v in pair.items()})
    return metrics


def write_results(run_dir: Path, predictions: dict[str, list[dict]], metrics: dict) -> None:
    with (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for records in predictions.values():
            for record in records:
                handle.write(json.dumps(record) + "\n")
    tracking.write_json(run_dir / "eval_metrics.json", metrics)


def print_summary(metrics: dict, is_tiny: bool) -> None:
    for name in ("baseline", "finetuned"):
        key = f"{name}_gsm8k_accuracy_flexible"
        if key in metrics:
            print(f"GSM8K accuracy ({name}, n={metrics[f'{name}_n']}): flexible {metrics[key]:.1%} "
                  f"[{metrics[key + '_ci95_low']:.1%}, {metrics[key + '_ci95_high']:.1%}], strict "
                  f"{metrics[f'{name}_gsm8k_accuracy_strict']:.1%}; answer format rate "
                  f"{metrics[f'{name}_answer_format_rate']:.1%}")
    if "paired_flexible_difference" in metrics:
        print(f"fine-tuned minus baseline: {metrics['paired_flexible_difference']:+.1%} "
              f"(McNemar p={metrics['paired_flexible_mcnemar_p']:.3g})")
    if is_tiny:
        print(TINY_NOTE)


def run_eval(cfg: Config, model, tokenizer, rows: list[dict], train_rows: list[dict], run_dir: Path,
             adapters: bool, wandb_run=None) -> dict:
    predictions = evaluate_model(model, tokenizer, rows, pick_shots(train_rows, cfg.eval), cfg.eval,
                                 cfg.data.system_prompt, adapters)
    metrics = eval_metrics(predictions)
    is_tiny = cfg.model.name_or_path.startswith("builtin:")
    if is_tiny:
        metrics["note"] = TINY_NOTE
    write_results(run_dir, predictions, metrics)
    if wandb_run is not None:
        import wandb

        wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        columns = ["id", "model", "question", "gold", "completion", "pred", "correct", "num_steps", "category"]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for recs in predictions.values()
                                                   for r in recs])
        wandb_run.log({"eval/predictions": table})
    print_summary(metrics, is_tiny)
    return metrics


def eval_rows(splits, cfg: EvalConfig) -> list[dict]:
    rows = (splits.test if cfg.split == "test" else splits.validation).to_list()
    if cfg.limit is not None and cfg.limit > len(rows):
        raise ConfigError(f"eval.limit={cfg.limit} is invalid: the {cfg.split} split has {len(rows)} rows")
    return rows[: cfg.limit] if cfg.limit else rows


def resolve_adapter(path: str) -> str:
    root = Path(path).expanduser()
    if (root / "adapter_config.json").exists():
        return str(root)
    if (root / "adapter" / "adapter_config.json").exists():
        return str(root / "adapter")
    raise ConfigError(f"adapter={path!r} is invalid: expected a LoRA adapter directory "
                      "or a run directory with adapter/")


def main_guarded(raw: DictConfig, run_dir: Path) -> dict:
    import torch

    from gsm8k_lora.data import DataError, build_splits
    from gsm8k_lora.model import ModelLoadError, four_bit_device, load

    try:
        cfg = validate(raw)
        if cfg.model.load_in_4bit:
            four_bit_device()  # bitsandbytes installed, with kernels for this device
        adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
        splits = build_splits(cfg.data)
        rows = eval_rows(splits, cfg.eval)
        model, tokenizer = load(cfg.model, cfg.cache_dir)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        sys.exit(2)
    except (DataError, ModelLoadError) as err:
        print(f"error: {err}", file=sys.stderr)
        sys.exit(1)
    if adapter:
        from peft import PeftModel

        model = PeftModel.from_pretrained(model, adapter)
    if not getattr(model, "is_loaded_in_4bit", False):  # a 4-bit model is already placed by its device map
        model.to("cuda" if torch.cuda.is_available() else "cpu")
    run_dir.mkdir(parents=True, exist_ok=True)
    return run_eval(cfg, model, tokenizer, rows, splits.train.to_list(), run_dir, adapters=adapter is not None)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    main_guarded(raw, Path(HydraConfig.get().runtime.output_dir))


if __name__ == "__main__":
    register_configs()
    main()

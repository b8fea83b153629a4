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
from omegaconf import DictConfig, OmegaConf

from gsm8k_lora import protocols, tracking
from gsm8k_lora.analysis import repetition_loop
from gsm8k_lora.config import Config, ConfigError, EvalConfig, register_configs, validate
from gsm8k_lora.generation import build_prompt, generate, token_limit
from gsm8k_lora.grading import extract_flexible, grade
from gsm8k_lora.sources import resolve as resolve_weights
from gsm8k_lora.stats import majority_vote, paired_comparison, wilson_interval

TINY_NOTE = ("The built-in tiny model's accuracy says nothing about Falcon3 or any real model: "
             "it only shows the pipeline measures what fine-tuning changed.")


# Each accuracy figure: (record field, metric name). lm-eval's `strict-match` and `flexible-extract` are computed
# as lm-eval computes them (grading.py); the package's own by-value rule reads `18.00` or `$18` as 18, so it is
# the headline, and lm-eval's figures sit beside it for comparison with published numbers.
RULES = (("correct", "gsm8k_by_value"), ("correct_strict", "gsm8k_by_value_strict"),
         ("lm_eval_strict_correct", "gsm8k_strict_match"), ("lm_eval_flexible_correct", "gsm8k_flexible_extract"))
HEADLINE = "gsm8k_by_value"


def score(rows: list[dict], generations: list[dict], model_name: str, max_new_tokens: int | None = None) -> list[dict]:
    """One prediction record per question: the first completion graded, plus self-consistency votes."""
    records = []
    for row, gen in zip(rows, generations, strict=True):
        first, tokens = gen["completions"][0], gen["generated_tokens"][0]
        g = grade(first, row["gold"])
        record = {
            "id": row["id"], "model": model_name, "question": row["question"], "gold": row["gold"],
            "completion": first, "pred": g.pred, "correct": g.correct, "pred_strict": g.pred_strict,
            "correct_strict": g.correct_strict, "explicit_answer": g.explicit,
            "lm_eval_strict_extracted": g.lm_eval_strict.extracted,
            "lm_eval_strict_correct": g.lm_eval_strict.exact_match,
            "lm_eval_flexible_extracted": g.lm_eval_flexible.extracted,
            "lm_eval_flexible_correct": g.lm_eval_flexible.exact_match,
            "generated_tokens": tokens, "hit_token_limit": max_new_tokens is not None and tokens >= max_new_tokens,
            "repetition_loop": repetition_loop(first), "num_steps": row["num_steps"],
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


def rate(records: list[dict], key: str) -> float:
    return sum(bool(r.get(key)) for r in records) / len(records) if records else 0.0


def summarize(records: list[dict], prefix: str) -> dict:
    n = len(records)
    out = {f"{prefix}_n": n}
    for key, name in RULES:
        k = sum(r[key] for r in records)
        low, high = wilson_interval(k, n)
        out.update({f"{prefix}_{name}": k / n if n else 0.0, f"{prefix}_{name}_ci95_low": low,
                    f"{prefix}_{name}_ci95_high": high})
    out[f"{prefix}_answer_format_rate"] = rate(records, "explicit_answer")
    out[f"{prefix}_hit_token_limit_rate"] = rate(records, "hit_token_limit")
    out[f"{prefix}_repetition_loop_rate"] = rate(records, "repetition_loop")
    out[f"{prefix}_generated_tokens_mean"] = sum(r["generated_tokens"] for r in records) / n if n else 0.0
    if records and "majority_correct" in records[0]:
        k = len(records[0]["samples"])
        out[f"{prefix}_gsm8k_maj@{k}"] = sum(r["majority_correct"] for r in records) / n
        out[f"{prefix}_gsm8k_pass@{k}"] = sum(r["any_correct"] for r in records) / n
    return out


def pick_shots(train_rows: list[dict], cfg: EvalConfig, num_questions: int) -> list[list[dict]]:
    """Each question's few-shot examples, from the train split only, never from the questions under test:
    lm-eval's own draw for its protocols (`train_rows` must then be the whole train split in its published
    order), else the first k rows for every question."""
    if cfg.prompt.startswith("lm_eval_gsm8k"):
        return protocols.lm_eval_shots(train_rows, num_questions, cfg.num_fewshot)
    shots = [] if cfg.prompt == "zero_shot_cot" else train_rows[: cfg.num_fewshot]
    return [shots] * num_questions


def shot_pool(splits, cfg: EvalConfig) -> list[dict]:
    """Where few-shot examples come from: GSM8K's whole train split in its published order when the test
    split is answered (what lm-eval draws from); when the validation split is answered, the training part
    only, so no question under test is its own example."""
    return (splits.pool if cfg.split == "test" else splits.train).to_list()


def evaluate_model(model, tokenizer, rows: list[dict], shots: list[list[dict]], cfg: EvalConfig,
                   system_prompt: str | None, adapters: bool) -> dict[str, list[dict]]:
    """Predictions of the fine-tuned model and (adapter disabled) the baseline, on the same questions."""
    prompts = [build_prompt(tokenizer, r["question"], cfg, s, system_prompt) for r, s in zip(rows, shots, strict=True)]
    model.config.use_cache = True
    out: dict[str, list[dict]] = {}
    if not adapters or cfg.compare_baseline:
        context = model.disable_adapter() if adapters else contextlib.nullcontext()
        with context:
            out["baseline"] = score(rows, generate(model, tokenizer, prompts, cfg, "Baseline answers"), "baseline",
                                    token_limit(cfg))
    if adapters:
        out["finetuned"] = score(rows, generate(model, tokenizer, prompts, cfg, "Fine-tuned answers"), "finetuned",
                                 token_limit(cfg))
    return out


def eval_metrics(predictions: dict[str, list[dict]]) -> dict:
    metrics: dict = {}
    for name, records in predictions.items():
        metrics.update(summarize(records, name))
    if {"baseline", "finetuned"} <= predictions.keys():
        for key, name in RULES:
            pair = paired_comparison([r[key] for r in predictions["baseline"]],
                                     [r[key] for r in predictions["finetuned"]])
            metrics.update({f"paired_{name.removeprefix('gsm8k_')}_{k}": v for k, v in pair.items()})
    return metrics


def write_results(run_dir: Path, predictions: dict[str, list[dict]], metrics: dict) -> None:
    with (run_dir / "predictions.jsonl").open("w", encoding="utf-8") as handle:
        for records in predictions.values():
            for record in records:
                handle.write(json.dumps(record) + "\n")
    tracking.write_json(run_dir / "eval_metrics.json", metrics)


def print_summary(metrics: dict, is_tiny: bool) -> None:
    for name in ("baseline", "finetuned"):
        key = f"{name}_{HEADLINE}"
        if key in metrics:
            def m(rule: str, name: str = name) -> str:
                return f"{metrics[f'{name}_{rule}']:.1%}"

            print(f"GSM8K accuracy ({name}, n={metrics[f'{name}_n']}): by-value {m(HEADLINE)} "
                  f"[{metrics[key + '_ci95_low']:.1%}, {metrics[key + '_ci95_high']:.1%}] (the headline); "
                  f"lm-eval strict-match {m('gsm8k_strict_match')}, flexible-extract {m('gsm8k_flexible_extract')}; "
                  f"answer format rate {m('answer_format_rate')}, ran to the token limit {m('hit_token_limit_rate')}, "
                  f"repetition loops {m('repetition_loop_rate')}")
    if "paired_by_value_difference" in metrics:
        print(f"fine-tuned minus baseline (by-value): {metrics['paired_by_value_difference']:+.1%} "
              f"(McNemar p={metrics['paired_by_value_mcnemar_p']:.3g})")
    if is_tiny:
        print(TINY_NOTE)


def run_eval(cfg: Config, model, tokenizer, rows: list[dict], train_rows: list[dict], run_dir: Path,
             adapters: bool, wandb_run=None) -> dict:
    predictions = evaluate_model(model, tokenizer, rows, pick_shots(train_rows, cfg.eval, len(rows)), cfg.eval,
                                 cfg.data.system_prompt, adapters)
    metrics = eval_metrics(predictions)
    is_tiny = cfg.model.name_or_path.startswith("builtin:")
    if is_tiny:
        metrics["note"] = TINY_NOTE
    write_results(run_dir, predictions, metrics)
    if wandb_run is not None:
        import wandb

        wandb_run.summary.update({k: v for k, v in metrics.items() if isinstance(v, (int, float))})
        columns = ["id", "model", "question", "gold", "completion", "pred", "correct", "lm_eval_strict_correct",
                   "lm_eval_flexible_correct", "hit_token_limit", "repetition_loop", "num_steps", "category"]
        table = wandb.Table(columns=columns, data=[[r[c] for c in columns] for recs in predictions.values()
                                                   for r in recs])
        wandb_run.log({"eval/predictions": table})
    print_summary(metrics, is_tiny)
    return metrics


def eval_rows(splits, cfg: EvalConfig) -> list[dict]:
    """The first `eval.limit` questions of the split; a limit is an upper bound, as lm-eval's --limit is."""
    rows = (splits.test if cfg.split == "test" else splits.validation).to_list()
    if cfg.limit is not None and cfg.limit > len(rows):
        print(f"eval: eval.limit={cfg.limit} but the {cfg.split} split has {len(rows)} rows: answering all {len(rows)}")
    return rows[: cfg.limit] if cfg.limit else rows


def resolve_adapter(path: str) -> str:
    root = Path(path).expanduser()
    if (root / "adapter_config.json").exists():
        return str(root)
    if (root / "adapter" / "adapter_config.json").exists():
        return str(root / "adapter")
    raise ConfigError(f"adapter={path!r} is invalid: expected a LoRA adapter directory "
                      "or a run directory with adapter/")


# What an evaluation of a run directory takes from the run's own config.yaml unless the command line sets it.
RUN_KEYS = ("model", "data", "eval.prompt", "eval.num_fewshot")


def run_directory(adapter: str | None) -> Path | None:
    """The run directory an `adapter=` path belongs to (it holds config.yaml), or None for a bare adapter."""
    if not adapter:
        return None
    root = Path(adapter).expanduser()
    candidates = [root]
    if root.name == "adapter":  # RUN/adapter
        candidates.append(root.parent)
    if root.parent.name == "checkpoints":  # RUN/checkpoints/checkpoint-N
        candidates.append(root.parent.parent)
    return next((c for c in candidates if (c / "config.yaml").exists()), None)


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


def main_guarded(raw: DictConfig, run_dir: Path, overrides: list[str] | None = None) -> dict:
    import torch

    from gsm8k_lora.data import DataError, build_splits
    from gsm8k_lora.model import ModelLoadError, four_bit_device, load

    try:
        merged = inherit_run_config(raw, overrides or [])
        cfg = validate(merged)
        if cfg.model.load_in_4bit:
            four_bit_device()  # bitsandbytes installed, with kernels for this device
        adapter = resolve_adapter(cfg.adapter) if cfg.adapter else None
        splits = build_splits(cfg.data)
        rows = eval_rows(splits, cfg.eval)
        weights = resolve_weights(cfg.model, cfg.cache_dir)
        model, tokenizer = load(cfg.model, cfg.cache_dir, resolved=weights)
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
    (run_dir / "config.yaml").write_text(OmegaConf.to_yaml(merged, resolve=True), encoding="utf-8")  # as evaluated
    tracking.write_json(run_dir / "environment.json", {**tracking.environment(), "model_weights": weights.as_dict()})
    return run_eval(cfg, model, tokenizer, rows, shot_pool(splits, cfg.eval), run_dir, adapters=adapter is not None)


@hydra.main(version_base="1.3", config_path="../conf", config_name="config")
def main(raw: DictConfig) -> None:
    from hydra.core.hydra_config import HydraConfig

    hydra_cfg = HydraConfig.get()
    try:
        main_guarded(raw, Path(hydra_cfg.runtime.output_dir), list(hydra_cfg.overrides.task))
    except KeyboardInterrupt:
        print("stopped: interrupted before the answers were graded; no results were written", file=sys.stderr)
        sys.exit(130)


if __name__ == "__main__":
    from gsm8k_lora.cli import run

    register_configs()
    run(main)  # a config mistake: one line, exit code 2

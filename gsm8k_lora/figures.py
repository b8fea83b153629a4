"""The name of every figure a run directory holds, and of every field of one graded answer: defined here once.

Who writes a figure (the scorer, the training step, the grade CLI) and who reads it (the report, `compare`, the
terminal's summary, W&B) build its name with the functions below, so the two cannot drift apart; a reader that
reads by name goes through `read`, which refuses a name not defined here rather than printing "n/a" for it.
The architecture test checks that every figure name written anywhere in the package is one of these.

Grading rules: the package's by-value rule (`pred`, `correct`: the headline) and its strict form read numbers by
value; lm-eval's strict-match and flexible-extract are lm-eval's own. A name that says strict or flexible without
saying by-value is lm-eval's.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass

MODELS = ("baseline", "finetuned")  # the two models of eval_metrics.json
DURING_TRAINING = "eval"  # the prefix of accuracy on validation questions during training (log_history.json)


@dataclass(frozen=True)
class Rule:
    """One way of grading an answer: the answer fields it fills, the figure it gives, how it is shown."""

    figure: str  # `{model}_{figure}` in eval_metrics.json
    extracted: str  # the graded answer's field: what the rule read as the answer
    verdict: str  # the graded answer's field: whether that is the gold answer
    label: str  # its name in the terminal and the report
    reads: str  # how it reads an answer, for the report's table

    @property
    def pair(self) -> str:
        """Its name in the paired figures (`paired_{pair}_*`)."""
        return pair_name(self.figure)

    @property
    def fields(self) -> tuple[str, str]:
        return (self.extracted, self.verdict)


BY_VALUE = Rule("gsm8k_by_value", "pred", "correct", "by-value",
                "first `#### N`, else the last explicit final statement, else the last number; compared by value "
                "(`18.00` = `$18` = 18)")
BY_VALUE_STRICT = Rule("gsm8k_by_value_strict", "by_value_strict_pred", "by_value_strict_correct", "by-value strict",
                       "the number after the first `####`, compared by value")
STRICT_MATCH = Rule("gsm8k_strict_match", "lm_eval_strict_extracted", "lm_eval_strict_correct", "lm-eval strict-match",
                    "lm-eval's: first `#### (-?[0-9.,]+)`, exact string match")
FLEXIBLE_EXTRACT = Rule("gsm8k_flexible_extract", "lm_eval_flexible_extracted", "lm_eval_flexible_correct",
                        "lm-eval flexible-extract",
                        "lm-eval's: last `(-?[$0-9.,]{2,})\\|(-?[0-9]+)`, exact string match")
RULES = (BY_VALUE, BY_VALUE_STRICT, STRICT_MATCH, FLEXIBLE_EXTRACT)
LM_EVAL_RULES = (STRICT_MATCH, FLEXIBLE_EXTRACT)
HEADLINE = BY_VALUE  # of a greedy protocol; a sampled one is judged by maj@k (`headline`)

# --- the fields of one graded answer (predictions.jsonl; the grade CLI's output) -------------------------------
EXPLICIT_ANSWER = "explicit_answer"  # the answer came from `####` or a final statement, not the last number
GRADED = (*BY_VALUE.fields, *BY_VALUE_STRICT.fields, EXPLICIT_ANSWER, *STRICT_MATCH.fields, *FLEXIBLE_EXTRACT.fields)
# How the model's context bounded an answer (`evaluation/generation.py`): tokens cut from the prompt's start
# (lm-eval's protocols, as lm-eval cuts them), the answer stopped at the model's last position (the package's own
# protocols), the prompt left no room for an answer (the package's own protocols: not answered, graded wrong).
CONTEXT = ("prompt_tokens_cut", "stopped_at_context_end", "prompt_did_not_fit")
ANSWER = ("id", "model", "question", "gold", "completion", *GRADED, "generated_tokens", "hit_token_limit", *CONTEXT,
          "repetition_loop", "num_steps", "problem_type", "error_category")
SAMPLED = ("samples", "sample_preds", "majority_pred", "majority_correct", "any_correct")  # self-consistency only
PREDICTION_TABLE = ("id", "model", "question", "gold", "completion", BY_VALUE.extracted, BY_VALUE.verdict,
                    STRICT_MATCH.verdict, FLEXIBLE_EXTRACT.verdict, "hit_token_limit", "repetition_loop",
                    "num_steps", "error_category", "problem_type")  # the W&B table: what a reader filters by

# --- eval_metrics.json ------------------------------------------------------------------------------------------
RATES = {  # the graded answer's field each rate counts
    "answer_format_rate": EXPLICIT_ANSWER, "hit_token_limit_rate": "hit_token_limit",
    "repetition_loop_rate": "repetition_loop"}
COUNTS = {  # the graded answer's field each count counts (answers where it is set)
    "prompts_cut": "prompt_tokens_cut", "answers_stopped_at_context_end": "stopped_at_context_end",
    "prompts_not_fitting": "prompt_did_not_fit"}
GENERATED_TOKENS_MEAN = "generated_tokens_mean"
ANSWER_SECONDS = "answer_s"  # wall seconds a model took to answer (a baseline read from the cache: not written)
ANSWER_PROCESSES = "answer_processes"  # how many processes answered a share of the questions (data-parallel runs)
ANSWER_FORMAT = "answer_format"  # the answer-format rate's name in the paired figures
PAIRED_STATS = ("n", "difference", "only_finetuned_correct", "only_baseline_correct", "mcnemar_p")
CI = ("ci95_low", "ci95_high")
EVAL_FACTS = ("baseline_source", "note")  # where the baseline's answers came from; the tiny model's caveat


def majority(k: int) -> str:
    """maj@k: the most common by-value answer of k samples."""
    return f"gsm8k_maj@{k}"


def any_of(k: int) -> str:
    """pass@k: any of k samples right by value."""
    return f"gsm8k_pass@{k}"


def accuracy_names(k: int | None = None) -> tuple[str, ...]:
    """The accuracy figures of a protocol: every rule's, and maj@k and pass@k when it samples k answers."""
    return (*(rule.figure for rule in RULES), *((majority(k), any_of(k)) if k else ()))


def headline(k: int | None = None) -> str:
    """The figure a protocol is judged by: maj@k when it samples, else by-value."""
    return majority(k) if k else HEADLINE.figure


def figure(model: str, name: str) -> str:
    """A model's figure: an accuracy, a rate, `n` or the mean generated tokens."""
    assert model in (*MODELS, DURING_TRAINING), model
    return f"{model}_{name}"


def interval(model: str, accuracy: str) -> tuple[str, str]:
    """The names of the 95% Wilson interval's bounds of a model's accuracy."""
    return tuple(f"{figure(model, accuracy)}_{bound}" for bound in CI)  # type: ignore[return-value]


def paired(name: str, stat: str) -> str:
    """A figure of the paired comparison of the two models (`name`: a rule's `pair`, answer_format, maj@k)."""
    assert stat in PAIRED_STATS, stat
    return f"paired_{name}_{stat}"


def pair_name(accuracy: str) -> str:
    """An accuracy figure's name in the paired figures."""
    return accuracy.removeprefix("gsm8k_")


def sampled_k(metrics: Mapping) -> int | None:
    """k of a sampled protocol's figures (maj@k), or None for greedy ones."""
    found = (re.fullmatch(rf"(?:{'|'.join(MODELS)})_{majority(0)[:-1]}(\d+)", key) for key in metrics)
    return next((int(m.group(1)) for m in found if m), None)


def eval_names(k: int | None = None) -> list[str]:
    """Every figure eval_metrics.json can hold, for greedy answers or k samples each."""
    names = [*EVAL_FACTS]
    pairs = [*(pair_name(a) for a in accuracy_names(k) if a != any_of(k or 0)), ANSWER_FORMAT]
    for model in MODELS:
        names.append(figure(model, "n"))
        for accuracy in accuracy_names(k):
            names += [figure(model, accuracy), *interval(model, accuracy)]
        names += [figure(model, rate) for rate in RATES] + [figure(model, GENERATED_TOKENS_MEAN)]
        names += [figure(model, count) for count in COUNTS]
        names += [figure(model, ANSWER_SECONDS), figure(model, ANSWER_PROCESSES)]
    names += [paired(p, stat) for p in pairs for stat in PAIRED_STATS]
    return names


# --- metrics.json -----------------------------------------------------------------------------------------------
# How large a run was (`sft.scale_record`: environment.json's `scale`, and metrics.json): another number of processes
# is another global batch, step count and schedule.
SCALE = ("processes", "nodes", "launcher", "per_device_train_batch_size", "gradient_accumulation_steps", "global_batch")

# Curves summed up from the log history (`training/history.py`): first, last, best, its step, and for losses the
# decrease in percent. Token accuracy is TRL's next-token statistic under teacher forcing, never GSM8K accuracy.
CURVES = {"train_loss": ("first", "last", "best", "best_step", "decrease_pct"),
          "eval_loss": ("first", "last", "best", "best_step", "decrease_pct"),
          f"{DURING_TRAINING}_{HEADLINE.figure}": ("first", "last", "best", "best_step"),
          "train_token_accuracy": ("first", "last"), "eval_token_accuracy": ("first", "last")}
TRAINING = (
    "rows_train", "rows_validation", "rows_test", "rows_dropped_train", "rows_dropped_test", "dropped_reasons",
    "rows_validation_loss", "train_runtime_s", "train_samples_per_s", "steps", "max_steps", "epochs", "tokens_seen",
    "stop_reason", "best_checkpoint", "trainable_params", "total_params", "token_accuracy_note", "model_weights",
    "system_prompt", "weights_gib", "weights_gib_unquantised", "weights_unquantised_dtype", "peak_memory_gib",
    *SCALE, "steps_per_epoch")


def curve(name: str, stat: str) -> str:
    assert stat in CURVES[name], (name, stat)
    return f"{name}_{stat}"


def training_names() -> list[str]:
    """Every figure metrics.json can hold."""
    return [*TRAINING, *(curve(name, stat) for name, stats in CURVES.items() for stat in stats)]


# --- a sweep's comparison.csv: per job, the headline figure of its protocol (`headline`) and a few others ------
def column_interval(model: str) -> tuple[str, str]:
    """The comparison's columns of the 95% interval of a model's headline accuracy (its column: the model)."""
    return (f"{model}_{CI[0]}", f"{model}_{CI[1]}")


COMPARISON = (*(c for model in MODELS for c in (model, *column_interval(model))), "difference", "mcnemar_p",
              "finetuned_strict_match", "finetuned_flexible_extract", "finetuned_loop_rate", "eval_loss_best",
              "train_runtime_s", "processes", "global_batch")
SETTING_FACTS = ("processes", "global_batch")  # a setting's, where all its seeds agree: not averaged
# A setting (the swept values but the seed) over its seeds: each figure's mean in the figure's column, and for these
# its standard deviation over the seeds beside it.
SPREAD = ("baseline", "finetuned", "difference", "finetuned_strict_match", "finetuned_flexible_extract",
          "finetuned_loop_rate", "eval_loss_best", "train_runtime_s")


def spread(column: str) -> str:
    """The comparison's column of a figure's standard deviation over a setting's seeds."""
    assert column in SPREAD, column
    return f"{column}_std"


# A setting against the sweep's best (`reporting/ranking.py`), paired on the same questions (and seeds): accuracy
# difference (setting minus best) with its 95% interval, exact McNemar p, Holm's adjusted p, pairs compared.
VS_BEST = ("vs_best_difference", *(f"vs_best_{bound}" for bound in CI), "vs_best_mcnemar_p", "vs_best_p_holm",
           "vs_best_pairs")


# --- log_history.json: the Trainer's names (transformers, TRL), and the accuracies the package adds ------------
HISTORY = ("loss", "eval_loss", "mean_token_accuracy", "eval_mean_token_accuracy", "train_runtime",
           "train_samples_per_second", "step", "epoch", "learning_rate", "grad_norm")


def during_training_names() -> list[str]:
    """What GSM8K accuracy during training adds to each evaluation's log (`training/callbacks.py`)."""
    return [figure(DURING_TRAINING, a) for a in accuracy_names()] + [figure(DURING_TRAINING, "answer_format_rate")]


def _k(name: str) -> int | None:
    found = re.search(r"@(\d+)", name)
    return int(found.group(1)) if found else None


def defined(name: str) -> bool:
    """Whether `name` is a figure of a run directory (metrics.json, eval_metrics.json, log_history.json)."""
    return name in {*eval_names(_k(name)), *training_names(), *HISTORY, *during_training_names()}


def is_result(name: str) -> bool:
    """The figures a dashboard's default panels should draw (W&B's `results/` section): accuracy under every rule
    (maj@k and pass@k when sampled) with its 95% bounds, the answer-format rates, the paired tests' difference and
    p, and the best validation loss."""
    k = _k(name)
    per_model = [*accuracy_names(k), "answer_format_rate"]
    names = {curve("eval_loss", "best")}
    for model in MODELS:
        names |= {figure(model, a) for a in per_model} | {b for a in accuracy_names(k) for b in interval(model, a)}
    names |= {n for n in eval_names(k) if n.startswith("paired_") and n.endswith(("_difference", "_mcnemar_p"))}
    return name in names


def read(figures: Mapping, name: str):
    """A figure by name, None where this run does not have it; a name defined nowhere is an error, not a gap."""
    if not defined(name):
        raise KeyError(f"{name!r} is not a figure (gsm8k_lora/figures.py defines them)")
    return figures.get(name)

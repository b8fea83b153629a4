"""Scoring graded answers: one prediction record per question, the accuracy figures of a set of records,
and the paired comparison of two models on the same questions. Used alike by the evaluation CLI, the
training callback (accuracy during training) and the recipe; the report reads what they wrote.

Statistics come from scipy: the 95% Wilson score interval (`binomtest(...).proportion_ci(method="wilson")`,
well-behaved at 0 and 1, unlike the normal one) and the exact McNemar test (a two-sided binomial test with
p = 1/2 on the discordant pairs).
"""

from __future__ import annotations

from collections import Counter, defaultdict

from gsm8k_lora.data.gsm8k import same_number
from gsm8k_lora.evaluation.grading import extract_flexible, grade, repetition_loop

# Each accuracy figure: (record field, metric name). lm-eval's `strict-match` and `flexible-extract` are computed
# as lm-eval computes them (grading.py); the package's own by-value rule reads `18.00` or `$18` as 18, so it is
# the headline, and lm-eval's figures sit beside it for comparison with published numbers.
RULES = (("correct", "gsm8k_by_value"), ("correct_strict", "gsm8k_by_value_strict"),
         ("lm_eval_strict_correct", "gsm8k_strict_match"), ("lm_eval_flexible_correct", "gsm8k_flexible_extract"))
HEADLINE = "gsm8k_by_value"
LABELS = {"gsm8k_by_value": "by-value", "gsm8k_by_value_strict": "by-value strict",
          "gsm8k_strict_match": "lm-eval strict-match", "gsm8k_flexible_extract": "lm-eval flexible-extract"}


def wilson_interval(correct: int, total: int) -> tuple[float, float]:
    """95% Wilson score interval for a proportion; (0, 0) for no trials."""
    if total == 0:
        return (0.0, 0.0)
    from scipy.stats import binomtest  # deferred for start-up time: scipy.stats takes ~0.7 s to import

    ci = binomtest(correct, total).proportion_ci(confidence_level=0.95, method="wilson")
    return (float(ci.low), float(ci.high))


def mcnemar_exact(only_a: int, only_b: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (binomial with p = 1/2)."""
    n = only_a + only_b
    if n == 0:
        return 1.0
    from scipy.stats import binomtest  # deferred for start-up time: scipy.stats takes ~0.7 s to import

    return float(binomtest(min(only_a, only_b), n, 0.5).pvalue)


def paired_comparison(base: list[bool], tuned: list[bool]) -> dict:
    """How two models answering the same questions differ: counts, difference and McNemar p."""
    assert len(base) == len(tuned), "paired comparison needs the same questions"
    only_tuned = sum(t and not b for b, t in zip(base, tuned, strict=True))
    only_base = sum(b and not t for b, t in zip(base, tuned, strict=True))
    n = len(base)
    return {
        "n": n,
        "difference": (sum(tuned) - sum(base)) / n if n else 0.0,
        "only_finetuned_correct": only_tuned,
        "only_baseline_correct": only_base,
        "mcnemar_p": mcnemar_exact(only_tuned, only_base),
    }


def majority_vote(preds: list[str | None]) -> str | None:
    """The most common extracted answer (first seen wins a tie); None when no sample has one."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(p for p in preds if p is not None and votes[p] == best)


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
                          majority_correct=same_number(vote, row["gold"]),
                          any_correct=any(grade(c, row["gold"]).correct for c in gen["completions"]))
        records.append(record)
    return records


def rate(records: list[dict], key: str) -> float:
    return sum(bool(r.get(key)) for r in records) / len(records) if records else 0.0


def tally(records: list[dict]) -> dict[str, int]:
    """How many records each rule grades correct."""
    return {name: sum(bool(r[key]) for r in records) for key, name in RULES}


def accuracy_by_steps(records: list[dict]) -> list[tuple[int, int, float]]:
    """(reasoning steps in the gold solution, questions, by-value accuracy), by steps."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        groups[int(record["num_steps"])].append(record)
    return [(steps, len(group), rate(group, "correct")) for steps, group in sorted(groups.items())]


def accuracies(records: list[dict], prefix: str) -> dict:
    """`{prefix}_{rule}` for every grading rule, and the answer-format rate: the figures of a set of records."""
    out = {f"{prefix}_{name}": rate(records, key) for key, name in RULES}
    out[f"{prefix}_answer_format_rate"] = rate(records, "explicit_answer")
    return out


def summarize(records: list[dict], prefix: str) -> dict:
    """Every figure of one model's records: accuracies with 95% intervals, rates, mean tokens, maj@k/pass@k."""
    n = len(records)
    out = {f"{prefix}_n": n, **accuracies(records, prefix)}
    for name, k in tally(records).items():
        low, high = wilson_interval(k, n)
        out.update({f"{prefix}_{name}_ci95_low": low, f"{prefix}_{name}_ci95_high": high})
    out[f"{prefix}_hit_token_limit_rate"] = rate(records, "hit_token_limit")
    out[f"{prefix}_repetition_loop_rate"] = rate(records, "repetition_loop")
    out[f"{prefix}_generated_tokens_mean"] = sum(r["generated_tokens"] for r in records) / n if n else 0.0
    if records and "majority_correct" in records[0]:
        k = len(records[0]["samples"])
        out[f"{prefix}_gsm8k_maj@{k}"] = rate(records, "majority_correct")
        out[f"{prefix}_gsm8k_pass@{k}"] = rate(records, "any_correct")
    return out


def eval_metrics(predictions: dict[str, list[dict]]) -> dict:
    """The figures of `eval_metrics.json`: each model's summary, and the paired comparison of the two."""
    metrics: dict = {}
    for name, records in predictions.items():
        metrics.update(summarize(records, name))
    if {"baseline", "finetuned"} <= predictions.keys():
        for key, name in RULES:
            pair = paired_comparison([r[key] for r in predictions["baseline"]],
                                     [r[key] for r in predictions["finetuned"]])
            metrics.update({f"paired_{name.removeprefix('gsm8k_')}_{k}": v for k, v in pair.items()})
    return metrics


def summary_lines(metrics: dict) -> list[str]:
    """What the terminal shows of `eval_metrics.json`."""
    lines = []
    for name in ("baseline", "finetuned"):
        key = f"{name}_{HEADLINE}"
        if key in metrics:
            def m(rule: str, name: str = name) -> str:
                return f"{metrics[f'{name}_{rule}']:.1%}"

            lines.append(f"GSM8K accuracy ({name}, n={metrics[f'{name}_n']}): by-value {m(HEADLINE)} "
                         f"[{metrics[key + '_ci95_low']:.1%}, {metrics[key + '_ci95_high']:.1%}] (the headline); "
                         f"lm-eval strict-match {m('gsm8k_strict_match')}, flexible-extract "
                         f"{m('gsm8k_flexible_extract')}; answer format rate {m('answer_format_rate')}, ran to the "
                         f"token limit {m('hit_token_limit_rate')}, repetition loops {m('repetition_loop_rate')}")
    if "paired_by_value_difference" in metrics:
        lines.append(f"fine-tuned minus baseline (by-value): {metrics['paired_by_value_difference']:+.1%} "
                     f"(McNemar p={metrics['paired_by_value_mcnemar_p']:.3g})")
    if metrics.get("note"):
        lines.append(metrics["note"])
    return lines

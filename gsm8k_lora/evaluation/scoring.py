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
from gsm8k_lora.evaluation.diagnosis import error_category
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
            "problem_type": row.get("problem_type") or None,  # the synthetic generator's kind of problem
        }
        record["error_category"] = error_category(record)  # None when right
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


def accuracy_by_steps(records: list[dict]) -> list[tuple[int, int, float, float, float]]:
    """(reasoning steps in the gold solution, questions, by-value accuracy, its 95% interval), by steps."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for record in records:
        groups[int(record["num_steps"])].append(record)
    return [(steps, len(group), rate(group, "correct"), *wilson_interval(sum(bool(r["correct"]) for r in group),
                                                                      len(group)))
            for steps, group in sorted(groups.items())]


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
        for key, name in (("majority_correct", f"gsm8k_maj@{k}"), ("any_correct", f"gsm8k_pass@{k}")):
            low, high = wilson_interval(sum(bool(r[key]) for r in records), n)
            out.update({f"{prefix}_{name}": rate(records, key), f"{prefix}_{name}_ci95_low": low,
                        f"{prefix}_{name}_ci95_high": high})
    return out


def sampled_k(records: list[dict]) -> int | None:
    """k of self-consistency (maj@k, pass@k), or None for greedy answers."""
    return len(records[0]["samples"]) if records and "samples" in records[0] else None


def eval_metrics(predictions: dict[str, list[dict]]) -> dict:
    """The figures of `eval_metrics.json`: each model's summary, and the paired comparison of the two: every
    accuracy, the answer-format rate and, when sampled, maj@k."""
    metrics: dict = {}
    for name, records in predictions.items():
        metrics.update(summarize(records, name))
    if {"baseline", "finetuned"} <= predictions.keys():
        k = sampled_k(predictions["finetuned"])
        paired = [*((key, name.removeprefix("gsm8k_")) for key, name in RULES), ("explicit_answer", "answer_format")]
        if k is not None:
            paired.append(("majority_correct", f"maj@{k}"))
        for key, name in paired:
            pair = paired_comparison([r[key] for r in predictions["baseline"]],
                                     [r[key] for r in predictions["finetuned"]])
            metrics.update({f"paired_{name}_{k}": v for k, v in pair.items()})
    return metrics


def significance(metrics: dict, name: str) -> str:
    """The paired difference of `paired_{name}_*` in points, and whether it is more than noise."""
    diff, p, n = (metrics[f"paired_{name}_{k}"] for k in ("difference", "mcnemar_p", "n"))
    if p < 0.05:
        return f"{100 * diff:+.1f} points, significant (McNemar p={p:.2g})"
    return f"{100 * diff:+.1f} points, not significant (McNemar p={p:.2g}): within the noise of {n} questions"


def summary_lines(metrics: dict, protocol: str, split: str = "test") -> list[str]:
    """What the terminal shows of `eval_metrics.json`, what changed first: the answer format, then the accuracy
    (maj@k and pass@k when sampled), each with its 95% interval and whether the change is more than noise."""
    models = [m for m in ("baseline", "finetuned") if f"{m}_n" in metrics]
    if not models:
        return []
    names = {"baseline": "baseline", "finetuned": "fine-tuned"}
    paired = len(models) == 2

    def across(figure: str, interval: bool = True) -> str:
        cells = []
        for model in models:
            key = f"{model}_{figure}"
            ci = f" [{metrics[key + '_ci95_low']:.1%}, {metrics[key + '_ci95_high']:.1%}]" if interval else ""
            cells.append(f"{names[model]} {metrics[key]:.1%}{ci}")
        return " -> ".join(cells)

    def line(label: str, figure: str, pair: str | None, interval: bool = True) -> str:
        change = f"; {significance(metrics, pair)}" if paired and pair else ""
        return f"  {label}: {across(figure, interval)}{change}"

    k = next((int(key.rpartition("@")[2]) for key in metrics if key.startswith(f"{models[0]}_gsm8k_maj@")
              and key[-1].isdigit()), None)
    note = " (the built-in tiny model: its accuracy says nothing about real models)" if metrics.get("note") else ""
    lines = [f"GSM8K, {metrics[models[0] + '_n']} {split} questions, {protocol}{note}",
             line("answer format (states a final answer)", "answer_format_rate", "answer_format", interval=False)]
    if k is not None:
        lines += [line(f"maj@{k}, by-value (the headline)", f"gsm8k_maj@{k}", f"maj@{k}"),
                  line(f"pass@{k}, by-value", f"gsm8k_pass@{k}", None),
                  line("the first sample alone, by-value", HEADLINE, "by_value")]
    else:
        lines.append(line("accuracy, by-value (the headline)", HEADLINE, "by_value"))
    rules = [f"lm-eval {LABELS[rule].removeprefix('lm-eval ')} {across(rule, interval=False)}"
             for rule in ("gsm8k_strict_match", "gsm8k_flexible_extract")]
    rates = [f"{what} {across(rate_name, interval=False)}" for what, rate_name in
             (("ran to the token limit", "hit_token_limit_rate"), ("repetition loops", "repetition_loop_rate"))]
    return lines + ["  " + "; ".join(rules), "  " + "; ".join(rates)]

"""Scoring graded answers: one graded answer per question, the accuracy figures of a set of answers,
and the paired comparison of two models on the same questions. Used alike by the evaluation CLI, the
training callback (accuracy during training) and the recipe; the report reads what they wrote.

Statistics come from scipy: the 95% Wilson score interval (`binomtest(...).proportion_ci(method="wilson")`,
well-behaved at 0 and 1, unlike the normal one) and the exact McNemar test (a two-sided binomial test with
p = 1/2 on the discordant pairs). A sweep's ranking adds what scipy has no function for, each a few lines on
scipy's distributions: the interval of a paired difference (Bonett and Price's adjusted Wald interval), Holm's
adjustment of several p-values, and the power of the exact McNemar test, hence the smallest difference a set of
paired answers can detect.
"""

from __future__ import annotations

import math
from collections import Counter, defaultdict

from gsm8k_lora import figures as F
from gsm8k_lora.data.gsm8k import same_number
from gsm8k_lora.evaluation.diagnosis import error_category
from gsm8k_lora.evaluation.grading import extract_by_value, grade, repetition_loop

# The rules (`figures.RULES`): lm-eval's `strict-match` and `flexible-extract` are computed as lm-eval computes them
# (grading.py); the package's own by-value rule reads `18.00` or `$18` as 18, so it is the headline, and lm-eval's
# figures sit beside it for comparison with published numbers.


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


def discordant(a: list[bool], b: list[bool]) -> tuple[int, int]:
    """Of two sets of verdicts on the same questions: how many only `a` got right, and how many only `b`."""
    assert len(a) == len(b), "paired comparison needs the same questions"
    return (sum(x and not y for x, y in zip(a, b, strict=True)), sum(y and not x for x, y in zip(a, b, strict=True)))


def paired_comparison(base: list[bool], tuned: list[bool]) -> dict:
    """How two models answering the same questions differ: counts, difference and McNemar p."""
    only_tuned, only_base = discordant(tuned, base)
    n = len(base)
    return {
        "n": n,
        "difference": (sum(tuned) - sum(base)) / n if n else 0.0,
        "only_finetuned_correct": only_tuned,
        "only_baseline_correct": only_base,
        "mcnemar_p": mcnemar_exact(only_tuned, only_base),
    }


def paired_difference_interval(only_a: int, only_b: int, n: int) -> tuple[float, float]:
    """95% interval of accuracy(a) - accuracy(b) on n paired questions, from the discordant counts: Bonett and
    Price's adjusted Wald interval (Stat. Med. 2012; one added to each discordant count), which keeps its
    coverage near 95% down to small n and stays wide where no answer differs (the plain Wald interval collapses
    to a point there). scipy has no interval for paired proportions."""
    from scipy.stats import norm  # deferred, as above

    a, b = (only_a + 1) / (n + 2), (only_b + 1) / (n + 2)
    centre = a - b
    half = float(norm.ppf(0.975)) * math.sqrt(max(a + b - centre ** 2, 0.0) / (n + 2))
    return (max(centre - half, -1.0), min(centre + half, 1.0))


def holm(pvalues: list[float]) -> list[float]:
    """Holm's step-down adjustment of p-values tested together (each compared with 0.05 as usual afterwards):
    the smallest times m, the next times m - 1, ..., never below an earlier one. scipy's
    `false_discovery_control` offers only Benjamini-Hochberg and -Yekutieli, which bound another error."""
    order = sorted(range(len(pvalues)), key=lambda i: pvalues[i])
    adjusted, running = [1.0] * len(pvalues), 0.0
    for rank, index in enumerate(order):
        running = max(running, min(1.0, (len(pvalues) - rank) * pvalues[index]))
        adjusted[index] = running
    return adjusted


def mcnemar_power(n: int, discordance: float, difference: float, alpha: float) -> float:
    """The chance that the exact McNemar test (`mcnemar_exact`) at level `alpha` finds a true accuracy difference
    `difference` on n paired questions of which a share `discordance` is answered differently: summed over the
    binomial number m of discordant pairs, the chance that their split falls where the test rejects (at most
    k(m) on one side, k(m) the largest k with 2 * P(Binom(m, 1/2) <= k) <= alpha)."""
    import numpy as np
    from scipy.stats import binom  # deferred, as above

    m = np.arange(n + 1)
    k = binom.ppf(alpha / 2, m, 0.5)
    k = np.where(2 * binom.cdf(k, m, 0.5) <= alpha, k, k - 1)
    better = (discordance + difference) / (2 * discordance)  # the share of discordant pairs the better one wins
    rejected = binom.cdf(k, m, better) + binom.sf(m - k - 1, m, better)
    return float(np.sum(binom.pmf(m, n, discordance) * rejected))


def minimum_detectable_difference(n: int, discordance: float, alpha: float, power: float = 0.8) -> float | None:
    """The smallest accuracy difference the exact McNemar test at level `alpha` finds with this `power` on n paired
    questions of which a share `discordance` is answered differently; None where even the largest difference
    those answers allow (every differing answer going one way: `discordance`) is found less often."""
    if n == 0 or discordance <= 0 or mcnemar_power(n, discordance, discordance, alpha) < power:
        return None
    from scipy.optimize import brentq  # deferred, as above

    return float(brentq(lambda d: mcnemar_power(n, discordance, d, alpha) - power, 1e-9, discordance, xtol=1e-6))


def majority_vote(preds: list[str | None]) -> str | None:
    """The most common extracted answer (first seen wins a tie); None when no sample has one."""
    votes = Counter(p for p in preds if p is not None)
    if not votes:
        return None
    best = max(votes.values())
    return next(p for p in preds if p is not None and votes[p] == best)


def score(rows: list[dict], generations: list[dict], model_name: str, max_new_tokens: int | None = None) -> list[dict]:
    """One graded answer per question (`figures.ANSWER`): the first completion graded, plus self-consistency votes,
    with how the model's context bounded it (`figures.CONTEXT`: a prompt that did not fit has no completion, so it is
    graded wrong and stays among the questions both models are compared on)."""
    answers = []
    for row, gen in zip(rows, generations, strict=True):
        first, tokens = gen["completions"][0], gen["generated_tokens"][0]
        answer = {"id": row["id"], "model": model_name, "question": row["question"], "gold": row["gold"],
                  "completion": first, **grade(first, row["gold"]).fields(), "generated_tokens": tokens,
                  "hit_token_limit": max_new_tokens is not None and tokens >= max_new_tokens,
                  "prompt_tokens_cut": gen["prompt_tokens_cut"], "prompt_did_not_fit": gen["prompt_did_not_fit"],
                  "stopped_at_context_end": gen["stopped_at_context_end"][0],
                  "repetition_loop": repetition_loop(first), "num_steps": row["num_steps"],
                  "problem_type": row.get("problem_type") or None,  # the synthetic generator's kind of problem
                  }
        answer["error_category"] = error_category(answer)  # None when right
        if len(gen["completions"]) > 1:
            preds = [extract_by_value(c) for c in gen["completions"]]
            vote = majority_vote(preds)
            answer.update(zip(F.SAMPLED, (gen["completions"], preds, vote, same_number(vote, row["gold"]),
                                          any(grade(c, row["gold"]).correct for c in gen["completions"])), strict=True))
        answers.append(answer)
    return answers


def rate(answers: list[dict], field: str) -> float:
    return sum(bool(r.get(field)) for r in answers) / len(answers) if answers else 0.0


def tally(answers: list[dict]) -> dict[F.Rule, int]:
    """How many answers each rule grades correct."""
    return {rule: sum(bool(r[rule.verdict]) for r in answers) for rule in F.RULES}


def accuracy_by_steps(answers: list[dict]) -> list[tuple[int, int, float, float, float]]:
    """(reasoning steps in the gold solution, questions, by-value accuracy, its 95% interval), by steps."""
    groups: dict[int, list[dict]] = defaultdict(list)
    for answer in answers:
        groups[int(answer["num_steps"])].append(answer)
    right = F.HEADLINE.verdict
    return [(steps, len(group), rate(group, right), *wilson_interval(sum(bool(r[right]) for r in group), len(group)))
            for steps, group in sorted(groups.items())]


def accuracies(answers: list[dict], model: str) -> dict:
    """Every rule's accuracy and the answer-format rate of a set of answers (`model`: whose, or during training)."""
    out = {F.figure(model, rule.figure): rate(answers, rule.verdict) for rule in F.RULES}
    out[F.figure(model, "answer_format_rate")] = rate(answers, F.EXPLICIT_ANSWER)
    return out


def sampled_k(answers: list[dict]) -> int | None:
    """k of self-consistency (maj@k, pass@k), or None for greedy answers."""
    return len(answers[0]["samples"]) if answers and "samples" in answers[0] else None


def verdicts(k: int | None) -> dict[str, str]:
    """Each accuracy figure of a protocol, and the graded answer's field it counts."""
    out = {rule.figure: rule.verdict for rule in F.RULES}
    if k:
        out.update({F.majority(k): "majority_correct", F.any_of(k): "any_correct"})
    return out


def summarize(answers: list[dict], model: str) -> dict:
    """Every figure of one model's answers: accuracies with 95% intervals, rates, mean tokens, maj@k/pass@k, and how
    many answers the model's context bounded (`figures.COUNTS`)."""
    n, k = len(answers), sampled_k(answers)
    out = {F.figure(model, "n"): n}
    for name, field in verdicts(k).items():
        out[F.figure(model, name)] = rate(answers, field)
        bounds = wilson_interval(sum(bool(r[field]) for r in answers), n)
        out.update(zip(F.interval(model, name), bounds, strict=True))
    out.update({F.figure(model, name): rate(answers, field) for name, field in F.RATES.items()})
    out[F.figure(model, F.GENERATED_TOKENS_MEAN)] = sum(r["generated_tokens"] for r in answers) / n if n else 0.0
    out.update({F.figure(model, name): sum(bool(r[field]) for r in answers) for name, field in F.COUNTS.items()})
    return out


def eval_metrics(predictions: dict[str, list[dict]]) -> dict:
    """The figures of `eval_metrics.json`: each model's summary, and the paired comparison of the two: every
    accuracy, the answer-format rate and, when sampled, maj@k."""
    metrics: dict = {}
    for model, answers in predictions.items():
        metrics.update(summarize(answers, model))
    if set(F.MODELS) <= predictions.keys():
        k = sampled_k(predictions["finetuned"])
        paired = {F.pair_name(name): field for name, field in verdicts(k).items() if name != F.any_of(k or 0)}
        paired[F.ANSWER_FORMAT] = F.EXPLICIT_ANSWER
        for name, field in paired.items():
            pair = paired_comparison([r[field] for r in predictions["baseline"]],
                                     [r[field] for r in predictions["finetuned"]])
            metrics.update({F.paired(name, stat): value for stat, value in pair.items()})
    return metrics


def significance(metrics: dict, name: str) -> str:
    """The paired difference of `name` (`figures.paired`) in points, and whether it is more than noise."""
    diff, p, n = (metrics[F.paired(name, stat)] for stat in ("difference", "mcnemar_p", "n"))
    if p < 0.05:
        return f"{100 * diff:+.1f} points, significant (McNemar p={p:.2g})"
    return f"{100 * diff:+.1f} points, not significant (McNemar p={p:.2g}): within the noise of {n} questions"


def summary_lines(metrics: dict, protocol: str, split: str = "test") -> list[str]:
    """What the terminal shows of `eval_metrics.json`, what changed first: the answer format, then the accuracy
    (maj@k and pass@k when sampled), each with its 95% interval and whether the change is more than noise."""
    models = [m for m in F.MODELS if F.figure(m, "n") in metrics]
    if not models:
        return []
    names = {"baseline": "baseline", "finetuned": "fine-tuned"}
    paired = len(models) == 2

    def across(name: str, interval: bool = True) -> str:
        cells = []
        for model in models:
            low, high = (metrics[bound] for bound in F.interval(model, name)) if interval else (None, None)
            ci = f" [{low:.1%}, {high:.1%}]" if interval else ""
            cells.append(f"{names[model]} {metrics[F.figure(model, name)]:.1%}{ci}")
        return " -> ".join(cells)

    def line(label: str, name: str, pair: str | None, interval: bool = True) -> str:
        change = f"; {significance(metrics, pair)}" if paired and pair else ""
        return f"  {label}: {across(name, interval)}{change}"

    k = F.sampled_k(metrics)
    note = " (the built-in tiny model: its accuracy says nothing about real models)" if F.read(metrics, "note") else ""
    first = F.HEADLINE
    lines = [f"GSM8K, {metrics[F.figure(models[0], 'n')]} {split} questions, {protocol}{note}",
             line("answer format (states a final answer)", "answer_format_rate", F.ANSWER_FORMAT, interval=False)]
    if k is not None:
        lines += [line(f"maj@{k}, by-value (the headline)", F.majority(k), F.pair_name(F.majority(k))),
                  line(f"pass@{k}, by-value", F.any_of(k), None),
                  line(f"the first sample alone, {first.label}", first.figure, first.pair)]
    else:
        lines.append(line(f"accuracy, {first.label} (the headline)", first.figure, first.pair))
    rules = [f"{rule.label} {across(rule.figure, interval=False)}" for rule in F.LM_EVAL_RULES]
    rates = [f"{what} {across(rate_name, interval=False)}" for what, rate_name in
             (("ran to the token limit", "hit_token_limit_rate"), ("repetition loops", "repetition_loop_rate"))]
    return lines + ["  " + "; ".join(rules), "  " + "; ".join(rates), context_line(metrics, models, names)]


CONTEXT_LABELS = {"prompts_cut": "prompts cut at the start (lm-eval's rule)",
                  "answers_stopped_at_context_end": "answers stopped at the context's end",
                  "prompts_not_fitting": "prompts that left no room (not answered)"}


def context_line(metrics: dict, models: list[str], names: dict[str, str]) -> str:
    """How many answers the model's context bounded (`figures.COUNTS`), each model's count of each that is not 0
    for both; where the context bounded none, one short clause says so."""
    bounded = [(count, label) for count, label in CONTEXT_LABELS.items()
               if any(F.read(metrics, F.figure(m, count)) for m in models)]
    if not bounded:
        return "  context: every prompt and answer fit the model's positions (none cut or stopped there)"
    parts = [f"{label} " + " -> ".join(f"{names[m]} {F.read(metrics, F.figure(m, count))}" for m in models)
             for count, label in bounded]
    return f"  context: {'; '.join(parts)}"

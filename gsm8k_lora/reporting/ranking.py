"""A sweep's settings ranked, and the best tested against every other on the same questions.

A setting is a job's swept values but its seed (`naming.setting_name`); a sweep with several seeds
(`grid.seeds`) runs a job per seed of each setting, all on the same test questions (`data.split_seed` is not
swept). Within each protocol (runs asked in different ways are never ranked together):
- a setting's figures are the mean over its done jobs, with their standard deviation over seeds beside them;
- the best is the setting with the highest mean fine-tuned accuracy (its protocol's headline). Several at the top
  are a tie, said as one and never shown as a winner: the others are then tested against the tied setting with
  the lowest validation loss (or the first), which the sentence names;
- every other setting is tested against it, paired on the same (question, seed): the accuracy difference with its
  95% interval, the exact McNemar p, and Holm's adjustment over the settings compared;
- the smallest difference those tests could detect with 80% power follows from the sweep's own discordance rate.
Read from each job's predictions.jsonl; the statistics are `evaluation/scoring.py`'s.
"""

from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field

from gsm8k_lora import figures as F
from gsm8k_lora import naming
from gsm8k_lora.evaluation import scoring
from gsm8k_lora.rundir import read_predictions

ALPHA, POWER = 0.05, 0.8
SEED = naming.short(naming.SEED)  # the one swept key that is not part of a setting


@dataclass
class Ranking:
    """One protocol's settings ranked (labels are the settings' `setting`)."""

    protocol: str
    rule: str | None  # the accuracy ranked by: the protocol's headline; None without evaluation (by loss)
    settings: list[dict]  # the protocol's setting rows, in sweep order, with their tests against `reference`
    top: list[str] = field(default_factory=list)  # the settings at the top: several are a tie
    reference: str | None = None  # the one every other is tested against
    broken_by: str = ""  # how `reference` was picked among a tie
    runner_up: dict | None = None  # the highest setting below the top
    seeds: int = 1  # the most seeds a setting of the protocol ran
    questions: int = 0
    discordance: float | None = None  # share of pairs answered differently, mean over the settings compared
    pairs: int = 0  # pairs of a comparison (questions x seeds), as tested
    detectable: float | None = None  # the smallest difference found with 80% power at Holm's first level
    compared: int = 0  # settings tested against the reference

    @property
    def tied(self) -> bool:
        return len(self.top) > 1

    @property
    def alpha(self) -> float:
        """The level the first (smallest) p-value of Holm's procedure is held to."""
        return ALPHA / max(self.compared, 1)


def answers(job: dict) -> dict[tuple[str, object], bool]:
    """(question id, seed) -> whether the fine-tuned model got it right, by its protocol's headline figure."""
    k = F.sampled_k(job["eval"])
    verdict = scoring.verdicts(k)[F.headline(k)]
    seed = (job["config"].get("trainer") or {}).get("seed")
    return {(r["id"], seed): bool(r[verdict]) for r in read_predictions(job["dir"]) if r["model"] == "finetuned"}


def setting_rows(rows: list[dict], swept: list[str]) -> list[dict]:
    """A row per (protocol, setting): its jobs' figures averaged, each figure's spread over seeds beside it. A
    setting of one job keeps that job's intervals and p-value; one of several seeds has none (they belong to a
    single set of answers)."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault((row["protocol"], row["setting"]), []).append(row)
    return [_setting(members, swept) for members in groups.values()]


def _setting(members: list[dict], swept: list[str]) -> dict:
    first, done = members[0], [r for r in members if r["status"] == "done"]
    one = len(members) == 1
    row = {**{c: (first[c] if one else None) for c in F.COMPARISON}, **dict.fromkeys(F.VS_BEST), "level": "setting",
           "setting": first["setting"], "job": " ".join(r["job"] for r in members),
           "status": "done" if len(done) == len(members) else f"{len(done)} of {len(members)} done",
           **{k: " ".join(str(r[k]) for r in members) if k == SEED else first[k] for k in swept},
           "seeds": len(members), "protocol": first["protocol"], "rule": first["rule"], "n": first["n"],
           "best": "", "wandb_run": first["wandb_run"] if one else "",
           "error": "; ".join(f"job {r['job']}: {r['error']}" for r in members if r["error"])}
    for column in F.SETTING_FACTS:
        values = {r[column] for r in members}
        row[column] = values.pop() if len(values) == 1 else None
    for column in F.SPREAD:
        values = [r[column] for r in done if r[column] is not None]
        row[column] = statistics.fmean(values) if values else None
        row[F.spread(column)] = statistics.stdev(values) if len(values) > 1 else None
    return row


def rank(settings: list[dict], answered: dict[str, dict]) -> Ranking:
    """One protocol's settings ranked and tested (`answered`: a setting's label -> its jobs' answers, pooled)."""
    ranking = Ranking(settings[0]["protocol"], settings[0]["rule"], settings,
                      seeds=max(s["seeds"] for s in settings), questions=settings[0]["n"] or 0)
    scored = [s for s in settings if s["finetuned"] is not None]
    if not scored:  # not evaluated: the lowest validation loss, untested
        with_loss = [s for s in settings if s["eval_loss_best"] is not None]
        if with_loss:
            ranking.top = [min(with_loss, key=lambda s: s["eval_loss_best"])["setting"]]
            ranking.reference = ranking.top[0]
            _mark(ranking)
        return ranking
    high = max(s["finetuned"] for s in scored)
    top = [s for s in scored if math.isclose(s["finetuned"], high, abs_tol=1e-12)]
    reference = min(top, key=_loss)  # the first of equal losses: sweep order
    ranking.top, ranking.reference = [s["setting"] for s in top], reference["setting"]
    if len(top) > 1:
        distinct = len({_loss(s) for s in top}) > 1
        ranking.broken_by = ("the lowest best validation loss" if distinct
                             else "sweep order (their validation losses are equal or missing)")
    below = [s for s in scored if s not in top]
    ranking.runner_up = max(below, key=lambda s: s["finetuned"]) if below else None
    _mark(ranking)
    _test_against(ranking, reference, [s for s in scored if s is not reference], answered)
    return ranking


def _loss(setting: dict) -> float:
    return setting["eval_loss_best"] if setting["eval_loss_best"] is not None else math.inf


def _mark(ranking: Ranking) -> None:
    for s in ranking.settings:
        if s["setting"] in ranking.top:
            s["best"] = ("best" if not ranking.tied else
                         "tied (reference)" if s["setting"] == ranking.reference else "tied")


def _test_against(ranking: Ranking, reference: dict, others: list[dict], answered: dict[str, dict]) -> None:
    """Each of `others` against `reference` on their shared (question, seed) pairs; Holm over all of them."""
    best, tested, shares = answered.get(reference["setting"], {}), [], []
    for s in others:
        theirs = answered.get(s["setting"], {})
        shared = sorted(best.keys() & theirs.keys(), key=str)
        if not shared:
            continue
        only_them, only_best = scoring.discordant([theirs[q] for q in shared], [best[q] for q in shared])
        low, high = scoring.paired_difference_interval(only_them, only_best, len(shared))
        s.update(zip(F.VS_BEST, ((only_them - only_best) / len(shared), low, high,
                                  scoring.mcnemar_exact(only_them, only_best), None, len(shared)), strict=True))
        tested.append(s)
        shares.append((only_them + only_best) / len(shared))
    for s, adjusted in zip(tested, scoring.holm([s["vs_best_mcnemar_p"] for s in tested]), strict=True):
        s["vs_best_p_holm"] = adjusted
    if tested:
        ranking.compared, ranking.discordance = len(tested), statistics.fmean(shares)
        ranking.pairs = round(statistics.fmean(s["vs_best_pairs"] for s in tested))
        ranking.detectable = scoring.minimum_detectable_difference(ranking.pairs, ranking.discordance,
                                                                   ranking.alpha, POWER)


def best_job(ranking: Ranking, rows: list[dict]) -> dict | None:
    """The job whose adapter stands for the sweep's best (W&B alias `best`): of the best setting, its done job with
    the highest fine-tuned accuracy, then the lowest validation loss; None in a tie (no winner) or without one."""
    if ranking.reference is None or ranking.tied:
        return None
    done = [r for r in rows if r["setting"] == ranking.reference and r["protocol"] == ranking.protocol
            and r["status"] == "done"]
    return min(done, key=lambda r: (-(r["finetuned"] or 0.0), _loss(r)), default=None)


def rule_label(rule: str) -> str:
    return next((r.label for r in F.RULES if r.figure == rule), rule.removeprefix("gsm8k_"))


def conclusion(ranking: Ranking) -> list[str]:
    """What a reader should take from the ranking, a sentence each: the best (or the tie), whether it is told apart
    from the runner-up, the smallest difference the sweep could detect, and what its seeds allow."""
    if ranking.reference is None:
        return []
    if ranking.rule is None:
        return [f"- **Best by validation loss:** {ranking.reference}; without GSM8K answers no setting is tested "
                f"against another."]
    return [_best_line(ranking), _runner_up_line(ranking), _detectable_line(ranking), _seeds_line(ranking)]


def _accuracy(setting: dict) -> str:
    return f"{setting['finetuned']:.1%}"


def _of(ranking: Ranking, label: str) -> dict:
    return next(s for s in ranking.settings if s["setting"] == label)


def _best_line(ranking: Ranking) -> str:
    reference = _of(ranking, ranking.reference)
    what = f"fine-tuned accuracy ({rule_label(ranking.rule)})"
    if ranking.tied:
        return (f"- **No single best:** {', '.join(ranking.top)} tie at {_accuracy(reference)} {what}; the others are "
                f"tested against {ranking.reference}, picked among the tied by {ranking.broken_by}.")
    return f"- **Best:** {ranking.reference}, {_accuracy(reference)} {what}."


def _runner_up_line(ranking: Ranking) -> str:
    if ranking.tied:
        return "- **Best against the runner-up:** not distinguishable: they tie."
    second = ranking.runner_up
    if second is None:
        return "- **Best against the runner-up:** there is no runner-up (one setting was scored)."
    if second["vs_best_p_holm"] is None:
        return f"- **Best against the runner-up:** {second['setting']} shares no answered question with the best."
    told = second["vs_best_p_holm"] < ALPHA
    low, high = (-second[c] for c in F.VS_BEST[1:3])  # best minus runner-up: the interval turned round
    return (f"- **Best against the runner-up:** the best is {'' if told else 'not '}distinguishable from the "
            f"runner-up {second['setting']} ({_accuracy(second)}): {_points(-second['vs_best_difference'])} "
            f"[95% CI {100 * high:+.1f}, {100 * low:+.1f}], exact McNemar p={second['vs_best_mcnemar_p']:.3g}, "
            f"Holm-adjusted p={second['vs_best_p_holm']:.3g} over {ranking.compared} comparison"
            f"{'s' if ranking.compared > 1 else ''} with the best.")


def _detectable_line(ranking: Ranking) -> str:
    if ranking.discordance is None:
        return "- **Smallest detectable difference:** none computed (no setting was compared with the best)."
    pairs = _pairs(ranking)
    level = (f"the exact McNemar test at alpha={ranking.alpha:.3g} (Holm's first level: 0.05 / "
             f"{ranking.compared} comparison{'s' if ranking.compared > 1 else ''})")
    if ranking.discordance == 0:
        return (f"- **Smallest detectable difference:** none: on {pairs} the best and every other setting gave the "
                f"same verdicts, so this sweep could tell no difference from noise.")
    if ranking.detectable is None:
        return (f"- **Smallest detectable difference:** none: on {pairs}, {ranking.discordance:.1%} answered "
                f"differently by the best and the others, even a difference that large is found by {level} less "
                f"often than {POWER:.0%} of the time.")
    return (f"- **Smallest detectable difference:** {100 * ranking.detectable:.1f} points: on {pairs}, where the "
            f"best and the others answered {ranking.discordance:.1%} differently (the mean over the comparisons), "
            f"{level} finds a difference that large {POWER:.0%} of the time; smaller ones this sweep cannot tell "
            f"from noise.")


def _pairs(ranking: Ranking) -> str:
    if ranking.seeds > 1:
        return f"{ranking.pairs} paired answers ({ranking.questions} questions x {ranking.seeds} seeds)"
    return f"{ranking.pairs} paired questions"


def _seeds_line(ranking: Ranking) -> str:
    if ranking.seeds == 1:
        return ("- **Seeds:** one per setting, so this ranking ignores seed variance (a LoRA run's accuracy moves "
                "with its seed alone); `make sweep SEEDS=3` runs each setting with 3 seeds.")
    return (f"- **Seeds:** {ranking.seeds} per setting (trainer.seed), on the same test questions: each figure is "
            f"the mean over seeds with its standard deviation; the tests pool the seeds' answers question by "
            f"question, pairing equal seeds (answers to one question under several seeds are not independent, so "
            f"their p-values lean optimistic).")


def _points(difference: float) -> str:
    return f"{100 * difference:+.1f} points"

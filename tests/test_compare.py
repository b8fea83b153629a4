"""`compare`: a sweep's settings ranked, the best tested against every other on the same questions, a tie said as
one, seeds grouped; checked on synthetic answer sets whose differences are known."""

import csv
import json
import math
import random
import re
import statistics
from pathlib import Path

import pytest
import yaml
from scipy.optimize import brentq
from scipy.stats import binomtest, norm

from gsm8k_lora.figures import HEADLINE
from tests.conftest import run_cli


def fake_job(sweep: Path, job: int, lr: str, status: str, loss: float | None, accuracy: float | None,
             seed: int | None = None, verdicts: list[bool] | None = None) -> None:
    """A job directory as a sweep's job leaves it; with `verdicts`, its fine-tuned answers (question i right or
    not) and the accuracy they make."""
    job_dir = sweep / str(job)
    (job_dir / ".hydra").mkdir(parents=True)
    overrides = [f"trainer.learning_rate={lr}", *([f"trainer.seed={seed}"] if seed is not None else [])]
    (job_dir / ".hydra" / "overrides.yaml").write_text(yaml.safe_dump(overrides))
    (job_dir / "config.yaml").write_text(yaml.safe_dump({"trainer": {"seed": seed if seed is not None else 42},
                                                         "eval": {"prompt": "chat", "num_samples": 1}}))
    (job_dir / f"{status}.json").write_text(json.dumps({"error": "RuntimeError: boom"} if status == "failed" else {}))
    (job_dir / "metrics.json").write_text(json.dumps({"eval_loss_best": loss, "train_runtime_s": 10.0}))
    if verdicts is not None:
        accuracy = sum(verdicts) / len(verdicts)
        (job_dir / "predictions.jsonl").write_text("".join(
            json.dumps({"id": f"test-{i}", "model": "finetuned", HEADLINE.verdict: right}) + "\n"
            for i, right in enumerate(verdicts)))
    if accuracy is not None:
        n = len(verdicts) if verdicts is not None else 100
        (job_dir / "eval_metrics.json").write_text(json.dumps({f"finetuned_{HEADLINE.figure}": accuracy,
                                                               f"baseline_{HEADLINE.figure}": 0.1, "finetuned_n": n}))


def planted(n: int, accuracy: float, gap: float, discordance: float, rng: random.Random) -> tuple[list, list]:
    """Two answer sets on the same n questions: the second `accuracy`, the first `gap` higher, a share
    `discordance` of the questions answered differently; which questions are which, shuffled."""
    only_first = round(n * (discordance + gap) / 2)
    only_second = round(n * (discordance - gap) / 2)
    both = round(n * accuracy) - only_second
    kinds = ["first"] * only_first + ["second"] * only_second + ["both"] * both
    kinds += ["neither"] * (n - len(kinds))
    rng.shuffle(kinds)
    return [k in ("first", "both") for k in kinds], [k in ("second", "both") for k in kinds]


def connor(n: int, discordance: float, alpha: float, power: float) -> float:
    """The smallest difference McNemar's test detects, by Connor's normal approximation (Biometrics 1987):
    n = (z_alpha/2 sqrt(psi) + z_power sqrt(psi - d^2))^2 / d^2, solved for d."""
    za, zb = norm.ppf(1 - alpha / 2), norm.ppf(power)
    return brentq(lambda d: (za * math.sqrt(discordance) + zb * math.sqrt(discordance - d * d)) ** 2 / d ** 2 - n,
                  1e-6, discordance)


def compared(sweep: Path) -> tuple[list[dict], str, str]:
    proc = run_cli("compare", str(sweep), timeout=120)
    assert proc.returncode == 0, proc.stderr
    return list(csv.DictReader((sweep / "comparison.csv").open())), (sweep / "comparison.md").read_text(), proc.stdout


def by_setting(rows: list[dict]) -> dict[str, dict]:
    return {r["setting"]: r for r in rows if r["level"] == "setting"}


def test_a_planted_ten_point_gap_is_found_and_a_one_point_gap_is_not(tmp_path):
    rng = random.Random(0)
    best, second = planted(1000, 0.50, 0.10, 0.20, rng)
    close, close_second = planted(1000, 0.50, 0.01, 0.20, rng)
    for number, (lr, verdicts) in enumerate((("1e-4", second), ("2e-4", best))):
        fake_job(tmp_path / "wide", number, lr, "done", 1.0, None, verdicts=verdicts)
    for number, (lr, verdicts) in enumerate((("1e-4", close_second), ("2e-4", close))):
        fake_job(tmp_path / "close", number, lr, "done", 1.0, None, verdicts=verdicts)

    rows, md, out = compared(tmp_path / "wide")
    runner_up = by_setting(rows)["lr=1e-4"]
    assert by_setting(rows)["lr=2e-4"]["best"] == "best" and "best: lr=2e-4 (" in out
    assert float(runner_up["vs_best_difference"]) == pytest.approx(-0.10)
    assert float(runner_up["vs_best_ci95_low"]) < -0.10 < float(runner_up["vs_best_ci95_high"]) < 0
    assert float(runner_up["vs_best_mcnemar_p"]) == pytest.approx(binomtest(50, 200).pvalue)  # 150 vs 50 discordant
    assert float(runner_up["vs_best_p_holm"]) < 0.05 and int(runner_up["vs_best_pairs"]) == 1000
    assert "the best is distinguishable from the runner-up lr=1e-4 (50.0%): +10.0 points" in md

    rows, md, _ = compared(tmp_path / "close")
    runner_up = by_setting(rows)["lr=1e-4"]
    assert float(runner_up["vs_best_ci95_low"]) < 0 < float(runner_up["vs_best_ci95_high"])
    assert float(runner_up["vs_best_p_holm"]) > 0.05
    assert "the best is not distinguishable from the runner-up lr=1e-4 (50.0%): +1.0 points" in md
    # 20% of 1,000 questions answered differently: what the exact test finds with 80% power is near what Connor's
    # normal approximation (1987) gives, well above the 1-point gap
    said = re.search(r"\*\*Smallest detectable difference:\*\* ([0-9.]+) points: on 1000 paired questions", md)
    assert said and float(said.group(1)) == pytest.approx(100 * connor(1000, 0.20, 0.05, 0.8), abs=0.3)
    assert "one per setting, so this ranking ignores seed variance" in md


def test_a_zero_point_gap_is_a_tie_said_as_one_and_never_a_winner(tmp_path):
    first, second = planted(400, 0.55, 0.0, 0.20, random.Random(1))
    fake_job(tmp_path, 0, "1e-4", "done", 0.9, None, verdicts=first)
    fake_job(tmp_path, 1, "2e-4", "done", 0.8, None, verdicts=second)
    fake_job(tmp_path, 2, "5e-4", "done", 1.0, 0.2)
    rows, md, out = compared(tmp_path)
    settings = by_setting(rows)
    assert [settings[s]["best"] for s in ("lr=1e-4", "lr=2e-4", "lr=5e-4")] == ["tied", "tied (reference)", ""]
    assert "(best)" not in md and "tie of lr=1e-4, lr=2e-4" in out
    assert ("**No single best:** lr=1e-4, lr=2e-4 tie at 55.0% fine-tuned accuracy (by-value); the others are "
            "tested against lr=2e-4, picked among the tied by the lowest best validation loss.") in md
    assert "not distinguishable: they tie" in md
    tied = settings["lr=1e-4"]
    assert float(tied["vs_best_difference"]) == 0.0 and float(tied["vs_best_mcnemar_p"]) == 1.0
    assert float(tied["vs_best_ci95_low"]) < 0 < float(tied["vs_best_ci95_high"])


@pytest.mark.parametrize("jobs, best", [
    # highest fine-tuned accuracy wins (not the lowest loss, job 0); a failed job never does
    ([("1e-4", "done", 0.80, 0.30), ("2e-4", "done", 1.20, 0.50), ("1e-3", "failed", 0.50, 0.90)], "lr=2e-4"),
    # without evaluation, the lowest validation loss
    ([("1e-4", "done", 1.10, None), ("2e-4", "done", 0.95, None), ("5e-4", "done", 1.30, None)], "lr=2e-4"),
])
def test_compare_ranks_runs_and_marks_the_best(tmp_path, jobs, best):
    for number, job in enumerate(jobs):
        fake_job(tmp_path, number, *job)
    rows, table, out = compared(tmp_path)
    assert f"best: {best} (" in out
    assert [r["job"] for r in rows] == [str(n) for n in range(len(jobs))]  # one seed: a row per job
    assert [r["setting"] for r in rows if r["best"] == "best"] == [best]
    assert f"| **{best} (best)** |" in table and table.count("(best)") == 1


def test_seeds_are_grouped_per_setting_and_tested_on_the_pooled_answers(tmp_path):
    rng = random.Random(2)
    answers = {}
    for number, (lr, seed) in enumerate((lr, seed) for lr in ("1e-4", "2e-4") for seed in (42, 43, 44)):
        answers[lr, seed] = [rng.random() < (0.40 if lr == "1e-4" else 0.55) for _ in range(200)]
        fake_job(tmp_path, number, lr, "done", 1.0 + number / 10, None, seed=seed, verdicts=answers[lr, seed])
    (tmp_path / "sweep.json").write_text(json.dumps({"swept": ["trainer.learning_rate", "trainer.seed"]}))
    rows, md, _ = compared(tmp_path)
    assert [r["level"] for r in rows] == ["setting"] * 2 + ["job"] * 6  # the per-seed rows kept
    for lr in ("1e-4", "2e-4"):
        row = by_setting(rows)[f"lr={lr}"]
        accuracies = [sum(answers[lr, s]) / 200 for s in (42, 43, 44)]
        assert (row["seeds"], row["seed"], row["job"]) == ("3", "42 43 44", "0 1 2" if lr == "1e-4" else "3 4 5")
        assert float(row["finetuned"]) == pytest.approx(statistics.mean(accuracies))
        assert float(row["finetuned_std"]) == pytest.approx(statistics.stdev(accuracies))
        assert float(row["eval_loss_best_std"]) == pytest.approx(0.1)
    # pooled: 600 (question, seed) pairs, each seed's answers against the same seed's of the best
    pairs = [pair for s in (42, 43, 44) for pair in zip(answers["1e-4", s], answers["2e-4", s], strict=True)]
    only_other, only_best = sum(a and not b for a, b in pairs), sum(b and not a for a, b in pairs)
    other = by_setting(rows)["lr=1e-4"]
    assert int(other["vs_best_pairs"]) == 600
    assert float(other["vs_best_difference"]) == pytest.approx((only_other - only_best) / 600)
    assert float(other["vs_best_mcnemar_p"]) == pytest.approx(binomtest(min(only_other, only_best),
                                                                        only_other + only_best).pvalue)
    assert "**Seeds:** 3 per setting" in md and "600 paired answers (200 questions x 3 seeds)" in md
    assert "Per seed:" in md and "ignores seed variance" not in md


def test_the_accuracy_grid_title_stays_inside_the_figure():
    from matplotlib.backends.backend_agg import FigureCanvasAgg

    from gsm8k_lora.figures import COMPARISON
    from gsm8k_lora.reporting.plots import accuracy_grid

    def setting(lr, epochs, accuracy):
        return {**dict.fromkeys(COMPARISON), "lr": lr, "epochs": epochs, "finetuned": accuracy, "baseline": 0.1,
                "finetuned_ci95_low": accuracy - 0.05, "finetuned_ci95_high": accuracy + 0.05, "rule": "gsm8k_by_value",
                "n": 1319, "seeds": 1, "setting": f"epochs={epochs} lr={lr}", "job": "0"}

    grid = [setting(lr, e, 0.3) for lr in ("1e-4", "2e-4", "5e-4") for e in ("1", "2", "3")]
    for plot in (accuracy_grid(grid, ["epochs", "lr"]), accuracy_grid(grid[:3], ["lr"])):
        canvas = FigureCanvasAgg(plot)
        canvas.draw()
        title = plot.axes[0].title.get_window_extent(canvas.get_renderer())
        assert 0 <= title.x0 and title.x1 <= plot.bbox.x1 and title.y1 <= plot.bbox.y1

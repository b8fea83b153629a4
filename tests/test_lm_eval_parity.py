"""lm-eval's `gsm8k` strict-match and flexible-extract: ours against lm-evaluation-harness's own code.

Every case carries verdicts checked by hand from lm-eval's rules, so the table means something without lm-eval.
When `lm_eval` is importable, the same completions also go through lm-eval's own `gsm8k` task, built from its
own YAML (filters, `take_first`, `exact_match` and its options, `doc_to_target`), and ours must agree with it
string for string.
"""

from __future__ import annotations

from importlib import resources

import pytest

from gsm8k_lora.evaluation.grading import (
    LM_EVAL_FALLBACK,
    grade,
    lm_eval_exact_match,
    lm_eval_flexible_extract,
    lm_eval_strict_match,
)
from gsm8k_lora.evaluation.protocols import LM_EVAL_FEWSHOT_SEED

SKIP_REASON = "lm-evaluation-harness is not installed (`pip install lm_eval`, dev extra); hand-checked cases still run"

# GSM8K `answer` fields, the reference lm-eval compares with (its doc_to_target is `{{answer}}`).
GOLD_18 = "Janet has 20 - 2 = <<20-2=18>>18 eggs left.\n#### 18"
GOLD_1000 = "Each box holds 250, so 4 boxes hold 4 * 250 = <<4*250=1000>>1,000.\n#### 1,000"
GOLD_NEG = "The temperature falls 5 - 8 = <<5-8=-3>>-3 degrees.\n#### -3"
GOLD_5 = "2 + 3 = <<2+3=5>>5\n#### 5"
INVALID = LM_EVAL_FALLBACK

# completion, answer field, then by hand: strict-match's extracted string and verdict, flexible-extract's.
CASES = [
    ("Janet has 18 eggs.\n#### 18", GOLD_18, "18", True, "18", True),
    ("She makes $18.", GOLD_18, INVALID, False, "$18.", True),  # `$` and one trailing `.` are ignored
    ("#### $18", GOLD_18, INVALID, False, "$18", True),  # strict's class has no `$`
    ("4 * 250 = 1,000 in all.\n#### 1,000", GOLD_1000, "1,000", True, "1,000", True),
    ("#### 1000", GOLD_1000, "1000", True, "1000", True),  # commas are ignored on both sides
    ("#### 1,000.00", GOLD_1000, "1,000.00", False, "1,000.00", False),
    ("#### 18.00", GOLD_18, "18.00", False, "18.00", False),  # a string match: 18.00 is not 18
    ("####18", GOLD_18, INVALID, False, "18", True),  # strict needs exactly one space after ####
    ("#### 17\n#### 18", GOLD_18, "17", False, "18", True),  # strict: the first; flexible: the last
    ("#### 18\n#### 17", GOLD_18, "18", True, "17", False),
    ("It falls to -3 degrees.\n#### -3", GOLD_NEG, "-3", True, "-3", True),
    ("#### 3", GOLD_NEG, "3", False, "3", False),
    ("#### 18.", GOLD_18, "18.", True, "18.", True),
    ("The answer is 18...", GOLD_18, INVALID, False, "18...", False),  # only one trailing `.` is ignored
    ("That is 18 eggs.\n#### 18\n\nQuestion: Tom has 4 pens and buys 7 more. How many?",
     GOLD_18, "18", True, "7", False),  # not cut here: lm-eval stops generating at `Question:`
    ("I cannot tell.", GOLD_18, INVALID, False, INVALID, False),
    ("I am not sure.\n\nQuestion: A farmer has 18 cows.", GOLD_18, INVALID, False, "18", True),
    ("The answer is 5", GOLD_5, INVALID, False, "5", True),  # one digit: the pattern's second group
    ("2 + 3 = 5, I think.", GOLD_5, INVALID, False, "5,", True),  # the comma is ignored
    ("We get 18.\n#### 18\n", GOLD_18, "18", True, "18", True),
]
IDS = [f"{i}-{c[0][:24]!r}" for i, c in enumerate(CASES)]


@pytest.mark.parametrize("completion, answer, strict, strict_ok, flexible, flexible_ok", CASES, ids=IDS)
def test_hand_checked_verdicts(completion, answer, strict, strict_ok, flexible, flexible_ok):
    assert lm_eval_strict_match(completion, answer) == (strict, strict_ok)
    assert lm_eval_flexible_extract(completion, answer) == (flexible, flexible_ok)


def test_grade_carries_lm_eval_verdicts_beside_by_value_ones():
    g = grade("She makes $18.00.", "18")  # by value right; a string match in lm-eval's eyes: wrong
    assert (g.correct, g.by_value_strict_correct) == (True, False)
    assert (g.lm_eval_strict.exact_match, g.lm_eval_flexible) == (False, ("$18.00.", False))


def lm_eval_gsm8k_task(train: list[dict], test: list[dict]):
    """lm-eval's own `gsm8k` task, from its own YAML, over the rows given here instead of the hub dataset."""
    task_module = pytest.importorskip("lm_eval.api.task", reason=SKIP_REASON)
    import datasets
    import yaml

    config = yaml.safe_load((resources.files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    splits = datasets.DatasetDict({"train": datasets.Dataset.from_list(train),
                                   "test": datasets.Dataset.from_list(test)})
    task = task_module.ConfigurableTask(config={**config, "custom_dataset": lambda **_: splits})
    from lm_eval.defaults import DEFAULT_OTHER_SEED

    assert DEFAULT_OTHER_SEED == LM_EVAL_FEWSHOT_SEED
    task.set_fewshot_seed(DEFAULT_OTHER_SEED)  # what lm-eval's evaluator does before building requests
    return task


@pytest.fixture(scope="module")
def lm_eval_verdicts() -> list[dict]:
    """Each case's completion run through lm-eval's pipeline: filters, then process_results, as its evaluator."""
    docs = [{"question": f"Case {i}?", "answer": case[1]} for i, case in enumerate(CASES)]
    task = lm_eval_gsm8k_task(train=docs, test=docs)
    task.build_all_requests()
    for instance, case in zip(task.instances, CASES, strict=True):
        instance.resps = [case[0]]  # the model's (already stop-cut) generation
    task.apply_filters()
    out = []
    for instance in task.instances:
        row = {}
        for name, filtered in instance.filtered_resps.items():
            row[name] = (filtered, bool(task.process_results(instance.doc, [filtered])["exact_match"]))
        out.append(row)
    return out


@pytest.mark.parametrize("index", range(len(CASES)), ids=IDS)
def test_same_extraction_and_verdict_as_lm_eval(lm_eval_verdicts, index):
    completion, answer = CASES[index][:2]
    theirs = lm_eval_verdicts[index]
    assert set(theirs) == {"strict-match", "flexible-extract"}
    assert lm_eval_strict_match(completion, answer) == theirs["strict-match"]
    assert lm_eval_flexible_extract(completion, answer) == theirs["flexible-extract"]


@pytest.mark.parametrize("prediction, reference", [
    ("18", GOLD_18), ("$18.", GOLD_18), ("18..", GOLD_18), ("1,000", GOLD_1000), ("1000.", "1,000"),
    ("[invalid]", GOLD_18), ("[INVALID]", "[invalid]"), ("18.\n", "18"), ("18.\x00", "18"), ("-3", GOLD_NEG),
    ("#### 18", "18"), ("a #### b #### 18", GOLD_18), ("18 ", "18"),
])
def test_exact_match_as_lm_eval(prediction, reference):
    metrics = pytest.importorskip("lm_eval.api.metrics", reason=SKIP_REASON)
    import yaml

    config = yaml.safe_load((resources.files("lm_eval") / "tasks" / "gsm8k" / "gsm8k.yaml").read_text())
    options = {k: v for k, v in config["metric_list"][0].items() if k not in ("metric", "aggregation",
                                                                                "higher_is_better")}
    theirs = metrics.exact_match_hf_evaluate(predictions=[prediction], references=[reference], **options)
    assert lm_eval_exact_match(prediction, reference) is bool(theirs["exact_match"])

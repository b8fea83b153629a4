"""Grade existing completions: `python -m gsm8k_lora.grade FILE.jsonl > graded.jsonl`.

Each input row needs `completion` and `answer` (GSM8K's answer field with `#### N`, or a bare
number). Rows come back on stdout with the graded answer's fields (`figures.GRADED`): the package's by-value
rule (`pred`, the extracted number or null, and `correct`; `by_value_strict_pred` and `by_value_strict_correct`
for the number after `####` only; `explicit_answer`) and lm-eval's own `gsm8k` filters
(`lm_eval_strict_extracted` / `_correct` for strict-match, `lm_eval_flexible_*` for flexible-extract); a one-line
summary goes to stderr. A file that is not UTF-8 JSON lines, holds no rows, or lacks a column is one line, exit 1.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gsm8k_lora.data.files import read_jsonl
from gsm8k_lora.data.gsm8k import gold_number
from gsm8k_lora.errors import DataError, fail
from gsm8k_lora.evaluation.grading import grade
from gsm8k_lora.evaluation.scoring import tally


def grade_rows(rows: list[dict]) -> list[dict]:
    return [{**row, **grade(str(row.get("completion") or ""), gold_number(str(row["answer"])) or "").fields()}
            for row in rows]


def read_completions(file: Path) -> list[dict]:
    """The rows to grade, from a JSONL file or stdin ('-'); DataError naming the file (or stdin) and what is wrong."""
    if str(file) == "-":
        rows = []
        for lineno, line in enumerate(sys.stdin, start=1):
            try:
                rows += [json.loads(line)] if line.strip() else []
            except json.JSONDecodeError as err:
                raise DataError(f"stdin:{lineno}: malformed JSON ({err.msg} at column {err.colno})") from err
    elif not file.exists():
        raise DataError(f"{file} does not exist")
    else:
        rows = read_jsonl(file)
    where = "stdin" if str(file) == "-" else file
    if not rows:
        raise DataError(f"{where} holds no rows to grade")
    missing = next((i for i, r in enumerate(rows, 1) if not isinstance(r, dict)
                    or "answer" not in r or "completion" not in r), None)
    if missing is not None:
        raise DataError(f"{where}: row {missing} needs both 'completion' and 'answer'")
    return rows


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.grade", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="JSONL with 'completion' and 'answer' on each row ('-': stdin)")
    args = parser.parse_args(argv)
    try:
        rows = read_completions(args.file)
    except DataError as err:
        fail(err)
    graded = grade_rows(rows)
    for row in graded:
        sys.stdout.write(json.dumps(row) + "\n")
    n = len(graded)
    parts = [f"{rule.label} {k}/{n} ({k / n:.1%})" for rule, k in tally(graded).items()]
    print(f"graded {n} rows: " + ", ".join(parts), file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Grade existing completions: `python -m gsm8k_lora.grade FILE.jsonl > graded.jsonl`.

Each input row needs `completion` and `answer` (GSM8K's answer field with `#### N`, or a bare
number). Rows come back on stdout with `pred` (the flexible extraction, or null) and `correct`
added, plus `pred_strict` and `correct_strict`; a one-line summary goes to stderr.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from gsm8k_lora.grading import gold_number, grade


def grade_rows(rows: list[dict]) -> list[dict]:
    out = []
    for row in rows:
        g = grade(str(row.get("completion") or ""), gold_number(str(row["answer"])) or "")
        out.append({**row, "pred": g.pred, "correct": g.correct, "pred_strict": g.pred_strict,
                    "correct_strict": g.correct_strict})
    return out


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m gsm8k_lora.grade", description=__doc__.splitlines()[0])
    parser.add_argument("file", type=Path, help="JSONL with 'completion' and 'answer' on each row ('-': stdin)")
    args = parser.parse_args(argv)
    from gsm8k_lora.data import DataError, read_jsonl

    try:
        if str(args.file) == "-":
            rows = [json.loads(line) for line in sys.stdin if line.strip()]
        elif not args.file.exists():
            raise DataError(f"{args.file} does not exist")
        else:
            rows = read_jsonl(args.file)
        missing = next((i for i, r in enumerate(rows, 1) if "answer" not in r or "completion" not in r), None)
        if missing is not None:
            raise DataError(f"{args.file}: row {missing} needs both 'completion' and 'answer'")
    except (DataError, json.JSONDecodeError) as err:
        print(f"error: {err}", file=sys.stderr)
        return 1
    graded = grade_rows(rows)
    for row in graded:
        sys.stdout.write(json.dumps(row) + "\n")
    n = len(graded)
    flexible, strict = sum(r["correct"] for r in graded), sum(r["correct_strict"] for r in graded)
    print(f"graded {n} rows: flexible {flexible}/{n} ({flexible / n:.1%}), strict {strict}/{n} "
          f"({strict / n:.1%})" if n else "graded 0 rows", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""The `grade` CLI: completions in, both rules' verdicts out, and one-line errors for bad input."""

import json
import os
import subprocess
import sys

import pytest

from tests.conftest import OFFLINE_ENV, ROOT, run_cli, write_jsonl


def test_grade_cli_on_a_file(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [
        {"completion": "so 5\n#### 5", "answer": "2+3=5\n#### 5"},
        {"completion": "The answer is 7.", "answer": "8"},
        {"completion": "nothing", "answer": "#### 1,000"},
        {"completion": "She pays\n#### $18", "answer": "9*2=18\n#### 18"},  # lm-eval's strict-match: no `$`
    ])
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode == 0, proc.stderr
    rows = [json.loads(line) for line in proc.stdout.splitlines()]
    assert [(r["pred"], r["correct"]) for r in rows] == [("5", True), ("7", False), (None, False), ("18", True)]
    assert [r["lm_eval_strict_correct"] for r in rows] == [True, False, False, False]
    assert [r["lm_eval_flexible_correct"] for r in rows] == [True, False, False, True]
    assert ("by-value 2/4" in proc.stderr and "lm-eval strict-match 1/4" in proc.stderr
            and "lm-eval flexible-extract 2/4" in proc.stderr), proc.stderr


@pytest.mark.parametrize("content, says", [
    (None, "does not exist"),
    ('{"completion": "#### 5", "answer": "5"}\n{"completion": oops}\n', "c.jsonl:2: malformed JSON"),
    ('{"completion": "#### 5", "answer": "5"}\n{"answer": "5"}\n', "row 2 needs both 'completion' and 'answer'"),
    ('["not", "an", "object"]\n', "c.jsonl:1: expected a JSON object"),
])
def test_grade_cli_errors_are_one_line(tmp_path, content, says):
    path = tmp_path / "c.jsonl"
    if content is not None:
        path.write_text(content)
    proc = run_cli("grade", str(path), timeout=120)
    assert proc.returncode != 0 and proc.stdout == ""
    (line,) = proc.stderr.strip().splitlines()
    assert line.startswith("error: ") and says in line


def test_grade_cli_reads_stdin(tmp_path):
    path = write_jsonl(tmp_path / "c.jsonl", [{"completion": "so\n#### 12", "answer": "#### 12"}])
    proc = subprocess.run([sys.executable, "-m", "gsm8k_lora.grade", "-"], input=path.read_text(), cwd=ROOT,
                          capture_output=True, text=True, timeout=120, env={**os.environ, **OFFLINE_ENV})
    assert proc.returncode == 0 and json.loads(proc.stdout)["correct"] is True

"""The GPU check's summary, from what its steps left in WORK, whether each finished or its time limit cut it off:
OUT/gpu_check.json (the figures) and the same as a table on stdout (scripts/gpu_check.sh keeps it as gpu_check.txt).

    python scripts/gpu_summary.py WORK OUT

Each step's figures come from its own files, as far as it got:
- the bench: its JSON, which it rewrites after each measurement (what it did not reach is named as such);
- each recipe run: metrics.json and eval_metrics.json; where the run was stopped before metrics.json, the newest
  checkpoint's trainer_state.json (a stop by a signal saves one): the steps done, and from its log history the
  seconds since training started and the tokens trained by then (logged with TRL's step metrics on);
- pytest: its JUnit XML, else the outcome lines its log printed so far.
Run with PYTHONPATH at the repository; imports nothing of the carried stack before `gsm8k_lora`.
"""

from __future__ import annotations

import importlib
import json
import re
import shutil
import subprocess
import sys
import xml.etree.ElementTree as ET
from importlib import metadata
from pathlib import Path

# The package first, as every command imports it: bitsandbytes (imported below, and by PEFT) asks the Hub for a
# kernel at import on a CPU with AVX512-BF16, which the package refuses it; imported after bitsandbytes, it could not.
try:
    import gsm8k_lora  # noqa: F401
except Exception as err:  # a broken install is a finding to report, not a reason to lose the summary
    PACKAGE_ERROR = f"{type(err).__name__}: {err}"
else:
    PACKAGE_ERROR = None

VERSIONS = ("torch", "transformers", "trl", "peft", "accelerate", "datasets", "huggingface_hub", "tokenizers",
            "kernels", "bitsandbytes", "liger_kernel", "numpy", "pandas", "pyarrow", "scipy", "matplotlib")
BENCH_KEYS = ("falcon3_", "gen_", "qlora", "peak_bf16", "unmeasured", "finished")
OUTCOME = re.compile(r"\b(PASSED|FAILED|SKIPPED|ERROR|XFAIL|XPASS)\b")


def read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError):  # absent, or cut off mid-write by a kill
        return {}


def versions() -> dict:
    found = {"gsm8k_lora": f"import failed: {PACKAGE_ERROR}" if PACKAGE_ERROR else "imported"}
    for name in VERSIONS:
        try:
            module = importlib.import_module(name)  # importable there, not only installed
            found[name] = getattr(module, "__version__", None) or metadata.version(name.replace("_", "-"))
        except Exception as err:  # a failed import is a finding, not a reason to stop the summary
            found[name] = f"import failed: {type(err).__name__}: {err}"
    return found


def newest_state(run: Path) -> tuple[Path, dict] | None:
    """The trainer_state.json of the run's newest checkpoint that holds a whole one."""
    for state in sorted(run.glob("checkpoints/checkpoint-*/trainer_state.json"),
                        key=lambda p: int(p.parent.name.rpartition("-")[2]), reverse=True):
        if figures := read_json(state):
            return state, figures
    return None


def training(run: Path) -> dict:
    """What a run trained: from metrics.json, else from its newest checkpoint."""
    metrics = read_json(run / "metrics.json")
    if metrics:
        seconds, steps, tokens = metrics.get("train_runtime_s"), metrics.get("steps"), metrics.get("tokens_seen")
        return {"source": "metrics.json", "steps": steps, "max_steps": metrics.get("max_steps"), "timed_steps": steps,
                "train_runtime_s": seconds, "tokens_seen": tokens, "peak_memory_gib": metrics.get("peak_memory_gib")}
    found = newest_state(run)
    if found is None:
        return {"source": "nothing: stopped before its first checkpoint (see its log)"}
    path, state = found
    timed = [entry for entry in state.get("log_history", []) if "train_runtime" in entry]
    last = timed[-1] if timed else {}
    return {"source": f"{path.relative_to(run)} (stopped before metrics.json)", "steps": state.get("global_step"),
            "max_steps": state.get("max_steps"), "timed_steps": last.get("step"),
            "train_runtime_s": last.get("train_runtime"), "tokens_seen": last.get("num_input_tokens_seen"),
            "peak_memory_gib": None,
            **({} if timed else {"note": "no time logged: TRL's step metrics were off (trainer.step_metrics=false)"})}


def run_figures(run: Path, bench: dict) -> dict:
    """A recipe run's speed, memory and answer times; MFU where it ran at Falcon3's shape on a GPU the bench knew."""
    figures = training(run)
    seconds, steps, tokens = figures.get("train_runtime_s"), figures.get("timed_steps"), figures.get("tokens_seen")
    figures["step_s"] = seconds / steps if seconds and steps else None
    figures["trained_tokens_per_s"] = tokens / seconds if seconds and tokens else None
    n, peak = bench.get("falcon3_matmul_params"), bench.get("peak_bf16_tflops")
    config = run / "config.yaml"
    shaped = config.exists() and "builtin:falcon3_1b_shape" in config.read_text()
    if shaped and n and peak and figures["trained_tokens_per_s"]:  # 4N a trained token (benchmarks/falcon3.py)
        figures["mfu_over_train_runtime"] = 4 * n * figures["trained_tokens_per_s"] / (peak * 1e12)
    answers = read_json(run / "eval_metrics.json")
    figures.update({"questions": answers.get("baseline_n"), "baseline_answer_s": answers.get("baseline_answer_s"),
                    "finetuned_answer_s": answers.get("finetuned_answer_s"), "done": (run / "done.json").exists()})
    return figures


def pytest_outcomes(work: Path) -> dict | None:
    junit, log = work / "runs" / "pytest_gpu.xml", work / "pytest_gpu.log"
    if junit.exists():
        suite = ET.parse(junit).getroot()
        suite = suite if suite.tag == "testsuite" else suite.find("testsuite")
        return {"source": "junit", **{k: int(suite.get(k, 0)) for k in ("tests", "failures", "errors", "skipped")}}
    if not log.exists():
        return None
    counts: dict = {}
    for line in log.read_text(errors="replace").splitlines():
        if "::" in line and (match := OUTCOME.search(line)):
            counts[match.group(1).lower()] = counts.get(match.group(1).lower(), 0) + 1
    return {"source": "log (no junit XML: pytest was stopped)", **counts}


def read_line(path: Path) -> str | None:
    return path.read_text().strip() if path.exists() else None


def summary(work: Path) -> dict:
    steps = [json.loads(line) for line in (work / "steps.jsonl").read_text().splitlines()]
    smi = shutil.which("nvidia-smi")
    gpu = subprocess.run([smi, "-L"], capture_output=True, text=True).stdout.strip() if smi else "no nvidia-smi"
    bench_file = next(iter(sorted((work / "runs" / "bench").glob("*.json"))), None)
    bench = read_json(bench_file) if bench_file else {}
    runs = {run.name: run_figures(run, bench) for run in sorted((work / "runs").iterdir())
            if run.is_dir() and any((run / name).exists() for name in ("config.yaml", "checkpoints"))}
    return {"planned": (read_line(work / "planned.txt") or "").split(), "steps": steps,
            "environment": {"gpu": gpu, "python": sys.version.split()[0], **versions()},
            "kept_libraries": read_line(work / "kept.txt") or "not checked (the install step did not reach it)",
            "chosen": read_line(work / "chosen.txt"), "runs": runs, "pytest_gpu": pytest_outcomes(work),
            "bench": {k: v for k, v in bench.items() if k.startswith(BENCH_KEYS)}}


def table(result: dict) -> None:
    print(f"\n{'':44s} {result['environment']['gpu']}")
    for name, version in result["environment"].items():
        if name != "gpu":
            print(f"{name:44s} {version}")
    print(f"{'kept libraries':44s} {result['kept_libraries']}")
    for key, value in result["bench"].items():
        if isinstance(value, dict) and "real_tokens_per_s" in value:
            print(f"{key:44s} {value['real_tokens_per_s']:10.0f} tok/s, MFU {value.get('mfu') or 0:.1%}, "
                  f"peak {value.get('peak_memory_gib') or 0:.1f} GiB")
        elif isinstance(value, dict) and ("skipped" in value or "error" in value):
            print(f"{key:44s} {value.get('error') or 'not run: ' + value['skipped']}")
        elif isinstance(value, float):
            print(f"{key:44s} {value:10.3f}")
    for name, figures in result["runs"].items():
        print(f"{'run ' + name:44s} " + ", ".join(f"{k} {v:.4g}" if isinstance(v, float) else f"{k} {v}"
                                                   for k, v in figures.items()))
    print(f"{'pytest -m gpu':44s} {result['pytest_gpu']}")
    print(f"{'chosen':44s} {result['chosen'] or ''}")
    for step in result["steps"]:
        print(f"{'step ' + step['step']:44s} rc {step['rc']} in {step['seconds']} s (limit {step['limit_s']} s)")


def main() -> None:
    work, out = map(Path, sys.argv[1:3])
    result = summary(work)
    (out / "gpu_check.json").write_text(json.dumps(result, indent=1, default=str))
    table(result)


if __name__ == "__main__":
    main()

#!/usr/bin/env bash
# The GPU check, prepared for one call on a lent GPU machine (README, "A GPU"), which has no network:
#   bash scripts/gpu_check.sh --wheels    here, beforehand (make gpu-wheels): the pinned wheels of
#                                         scripts/gpu_requirements.txt for Python 3.12 on manylinux x86_64, into
#                                         .gpu-wheels/ (ignored by git; under the 64 MiB a call may carry)
#   bash scripts/gpu_check.sh             there (make gpu-check; carry .gpu-wheels): install them, then
#                                         `pytest -m gpu`, the GPU bench, and a short run of the tiny model with
#                                         trainer=default; a table last, and the figures as JSON in $OUT when set
#   bash scripts/gpu_check.sh --dry-run   anywhere: the wheel list resolves, the commands parse, and the GPU steps
#                                         say why they skip (the test suite runs this)
# Each step has its own time limit; together they fit in 8 minutes on an H100/H200.
set -uo pipefail
cd "$(dirname "$0")/.."
mode=${1:-run}
PY=${PYTHON:-python3}  # the Python that runs the package: the image's there, the venv's here
WHEELS=${GPU_WHEELS:-.gpu-wheels}
OUT=${OUT:-outputs/gpu_check}
REQS=scripts/gpu_requirements.txt
LIMIT_MIB=64
PLATFORM=(--python-version 3.12 --implementation cp --abi cp312 --only-binary=:all:
  --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_24_x86_64
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform any)
PIP=("$PY" -m pip --disable-pip-version-check)

antlr() {  # antlr4-python3-runtime 4.9.3 (what omegaconf needs) is an sdist on PyPI: built here into a wheel
  ls "$1"/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 \
    || "${PIP[@]}" wheel -q --no-deps antlr4-python3-runtime==4.9.3 -w "$1"
}

pinned() {  # the pinned wheels for the image's Python, the one built here aside
  grep -vE '^(#|$|antlr4-python3-runtime)' "$REQS"
}

case "$mode" in
--wheels)
  mkdir -p "$WHEELS"
  antlr "$WHEELS" || { echo "gpu-wheels: cannot build the antlr4 wheel"; exit 1; }
  "${PIP[@]}" download -q --no-deps "${PLATFORM[@]}" -d "$WHEELS" $(pinned) \
    || { echo "gpu-wheels: the pinned wheels did not download"; exit 1; }
  size=$(du -cm "$WHEELS"/*.whl | tail -1 | cut -f1)
  echo "gpu-wheels: $(ls "$WHEELS"/*.whl | wc -l) wheels, $size MiB in $WHEELS (a call carries at most $LIMIT_MIB)"
  [ "$size" -lt "$LIMIT_MIB" ] || { echo "gpu-wheels: over $LIMIT_MIB MiB"; exit 1; }
  ;;
--dry-run)
  bash -n "$0" || exit 1
  report=$(mktemp)
  # every pinned wheel exists for the image's Python and platform (resolved from PyPI's metadata, not downloaded)
  if "${PIP[@]}" install -q --dry-run --no-deps --ignore-installed --target "$(mktemp -d)" "${PLATFORM[@]}" \
      --report "$report" $(pinned) 2>"$report.err"; then
    echo "dry run: the wheel list resolves: $(grep -c '"metadata"' "$report") pinned wheels for Python 3.12," \
         "and antlr4's is built here"
  elif grep -qE 'NewConnectionError|Max retries exceeded|Network is unreachable|Name or service not known|Temporary failure in name resolution' "$report.err"; then
    echo "dry run: PyPI is not reachable from here, so the wheel list cannot be checked"
    exit 3
  else
    echo "dry run: the wheel list does not resolve: $(grep -v ignored "$report.err" | tail -1)"
    exit 1
  fi
  "$PY" -m gsm8k_lora.bench --help >/dev/null || exit 1
  "$PY" -m gsm8k_lora.train --help >/dev/null || exit 1
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "dry run: the GPU steps skip: no CUDA GPU here (pytest -m gpu, bench --gpu-check, the trainer=default run)"
  fi
  ;;
run)
  mkdir -p "$OUT"
  if [ -d "$WHEELS" ]; then
    "${PIP[@]}" install -q --no-index --find-links "$WHEELS" -r "$REQS" > "$OUT/install.log" 2>&1 \
      || echo "install: some wheels did not install (see $OUT/install.log)"
  else
    echo "install: no $WHEELS here: run make gpu-wheels where PyPI answers, and carry it"
  fi
  export PYTHONPATH="$PWD" HF_HUB_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false
  export GSM8K_LORA_CACHE="$OUT/cache" GSM8K_LORA_BASELINE_CACHE="$OUT/baselines"
  step() {  # name, seconds, command...: its output to $OUT/<name>.log, its exit code and time to steps.jsonl
    local name=$1 limit=$2 start=$SECONDS
    shift 2
    timeout "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - start))}" >> "$OUT/steps.jsonl"
    echo "$name: rc $rc in $((SECONDS - start)) s"
  }
  nvidia-smi -L > "$OUT/gpu.txt" 2>&1
  step pytest_gpu 200 "$PY" -m pytest -m gpu -q -p no:cacheprovider --junitxml "$OUT/pytest_gpu.xml"
  step bench 240 "$PY" -m gsm8k_lora.bench --gpu-check --skip-real --out "$OUT/bench"
  step tiny_default 100 "$PY" -m gsm8k_lora.train model=tiny data=synthetic trainer=default logger=none \
    trainer.max_steps=60 trainer.eval_steps=20 trainer.save_steps=20 eval.limit=64 hydra.run.dir="$OUT/tiny_default"
  "$PY" - "$OUT" <<'PYEOF'
import json, pathlib, sys
out = pathlib.Path(sys.argv[1])
steps = [json.loads(line) for line in (out / "steps.jsonl").read_text().splitlines()]
bench = next(iter(sorted((out / "bench").glob("*.json"))), None)
figures = json.loads(bench.read_text()) if bench else {}
kept = ("falcon3_", "gen_", "qlora", "eval_", "train_")
summary = {"gpu": (out / "gpu.txt").read_text().strip(), "steps": steps,
           "bench": {k: v for k, v in figures.items() if k.startswith(kept)}}
(out / "gpu_check.json").write_text(json.dumps(summary, indent=1, default=str))
print(f"\n{'figure':44s} value")
for key, value in summary["bench"].items():
    if isinstance(value, dict) and "real_tokens_per_s" in value:
        print(f"{key:44s} {value['real_tokens_per_s']:10.0f} tok/s, MFU {value.get('mfu') or 0:.1%}, "
              f"peak {value.get('peak_memory_gib') or 0:.1f} GiB")
    elif isinstance(value, float):
        print(f"{key:44s} {value:10.3f}")
for step in steps:
    print(f"{'step ' + step['step']:44s} rc {step['rc']} in {step['seconds']} s")
PYEOF
  ;;
*)
  echo "usage: bash scripts/gpu_check.sh [--wheels | --dry-run]"
  exit 2
  ;;
esac

#!/usr/bin/env bash
# The GPU check: one call on a lent GPU machine, which has no network, prepared here.
#   make gpu-wheels                        here, beforehand: .gpu-carry/ (scripts/gpu_carry.py build) with the
#                                          wheels the machine's image lacks, the tiny model's cache, the GSM8K rows
#   bash scripts/gpu_check.sh              there (make gpu-check, carrying .gpu-carry): install the wheels over the
#                                          image (its torch kept; its numpy, pandas, pyarrow, scipy, matplotlib
#                                          checked), run STEPS, then write to $OUT gpu_check.json (the figures, each
#                                          step's so far where its limit cut it off: scripts/gpu_summary.py),
#                                          gpu_check.txt (the table) and gpu_check.tar.gz (every log and each run's
#                                          small files)
#   bash scripts/gpu_check.sh --dry-run    anywhere (the test suite runs it): the carried set fits the image, the
#                                          commands parse and compose, and the GPU steps say why they skip here
#   bash scripts/gpu_rehearsal.sh          here (make gpu-rehearsal): the whole call, offline, on a stand-in image
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

# ---- The steps, in order of value: name, time limit in seconds, command (run by bash as one line, with $PY the
# Python, $RUNS the folder for run directories, $DATA the carried GSM8K rows, $CHOSEN the overrides of the levers
# and engine the bench found fastest). A step that fails or runs out of time does not stop the next, and leaves its
# figures so far; the limits are cut to what is left of TOTAL_S.
# The bench's deadline starts after its imports (about 15 s) and includes building the Falcon3-shaped model once
# (the recipe reuses it); it measures in order of value (benchmarks/falcon3.py PLAN) and writes after each
# measurement. The recipe trains and validates on only the rows its 80 steps use (1,280 = 80 x 16; 256 validation
# rows): the rest would be tokenized and scored for nothing. pytest collects only the files with GPU tests.
STEPS=(
  'bench      200 $PY -m gsm8k_lora.bench --gpu-check --skip-real --gsm8k $DATA --deadline-s 160 --out $RUNS/bench'
  'recipe     110 $PY -m gsm8k_lora.train experiment=falcon3_shape data=local data.path=$DATA eval.batch_size=256
                  data.train_limit=1280 data.val_limit=256 trainer.max_steps=80 trainer.eval_steps=40
                  trainer.save_steps=40 eval.limit=256 $CHOSEN hydra.run.dir=$RUNS/recipe'
  'pytest_gpu  60 $PY -m pytest -m gpu -v -p no:cacheprovider --junitxml=$RUNS/pytest_gpu.xml
                  $(grep -l mark.gpu tests/test_*.py)'
)
# The seed's whole experiment (bash scripts/gpu_check.sh --experiment; make gpu-experiment): a call of its own,
# since its 5-minute goal does not fit in the check's 7 minutes beside the bench. $CHOSEN: GPU_CHOSEN, the
# overrides the check printed.
EXPERIMENT_STEPS=(
  'experiment 330 $PY -m gsm8k_lora.train experiment=falcon3_shape data=local data.path=$DATA eval.batch_size=256
                  $CHOSEN hydra.run.dir=$RUNS/experiment'
)
TOTAL_S=420   # every command of the check together, the install and the packing included
RESERVE_S=30  # kept back from the steps for the summary and the archive

PY=${PYTHON:-python3}  # the image's Python there, the venv's here
CARRY=$PWD/${GPU_CARRY:-.gpu-carry}
OUT=${OUT:-outputs/gpu_check}   # what comes back: three files
WORK=$PWD/outputs/gpu_check_work  # logs and run directories, packed into $OUT at the end
RUNS=$WORK/runs
DATA=$WORK/gsm8k
PIP=("$PY" -m pip --disable-pip-version-check)

step() {  # name, limit, command...: output to $WORK/<name>.log; rc, seconds and limit to $WORK/steps.jsonl
  local name=$1 limit=$2 start=$SECONDS rc
  shift 2
  local left=$((deadline - SECONDS - RESERVE_S))
  ((limit > left)) && limit=$left
  if ((limit > 0)); then
    timeout -k 10 "$limit" "$@" >"$WORK/$name.log" 2>&1
    rc=$?
  else
    rc=124
    echo "no time left of the check's $TOTAL_S s" >"$WORK/$name.log"
  fi
  printf '{"step": "%s", "rc": %d, "seconds": %d, "limit_s": %d}\n' "$name" "$rc" $((SECONDS - start)) "$limit" \
    >>"$WORK/steps.jsonl"
  echo "$name: rc $rc in $((SECONDS - start)) s (limit $limit s)"
}

install_carried() {  # the carried wheels over the image, without their dependencies: torch and CUDA stay the image's;
  # then whether the image's kept libraries meet what the carried packages need (one line: $WORK/kept.txt)
  "${PIP[@]}" list --format=freeze >"$WORK/image_pip_list.txt" 2>&1
  step install 90 bash -c '"$0" -m pip --disable-pip-version-check install --no-deps --no-index --upgrade \
    --no-compile "$1"/wheels/*.whl && "$0" scripts/gpu_carry.py kept --carry "$1" --out "$2"' "$PY" "$CARRY" \
    "$WORK/kept.txt"
  "${PIP[@]}" check >"$WORK/pip_check.txt" 2>&1  # for the record: the image's own packages are listed too
  for rows in "$CARRY"/gsm8k/*.jsonl.gz; do
    gunzip -c "$rows" >"$DATA/$(basename "${rows%.gz}")"
  done
}

choose() {  # the overrides of the levers and engine the bench found fastest, alone in $WORK/chosen.txt: GPU_CHOSEN
  local bench
  bench=$(ls "$RUNS"/bench/*.json 2>/dev/null | head -1)
  # its last line: the overrides (a library may print a line of its own at import)
  CHOSEN=$("$PY" -m gsm8k_lora.bench --choose "$bench" 2>/dev/null | tail -n 1)
  echo "$CHOSEN" >"$WORK/chosen.txt"
  echo "chosen from the bench: ${CHOSEN:-nothing (it measured no lever)}"
}

pack() {  # $OUT: the summary, the table, and one archive of the small files (no weights, no checkpoints)
  "$PY" scripts/gpu_summary.py "$WORK" "$OUT" 2>"$WORK/summary.log" | tee "$OUT/gpu_check.txt" \
    || tail -20 "$WORK/summary.log"
  find "$WORK" -type f ! -path "$DATA/*" ! -path '*/checkpoint*' ! -name '*.safetensors' ! -name '*.bin' \
    ! -name '*.pt' ! -name '*.pth' ! -name '*.gguf' -size -8M -printf '%P\n' \
    | tar -czf "$OUT/gpu_check.tar.gz" -C "$WORK" -T -
  echo "gpu-check: $OUT holds gpu_check.json, gpu_check.txt and gpu_check.tar.gz"
}

run() {
  if [ ! -d "$CARRY/wheels" ]; then
    echo "gpu-check: no $CARRY: run make gpu-wheels where PyPI answers, and carry it"
    exit 1
  fi
  deadline=$((SECONDS + TOTAL_S))
  rm -rf "$WORK"
  mkdir -p "$RUNS" "$DATA" "$OUT"
  OUT=$(cd "$OUT" && pwd)
  # offline, with the carried model and rows; Hub kernels are the package's own choice (model/kernels.py)
  export PY RUNS DATA PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false WANDB_MODE=disabled \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TRANSFORMERS_OFFLINE=1 \
    GSM8K_LORA_CACHE=$CARRY/models GSM8K_LORA_TEST_CACHE=$CARRY/models GSM8K_LORA_BASELINE_CACHE=$WORK/baselines
  local entry name limit command
  { echo install; for entry in "$@"; do echo "${entry%% *}"; done; } >"$WORK/planned.txt"
  install_carried
  CHOSEN=${GPU_CHOSEN:-}
  export CHOSEN
  for entry in "$@"; do
    read -r name limit command <<<"${entry//$'\n'/ }"
    step "$name" "$limit" bash -c "$command"
    [ "$name" = bench ] && choose  # the levers and engine the bench found fastest, for the runs after it
  done
  pack
}

dry_run() {
  bash -n "$0" || exit 1
  "$PY" scripts/gpu_carry.py check
  local checked=$?  # 1: a broken requirement; 3: PyPI did not answer, the rest is still checked
  ((checked == 1)) && exit 1
  local module
  for module in bench train; do
    "$PY" -m "gsm8k_lora.$module" --help >/dev/null \
      || { echo "dry run: python -m gsm8k_lora.$module --help fails"; exit 1; }
  done
  CHOSEN="model.attn_implementation=flex_attention trainer.step_metrics=false eval.engine=slots"  # as choose prints
  export PY RUNS DATA CHOSEN
  local entry name limit command
  for entry in "${STEPS[@]}" "${EXPERIMENT_STEPS[@]}"; do  # a run's overrides compose: a typo fails here, not there
    read -r name limit command <<<"${entry//$'\n'/ }"
    if [[ $command == *gsm8k_lora.train* ]]; then
      bash -c "$command --cfg job" >/dev/null || { echo "dry run: step $name does not compose"; exit 1; }
    fi
  done
  echo "dry run: the steps parse and the training steps compose (${#STEPS[@]} steps)"
  if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
    echo "dry run: the GPU steps skip: no CUDA GPU here (bench --gpu-check, the Falcon3-shaped recipe, pytest -m gpu," \
         "the whole experiment)"
  fi
  exit "$checked"
}

[ "${BASH_SOURCE[0]}" = "$0" ] || return 0  # sourced (the test suite runs its functions): define, run nothing
case "${1:-run}" in
run) run "${STEPS[@]}" ;;
--experiment) run "${EXPERIMENT_STEPS[@]}" ;;
--dry-run) dry_run ;;
*) echo "usage: bash scripts/gpu_check.sh [--experiment | --dry-run]"; exit 2 ;;
esac

#!/usr/bin/env bash
# The GPU check rehearsed on this machine as a lent GPU machine will run it (make gpu-rehearsal; not in make test):
#   1. a stand-in of the machine's image, built once and cached outside the repository ($CACHE): Python 3.12, torch
#      2.11.0 from PyPI (its CUDA 13 build, which runs on a CPU), the pinned versions of scripts/gpu_image.txt, and
#      the unpinned packages the check imports at the versions pip picks (the image's own are not recorded);
#   2. what a call carries: a copy of the working tree as the device copies it (tracked files and untracked ones git
#      does not ignore) holding .gpu-carry (make gpu-wheels), and a hard-linked copy of the image for the check to
#      install into (pip replaces files, never writes into them: the cached image stays as built);
#   3. the check, offline (unshare -n: no network but loopback; as root), in a clean environment, where the CUDA
#      steps are refused in one line each;
#   4. its three files read back (scripts/gpu_readback.py), and the smoke recipe run offline on what it installed.
#   bash scripts/gpu_rehearsal.sh [--image-only]
set -euo pipefail
cd "$(dirname "$0")/.."
ROOT=$PWD
CACHE=${GSM8K_LORA_REHEARSAL_CACHE:-$HOME/.cache/gsm8k_lora/gpu-rehearsal}
IMAGE_BUILD=1  # bump when the image's build below changes: a new stand-in is built
# pinned image packages left out: the check never imports them, and they weigh GBs (jax's and cupy's CUDA
# libraries) or bring stacks of their own (botorch, gpytorch, numpyro, torch-geometric, onnx)
LEFT_OUT='^(jax|jaxlib|jax-cuda13-.*|cupy-cuda13x|onnx.*|numpyro|botorch|gpytorch|torch-geometric)$'
UNPINNED=(pandas pyarrow scipy matplotlib pytest pytest-xdist pytest-timeout)  # in the image, versions not recorded

python312() {  # the image's Python minor version: REHEARSAL_PYTHON, python3.12, or pyenv's
  local candidate
  for candidate in "${REHEARSAL_PYTHON:-}" python3.12 "$(pyenv root 2>/dev/null)"/versions/3.12*/bin/python3.12; do
    if [ -n "$candidate" ] && "$candidate" -c 'import sys; sys.exit(sys.version_info[:2] != (3, 12))' 2>/dev/null
    then
      echo "$candidate"
      return
    fi
  done
  echo "gpu-rehearsal: no Python 3.12 here (the image's): install one, or set REHEARSAL_PYTHON" >&2
  exit 1
}

image_pins() {  # the pinned packages of scripts/gpu_image.txt the stand-in installs
  sed 's/#.*//' scripts/gpu_image.txt | awk -F'==' 'NF == 2 {gsub(/ /, ""); print}' \
    | while IFS= read -r pin; do [[ ${pin%%==*} =~ $LEFT_OUT ]] || echo "$pin"; done
}

image() {  # the cached stand-in's directory, built first where missing
  local key dir
  key=$({ echo "$IMAGE_BUILD $LEFT_OUT ${UNPINNED[*]}"; image_pins; } | sha256sum | cut -c1-12)  # what it installs
  dir=$CACHE/image-$key
  if [ ! -f "$dir/.built" ]; then
    echo "gpu-rehearsal: building the image's stand-in in $dir (once; torch's CUDA build is about 2.5 GB)" >&2
    rm -rf "$dir"
    mkdir -p "$CACHE"
    "$(python312)" -m venv "$dir"
    # torch first and alone: the rest resolves around the image's torch, as on the machine
    "$dir/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 >&2
    # shellcheck disable=SC2046  # one pin a word
    "$dir/bin/python" -m pip install -q --disable-pip-version-check torch==2.11.0 $(image_pins) "${UNPINNED[@]}" >&2
    "$dir/bin/python" -m pip list --format=freeze >"$dir/pip_list.txt"
    touch "$dir/.built"
  fi
  echo "$dir"
}

working_tree() {  # what the device copies: tracked files and untracked ones git does not ignore, into $1
  mkdir -p "$1"
  git ls-files -z --cached --others --exclude-standard \
    | while IFS= read -r -d '' file; do [ -e "$file" ] && printf '%s\0' "$file"; done \
    | tar --null -T - -cf - | tar -xf - -C "$1"
}

offline() {  # a command with no network and a clean environment: the image's Python first on PATH, a fresh HOME
  local venv=$1 home=$2
  shift 2
  unshare -n env -i HOME="$home" PATH="$venv/bin:/usr/local/bin:/usr/bin:/bin" LANG=C.UTF-8 "$@"
}

main() {
  local start=$SECONDS venv run tree
  venv=$(image)
  [ "${1:-}" = --image-only ] && { echo "gpu-rehearsal: the image's stand-in: $venv"; return; }
  if [ ! -d .gpu-carry/wheels ]; then
    echo "gpu-rehearsal: no .gpu-carry: run make gpu-wheels first (make gpu-rehearsal does)"
    exit 1
  fi
  if ! unshare -n true 2>/dev/null; then
    echo "gpu-rehearsal: unshare -n failed: run it as root (it takes the network away)"
    exit 1
  fi
  ls -dt "$CACHE"/runs/* 2>/dev/null | tail -n +3 | xargs -r rm -rf  # the two newest rehearsals are kept
  run=$CACHE/runs/$(date +%Y-%m-%d_%H-%M-%S)
  tree=$run/tree
  working_tree "$tree"
  cp -a .gpu-carry "$tree/"
  cp -al "$venv" "$run/image"
  mkdir -p "$run/home" "$run/out"
  echo "gpu-rehearsal: the check, offline, in $tree on the image's stand-in ($(wc -l <"$venv/pip_list.txt") packages)"
  (cd "$tree" && offline "$run/image" "$run/home" OUT="$run/out" bash scripts/gpu_check.sh) || true
  echo "gpu-rehearsal: reading back $run/out"
  local verdict=0
  "$run/image/bin/python" scripts/gpu_readback.py "$run/out" || verdict=1
  echo "gpu-rehearsal: the smoke recipe, offline, on what the check installed"
  (cd "$tree" && offline "$run/image" "$run/home" PYTHONPATH="$tree" GSM8K_LORA_CACHE="$tree/.gpu-carry/models" \
    HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 WANDB_MODE=disabled TOKENIZERS_PARALLELISM=false \
    python -m gsm8k_lora.train experiment=smoke logger=none trainer.max_steps=6 eval.limit=8 \
    hydra.run.dir="$run/smoke" >"$run/smoke.log" 2>&1) || verdict=1
  tail -3 "$run/smoke.log"
  if [ ! -f "$run/smoke/done.json" ]; then
    echo "gpu-rehearsal: the smoke recipe did not finish ($run/smoke.log)"
    verdict=1
  fi
  echo "gpu-rehearsal: $( ((verdict)) && echo FAILED || echo passed ) in $((SECONDS - start)) s; all of it in $run"
  return "$verdict"
}

main "$@"

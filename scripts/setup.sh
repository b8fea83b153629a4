#!/usr/bin/env bash
# Create the virtual environment and install the package with its dev tools.
# A machine without an NVIDIA GPU gets a CPU build of torch: PyPI's Linux torch wheel is the
# multi-GB CUDA build, so the CPU build is asked for by its exact "+cpu" version, which PyPI
# does not have: it comes from a local wheel if pip has one, else from PyTorch's CPU index.
set -euo pipefail
venv=${1:-.venv}
torch_version=${TORCH_VERSION:-2.13.0}
python=${PYTHON:-python3}

[ -x "$venv/bin/python" ] || "$python" -m venv "$venv"
pip=("$venv/bin/python" -m pip install --quiet --disable-pip-version-check)

if ! "$venv/bin/python" -c "import torch" 2>/dev/null; then
  if command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
    echo "setup: NVIDIA GPU found, installing CUDA torch==$torch_version"
    "${pip[@]}" "torch==$torch_version"
  else
    echo "setup: no NVIDIA GPU, installing CPU torch==$torch_version+cpu"
    "${pip[@]}" "torch==$torch_version+cpu" 2>/dev/null \
      || "${pip[@]}" "torch==$torch_version+cpu" --extra-index-url https://download.pytorch.org/whl/cpu
  fi
fi
"${pip[@]}" -e ".[dev]"
"$venv/bin/python" -c "import gsm8k_lora, torch, trl, transformers, peft; print(f'setup: torch {torch.__version__} (cuda: {torch.cuda.is_available()}), transformers {transformers.__version__}, trl {trl.__version__}, peft {peft.__version__}')"

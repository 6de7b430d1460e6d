#!/usr/bin/env bash
# Create .venv and install the harness with everything its tests need.
# PyTorch is pinned and installed first: with no GPU, the CPU build (a plain `torch`
# requirement would pull the CUDA build, gigabytes of packages, onto a CPU machine).
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PYTHON=${PYTHON:-python3}
TORCH_VERSION=${TORCH_VERSION:-2.13.0}

"$PYTHON" -c 'import sys; assert sys.version_info >= (3, 10), "Python >= 3.10 is required"'
[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --quiet --disable-pip-version-check)

if "$VENV/bin/python" -c "import torch, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  echo "bootstrap: torch $TORCH_VERSION already installed"
elif command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L >/dev/null 2>&1; then
  echo "bootstrap: GPU found, installing torch==$TORCH_VERSION (CUDA build)"
  "${pip[@]}" "torch==$TORCH_VERSION"
elif ls /opt/wheels/torch-"$TORCH_VERSION"+cpu-"$("$VENV/bin/python" -c 'import sys; print(f"cp{sys.version_info[0]}{sys.version_info[1]}")')"-*.whl >/dev/null 2>&1; then
  echo "bootstrap: no GPU, installing the local CPU wheel of torch $TORCH_VERSION"
  "${pip[@]}" --find-links /opt/wheels "torch==$TORCH_VERSION+cpu"
else
  echo "bootstrap: no GPU, installing torch==$TORCH_VERSION from the PyTorch CPU index"
  "${pip[@]}" --index-url https://download.pytorch.org/whl/cpu "torch==$TORCH_VERSION"
fi
"${pip[@]}" -e '.[dev]'
touch "$VENV/.installed"
echo "bootstrap: ready ($("$VENV/bin/python" -c 'import torch; print("torch", torch.__version__)'))"

#!/usr/bin/env bash
# Create .venv and install FlashTune with its dev tools. torch comes first, pinned, and from the right place:
#   1. a torch already installed in .venv is kept (whatever build: a CUDA one you chose stays);
#   2. FLASHTUNE_TORCH_INDEX_URL, when set, is the index torch comes from (e.g. https://download.pytorch.org/whl/cu126
#      for an older NVIDIA driver, or a mirror);
#   3. a torch wheel pip finds without an index (pip's find-links, e.g. PIP_FIND_LINKS=/opt/wheels) is installed
#      from there, offline;
#   4. no NVIDIA GPU on Linux: the CPU build, from PyTorch's CPU index (PyPI's Linux torch brings several GB of
#      CUDA libraries a CPU cannot use);
#   5. otherwise (an NVIDIA GPU, or macOS, whose PyPI wheel has no CUDA) PyPI's build.
# FLASHTUNE_TORCH_VERSION picks the version (default 2.13.0, the one the Docker images pin). Everything else is
# installed with the versions the images pin (docker/constraints.txt, the ones CI tests).
# `bash scripts/install.sh --torch-plan` prints which of these it would do, and changes nothing (without .venv it asks
# $PYTHON's pip, default python3).
set -euo pipefail
cd "$(dirname "$0")/.."
version=${FLASHTUNE_TORCH_VERSION:-2.13.0}
cpu_index=https://download.pytorch.org/whl/cpu

has_nvidia_gpu() { command -v nvidia-smi >/dev/null 2>&1 && nvidia-smi -L 2>/dev/null | grep -q '^GPU'; }

# Prints one line: "keep", "index URL", "local", "cpu URL" or "pypi".
torch_plan() {
  local python=$1
  if [ -x .venv/bin/python ] && .venv/bin/python -c "import torch" 2>/dev/null; then
    echo keep
  elif [ -n "${FLASHTUNE_TORCH_INDEX_URL:-}" ]; then
    echo "index $FLASHTUNE_TORCH_INDEX_URL"
  elif "$python" -m pip install --dry-run --ignore-installed --no-index --no-deps --quiet "torch==$version" >/dev/null 2>&1; then
    echo local
  elif [ "$(uname -s)" = Linux ] && ! has_nvidia_gpu; then
    echo "cpu $cpu_index"
  else
    echo pypi
  fi
}

if [ "${1:-}" = --torch-plan ]; then
  python=${PYTHON:-python3}
  [ -x .venv/bin/python ] && python=.venv/bin/python
  echo "torch $version: $(torch_plan "$python")"
  exit 0
fi

if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
plan=$(torch_plan python)
echo "torch $version: $plan"
case "$plan" in
  keep) ;;
  # the wheel from pip's find-links; its own requirements offline where they are there too, else from the index
  local) python -m pip install --quiet --no-index "torch==$version" 2>/dev/null || python -m pip install --quiet "torch==$version" ;;
  index* | cpu*) python -m pip install --quiet --index-url "${plan#* }" "torch==$version" ;;
  *) python -m pip install --quiet "torch==$version" ;;
esac
python -m pip install --quiet --constraint docker/constraints.txt -e '.[dev]'

#!/usr/bin/env bash
# Create .venv and install FlashTune with its dev tools. torch comes first and pinned: a bare 'torch'
# requirement would let pip pick a multi-GB CUDA build; on a GPU machine install the CUDA build you want first.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ ! -x .venv/bin/python ]; then
  python3 -m venv .venv
fi
. .venv/bin/activate
python -m pip install --quiet --upgrade pip
python -c "import torch" 2>/dev/null || python -m pip install --quiet "torch==${FLASHTUNE_TORCH_VERSION:-2.13.0}"
python -m pip install --quiet -e '.[dev]'

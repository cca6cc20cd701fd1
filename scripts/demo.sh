#!/usr/bin/env bash
# The demo: install into .venv if needed, then build the built-in model, train, serve and analyze.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
exec flashtune demo "$@"

#!/usr/bin/env bash
# The test command: install into .venv if needed, lint, type-check, run every test (PostgreSQL on 127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check service workers tests bench
mypy service workers
bash scripts/lint-deploy.sh
python -m pytest -q "$@"

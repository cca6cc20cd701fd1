#!/usr/bin/env bash
# The test command: install into .venv if needed, lint (ruff, its formatter, the import rules of pyproject.toml),
# type-check (bench/ too), run every test (PostgreSQL on 127.0.0.1:5432).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
. .venv/bin/activate
export HF_HUB_OFFLINE=1 TOKENIZERS_PARALLELISM=false
ruff check service workers tests bench docker
ruff format --check service workers tests bench docker
lint-imports --no-cache  # [tool.importlinter] in pyproject.toml: who may import whom (docs/architecture.md)
mypy service workers bench
bash scripts/lint-deploy.sh
python -m pytest -q "$@"

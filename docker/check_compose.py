"""Validate a Compose file against the Compose specification's JSON schema (docker/compose-spec.json).

No Docker engine runs in CI, so ``docker compose config`` is not available; this checks the same structure.
Usage: python docker/check_compose.py [compose.yaml ...]; exits 1 naming each problem and where it is.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import yaml
from jsonschema import Draft201909Validator

SCHEMA = Path(__file__).with_name("compose-spec.json")


def problems(path: Path) -> list[str]:
    document = yaml.safe_load(path.read_text())
    schema = json.loads(SCHEMA.read_text())
    # The schema names draft 2019-09 by an old URL that jsonschema does not recognise; say so explicitly.
    validator = Draft201909Validator(schema)
    found = []
    for error in sorted(validator.iter_errors(document), key=lambda e: list(map(str, e.absolute_path))):
        where = "/".join(str(part) for part in error.absolute_path) or "(top level)"
        found.append(f"{path}: {where}: {error.message}")
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [Path("compose.yaml")]
    failures = [line for path in paths for line in problems(path)]
    for line in failures:
        print(line)
    if not failures:
        print(f"ok: {', '.join(map(str, paths))} match the Compose specification schema")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

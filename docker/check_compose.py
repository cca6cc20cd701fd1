"""Validate a Compose file against the Compose specification's JSON schema (docker/compose-spec.json), and its
``FLASHTUNE_*`` variables against the settings.

No Docker engine runs in CI, so ``docker compose config`` is not available; this checks the same structure. A
``FLASHTUNE_*`` variable a service's ``environment`` sets must be a setting (``service/core/config.py``: a
misspelt one would be ignored in the container, e.g. ``FLASHTUNE_GPU_MEMORY_GB``); one the file interpolates
(``${FLASHTUNE_PUBLISH:-...}``) must be a setting or one of the names compose itself reads
(``OTHER_ENV_NAMES``). Usage: python docker/check_compose.py [compose.yaml ...]; exits 1 naming each problem and
where it is.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path
from typing import Any

import yaml
from jsonschema import Draft201909Validator

from service.core.config import ENV_PREFIX, Settings, known_env_names

INTERPOLATED = re.compile(r"\$\{(FLASHTUNE_[A-Za-z0-9_]+)")

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


def _environments(document: Any, where: str = "") -> list[tuple[str, str]]:
    """(where, variable name) of every ``environment`` entry in the file, services and extension blocks alike."""
    found: list[tuple[str, str]] = []
    if isinstance(document, dict):
        for key, value in document.items():
            here = f"{where}/{key}" if where else str(key)
            if key == "environment" and isinstance(value, dict):
                found.extend((here, str(name)) for name in value if str(name) != "<<")
            elif key == "environment" and isinstance(value, list):
                found.extend((here, str(item).split("=", 1)[0]) for item in value)
            else:
                found.extend(_environments(value, here))
    elif isinstance(document, list):
        for i, item in enumerate(document):
            found.extend(_environments(item, f"{where}/{i}"))
    return found


def unknown_variables(path: Path) -> list[str]:
    """``FLASHTUNE_*`` names the file sets or interpolates that FlashTune does not read (see the module)."""
    text = path.read_text()
    settings = {ENV_PREFIX + name.upper() for name in Settings.model_fields}
    found = []
    for where, name in _environments(yaml.safe_load(text)):
        if name.upper().startswith(ENV_PREFIX) and name.upper() not in settings:
            found.append(f"{path}: {where}: {name} is not a FlashTune setting (service/core/config.py)")
    known = known_env_names()
    for number, line in enumerate(text.splitlines(), 1):
        for name in INTERPOLATED.findall(line):
            if name not in known:
                found.append(f"{path}: line {number}: ${{{name}}} is neither a setting nor in OTHER_ENV_NAMES")
    return found


def main(argv: list[str]) -> int:
    paths = [Path(a) for a in argv] or [Path("compose.yaml")]
    failures = [line for path in paths for line in problems(path) + unknown_variables(path)]
    for line in failures:
        print(line)
    if not failures:
        print(f"ok: {', '.join(map(str, paths))} match the Compose specification schema; every FLASHTUNE_* is known")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))

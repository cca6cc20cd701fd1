"""``training_info.json``: the record a finished job publishes beside its adapter (hyperparameters, metrics, losses,
durations, the input fields its data carried). ``workers.training.recipe.publish_adapter`` writes it; the adapters
route,
the loss history and the model server read it through :func:`read_training_info`."""

from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

FILENAME = "training_info.json"
log = logging.getLogger("flashtune.api")


def read_training_info(adapter_dir: Path) -> dict[str, Any]:
    """The adapter's training record; ``{}`` where it is missing, unreadable or not a JSON object. A damaged record
    is logged, and the adapter still lists and serves: only what the record said is missing."""
    path = adapter_dir / FILENAME
    try:
        info = json.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring %s: %s", path, exc)
        return {}
    if not isinstance(info, dict):
        log.warning("ignoring %s: not a JSON object", path)
        return {}
    return info

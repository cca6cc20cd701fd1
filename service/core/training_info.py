"""``training_info.json``: the record a finished job publishes beside its adapter (hyperparameters, metrics, losses,
durations, the input fields its data carried, the calibration of its label probabilities). ``workers.training.recipe
.publish_adapter`` writes it; the adapters route, the loss history and the model server read it through
:func:`read_training_info`, the model server its calibration through :func:`calibration_temperature`."""

from __future__ import annotations

import json
import logging
import math
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


def calibration_temperature(info: dict[str, Any]) -> float | None:
    """The temperature the adapter's label probabilities are scaled by (``metrics.calibration``, written by
    ``workers.training.evaluation``) where its job kept one (``applied``); None otherwise: a record from before
    calibration, a calibration that did not lower the validation NLL, or a damaged value."""
    metrics = info.get("metrics")
    record = metrics.get("calibration") if isinstance(metrics, dict) else None
    if not isinstance(record, dict) or record.get("applied") is not True:
        return None
    temperature = record.get("temperature")
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        return None
    if not math.isfinite(temperature) or temperature <= 0:
        return None
    return float(temperature)

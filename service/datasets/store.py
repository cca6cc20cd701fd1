"""Content-addressed dataset storage under ``DATA_DIR/datasets/<sha256>/`` and loading for training.

The upload is stored byte for byte as ``original`` (never executed or imported), next to ``examples.jsonl``
(the normalised examples, each with its split). Files are written into a temporary folder that is renamed
into place, and the database row is added only after that: a failed upload leaves nothing behind.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import shutil
import tempfile
from collections import Counter
from pathlib import Path
from typing import Any

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from service.core.config import Settings
from service.datasets.formats import MAX_REJECTED_LISTED, Parsed, parse
from service.jobs.models import BUILTIN_DATASET, Dataset
from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import LABELS, Example, input_fields_used


class DatasetNotFound(Exception):
    pass


def dataset_id(sha256: str, format: str, options: dict[str, Any] | None) -> str:
    key = json.dumps({"sha256": sha256, "format": format, "options": options or {}}, sort_keys=True)
    return "ds-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def label_stats(examples: list[Example]) -> tuple[dict[str, int], int]:
    counts = Counter(e.label for e in examples)
    return {label: counts.get(label, 0) for label in LABELS}, counts.get(None, 0)


def save_upload(
    settings: Settings,
    session: Session,
    data: bytes,
    filename: str | None,
    format: str | None = None,
    options: dict[str, Any] | None = None,
) -> Dataset:
    """Parse, store and register an upload; the same content and options give the same dataset."""
    sha256 = hashlib.sha256(data).hexdigest()
    parsed = parse(data, format, options)
    ds_id = dataset_id(sha256, parsed.format, options)
    _write_atomically(settings.layout.datasets / ds_id, data, parsed)  # before the database: no lock held meanwhile
    existing = session.get(Dataset, ds_id)
    if existing is not None:
        return existing
    distribution, unlabelled = label_stats(parsed.examples + parsed.validation)
    stats = {
        "num_validation": len(parsed.validation),
        "label_distribution": distribution,
        "unlabelled": unlabelled,
        "duplicates_removed": parsed.duplicates_removed,
        "rejected": parsed.rejected[:MAX_REJECTED_LISTED],
        "rejected_count": len(parsed.rejected),
        "options": options or {},
        "details": parsed.extra,
        "input_fields": input_fields_used(e.input for e in parsed.examples + parsed.validation),
    }
    dataset = Dataset(
        id=ds_id,
        sha256=sha256,
        format=parsed.format,
        filename=filename,
        num_examples=len(parsed.examples) + len(parsed.validation),
        stats=stats,
    )
    try:
        with session.begin_nested():  # the row is inserted here, so a concurrent twin is found now, not at commit
            session.add(dataset)
    except IntegrityError:  # the same upload, registered by a concurrent request (PostgreSQL): use its row
        existing = session.get(Dataset, ds_id)
        if existing is None:
            raise
        return existing
    return dataset


def _write_atomically(folder: Path, data: bytes, parsed: Parsed) -> None:
    folder.parent.mkdir(parents=True, exist_ok=True)
    if folder.exists():
        return  # same id means same content and options: already stored
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=folder.parent))
    try:
        (tmp / "original").write_bytes(data)
        with (tmp / "examples.jsonl").open("w", encoding="utf-8") as out:
            for split, examples in (("train", parsed.examples), ("validation", parsed.validation)):
                for e in examples:
                    row = {"instruction": e.instruction, "input": e.input, "output": e.output, "split": split}
                    out.write(json.dumps(row, ensure_ascii=False) + "\n")
        os.chmod(tmp, 0o755)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.exists():
                raise  # else a concurrent twin upload stored the same files first
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def load_examples(
    settings: Settings, session: Session, ds_id: str, validation_fraction: float, seed: int
) -> tuple[list[Example], list[Example], str | None]:
    """(train, validation, sha256) for a job. A format-defined split wins over ``validation_fraction``."""
    if ds_id == BUILTIN_DATASET:
        return (*builtin_dataset(), None)
    dataset = session.get(Dataset, ds_id)
    if dataset is None:
        raise DatasetNotFound(ds_id)
    train: list[Example] = []
    validation: list[Example] = []
    with (settings.layout.datasets / ds_id / "examples.jsonl").open(encoding="utf-8") as rows:
        for line in rows:
            row = json.loads(line)
            example = Example(row["instruction"], row["input"], row["output"])
            (validation if row.get("split") == "validation" else train).append(example)
    if not validation:
        train, validation = hold_out(train, validation_fraction, seed)
    return train, validation, dataset.sha256


def hold_out(examples: list[Example], fraction: float, seed: int) -> tuple[list[Example], list[Example]]:
    """(train, validation): a seeded random ``fraction`` of ``examples`` held out (at least one), order kept."""
    if fraction <= 0 or len(examples) < 2:
        return examples, []
    order = list(range(len(examples)))
    random.Random(seed).shuffle(order)
    cut = max(1, round(len(examples) * fraction))
    return [examples[i] for i in sorted(order[cut:])], [examples[i] for i in sorted(order[:cut])]


def dataset_input_fields(settings: Settings, ds_id: str) -> list[str]:
    """The optional input fields (``service.llm.prompts.INPUT_FIELDS``) the examples of a dataset carry, read from its
    stored examples: what an adapter trained on it has seen (for adapters whose training_info predates the record).
    """
    if ds_id == BUILTIN_DATASET:
        train, validation = builtin_dataset()
        return input_fields_used(e.input for e in train + validation)
    path = settings.layout.datasets / ds_id / "examples.jsonl"
    if not path.is_file():
        return []
    with path.open(encoding="utf-8") as rows:
        return input_fields_used(str(json.loads(line).get("input") or "") for line in rows if line.strip())

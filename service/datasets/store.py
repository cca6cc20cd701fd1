"""Content-addressed dataset storage under ``DATA_DIR/datasets/<sha256>/`` and loading for training.

The upload is stored byte for byte as ``original`` (never executed or imported), next to ``examples.jsonl``
(the normalised examples, each with its split). Files are written into a temporary folder that is renamed
into place, and the database row is added only after that: a failed upload leaves nothing behind.
"""

from __future__ import annotations

import errno
import hashlib
import io
import json
import logging
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any, TextIO

from sqlalchemy.exc import IntegrityError
from sqlmodel import Session

from service.core.config import Settings
from service.core.errors import RequestError
from service.datasets.base import Limits, Split
from service.datasets.formats import PARSERS, Parsed, detect_format, parse_stream
from service.datasets.lines import CHUNK, head
from service.jobs.models import BUILTIN_DATASET, Dataset
from service.llm.builtin.data import builtin_dataset
from service.llm.prompts import LABELS, Example, input_fields_used

log = logging.getLogger("flashtune.datasets")
FULL = (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)


class DatasetNotFound(Exception):
    pass


def dataset_id(sha256: str, format: str, options: dict[str, Any] | None) -> str:
    key = json.dumps({"sha256": sha256, "format": format, "options": options or {}}, sort_keys=True)
    return "ds-" + hashlib.sha256(key.encode()).hexdigest()[:16]


def limits_of(settings: Settings, cancel: threading.Event | None = None) -> Limits:
    return Limits(
        max_examples=settings.max_dataset_examples,
        import_max_rows=settings.import_max_rows,
        import_seconds=settings.import_seconds,
        cancel=cancel or threading.Event(),
    )


def save_upload(
    settings: Settings,
    session: Session,
    upload: bytes | IO[bytes],
    filename: str | None,
    format: str | None = None,
    options: dict[str, Any] | None = None,
    cancel: threading.Event | None = None,
) -> Dataset:
    """Parse, store and register an upload (bytes, or a seekable file read as a stream: the spooled upload); the
    same content and options give the same dataset. Blocking: the API calls it in a worker thread."""
    stream = io.BytesIO(upload) if isinstance(upload, bytes | bytearray) else upload
    sha256 = _sha256(stream)
    detected = format or detect_format(head(stream))
    if detected in PARSERS:  # an unknown format is refused by parse_stream, naming the ones there are
        existing = session.get(Dataset, dataset_id(sha256, detected, options))
        if existing is not None and (settings.layout.datasets / existing.id).is_dir():
            return existing  # the same content and options were parsed and stored before
    with _storage():
        parsed = _store(settings.layout.datasets, stream, sha256, format, options, limits_of(settings, cancel))
    ds_id = dataset_id(sha256, parsed.format, options)
    existing = session.get(Dataset, ds_id)
    if existing is not None:
        return existing
    dataset = Dataset(
        id=ds_id,
        sha256=sha256,
        format=parsed.format,
        filename=filename,
        num_examples=parsed.num_train + parsed.num_validation,
        stats=_stats(parsed, options),
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


def _stats(parsed: Parsed, options: dict[str, Any] | None) -> dict[str, Any]:
    return {
        "num_validation": parsed.num_validation,
        "label_distribution": {label: parsed.labels.get(label, 0) for label in LABELS},
        "unlabelled": parsed.labels.get(None, 0),
        "duplicates_removed": parsed.duplicates_removed,
        "rejected": parsed.rejected,
        "rejected_count": parsed.rejected_count,
        "options": options or {},
        "details": parsed.extra,
        "input_fields": parsed.input_fields,
    }


def _sha256(stream: IO[bytes]) -> str:
    digest = hashlib.sha256()
    stream.seek(0)
    while chunk := stream.read(CHUNK):
        digest.update(chunk)
    stream.seek(0)
    return digest.hexdigest()


def _store(
    root: Path, stream: IO[bytes], sha256: str, format: str | None, options: dict[str, Any] | None, limits: Limits
) -> Parsed:
    """Parse into ``examples.jsonl`` and copy ``original``, in a temporary folder renamed into place at the end:
    a refused or failed upload leaves nothing behind."""
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=".upload-", dir=root))
    try:
        with (tmp / "examples.jsonl").open("w", encoding="utf-8") as out:
            parsed = parse_stream(stream, format, options, limits=limits, write=_writer(out))
        with (tmp / "original").open("wb") as original:
            stream.seek(0)
            shutil.copyfileobj(stream, original, CHUNK)
        os.chmod(tmp, 0o755)
        folder = root / dataset_id(sha256, parsed.format, options)
        try:
            os.replace(tmp, folder)
        except OSError:
            if not folder.is_dir():
                raise  # else a concurrent twin upload stored the same files first
        return parsed
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _writer(out: TextIO) -> Callable[[Example, Split], None]:
    def write(e: Example, split: Split) -> None:
        row = {"instruction": e.instruction, "input": e.input, "output": e.output, "split": split}
        out.write(json.dumps(row, ensure_ascii=False) + "\n")

    return write


@contextmanager
def _storage() -> Iterator[None]:
    """The server's own storage failing (full, read-only, not ours) is a 507 or 503 in the one error shape; the
    path and the system's words go to the operator's log, not to the caller."""
    try:
        yield
    except OSError as exc:
        log.error("cannot store a dataset: %s", exc)
        if exc.errno in FULL:
            raise RequestError(
                507, "insufficient_storage", "the server has no room to store the dataset; tell its operator"
            ) from exc
        raise RequestError(
            503, "storage_unavailable", "the server cannot store datasets right now; tell its operator"
        ) from exc


def load_examples(
    settings: Settings,
    session: Session,
    ds_id: str,
    validation_fraction: float,
    seed: int,
    validation_dataset: str | None = None,
) -> tuple[list[Example], list[Example], str | None]:
    """(train, validation, sha256) for a job. ``validation_dataset`` (a dataset id): every example of ``ds_id``
    trains and every example of that dataset is the held-out split; else a format-defined split wins over
    ``validation_fraction``."""
    train, validation, sha256 = _stored_examples(settings, session, ds_id)
    if validation_dataset is not None:
        held_out, other, _ = _stored_examples(settings, session, validation_dataset)
        return train + validation, held_out + other, sha256
    if not validation:
        train, validation = hold_out(train, validation_fraction, seed)
    return train, validation, sha256


def _stored_examples(
    settings: Settings, session: Session, ds_id: str
) -> tuple[list[Example], list[Example], str | None]:
    """(train split, validation split, sha256) of a dataset as stored."""
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
    return train, validation, dataset.sha256


def stored_size(settings: Settings, ds_id: str) -> int:
    """The bytes of a dataset's upload as stored (0 where its files are gone)."""
    try:
        return original_path(settings, ds_id).stat().st_size
    except OSError:
        return 0


def original_path(settings: Settings, ds_id: str) -> Path:
    """The dataset's upload, byte for byte."""
    return settings.layout.datasets / ds_id / "original"


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

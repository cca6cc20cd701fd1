"""Every dataset example of README.md and docs/ runs as written, from the repository root of a clone with nothing
beside it: each ``curl ... /datasets`` and ``flashtune datasets upload`` command in a shell code block is run by
bash against a real API (only ``localhost:8000`` becomes the test server's address) and must create a dataset.
The files they upload are the project's own samples (``samples/``), which must be what ``flashtune sample-data``
writes."""

from __future__ import annotations

import json
import os
import re
import sqlite3
import subprocess
from collections.abc import Iterator
from contextlib import closing
from pathlib import Path

import pytest

from service.datasets.sample import write_sample_data
from tests.conftest import Service

ROOT = Path(__file__).resolve().parents[2]
DOCS = [ROOT / "README.md", *sorted((ROOT / "docs").glob("*.md"))]
FENCE = re.compile(r"^```(?:bash|sh|shell)\n(.*?)^```", re.M | re.S)


def dataset_examples() -> list[tuple[str, str]]:
    """(where, command) of each dataset upload example: continuation lines joined, comments dropped."""
    found = []
    for path in DOCS:
        for block in FENCE.findall(path.read_text()):
            for command in re.sub(r"\\\n\s*", " ", block).splitlines():
                command = command.split(" # ")[0].strip()
                uploads = command.startswith("curl") and "/datasets" in command and "file=@" in command
                if uploads or command.startswith("flashtune datasets upload"):
                    found.append((path.name, command))
    return found


EXAMPLES = dataset_examples()


def test_the_docs_have_dataset_examples() -> None:
    assert len(EXAMPLES) >= 10, EXAMPLES
    assert not [c for _, c in EXAMPLES if "../" in c], "examples must use files inside the repository"


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Service]:
    service = Service(tmp_path_factory.mktemp("doc-examples"))
    service.start_api()
    yield service
    service.stop()


@pytest.mark.parametrize(("where", "command"), EXAMPLES, ids=[f"{w}:{c[:60]}" for w, c in EXAMPLES])
def test_dataset_example_runs_verbatim(api: Service, where: str, command: str) -> None:
    env = {**os.environ, "FLASHTUNE_URL": api.url}
    run = command.replace("localhost:8000", api.url.removeprefix("http://"))
    if run.startswith("flashtune "):
        run += " --json"
    out = subprocess.run(["bash", "-c", run], cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, f"{where}: {command}\n{out.stdout}\n{out.stderr}"
    body = json.loads(out.stdout)
    assert body.get("id", "").startswith("ds-") and body["num_examples"] > 0, f"{where}: {command}\n{out.stdout}"


def test_the_samples_are_what_sample_data_writes(tmp_path: Path) -> None:
    """samples/ is up to date: text files byte for byte, the database row for row."""
    fresh = write_sample_data(tmp_path)
    for made in fresh.files():
        shipped = ROOT / "samples" / made.relative_to(tmp_path)
        if made.suffix == ".db":
            assert _rows(shipped) == _rows(made), shipped
        else:
            assert shipped.read_bytes() == made.read_bytes(), f"{shipped}: run flashtune sample-data samples"


def _rows(path: Path) -> dict[str, list[tuple[object, ...]]]:
    with closing(sqlite3.connect(path)) as db:
        tables = [name for (name,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' ORDER BY name")]
        return {table: db.execute(f"SELECT * FROM {table} ORDER BY 1, 2, 3").fetchall() for table in tables}

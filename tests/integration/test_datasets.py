"""Datasets through the real API: files in each of the user's formats, and broken files of each format.

The files are the project's own sample data in the user's formats (``service.datasets.sample``, the session
fixture ``sample_data``); what each import should keep is counted here from the files themselves.
"""

from __future__ import annotations

import csv
import io
import json
import shutil
import sqlite3
from collections import Counter
from contextlib import closing
from pathlib import Path
from typing import Any

from service.datasets.sample import SampleData
from tests.conftest import Service

LABELS = {"-1": "bearish", "0": "neutral", "1": "bullish"}


def upload(svc: Service, path: Path, **fields: Any) -> Any:
    data = {k: (json.dumps(v) if isinstance(v, dict) else str(v)) for k, v in fields.items()}
    with path.open("rb") as f:
        return svc.client.post("/datasets", files={"file": (path.name, f)}, data=data)


def chat_copy(source: Path, target: Path) -> Path:
    """The user's smoke-test file rewritten in the OpenAI chat shape."""
    lines = []
    for line in source.read_text(encoding="utf-8").splitlines():
        r = json.loads(line)
        messages = [
            {"role": "system", "content": r["instruction"]},
            {"role": "user", "content": r["input"]},
            {"role": "assistant", "content": r["output"]},
        ]
        lines.append(json.dumps({"messages": messages}, ensure_ascii=False))
    target.write_text("\n".join(lines) + "\n", encoding="utf-8")
    return target


def jsonl_counts(path: Path) -> tuple[int, int]:
    """(distinct lines, repeated lines) of an instruction file."""
    records = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    distinct = {(r["instruction"], r.get("input", ""), r["output"]) for r in records}
    return len(distinct), len(records) - len(distinct)


def csv_counts(path: Path) -> tuple[int, int, dict[str, int]]:
    """(distinct rows, repeated rows, labels of the distinct rows) of a labelled CSV."""
    rows = list(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    distinct = {(r["text"], r["label"], r["star"]) for r in rows}
    return len(distinct), len(rows) - len(distinct), dict(Counter(LABELS[label] for _, label, _ in distinct))


def database_counts(path: Path) -> tuple[int, int]:
    """(events with a 15-minute XAUUSD return, of which repeat an item already there: same source, text, star)."""
    with closing(sqlite3.connect(f"file:{path}?mode=ro", uri=True)) as conn:
        items = conn.execute(
            "SELECT e.source, e.name, e.content, e.previous, e.consensus, e.actual, e.star FROM events e "
            "JOIN event_impacts i USING (event_id) WHERE i.ticker = 'XAUUSD' AND i.window_min = 15"
        ).fetchall()
    return len(items), len(items) - len(set(items))


def renamed_ret_copy(db: Path, tmp: Path) -> Path:
    copy = tmp / "renamed.db"
    shutil.copy(db, copy)
    copy.chmod(0o644)
    with sqlite3.connect(copy) as conn:
        conn.execute("ALTER TABLE event_impacts RENAME COLUMN ret TO ret_x")
    return copy


def test_sample_files_import_and_a_job_trains_on_the_database(
    service: Service, sample_data: SampleData, tmp_path: Path
) -> None:
    db = sample_data.database
    events, twins = database_counts(db)
    csv_examples, csv_duplicates, csv_labels = csv_counts(sample_data.labelled_csv)
    expected = {  # file: (format, examples, duplicates removed)
        **{
            path: ("instruction_jsonl", *jsonl_counts(path))
            for path in (sample_data.instructions, sample_data.instructions_v2, sample_data.instructions_test)
        },
        sample_data.labelled_csv: ("csv", csv_examples, csv_duplicates),
        db: ("sqlite", events - twins, twins),
        chat_copy(sample_data.instructions_test, tmp_path / "chat.jsonl"): (
            "chat_jsonl",
            *jsonl_counts(sample_data.instructions_test),
        ),
    }
    assert expected[sample_data.instructions][2] > 0 and csv_duplicates > 0 and twins > 0  # something to remove
    for path, (fmt, count, dupes) in expected.items():
        response = upload(service, path)
        assert response.status_code == 201, response.text
        body = response.json()
        assert (body["format"], body["num_examples"], body["duplicates_removed"]) == (fmt, count, dupes), path
        assert body["rejected_count"] == 0
        assert sum(body["label_distribution"].values()) + body["unlabelled"] == count
    listed = {d["format"] for d in service.client.get("/datasets").json()}
    assert listed == {"instruction_jsonl", "chat_jsonl", "csv", "sqlite"}

    csv_body = upload(service, sample_data.labelled_csv).json()  # same content again: same dataset
    assert csv_body["label_distribution"] == csv_labels
    assert csv_body["details"]["columns"] == {"text": "text", "label": "label", "star": "star", "input_fields": {}}

    db_body = upload(service, db).json()
    assert all(n > 0 for n in db_body["label_distribution"].values())
    assert db_body["num_validation"] == round(events * 0.2)  # the latest fifth; the repeats are all earlier
    info = db_body["details"]["import"]
    assert info["train"]["until"] < info["validation"]["from"]
    assert info["thresholds"]["low"] < 0 < info["thresholds"]["high"]

    # Calendar events are short, which keeps the job (training and base-vs-adapter evaluation) small.
    small = upload(service, db, options={"limit": 60, "seed": 3, "sources": ["calendar"]}, ticker="XAUUSD")
    assert small.status_code == 201, small.text
    assert (small.json()["num_examples"], small.json()["num_validation"]) == (60, 12)
    job = service.post_job(dataset=small.json()["id"], hyperparameters={"epochs": 1, "max_length": 128})
    done = service.wait(job["id"], timeout=900)
    assert done["status"] == "succeeded", service.logs()
    events = service.client.get(f"/jobs/{job['id']}/events", params={"limit": 1000}).json()["data"]
    stats = next(e for e in events if e["type"] == "dataset")["data"]["token_stats"]
    assert stats["examples"] == 60 and 0 < stats["p50"] <= stats["p90"] <= stats["p99"] <= stats["max"]


def test_broken_files_get_a_4xx_naming_the_problem_and_nothing_is_stored(
    service: Service, sample_data: SampleData, tmp_path: Path
) -> None:
    db = sample_data.database
    renamed = upload(service, renamed_ret_copy(db, tmp_path))
    assert renamed.status_code == 422, renamed.text
    error = renamed.json()["error"]
    assert "event_impacts" in error["message"] and "'ret'" in error["message"]
    assert error["details"]["table"] == "event_impacts" and error["details"]["column"] == "ret"
    assert "ret_x" in error["details"]["columns"]

    broken = {
        "bad.jsonl": (b'{"instruction": "x", "output": ""}\n{not json\n', "no usable examples"),
        "chat.jsonl": (b'{"messages": [{"role": "user", "content": "hi"}]}\n', "no usable examples"),
        "cols.csv": ("headline,sentiment\n美联储加息,1\n".encode(), "no column 'text' or 'content'"),
        "latin1.csv": ("text,label\nok,1\ncaf\xe9,0\n".encode("latin-1"), "not UTF-8 (line 3"),
        "labels.csv": (b"text,label\nfoo,up\n", "no usable examples"),
        "broken.db": (db.read_bytes()[:4096], "database"),
        "nolabel.jsonl": (b'{"instruction": "q", "output": "free text answer"}\n', "sentiment label"),
        "empty.jsonl": (b"\n\n", "empty"),
    }
    for name, (content, words) in broken.items():
        (tmp_path / name).write_bytes(content)
        response = upload(service, tmp_path / name)
        assert 400 <= response.status_code < 500, (name, response.text)
        assert words in response.json()["error"]["message"], (name, response.text)
    details = upload(service, tmp_path / "bad.jsonl").json()["error"]["details"]
    assert [r["line"] for r in details["rejected"]] == [1, 2]
    unknown = upload(service, tmp_path / "cols.csv", text_column="headline", label_column="nope").json()["error"]
    assert unknown["details"] == {"column": "nope", "option": "label_column", "columns": ["headline", "sentiment"]}
    bad_option = upload(service, db, window_min="soon").json()["error"]
    assert bad_option["details"]["option"] == "window_min"
    no_rows = upload(service, db, ticker="EURUSD").json()["error"]
    assert "XAUUSD/15" in no_rows["message"]

    assert service.client.get("/datasets").json() == []
    stored = service.data_dir / "datasets"
    assert not stored.exists() or list(stored.iterdir()) == []
    fine = upload(service, tmp_path / "cols.csv", text_column="headline", label_column="sentiment")
    assert fine.status_code == 201 and fine.json()["label_distribution"]["bullish"] == 1

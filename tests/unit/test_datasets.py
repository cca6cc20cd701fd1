"""Dataset parsers: chat lines, CSV columns, the SQLite importer (on the project's sample database in the user's
schema, ``service.datasets.sample``), and twin uploads registering one dataset."""

from __future__ import annotations

import contextlib
import json
import sqlite3
import time
from collections import Counter
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
from sqlalchemy import Engine, text
from sqlmodel import select

from service.core.config import Settings
from service.datasets.base import DatasetError
from service.datasets.formats import parse
from service.datasets.sample import DATA_FLASHES, DUPLICATES, HEADLINES, RELEASES, SampleData
from service.datasets.sqlite_import import open_readonly, quantile
from service.datasets.store import save_upload
from service.jobs.db import init_db, make_engine, session_scope
from service.jobs.models import Dataset
from service.llm.prompts import parse_label
from tests.conftest import wait_for
from tests.pgdb import postgres_database


def test_chat_lines() -> None:
    lines = [
        {
            "messages": [
                {"role": "system", "content": "分析"},
                {"role": "user", "content": "金价大涨"},
                {"role": "assistant", "content": "属于利好消息"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": [{"type": "text", "text": "Is this bullish?"}]},
                {"role": "assistant", "content": "bullish"},
            ]
        },
        {
            "messages": [
                {"role": "user", "content": "a"},
                {"role": "assistant", "content": "b"},
                {"role": "user", "content": "c"},
                {"role": "assistant", "content": "neutral"},
            ]
        },
        {"messages": [{"role": "user", "content": "no answer"}]},
        {"messages": [{"role": "robot", "content": "x"}]},
        {"messages": [{"role": "user", "content": "x"}, {"role": "assistant", "content": " "}]},
        {"prompt": "x"},
    ]
    data = "\n".join(json.dumps(x, ensure_ascii=False) for x in lines).encode() + b"\n[1]\n"
    parsed = parse(data)
    assert parsed.format == "chat_jsonl"
    first, second, third = parsed.examples
    assert (first.instruction, first.input, first.label) == ("分析", "金价大涨", "bullish")
    assert (second.instruction, second.input) == ("Is this bullish?", "")
    assert third.instruction == "用户: a\n\n助手: b\n\n用户: c"
    reasons = {r["line"]: r["reason"] for r in parsed.rejected}
    assert reasons[4] == "no assistant message" and "role" in reasons[5] and "empty output" in reasons[6]
    assert "messages" in reasons[7] and reasons[8] == "not a JSON object"


def test_csv_columns_labels_and_stars() -> None:
    data = 'id,content,label,star\n1,"金价\n大涨",bullish,5.0\n2,美元走弱,-1,\n3,,0,3\n4,震荡,2,3\n'.encode()
    parsed = parse(data)
    assert [e.label for e in parsed.examples] == ["bullish", "bearish"]
    assert [e.output[:7] for e in parsed.examples] == ["这是一条5星级", "这是一条3星级"]
    assert parsed.rejected == [
        {"line": 5, "reason": "empty text (column 'content')"},
        {"line": 6, "reason": "label '2' is not -1/0/1 or bearish/neutral/bullish (column 'label')"},
    ]  # # noqa: E501
    with pytest.raises(DatasetError) as err:
        parse(data, options={"text_column": "body"})
    assert err.value.details["columns"] == ["id", "content", "label", "star"]
    with pytest.raises(DatasetError, match="unknown option 'txt_column'"):
        parse(data, options={"txt_column": "content"})


def test_database_split_thresholds_and_options(sample_data: SampleData) -> None:
    db = sample_data.database
    data = db.read_bytes()
    parsed = parse(data)
    info = parsed.extra["import"]
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute(
            "SELECT e.ts_utc, i.ret FROM events e JOIN event_impacts i USING (event_id) "
            "WHERE i.ticker = 'XAUUSD' AND i.window_min = 15 ORDER BY e.ts_utc, e.event_id"
        ).fetchall()
    train_returns = sorted(r for ts, r in rows if ts <= info["train"]["until"])
    assert len(train_returns) == info["train"]["events"] == len(rows) - round(len(rows) * 0.2)
    assert info["thresholds"] == {"low": quantile(train_returns, 0.3), "high": quantile(train_returns, 0.7)}
    assert quantile([1.0, 2.0, 3.0, 4.0], 0.3) == pytest.approx(1.9)  # numpy.quantile([1, 2, 3, 4], 0.3)

    fixed = parse(data, options={"thresholds": [-0.000405, 0.000436], "sources": "calendar", "min_star": 4})
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        starred = conn.execute("SELECT count(*) FROM events WHERE source = 'calendar' AND star >= 4").fetchone()[0]
    assert fixed.extra["import"]["label_rule"] == "fixed" and fixed.extra["import"]["events_matched"] == starred
    assert all("前值:" in e.input or "公布:" in e.input for e in fixed.examples)
    assert all(e.output.startswith(("这是一条4星级", "这是一条5星级")) for e in fixed.examples)

    a = parse(data, options={"limit": 100, "seed": 7})
    b = parse(data, options={"limit": 100, "seed": 7})
    assert a.examples == b.examples and len(a.examples) + len(a.validation) == 100
    assert Counter(parse_label(e.output) for e in a.examples + a.validation).keys() == {"bearish", "neutral", "bullish"}
    with pytest.raises(DatasetError, match="label_rule 'fixed' needs"):
        parse(data, options={"label_rule": "fixed"})


def test_database_is_opened_read_only_and_nothing_but_reads_run(sample_data: SampleData) -> None:
    with open_readonly(sample_data.database.read_bytes()) as conn:
        written = HEADLINES + DATA_FLASHES + RELEASES + DUPLICATES
        assert conn.execute("SELECT count(*) FROM events").fetchone()[0] == written
        for statement in (
            "CREATE TABLE x (a)",
            "DELETE FROM events",
            "ATTACH DATABASE ':memory:' AS m",
            "PRAGMA journal_mode = WAL",
        ):
            with pytest.raises(sqlite3.DatabaseError):
                conn.execute(statement)


@pytest.mark.parametrize("backend", ["sqlite", "postgresql"])
def test_twin_uploads_at_the_same_instant_register_one_dataset(
    backend: str, sample_data: SampleData, tmp_path: Path
) -> None:
    """The same file uploaded twice at once: the second request waits for the first's row (SQLite's write lock,
    PostgreSQL's unique index) and both answer with the one dataset; no 500, nothing stored twice."""
    settings = Settings(data_dir=tmp_path)
    settings.ensure_dirs()
    data = sample_data.instructions.read_bytes()
    with contextlib.ExitStack() as stack:
        url = settings.resolved_database_url if backend == "sqlite" else stack.enter_context(postgres_database())
        engine = make_engine(url)
        stack.callback(engine.dispose)
        init_db(engine)

        def upload_alone() -> str:
            with session_scope(engine) as session:
                return save_upload(settings, session, data, "twin.jsonl").id

        pool = stack.enter_context(ThreadPoolExecutor(1))
        with session_scope(engine) as first:
            first_id = save_upload(settings, first, data, "first.jsonl").id  # inserted, not yet committed
            twin = pool.submit(upload_alone)
            if backend == "postgresql":  # the twin's INSERT waits on the unique index until the first commits
                wait_for(lambda: _waiting_on_a_lock(engine), 60, "the twin to wait")
            else:
                time.sleep(0.5)  # the twin waits for the write lock (BEGIN IMMEDIATE)
        assert twin.result(timeout=60) == first_id
        with session_scope(engine, read_only=True) as session:
            assert [d.id for d in session.exec(select(Dataset)).all()] == [first_id]
    assert [p.name for p in settings.layout.datasets.iterdir()] == [first_id]  # no temporary folder left


def _waiting_on_a_lock(engine: Engine) -> bool:
    query = "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' AND datname = current_database()"
    with engine.connect() as conn:  # a transaction of its own: pg_stat_activity is read once per transaction
        return bool(conn.execute(text(query)).scalar())

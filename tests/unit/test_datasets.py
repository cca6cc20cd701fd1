"""Dataset parsers: chat lines, CSV columns, the SQLite importer (on the project's sample database in the user's
schema, ``service.datasets.sample``), and twin uploads registering one dataset."""

from __future__ import annotations

import contextlib
import csv
import errno
import io
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
from service.core.errors import RequestError
from service.datasets.base import DatasetError, Limits
from service.datasets.formats import parse, parse_stream
from service.datasets.lines import MAX_ROW_BYTES, Lines
from service.datasets.sample import DATA_FLASHES, DUPLICATES, HEADLINES, RELEASES, SampleData
from service.datasets.sqlite_import import open_readonly, quantile
from service.datasets.store import _storage, save_upload
from service.jobs.db import init_db, make_engine, session_scope
from service.jobs.models import Dataset
from service.llm.prompts import Example, parse_label
from tests.conftest import shared_event_id_database, wait_for
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


# ------------------------------------------------------------------------------------------- hostile uploads
def test_a_csv_field_over_the_csv_modules_limit_is_a_4xx_naming_its_line() -> None:
    big = b"a" * (csv.field_size_limit() + 1)
    for data, line in ((b"text,label\nok,1\n" + big + b",1\n", 3), (b'text,label\n"' + big + b'\nb",1\nok,0\n', 2)):
        with pytest.raises(DatasetError, match=f"line {line}: a field is longer than 131072 characters") as err:
            parse(data)
        assert err.value.details == {"line": line}


def test_a_header_without_a_text_column_is_echoed_capped() -> None:
    header = ",".join(f"column_{i}_" + "x" * 300 for i in range(20_000)).encode()
    with pytest.raises(DatasetError) as err:
        parse(header + b"\n1,2\n")
    message = str(err.value)
    assert "no column 'text' or 'content' (20000 columns: column_0_" in message and "and 19980 more" in message
    assert len(message) < 6000  # 20 names of at most ~230 characters, not the 6 MB header


def test_jsonl_lines_nested_too_deep_too_long_or_with_huge_numbers_are_rejected() -> None:
    good = b'{"instruction": "q", "output": "bullish"}\n'
    deep = b"[" * 5000 + b"]" * 5000 + b"\n"
    too_long = b'{"instruction": "' + b"x" * MAX_ROW_BYTES + b'", "output": "bullish"}\n'
    huge_number = b'{"instruction": ' + b"9" * 5000 + b"}\n"
    parsed = parse(good + deep + too_long + huge_number + good.replace(b"q", b"r"))
    assert parsed.num_train == 2
    reasons = {r["line"]: r["reason"] for r in parsed.rejected}
    assert reasons[2] == "bad JSON: nested too deeply"
    assert reasons[3] == "longer than 8 MiB" and reasons[4].startswith("bad JSON: Exceeds the limit")


def test_a_csv_row_over_the_row_limit_ends_the_file_naming_its_line() -> None:
    with pytest.raises(DatasetError, match="line 2: a row longer than 8 MiB"):
        parse(b"text,label\n" + b"y" * (MAX_ROW_BYTES + 10) + b",1\n")
    lines = Lines(io.BytesIO(b'a,b\n"1\n2\n3\n4",5\n'), Limits(), max_bytes=8)  # one record over several lines
    reader = csv.reader(lines.text())
    assert next(reader) == ["a", "b"]
    lines.record_bytes = 0
    with pytest.raises(DatasetError, match="line 5: a row longer than 8 bytes"):
        next(reader)


def test_lines_read_the_stream_with_old_mac_line_breaks_and_name_bad_bytes() -> None:
    assert parse(b"text,label\rup,1\rdown,-1\r").num_train == 2
    with pytest.raises(DatasetError, match=r"not UTF-8 \(line 3, byte 19\)") as err:
        parse(b"text,label\nok,1\ncaf\xe9,0\n")
    assert err.value.details == {"line": 3, "byte": 19}


def test_an_instruction_option_longer_than_an_analyze_text_is_refused() -> None:
    data = b"text,label\nup,1\n"
    assert parse(data, options={"instruction": "i" * 4000}).examples[0].instruction == "i" * 4000
    with pytest.raises(DatasetError, match="at most 4000 characters") as err:  # it would be copied into every example
        parse(data, options={"instruction": "i" * 4001})
    assert err.value.details["option"] == "instruction"
    with pytest.raises(DatasetError, match="'ticker' must be a string of at most 200 characters"):
        parse(b"SQLite format 3\x00", "sqlite", {"ticker": "X" * 10**6})


def test_more_examples_than_the_limit_is_a_4xx_naming_the_limit() -> None:
    data = "".join(f'{{"instruction": "q{i}", "output": "bullish"}}\n' for i in range(6)).encode()
    assert parse(data, limits=Limits(max_examples=6)).num_train == 6
    with pytest.raises(DatasetError, match="more than 5 examples") as err:
        parse(data, limits=Limits(max_examples=5))
    assert err.value.details == {"limit": "FLASHTUNE_MAX_DATASET_EXAMPLES", "max": 5}


def test_streamed_parsing_writes_what_keeping_would_keep(sample_data: SampleData) -> None:
    written: list[tuple[str, Example]] = []
    with sample_data.database.open("rb") as f:
        streamed = parse_stream(f, write=lambda e, split: written.append((split, e)))
    kept = parse(sample_data.database.read_bytes())
    assert streamed.examples == [] and [e for s, e in written if s == "train"] == kept.examples
    assert [e for s, e in written if s == "validation"] == kept.validation
    assert (streamed.num_train, streamed.num_validation, streamed.labels) == (
        len(kept.examples),
        len(kept.validation),
        kept.labels,
    )


def test_the_import_refuses_an_event_id_repeated_for_one_ticker_and_window(tmp_path: Path) -> None:
    data = shared_event_id_database(tmp_path / "shared.db", 1000).read_bytes()  # 1,000,000 rows if joined
    started = time.monotonic()
    with pytest.raises(DatasetError, match="1000 rows with event_id 'e1' for ticker 'XAUUSD'") as err:
        parse(data)
    assert time.monotonic() - started < 5
    assert err.value.details["table"] == "event_impacts" and err.value.details["column"] == "event_id"
    with contextlib.closing(sqlite3.connect(tmp_path / "shared.db")) as conn:  # one impact, repeated events
        conn.execute("DELETE FROM event_impacts WHERE rowid > 1")
        conn.commit()
    with pytest.raises(DatasetError, match="table 'events' has 1000 rows with event_id 'e1'"):
        parse((tmp_path / "shared.db").read_bytes())


def test_the_import_stops_at_its_row_budget_its_time_limit_and_a_cancel(sample_data: SampleData) -> None:
    data = sample_data.database.read_bytes()
    with pytest.raises(DatasetError, match="more than 10 rows of events match") as err:
        parse(data, limits=Limits(import_max_rows=10))
    assert err.value.details == {"limit": "FLASHTUNE_IMPORT_MAX_ROWS", "max": 10}
    with pytest.raises(DatasetError, match="ran longer than 1e-06 s") as err:
        parse(data, limits=Limits(import_seconds=1e-6))
    assert err.value.details["limit"] == "FLASHTUNE_IMPORT_SECONDS"
    cancelled = Limits()
    cancelled.cancel.set()
    with pytest.raises(DatasetError, match="cancelled"):
        parse(data, limits=cancelled)
    lines = "".join(f"text {i},1\n" for i in range(5000)).encode()
    with pytest.raises(DatasetError, match="cancelled"):  # text formats check the flag every 1024 lines
        parse(b"text,label\n" + lines, limits=cancelled)


def test_the_servers_storage_failing_is_a_503_or_507_without_its_path(tmp_path: Path) -> None:
    settings = Settings(data_dir=tmp_path)
    settings.ensure_dirs()
    engine = make_engine(settings.resolved_database_url)
    init_db(engine)
    settings.layout.datasets.rmdir()
    settings.layout.datasets.write_text("not a folder")  # unwritable even for root, unlike a chmod
    with session_scope(engine) as session, pytest.raises(RequestError) as err:
        save_upload(settings, session, b'{"instruction": "q", "output": "bullish"}\n', "a.jsonl")
    assert (err.value.status, err.value.type) == (503, "storage_unavailable")
    assert str(tmp_path) not in err.value.message
    with pytest.raises(RequestError) as full, _storage():
        raise OSError(errno.ENOSPC, "No space left on device")
    assert (full.value.status, full.value.type) == (507, "insufficient_storage")
    engine.dispose()

"""Uploads that tried to take the API down (issue 20, sections 2 and 4), against a real ``flashtune serve``.

Each case states its limit as a number: the size of the error body, the peak memory of the API process (``VmHWM``
of /proc/<pid>/status, reset before the upload through ``clear_refs``), the time an import may take, and how long
``/healthz`` takes while the server is busy. The files are as small as still proves the point: a 4 MB header shows
the cap (a 20 MB one answered 239 MB before), a 106 KB database the join bound, a 40 MB file the streaming.
"""

from __future__ import annotations

import contextlib
import json
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.datasets.sample import SampleData
from tests.conftest import Service, make_service, shared_event_id_database

MiB = 1024 * 1024
IMPORT_MAX_ROWS = 300  # below the sample database's 520 events, above its 120 calendar events
ERROR_BODY_LIMIT = 8 * 1024  # bytes: 20 column names of at most ~230 characters, and the rest of the body
HEALTHZ_MEDIAN_LIMIT = 0.25  # seconds; a generous bound for a 2-core CI machine (docs/security.md has figures)
HEALTHZ_MAX_LIMIT = 2.0  # seconds; before, one big error body stalled the event loop 3.2 s


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory, builtin_model_cache: Path) -> Iterator[Service]:
    env = {"FLASHTUNE_MAX_UPLOAD_BYTES": str(64 * MiB), "FLASHTUNE_IMPORT_MAX_ROWS": str(IMPORT_MAX_ROWS)}
    svc = make_service(tmp_path_factory.mktemp("hostile-uploads"), builtin_model_cache, workers=0, env=env)
    yield svc
    svc.stop()


# ------------------------------------------------------------------------------------------------ measuring
def memory(svc: Service, field: str) -> int:
    """``VmRSS`` or ``VmHWM`` (the peak) of the API process, in bytes."""
    assert svc.api is not None
    for line in Path(f"/proc/{svc.api.pid}/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise AssertionError(f"no {field} in /proc/{svc.api.pid}/status")


@contextlib.contextmanager
def peak_growth(svc: Service) -> Iterator[dict[str, int]]:
    """How far the API's peak RSS rose above its RSS before the block (``growth``, bytes)."""
    assert svc.api is not None
    before = memory(svc, "VmRSS")
    with contextlib.suppress(OSError):  # resets VmHWM to the current RSS (Linux); without it the bound is looser
        Path(f"/proc/{svc.api.pid}/clear_refs").write_text("5")
    result: dict[str, int] = {}
    yield result
    result["growth"] = memory(svc, "VmHWM") - before


@contextlib.contextmanager
def healthz_latency(svc: Service) -> Iterator[list[float]]:
    """``/healthz`` timings (seconds), polled from another thread for as long as the block runs."""
    timings: list[float] = []
    done = threading.Event()

    def poll() -> None:
        with httpx.Client(base_url=svc.url, timeout=30) as client:
            while not timings or not done.is_set():  # at least one, however quick the block
                started = time.perf_counter()
                assert client.get("/healthz").status_code == 200
                timings.append(time.perf_counter() - started)
                time.sleep(0.02)

    poller = threading.Thread(target=poll)
    poller.start()
    try:
        yield timings
    finally:
        done.set()
        poller.join()


def assert_responsive(timings: list[float]) -> None:
    assert timings, "no /healthz answered while the server was busy"
    ordered = sorted(timings)
    assert ordered[len(ordered) // 2] < HEALTHZ_MEDIAN_LIMIT, ordered
    assert ordered[-1] < HEALTHZ_MAX_LIMIT, ordered


def upload(svc: Service, path: Path, route: str = "/datasets", **fields: Any) -> httpx.Response:
    with path.open("rb") as f:
        if route == "/v1/files":
            return svc.client.post(route, files={"file": (path.name, f)}, data={"purpose": "fine-tune", **fields})
        return svc.client.post(route, files={"file": (path.name, f)}, data=fields)


def assert_error(response: httpx.Response, status: int, kind: str, svc: Service) -> dict[str, Any]:
    """The one error shape, no server path in it; returns the error."""
    assert response.status_code == status, response.text[:2000]
    assert str(svc.data_dir) not in response.text and "Traceback" not in response.text
    error = response.json()["error"]
    assert error["type"] == kind and isinstance(error["message"], str)
    return dict(error)


# -------------------------------------------------------------------------------------------------- the cases
def test_a_header_without_a_text_column_answers_a_small_422(api: Service, tmp_path: Path) -> None:
    """A 4 MB header of 100,000 columns and no text column: the 422 names 20 of them and how many more."""
    path = tmp_path / "header.csv"
    header = ",".join(f"column_{i}_" + "x" * 30 for i in range(100_000))
    path.write_text(header + "\n1,2\n")
    assert path.stat().st_size > 4 * MiB
    for route in ("/datasets", "/v1/files"):
        with peak_growth(api) as peak, healthz_latency(api) as timings:
            response = upload(api, path, route)
        error = assert_error(response, 422, "invalid_dataset", api)
        assert len(response.content) < ERROR_BODY_LIMIT, len(response.content)
        assert "no column 'text' or 'content' (100000 columns: column_0_" in error["message"]
        assert "and 99980 more" in error["message"]
        assert error["details"]["columns"][-1] == "and 99980 more" and len(error["details"]["columns"]) == 21
        assert peak["growth"] < 64 * MiB, peak  # 20 MB took 2.6 GB before
        assert_responsive(timings)


def test_a_csv_field_over_131072_characters_is_a_422_on_both_routes(api: Service, tmp_path: Path) -> None:
    path = tmp_path / "field.csv"
    path.write_bytes(b"text,label\nok,1\n" + b"a" * 131_073 + b",1\n")
    for route in ("/datasets", "/v1/files"):
        error = assert_error(upload(api, path, route), 422, "invalid_dataset", api)
        assert error["message"] == "line 3: a field is longer than 131072 characters"
        assert error["details"] == {"line": 3}


def test_a_jsonl_line_nested_5000_deep_is_rejected_not_a_500(api: Service, tmp_path: Path) -> None:
    deep = b"[" * 5000 + b"]" * 5000 + b"\n"
    only = tmp_path / "deep.jsonl"
    only.write_bytes(b'{"instruction": ' + deep[:-1] + b"}\n")
    for route in ("/datasets", "/v1/files"):
        error = assert_error(upload(api, only, route), 422, "invalid_dataset", api)
        assert error["details"]["rejected"] == [{"line": 1, "reason": "bad JSON: nested too deeply"}]
    mixed = tmp_path / "mixed.jsonl"
    mixed.write_bytes(b'{"instruction": "gold up", "output": "bullish"}\n' + deep)
    response = upload(api, mixed)
    assert response.status_code == 201, response.text
    assert response.json()["rejected"] == [{"line": 2, "reason": "bad JSON: nested too deeply"}]
    nested_options = upload(api, mixed, options="[" * 4000 + "]" * 4000)  # the form field's JSON, not the file
    assert assert_error(nested_options, 422, "invalid_request", api)["details"] == [{"field": "options"}]


def test_an_unwritable_datasets_folder_is_a_503_and_nothing_is_half_saved(api: Service, tmp_path: Path) -> None:
    path = tmp_path / "good.jsonl"
    path.write_text('{"instruction": "gold up", "output": "bullish"}\n')
    folder = api.data_dir / "datasets"
    moved = api.data_dir / "datasets-moved"
    folder.rename(moved)
    folder.write_text("a file where the folder was: unwritable, even for root")
    try:
        for route in ("/datasets", "/v1/files"):
            error = assert_error(upload(api, path, route), 503, "storage_unavailable", api)
            assert "operator" in error["message"]
        assert [d["filename"] for d in api.client.get("/datasets").json()].count("good.jsonl") == 0
    finally:
        folder.unlink()
        moved.rename(folder)
    assert upload(api, path).status_code == 201


def test_the_finance_import_is_bounded_in_rows_and_repeats(
    api: Service, sample_data: SampleData, tmp_path: Path
) -> None:
    shared = shared_event_id_database(tmp_path / "shared.db", 1000)  # 1,000,000 rows took 47.5 s and 0.72 GB
    assert shared.stat().st_size < 200_000
    with peak_growth(api) as peak, healthz_latency(api) as timings:
        started = time.monotonic()
        response = upload(api, shared)
        elapsed = time.monotonic() - started
    error = assert_error(response, 422, "invalid_dataset", api)
    assert "1000 rows with event_id 'e1'" in error["message"] and error["details"]["column"] == "event_id"
    assert elapsed < 10 and peak["growth"] < 32 * MiB, (elapsed, peak)
    assert_responsive(timings)

    over = assert_error(upload(api, sample_data.database), 422, "invalid_dataset", api)
    assert f"more than {IMPORT_MAX_ROWS} rows" in over["message"] and "FLASHTUNE_IMPORT_MAX_ROWS" in over["message"]
    assert over["details"] == {"limit": "FLASHTUNE_IMPORT_MAX_ROWS", "max": IMPORT_MAX_ROWS}
    narrowed = upload(api, sample_data.database, sources="calendar")
    assert narrowed.status_code == 201, narrowed.text


def test_the_finance_import_is_bounded_in_time(
    tmp_path: Path, builtin_model_cache: Path, sample_data: SampleData
) -> None:
    svc = make_service(tmp_path, builtin_model_cache, workers=0, env={"FLASHTUNE_IMPORT_SECONDS": "0.000001"})
    try:
        error = assert_error(upload(svc, sample_data.database), 422, "invalid_dataset", svc)
        assert "ran longer than 1e-06 s" in error["message"]
        assert error["details"] == {"limit": "FLASHTUNE_IMPORT_SECONDS", "max": 1e-06}
    finally:
        svc.stop()


def test_a_big_upload_is_parsed_as_a_stream_off_the_event_loop(api: Service, tmp_path: Path) -> None:
    """40 MB of JSON Lines (200,000 examples): the API's peak memory rises by less than the file's size (it held
    about 6 copies before), and /healthz answers throughout."""
    path = tmp_path / "big.jsonl"
    with path.open("w", encoding="utf-8") as out:
        for i in range(200_000):
            record = {
                "instruction": f"分析第{i}条快讯 " + "x" * 150,
                "output": "属于利好消息" if i % 2 else "属于利空消息",
            }
            out.write(json.dumps(record, ensure_ascii=False) + "\n")
    size = path.stat().st_size
    assert size > 40 * 1000 * 1000
    with peak_growth(api) as peak, healthz_latency(api) as timings:
        response = upload(api, path)
    assert response.status_code == 201, response.text[:2000]
    assert response.json()["num_examples"] == 200_000
    assert peak["growth"] < size, (peak, size)
    assert_responsive(timings)
    stored = api.data_dir / "datasets" / response.json()["id"]
    assert (stored / "original").stat().st_size == size
    assert sum(1 for _ in (stored / "examples.jsonl").open(encoding="utf-8")) == 200_000

"""One renderer for news inputs: the importers (training) and /analyze (serving) build the same model input.

Parser-level tests on the project's sample files in the user's formats (``service.datasets.sample``); /analyze
itself is tested against real processes in test_serving.py.
"""

from __future__ import annotations

import csv
import io
import sqlite3

import pytest

from service.datasets.base import DatasetError
from service.datasets.formats import parse
from service.datasets.sample import SampleData
from service.llm.prompts import INPUT_FIELDS, NewsItem, input_fields_used, normalise_field, render_input


def test_render_input_layout() -> None:
    assert render_input(" 美国初请失业金人数 ", {"previous": "23.6", "consensus": 22.5, "actual": 22}) == (
        "美国初请失业金人数 前值:23.6 预期:22.5 公布:22"  # the user's own calendar lines read exactly so
    )
    everything = {
        "star": 4.0,
        "country": "美国",
        "previous": "1",
        "pre_ret": -0.0021,
        "volatility": 0.0015,
        "trend": "down",
        "consensus": None,
        "actual": "",
    }
    assert render_input("美联储宣布加息", everything) == (
        "美联储宣布加息 前值:1\n国家:美国 星级:4\n事前涨跌:-0.210% 波动率:0.150% 趋势:下跌"
    )
    assert render_input("美联储宣布加息") == "美联储宣布加息"
    assert input_fields_used([render_input("x", everything), "y"]) == [
        "previous",
        "country",
        "star",
        "pre_ret",
        "volatility",
        "trend",
    ]
    assert input_fields_used(["星级很高的新闻", "5星级 前值为3"]) == []  # words in a sentence are not fields
    assert NewsItem("a", {"country": "中国"}).render("b") == "b\n国家:中国"


@pytest.mark.parametrize(
    ("name", "value"),
    [
        ("pre_ret", 1.5),
        ("pre_ret", float("nan")),
        ("volatility", -0.1),
        ("trend", "sideways"),
        ("star", 6),
        ("star", 2.5),
        ("star", True),
        ("country", "a\nb"),
        ("actual", "9" * 65),
        ("beta", 1),
    ],
)
def test_bad_field_values(name: str, value: object) -> None:
    with pytest.raises(ValueError, match=name):
        normalise_field(name, value)


def test_database_inputs_by_default_are_what_the_user_trained_on(sample_data: SampleData) -> None:
    """Default input_fields: calendar figures only, as the user's instructions.jsonl reads."""
    db = sample_data.database
    parsed = parse(db.read_bytes(), "sqlite", {"sources": ["calendar"], "validation_fraction": 0})
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        rows = conn.execute("SELECT name, previous, consensus, actual FROM events WHERE source = 'calendar'")
        expected = {
            " ".join(
                [
                    n.strip(),
                    *(
                        f"{w}:{v}"
                        for w, v in zip(("前值", "预期", "公布"), (p, c, a), strict=True)
                        if v not in (None, "")
                    ),
                ]
            )
            for n, p, c, a in rows
        }
    assert {e.input for e in parsed.examples} <= expected
    assert parsed.extra["import"]["input_fields"] == ["previous", "consensus", "actual"]


def test_database_with_more_fields_renders_through_render_input(sample_data: SampleData) -> None:
    db = sample_data.database
    options = {"input_fields": ["star", "country", "previous", "consensus", "actual"], "validation_fraction": 0}
    parsed = parse(db.read_bytes(), "sqlite", options)
    with sqlite3.connect(f"file:{db}?mode=ro", uri=True) as conn:
        conn.row_factory = sqlite3.Row
        row = conn.execute(
            "SELECT * FROM events WHERE source = 'calendar' AND country IS NOT NULL ORDER BY ts_utc, event_id LIMIT 1"
        ).fetchone()
    fields = {k: row[k] for k in ("previous", "consensus", "actual", "country")} | {"star": int(row["star"])}
    served = NewsItem(row["name"], fields).render()  # what /analyze builds from the same item
    assert served in {e.input for e in parsed.examples}
    assert "\n国家:" in served and " 前值:" in served
    assert input_fields_used(e.input for e in parsed.examples) == ["previous", "consensus", "actual", "country", "star"]


def test_database_refuses_fields_it_does_not_have(sample_data: SampleData) -> None:
    with pytest.raises(DatasetError, match="input_fields") as caught:
        parse(sample_data.database.read_bytes(), "sqlite", {"input_fields": ["pre_ret"]})
    assert caught.value.details["option"] == "input_fields"


def test_csv_market_context_columns(sample_data: SampleData) -> None:
    path = sample_data.labelled_csv
    options = {"input_fields": ["pre_ret", "volatility=range_ratio", "country"], "text_column": "text"}
    parsed = parse(path.read_bytes(), "csv", options)
    first = next(csv.DictReader(io.StringIO(path.read_text(encoding="utf-8"))))
    expected = render_input(
        first["text"],
        {"pre_ret": float(first["pre_ret"]), "volatility": first["range_ratio"], "country": first["country"]},
    )
    assert parsed.examples[0].input == expected and f"事前涨跌:{float(first['pre_ret']):+.3%}" in expected
    assert parsed.extra["columns"]["input_fields"] == {
        "pre_ret": "pre_ret",
        "volatility": "range_ratio",
        "country": "country",
    }
    # the text column of calendar rows already holds the figures in the same layout: they count as seen too
    assert input_fields_used(e.input for e in parsed.examples) == [
        "previous",
        "consensus",
        "actual",
        "country",
        "pre_ret",
        "volatility",
    ]
    # without the option nothing changes
    assert parse(path.read_bytes(), "csv", {}).examples[0].input == first["text"]


@pytest.mark.parametrize(
    ("options", "match"),
    [({"input_fields": ["beta"]}, "unknown field 'beta'"), ({"input_fields": ["pre_ret=nope"]}, "no column 'nope'")],
)
def test_csv_bad_input_fields(sample_data: SampleData, options: dict[str, object], match: str) -> None:
    with pytest.raises(DatasetError, match=match):
        parse(sample_data.labelled_csv.read_bytes(), "csv", options)


def test_csv_row_with_a_bad_value_is_rejected_with_its_line() -> None:
    data = "text,label,pre_ret\n美联储加息,-1,0.001\n欧洲央行降息,1,abc\n日本央行按兵不动,0,5\n".encode()
    parsed = parse(data, "csv", {"input_fields": ["pre_ret"]})
    assert [e.input for e in parsed.examples] == ["美联储加息\n事前涨跌:+0.100%"]
    assert [r["line"] for r in parsed.rejected] == [3, 4] and "pre_ret" in parsed.rejected[0]["reason"]


def test_every_field_is_rendered() -> None:
    values = {
        "star": 3,
        "country": "中国",
        "previous": "1",
        "consensus": "2",
        "actual": "3",
        "pre_ret": 0.01,
        "volatility": 0.02,
        "trend": "up",
    }
    assert set(values) == set(INPUT_FIELDS)
    assert input_fields_used([render_input("x", values)]) == list(INPUT_FIELDS)

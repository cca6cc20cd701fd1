"""The capping of echoed values (service/core/capping.py): every value, list, mapping and message bounded."""

from __future__ import annotations

import json

from service.core.capping import (
    MAX_CHARS,
    MAX_ITEMS,
    MAX_MESSAGE_CHARS,
    MORE_KEY,
    cap_join,
    cap_message,
    cap_repr,
    cap_text,
    capped,
)


def test_a_long_value_is_cut_and_says_how_much_is_left_out() -> None:
    assert cap_text("short") == "short"
    long = "x" * 20_000_000
    text = cap_text(long)
    assert text == "x" * MAX_CHARS + f"... ({20_000_000 - MAX_CHARS} more characters)"
    assert cap_repr(long).startswith("'xxx") and len(cap_repr(long)) < MAX_CHARS + 50
    assert cap_repr("ab") == "'ab'"
    assert cap_text(b"\xff" * 1000).endswith("(800 more bytes)")
    assert len(cap_message("m" * 10**6)) < MAX_MESSAGE_CHARS + 50


def test_a_long_list_shows_its_first_items_then_and_n_more() -> None:
    header = [f"col{i}" + "y" * 500 for i in range(100_000)]
    joined = cap_join(header)
    assert joined.endswith("and 99980 more") and joined.count(", ") == MAX_ITEMS - 1
    assert len(joined) < MAX_ITEMS * (MAX_CHARS + 40) + 20
    items = capped(header)
    assert len(items) == MAX_ITEMS + 1 and items[-1] == "and 99980 more"
    assert capped(items) == items  # capping twice changes nothing
    assert capped(list(range(MAX_ITEMS + 1))) == list(range(MAX_ITEMS + 1))  # one over is kept whole


def test_details_of_any_shape_are_bounded() -> None:
    deep: object = "leaf"
    for _ in range(5000):
        deep = [deep]
    details = {
        "columns": ["c" * 10**6] * 10**5,
        "nested": deep,
        "mapping": {f"k{i}": i for i in range(1000)},
        "number": 3,
        "flag": True,
        "none": None,
        "set": {"a"},
    }
    out = capped(details)
    assert len(json.dumps(out)) < 20_000
    assert out["mapping"][MORE_KEY] == "and 980 more" and out["number"] == 3 and out["flag"] is True
    assert out["none"] is None and out["set"] == ["a"]

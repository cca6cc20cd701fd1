"""Sample data in the user's own formats, made by the project: every importer can be tried, and the test suite
runs, on a clone with nothing beside it (the user's real data stays outside the repository, for benchmarks).

:func:`write_sample_data` writes, deterministically from a seed and without any download, the files the finance
news project hands over, under the same names and layout as the user's data folder:

- ``finance_analysis_sample.db``: ``events`` + ``event_impacts`` in the user's exact schema (same columns,
  primary key and indexes). Flash news (the built-in template generator's headlines, and data releases as Jin10
  posts them) and calendar releases with their figures, August to October 2025 Beijing time, and the XAUUSD
  return 15 and 30 minutes after each. A few flash items are posted twice at one instant: same text, same
  return, so an importer must drop them as exact duplicates. Only those share a timestamp, and all fall in the
  first third of the period, so a time split lands exactly where its fraction says.
- ``seed/instructions.jsonl``: the user's first format (labelled news answers, plus unlabelled market and
  report questions repeated the way the user's file repeats them); ``seed/instructions_test.jsonl``: ten more.
- ``seed/instructions_v2.jsonl``: the user's second format (看涨（Bullish）answers, JSON blocks, free text).
- ``seed/val_3cls.csv``: one row per event with the user's columns (``text``, ``label`` -1/0/1 at the user's
  fixed thresholds, ``star``, ``ret_post``, ``pre_ret``, ``range_ratio``, ...): a CSV with metadata (country,
  star, the calendar figures) and market context (the return before the event, the range).
- ``seed/chat.jsonl``: the OpenAI fine-tuning shape (``{"messages": [...]}``), the instruction as the system
  message, the news with its metadata and market context (``render_input``) as the user's, the standard answer as
  the assistant's; every fifth message's content is a list of text parts, as OpenAI allows. Not one of the user's
  files: it shows the chat format with the same news.

``samples/`` in the repository holds these files as ``flashtune sample-data samples`` writes them (a test checks
they are up to date), so every dataset example in README.md and docs/ runs from a fresh clone.

Returns follow the news (a headline's rule label, a release's surprise) plus noise, as the real ones are noisy.
Every text is unique except the duplicates written on purpose, so what an importer should keep can be counted
from the files alone.
"""

from __future__ import annotations

import csv
import json
import random
import sqlite3
from collections.abc import Iterator, Mapping
from contextlib import closing
from dataclasses import dataclass, replace
from datetime import datetime, timedelta
from itertools import islice
from pathlib import Path

from service.llm.builtin.data import generate
from service.llm.prompts import (
    DEFAULT_INSTRUCTION,
    LABEL_IDS,
    LABEL_WORDS,
    REACTION_WORDS,
    Label,
    render_input,
    render_response,
)

DEFAULT_SEED = 20250801
HEADLINES, DATA_FLASHES, RELEASES, DUPLICATES = 360, 40, 120, 6  # flash, flash with figures, calendar, twins
TICKER, WINDOWS = "XAUUSD", (15, 30)
FIXED_THRESHOLDS = (-0.000405, 0.000436)  # the user's q_low / q_high, used for the CSV's and the answers' labels
START_UTC, DAYS = datetime(2025, 7, 31, 16, 0), 92  # 2025-08-01 00:00 in Beijing, where ts_local is read
LOCAL_OFFSET = timedelta(hours=8)
DIRECTIONS: dict[Label, int] = {"bearish": -1, "neutral": 0, "bullish": 1}  # which way a headline moves gold

# The user's schema, as ``sqlite3 finance_analysis_sample.db .schema`` prints it.
SCHEMA = """
CREATE TABLE events (
    event_id TEXT PRIMARY KEY, source TEXT NOT NULL, ts_local TEXT, ts_utc TEXT,
    country TEXT, name TEXT, content TEXT, star REAL, previous TEXT, consensus TEXT, actual TEXT,
    affect TEXT, detail_url TEXT, important INTEGER, hot TEXT, indicator_name TEXT, unit TEXT);
CREATE TABLE event_impacts (
    event_id TEXT NOT NULL, ticker TEXT NOT NULL, window_min INTEGER NOT NULL,
    price_event REAL, price_future REAL, delta REAL, ret REAL,
    price_event_ts_utc TEXT, price_future_ts_utc TEXT,
    PRIMARY KEY (event_id, ticker, window_min));
CREATE INDEX idx_events_ts ON events(ts_local);
CREATE INDEX idx_event_impacts_window ON event_impacts(window_min);
"""

CSV_COLUMNS = [
    "event_id",
    "event_ts_local",
    "event_ts_utc",
    "source",
    "country",
    "name",
    "content",
    "text",
    "star",
    "previous",
    "consensus",
    "actual",
    "indicator_name",
    "unit",
    "important",
    "hot",
    "price_event",
    "price_event_ts_utc",
    "price_future",
    "price_future_ts_utc",
    "delta",
    "delta_event_sec",
    "delta_future_sec",
    "ret_post",
    "pre_ret",
    "range_ratio",
    "label",
]

# (country, name with {period}, star, usual value, spread, unit suffix, weekly, sign of gold's move on a beat)
INDICATORS: list[tuple[str, str, int, float, float, str, bool, int]] = [
    ("美国", "美国{period}季调后非农就业人口", 5, 14.0, 6.0, "", False, -1),
    ("美国", "美国{period}未季调CPI年率", 5, 2.8, 0.2, "%", False, -1),
    ("美国", "美国{period}ISM制造业PMI", 4, 48.5, 1.2, "", False, -1),
    ("美国", "美国{period}零售销售月率", 4, 0.4, 0.4, "%", False, -1),
    ("美国", "美国至{period}当周初请失业金人数", 4, 22.5, 1.0, "", True, 1),
    ("美国", "美国至{period}当周EIA原油库存(万桶)", 3, -120.0, 250.0, "", True, 1),
    ("中国", "中国{period}官方制造业PMI", 3, 49.5, 0.5, "", False, 1),
    ("欧元区", "欧元区{period}CPI年率初值", 4, 2.0, 0.2, "%", False, 1),
    ("德国", "德国{period}制造业PMI终值", 3, 49.0, 1.0, "", False, 1),
    ("英国", "英国{period}Nationwide房价指数月率", 3, 0.3, 0.5, "%", False, 1),
    ("日本", "日本{period}失业率", 3, 2.5, 0.1, "%", False, 1),
    ("加拿大", "加拿大{period}失业率", 3, 6.9, 0.2, "%", False, 1),
    ("澳大利亚", "澳大利亚{period}季调后失业率", 3, 4.2, 0.1, "%", False, 1),
]


@dataclass(frozen=True)
class SampleData:
    """Where :func:`write_sample_data` put each file (the user's names and layout)."""

    root: Path

    @property
    def database(self) -> Path:
        return self.root / "finance_analysis_sample.db"

    @property
    def instructions(self) -> Path:
        return self.root / "seed" / "instructions.jsonl"

    @property
    def instructions_v2(self) -> Path:
        return self.root / "seed" / "instructions_v2.jsonl"

    @property
    def instructions_test(self) -> Path:
        return self.root / "seed" / "instructions_test.jsonl"

    @property
    def labelled_csv(self) -> Path:
        return self.root / "seed" / "val_3cls.csv"

    @property
    def chat(self) -> Path:
        return self.root / "seed" / "chat.jsonl"

    def files(self) -> list[Path]:
        return [
            self.database,
            self.instructions,
            self.instructions_v2,
            self.instructions_test,
            self.labelled_csv,
            self.chat,
        ]


@dataclass(frozen=True)
class Release:
    """A calendar release: where it comes from, what it is called, its figures, and which way gold should go."""

    country: str
    name: str
    star: int
    figures: tuple[str | None, str | None, str]  # previous, consensus, actual as the calendar shows them
    direction: int  # -1, 0, 1


@dataclass(frozen=True)
class Event:
    """One row of ``events`` with what ``event_impacts`` and the CSV say about it."""

    event_id: str
    ts_utc: datetime
    text: str  # flash content, or a calendar release's name
    release: Release | None  # calendar events only
    hot: str | None  # flash events only
    price: float  # XAUUSD when the event came out
    futures: tuple[float, ...]  # XAUUSD after each of WINDOWS
    pre_ret: float
    range_ratio: float

    @property
    def source(self) -> str:
        return "flash" if self.release is None else "calendar"

    def ret(self, window: int = 15) -> float:
        return (self.futures[WINDOWS.index(window)] - self.price) / self.price

    @property
    def label(self) -> Label:
        """The user's rule at the fixed thresholds, on the 15-minute return."""
        ret = self.ret()
        return "bearish" if ret < FIXED_THRESHOLDS[0] else "bullish" if ret > FIXED_THRESHOLDS[1] else "neutral"

    @property
    def model_input(self) -> str:
        """What the database importer renders by default: the text, and a release's figures after it."""
        return self.text if self.release is None else _figures_line(self.release)


def write_sample_data(root: Path, *, seed: int = DEFAULT_SEED) -> SampleData:
    """Write the sample files under ``root`` (replacing earlier ones); the same seed writes the same files."""
    rng = random.Random(seed)
    events = _market(rng, seed)
    sample = SampleData(root)
    sample.labelled_csv.parent.mkdir(parents=True, exist_ok=True)
    _write_database(sample.database, events)
    _write_csv(sample.labelled_csv, events)
    first_format, v2, test = _instruction_events(rng, events)
    _write_jsonl(sample.instructions, _first_format_lines(rng, first_format))
    _write_jsonl(sample.instructions_v2, [_v2_line(i, event) for i, event in enumerate(v2)])
    _write_jsonl(sample.instructions_test, [_news_line(event) for event in test])
    _write_jsonl(sample.chat, _chat_lines(random.Random(seed + 1), events))
    return sample


# ------------------------------------------------------------------------------------------------- the market
@dataclass(frozen=True)
class _Draft:
    minute: int  # after START_UTC
    text: str
    release: Release | None
    direction: int


def _market(rng: random.Random, seed: int) -> list[Event]:
    """Every event, oldest first, priced along one XAUUSD random walk; twins follow their original."""
    drafts = sorted(_drafts(rng, seed), key=lambda draft: draft.minute)
    events, price = [], 3300.0
    for draft in drafts:
        price = round(price * (1 + rng.gauss(0, 0.002)), 2)
        events.append(_event(rng, draft, price))
    return _with_twins(rng, events)


def _drafts(rng: random.Random, seed: int) -> list[_Draft]:
    """Headlines and data flashes at distinct minutes, releases on distinct quarter hours; every text new."""
    minutes = DAYS * 24 * 60
    release_slots = rng.sample(range(0, minutes, 15), RELEASES)
    flash_slots = rng.sample([m for m in range(minutes) if m % 15], HEADLINES + DATA_FLASHES)
    seen: set[str] = set()
    headlines = list(islice(_headlines(seed, seen), HEADLINES))
    drafts = [_Draft(m, text, None, d) for m, (text, d) in zip(flash_slots, headlines, strict=False)]
    for minute in flash_slots[HEADLINES:]:  # Jin10 posts a release's figures as a flash of its own too
        release = _release(rng, minute, seen)
        drafts.append(_Draft(minute, _figures_line(release), None, release.direction))
    for minute in release_slots:
        release = _release(rng, minute, seen)
        drafts.append(_Draft(minute, release.name, release, release.direction))
    return drafts


def _headlines(seed: int, seen: set[str]) -> Iterator[tuple[str, int]]:
    """The built-in generator's flash headlines, each once, with the way its rule label moves gold."""
    for example in generate(HEADLINES * 6, seed=seed):
        if example.input not in seen and example.label is not None:
            seen.add(example.input)
            yield example.input, DIRECTIONS[example.label]


def _release(rng: random.Random, minute: int, seen: set[str]) -> Release:
    """A calendar release published ``minute`` after the start, with figures no other event has."""
    local = START_UTC + timedelta(minutes=minute) + LOCAL_OFFSET
    while True:
        country, template, star, usual, spread, unit, weekly, sign = rng.choice(INDICATORS)
        covered = local - timedelta(days=rng.randint(2, 6)) if weekly else local.replace(day=1) - timedelta(days=1)
        period = f"{covered.month}月{covered.day}日" if weekly else f"{covered.month}月"
        previous = usual + rng.gauss(0, spread)
        consensus = previous + rng.gauss(0, spread / 3)
        actual = consensus + rng.gauss(0, spread / 2)
        surprise = (actual - consensus) / spread  # a beat moves gold by the indicator's sign; a near miss, not at all
        direction = 0 if abs(surprise) < 0.25 else sign if surprise > 0 else -sign
        shown = [f"{value:.1f}{unit}" for value in (previous, consensus, actual)]
        figures = (shown[0], None if rng.random() < 0.1 else shown[1], shown[2])
        release = Release(country, template.format(period=period), star, figures, direction)
        if _figures_line(release) not in seen:
            seen.add(_figures_line(release))
            return release


def _figures_line(release: Release) -> str:
    """``美国8月未季调CPI年率 前值:2.7% 预期:2.8% 公布:2.9%``: the release as the user's inputs read."""
    return render_input(release.name, dict(zip(("previous", "consensus", "actual"), release.figures, strict=True)))


def _event(rng: random.Random, draft: _Draft, price: float) -> Event:
    """The event of a draft at ``price``: its return follows its direction, plus noise."""
    ts_utc = START_UTC + timedelta(minutes=draft.minute)
    first = draft.direction * abs(rng.gauss(0.0006, 0.0003)) + rng.gauss(0, 0.0003)
    returns = (first, first + rng.gauss(0, 0.0003))  # WINDOWS: 15 and 30 minutes
    if draft.release is None:
        event_id, hot = _flash_id(ts_utc, rng.randrange(999)), rng.choice(("热", "爆", "沸"))
    else:
        event_id, hot = f"calendar:{rng.getrandbits(128):032x}", None
    return Event(
        event_id=event_id,
        ts_utc=ts_utc,
        text=draft.text,
        release=draft.release,
        hot=hot,
        price=price,
        futures=tuple(round(price * (1 + r), 2) for r in returns),
        pre_ret=max(-0.01, min(0.01, rng.gauss(0, 0.0015))),
        range_ratio=0.0002 + abs(rng.gauss(0.0008, 0.0005)),
    )


def _flash_id(ts_utc: datetime, millisecond: int) -> str:
    return f"flash:{ts_utc + LOCAL_OFFSET:%Y%m%d%H%M%S}{millisecond:03d}800"


def _with_twins(rng: random.Random, events: list[Event]) -> list[Event]:
    """DUPLICATES flash items of the first third posted twice at one instant: the same text and prices."""
    early = [i for i, event in enumerate(events[: len(events) // 3]) if event.release is None]
    twice = set(rng.sample(early, DUPLICATES))
    out = []
    for i, event in enumerate(events):
        out.append(event)
        if i in twice:
            out.append(replace(event, event_id=_flash_id(event.ts_utc, 999)))
    return out


# ------------------------------------------------------------------------------------------- database and CSV
def _stamp(moment: datetime) -> str:
    return f"{moment:%Y-%m-%d %H:%M:%S}"


def _write_database(path: Path, events: list[Event]) -> None:
    path.unlink(missing_ok=True)
    with closing(sqlite3.connect(path)) as conn, conn:
        conn.executescript(SCHEMA)
        conn.executemany(f"INSERT INTO events VALUES ({', '.join('?' * 17)})", [_event_row(e) for e in events])
        impacts = [row for event in events for row in _impact_rows(event)]
        conn.executemany(f"INSERT INTO event_impacts VALUES ({', '.join('?' * 9)})", impacts)


def _event_row(event: Event) -> tuple[object, ...]:
    """The ``events`` columns in order: flash items carry content, importance and heat; releases the rest."""
    times = (event.event_id, event.source, _stamp(event.ts_utc + LOCAL_OFFSET), _stamp(event.ts_utc))
    release = event.release
    if release is None:
        return (*times, None, None, event.text, None, None, None, None, None, None, 1, event.hot, None, None)
    described = (release.country, release.name, None, float(release.star), *release.figures)
    return (*times, *described, None, None, None, None, None, None)


def _impact_rows(event: Event) -> Iterator[tuple[object, ...]]:
    for window, future in zip(WINDOWS, event.futures, strict=True):
        later = _stamp(event.ts_utc + timedelta(minutes=window))
        delta = future - event.price
        yield (
            event.event_id,
            TICKER,
            window,
            event.price,
            future,
            delta,
            event.ret(window),
            _stamp(event.ts_utc),
            later,
        )


def _write_csv(path: Path, events: list[Event]) -> None:
    with path.open("w", encoding="utf-8", newline="") as out:
        writer = csv.DictWriter(out, CSV_COLUMNS, lineterminator="\n")
        writer.writeheader()
        writer.writerows(_csv_row(event) for event in events)


def _csv_row(event: Event) -> dict[str, object]:
    """One row as the user's export has it; ``text`` is what a model reads (a release with its figures)."""
    release, future = event.release, event.futures[0]
    previous, consensus, actual = release.figures if release else (None, None, None)
    return {
        "event_id": event.event_id,
        "event_ts_local": _stamp(event.ts_utc + LOCAL_OFFSET),
        "event_ts_utc": _stamp(event.ts_utc),
        "source": event.source,
        "country": release.country if release else "",
        "name": release.name if release else "",
        "content": "" if release else event.text,
        "text": event.model_input,
        "star": float(release.star) if release else "",
        "previous": previous or "",
        "consensus": consensus or "",
        "actual": actual or "",
        "indicator_name": "",
        "unit": "",
        "important": "" if release else 1.0,
        "hot": event.hot or "",
        "price_event": event.price,
        "price_event_ts_utc": _stamp(event.ts_utc),
        "price_future": future,
        "price_future_ts_utc": _stamp(event.ts_utc + timedelta(minutes=WINDOWS[0])),
        "delta": future - event.price,
        "delta_event_sec": 0.0,
        "delta_future_sec": 0.0,
        "ret_post": event.ret(),
        "pre_ret": event.pre_ret,
        "range_ratio": event.range_ratio,
        "label": LABEL_IDS[event.label],
    }


# ------------------------------------------------------------------------------------------ instruction files
ADVICE = "建议投资者关注后续市场反应，结合技术面和基本面综合判断。"  # the user's file gives this advice to every label
VERDICTS: dict[Label, str] = {"bullish": "看涨（Bullish）", "bearish": "看跌（Bearish）", "neutral": "中性（Neutral）"}
REPORT_INSTRUCTION = "根据财报数据回答问题"
# Unlabelled questions: the user's file repeats a handful of them many times over.
MARKET_QUESTIONS: list[tuple[str, str, str]] = [
    (
        "解释什么是预期兑现",
        "市场前期已经大涨，利好消息发布后反而下跌，这是为什么？",
        "这是典型的'预期兑现'现象。市场提前消化了利好预期，消息正式发布反而成为获利盘离场的信号。",
    ),
    (
        "分析黄金与美元的关系",
        "美元指数走强时黄金通常如何表现？",
        "黄金以美元计价，美元走强时金价通常承压；但避险情绪升温时，两者也可能同涨。",
    ),
    (
        "解释实际利率对黄金的影响",
        "为什么实际利率上升会压制金价？",
        "黄金不产生利息，实际利率上升意味着持有黄金的机会成本增加，资金流向有息资产，金价通常承压。",
    ),
    (
        "分析地缘政治对黄金的影响",
        "地缘冲突升级时金价为何上涨？",
        "冲突升级推高不确定性，资金转向黄金等避险资产；冲突缓和后避险溢价往往回吐。",
    ),
]
REPORT_QUESTIONS: list[tuple[str, str]] = [
    ("中国黄金需求情况如何？", "中国是全球最大的黄金消费国之一，首饰消费占比最大，投资需求保持稳定增长。"),
    (
        "美联储加息对黄金价格有什么影响？",
        "短期内加息提振美元，对金价形成压力；若加息导致经济放缓，避险需求又会支撑金价。",
    ),
    ("央行购金对金价有何支撑？", "全球央行持续增持黄金储备，为金价提供了长期而稳定的需求。"),
    ("黄金ETF持仓变化说明了什么？", "ETF持仓增加通常反映机构投资者看好黄金，持仓流出则说明配置需求降温。"),
]


def _instruction_events(rng: random.Random, events: list[Event]) -> tuple[list[Event], list[Event], list[Event]]:
    """Distinct events for the first format (60), the second (80) and the user's smoke test (10)."""
    distinct = list({event.model_input: event for event in events}.values())
    picked = rng.sample(distinct, 150)
    return picked[:60], picked[60:140], picked[140:]


def _first_format_lines(rng: random.Random, events: list[Event]) -> list[dict[str, str]]:
    """News answers (eight of them twice) and the market and report questions, repeated 20 times each."""
    news = [_news_line(event) for event in events]
    market = [_line(*rng.choice(MARKET_QUESTIONS)) for _ in range(20)]
    reports = [_line(REPORT_INSTRUCTION, *rng.choice(REPORT_QUESTIONS)) for _ in range(20)]
    lines = news + rng.sample(news, 8) + market + reports
    rng.shuffle(lines)
    return lines


def _news_line(event: Event) -> dict[str, str]:
    """The user's first format: ``这是一条4.0星级的财经快讯，属于利好消息。…``."""
    star = float(event.release.star) if event.release else 3.0
    label = event.label
    return _line(
        DEFAULT_INSTRUCTION,
        event.model_input,
        f"这是一条{star}星级的财经快讯，属于{LABEL_WORDS[label]}消息。"
        f"从市场反应来看，该消息发布后市场出现{REACTION_WORDS[label]}走势。{ADVICE}",
    )


def _line(instruction: str, text: str, output: str) -> dict[str, str]:
    return {"instruction": instruction, "input": text, "output": output}


def _v2_line(index: int, event: Event) -> dict[str, str]:
    """The user's second format: one of its instruction types, by turns (releases have two of their own)."""
    kinds = (_sentiment, _windows, _risk, _priced_in, _json_news) if event.release is None else (_reading, _json_data)
    return kinds[index % len(kinds)](event)


CHAT_LINES = 60


def _chat_lines(rng: random.Random, events: list[Event]) -> list[dict[str, object]]:
    """Chat JSONL (see the module): distinct news, each with the fields the feed knows about it."""
    distinct = list({event.model_input: event for event in events}.values())
    lines: list[dict[str, object]] = []
    for index, event in enumerate(rng.sample(distinct, CHAT_LINES)):
        star = event.release.star if event.release else 3
        user = render_input(event.text, _chat_fields(event))
        content: object = [{"type": "text", "text": user}] if index % 5 == 4 else user
        messages = [
            {"role": "system", "content": DEFAULT_INSTRUCTION},
            {"role": "user", "content": content},
            {"role": "assistant", "content": render_response(event.label, star)},
        ]
        lines.append({"messages": messages})
    return lines


def _chat_fields(event: Event) -> dict[str, object]:
    """A release's country, star and figures; for every event the market before it."""
    fields: dict[str, object] = {"pre_ret": round(event.pre_ret, 6), "volatility": round(event.range_ratio, 6)}
    fields["trend"] = "up" if event.pre_ret > 0.0005 else "down" if event.pre_ret < -0.0005 else "flat"
    if event.release is not None:
        previous, consensus, actual = event.release.figures
        fields.update(country=event.release.country, star=event.release.star, previous=previous)
        fields.update(consensus=consensus, actual=actual)
    return fields


def _move(ret: float) -> str:
    return "几乎没有变化" if abs(ret) < 0.00005 else f"{'上涨' if ret > 0 else '下跌'}{abs(ret):.2%}"


def _agree(event: Event) -> bool:
    return (event.ret(15) > 0) == (event.ret(30) > 0)


def _sentiment(event: Event) -> dict[str, str]:
    tail = "多个时间窗口的反应方向一致，表明市场对该消息的解读较为明确。" if _agree(event) else "不同窗口方向不一致。"
    return _line(
        "分析以下财经快讯对黄金市场的影响，给出看涨/看跌/中性的判断并说明理由",
        event.model_input,
        f"综合判断：{VERDICTS[event.label]}。该消息发布后15分钟内，{TICKER}{_move(event.ret())}。{tail}",
    )


def _windows(event: Event) -> dict[str, str]:
    moves = "\n".join(f"- {window}分钟窗口：{_move(event.ret(window))}" for window in WINDOWS)
    growing = _agree(event) and abs(event.ret(30)) > abs(event.ret(15))
    comment = "市场反应呈持续强化态势，定价尚未完成。" if growing else "市场反应随时间减弱或反转，冲击已被逐步消化。"
    return _line(
        "分析以下财经新闻在不同时间窗口的市场影响差异",
        event.model_input,
        f"不同时间窗口的市场反应如下：\n{moves}\n\n{comment}",
    )


def _risk(event: Event) -> dict[str, str]:
    calm = event.range_ratio < 0.001
    reaction = "相对平淡" if calm else "较为剧烈"
    advice = "该消息的短期影响有限，建议轻仓观望。" if calm else "短线波动加大，建议控制仓位并设置止损。"
    return _line(
        "评估以下消息的市场风险等级，并给出交易建议",
        event.model_input,
        f"综合判断：{VERDICTS[event.label]}。市场反应{reaction}（综合波动率{event.range_ratio:.2%}），{advice}",
    )


def _priced_in(event: Event) -> dict[str, str]:
    before = f"{'上涨' if event.pre_ret > 0 else '下跌'}{abs(event.pre_ret):.2%}"
    turned = (event.pre_ret > 0) != (event.ret() > 0)
    verdict = '这是典型的"预期兑现"（Priced-In）现象。' if turned else "前后方向一致，不属于预期兑现。"
    return _line(
        '判断以下市场走势是否存在"预期兑现"现象，并分析原因',
        f"{event.model_input}\n（市场背景：消息公布前价格已{before}）",
        f"从市场走势来看，消息公布前市场已{before}，消息公布后市场{_move(event.ret())}。{verdict}",
    )


def _json_news(event: Event) -> dict[str, str]:
    fields = {
        "sentiment": VERDICTS[event.label],
        "market_reaction": f"{TICKER} {_move(event.ret())}",
        "impact_duration": "短期",
        "confidence": "高" if _agree(event) else "中",
    }
    return _line(
        "请从以下财经新闻中提取关键信息，以JSON格式输出，包含字段：sentiment（情感）、market_reaction（市场反应）、"
        "impact_duration（影响周期）、confidence（判断置信度）",
        event.model_input,
        _json_block(fields),
    )


def _reading(event: Event) -> dict[str, str]:
    assert event.release is not None
    previous, _, actual = event.release.figures
    compared = _compare(actual, previous, ("高于", "低于", "持平于"))
    trend = _compare(actual, previous, ("走强", "走弱", "持平"))
    return _line(
        "解读以下经济数据的含义及其对黄金市场的影响",
        event.model_input,
        f"该数据来自{event.release.country}。实际公布值{actual}{compared}前值{previous}，显示该指标有所{trend}。"
        f"数据公布后，黄金市场{_move(event.ret())}。",
    )


def _json_data(event: Event) -> dict[str, str]:
    assert event.release is not None
    previous, consensus, actual = event.release.figures
    fields = {
        "country": event.release.country,
        "actual": actual,
        "previous": previous,
        "consensus": consensus or "",
        "surprise": _compare(actual, consensus, ("高于预期", "低于预期", "符合预期")) if consensus else "无预期",
        "direction": _compare(actual, previous, ("上升", "下降", "持平")),
    }
    return _line(
        "请提取以下经济数据公告中的关键指标，以JSON格式输出，包含字段：country、actual、previous、consensus、"
        "surprise、direction",
        event.model_input,
        _json_block(fields),
    )


def _compare(value: str | None, other: str | None, words: tuple[str, str, str]) -> str:
    """``words[0]`` when ``value`` is the larger figure, ``words[1]`` when the smaller, ``words[2]`` when equal."""
    a, b = (float(str(v).rstrip("%")) for v in (value, other))
    return words[0] if a > b else words[1] if a < b else words[2]


def _json_block(fields: Mapping[str, str | None]) -> str:
    return f"```json\n{json.dumps(fields, ensure_ascii=False, indent=2)}\n```"


def _write_jsonl(path: Path, lines: list[dict[str, str]] | list[dict[str, object]]) -> None:
    path.write_text("".join(json.dumps(line, ensure_ascii=False) + "\n" for line in lines), encoding="utf-8")

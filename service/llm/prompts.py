"""The prompt and response format shared by training, evaluation and /analyze.

Training renders every example with :func:`render_prompt` and appends the response; inference renders the
same prompt and scores the same response prefixes. Keeping both sides in this one module is what makes the
label probabilities of /analyze mean what the adapter learned.

The standard response format is the user's first style::

    这是一条{star}星级的财经快讯，属于{利好|利空|中性}消息。从市场反应来看，该消息发布后市场出现{上涨|下跌|震荡}走势。建议投资者…

Labels are also recognised in the user's second style (``看涨（Bullish）`` …) and in English.

The input of a news item is its text and, optionally, metadata (star, country, calendar figures) and market
context (return before the event, volatility, trend), all rendered by :func:`render_input`. The dataset importers
build training inputs with it and /analyze builds serving inputs with it, so an adapter sees at serving time
exactly the layout it was trained on; :func:`input_fields_used` reads back which fields a set of inputs carries.
"""

from __future__ import annotations

import math
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field, replace
from typing import Any, Literal

Label = Literal["bearish", "neutral", "bullish"]
LABELS: tuple[Label, ...] = ("bearish", "neutral", "bullish")  # the agent's order: -1, 0, 1
LABEL_IDS: dict[Label, int] = {"bearish": -1, "neutral": 0, "bullish": 1}

DEFAULT_INSTRUCTION = "分析以下财经快讯对市场的影响"

# Standard style: words at the fixed label place, and the market reaction that follows.
LABEL_WORDS: dict[Label, str] = {"bullish": "利好", "bearish": "利空", "neutral": "中性"}
REACTION_WORDS: dict[Label, str] = {"bullish": "上涨", "bearish": "下跌", "neutral": "震荡"}
STARS: tuple[int, ...] = (1, 2, 3, 4, 5)

STAR_PREFIX = "这是一条"
LABEL_PREFIX_TEMPLATE = "这是一条{star}星级的财经快讯，属于"
REACTION_PREFIX_TEMPLATE = "这是一条{star}星级的财经快讯，属于{label}消息。从市场反应来看，该消息发布后市场出现"
# Everything /analyze scores, as the response states it; the analysis text continues from here.
RESPONSE_PREFIX_TEMPLATE = REACTION_PREFIX_TEMPLATE + "{reaction}走势。"
ADVICE = {
    "bullish": "建议投资者关注做多机会，同时注意控制仓位。",
    "bearish": "建议投资者注意下行风险，谨慎追高。",
    "neutral": "建议投资者关注后续市场反应，结合技术面和基本面综合判断。",
}

# Recognisers for every style users bring; the first match in the text wins.
_LABEL_PATTERNS: list[tuple[re.Pattern[str], dict[str, Label]]] = [
    (re.compile(r"属于(利好|利空|中性)"), {"利好": "bullish", "利空": "bearish", "中性": "neutral"}),
    (
        re.compile(r"(看涨|看跌|中性)（(?:Bullish|Bearish|Neutral)）"),
        {"看涨": "bullish", "看跌": "bearish", "中性": "neutral"},
    ),
    (
        re.compile(r"\b(bullish|bearish|neutral)\b", re.IGNORECASE),
        {"bullish": "bullish", "bearish": "bearish", "neutral": "neutral"},
    ),
]


# ------------------------------------------------------------------------------------------ news item inputs
# Optional fields of a news item as (name, word shown to the model), in the order they are rendered. The figures
# follow the text on its line, as the user's calendar items read (``美国初请失业金人数 前值:23.6 预期:22.5 公布:22.4``);
# the other metadata and the market context each get a line of their own.
FIGURE_FIELDS = (("previous", "前值"), ("consensus", "预期"), ("actual", "公布"))
INFO_FIELDS = (("country", "国家"), ("star", "星级"))
CONTEXT_FIELDS = (("pre_ret", "事前涨跌"), ("volatility", "波动率"), ("trend", "趋势"))
METADATA_FIELDS: tuple[str, ...] = ("star", "country", "previous", "consensus", "actual")
MARKET_CONTEXT_FIELDS: tuple[str, ...] = ("pre_ret", "volatility", "trend")
INPUT_FIELDS: tuple[str, ...] = tuple(name for name, _ in FIGURE_FIELDS + INFO_FIELDS + CONTEXT_FIELDS)
TRENDS: dict[str, str] = {"up": "上涨", "down": "下跌", "flat": "震荡"}
TREND_ALIASES: dict[str, str] = {**{t: t for t in TRENDS}, **{w: t for t, w in TRENDS.items()}}
# Accepted ranges (fractions, not percent): the API validates with these, the importers reject rows outside them.
PRE_RET_RANGE = (-1.0, 1.0)
VOLATILITY_RANGE = (0.0, 1.0)
MAX_FIELD_CHARS = 64
_WORDS = dict(FIGURE_FIELDS + INFO_FIELDS + CONTEXT_FIELDS)
_MARKERS = {name: re.compile(rf"(?:^|[ \n]){word}:(?=\S)") for name, word in _WORDS.items()}


def _number(value: Any) -> float:
    """A number from a JSON value or a table cell; NaN when it is none (bools are not numbers)."""
    if isinstance(value, bool):
        return math.nan
    try:
        return float(value)
    except (TypeError, ValueError, OverflowError):
        return math.nan


def normalise_field(name: str, value: Any) -> str | None:
    """How one field's value is shown to the model; None for a missing value; ValueError for a bad one."""
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if name in ("pre_ret", "volatility"):
        low, high = PRE_RET_RANGE if name == "pre_ret" else VOLATILITY_RANGE
        number = _number(value)
        if not math.isfinite(number) or not low <= number <= high:
            raise ValueError(f"{name} must be a number from {low} to {high} (a fraction: 0.004 is 0.4%), got {value!r}")
        return f"{number * 100:+.3f}%" if name == "pre_ret" else f"{number * 100:.3f}%"
    if name == "trend":
        trend = TREND_ALIASES.get(str(value).strip().lower())
        if trend is None:
            raise ValueError(f"trend must be one of {', '.join(TRENDS)}, got {value!r}")
        return TRENDS[trend]
    if name == "star":
        star = _number(value)
        if not math.isfinite(star) or not star.is_integer() or not 1 <= star <= 5:
            raise ValueError(f"star must be an integer from 1 to 5, got {value!r}")
        return str(int(star))
    if name not in _WORDS:
        raise ValueError(f"unknown field {name!r} (known: {', '.join(INPUT_FIELDS)})")
    text = str(value).strip()
    if len(text) > MAX_FIELD_CHARS or any(ord(c) < 32 or c == "\x7f" for c in text):
        raise ValueError(f"{name} must be at most {MAX_FIELD_CHARS} characters on one line")
    return text


def render_input(text: str, fields: Mapping[str, Any] | None = None) -> str:
    """The model input of a news item: its text, then whichever optional fields have a value.

    ``fields`` maps names of :data:`INPUT_FIELDS` to raw values (missing, None and empty are left out).
    """
    shown = {name: normalise_field(name, value) for name, value in (fields or {}).items()}
    line = " ".join([text.strip(), *(f"{word}:{shown[name]}" for name, word in FIGURE_FIELDS if shown.get(name))])
    lines = [line]
    for group in (INFO_FIELDS, CONTEXT_FIELDS):
        parts = [f"{word}:{shown[name]}" for name, word in group if shown.get(name)]
        if parts:
            lines.append(" ".join(parts))
    return "\n".join(lines)


def input_fields_used(inputs: Iterable[str]) -> list[str]:
    """The optional fields that appear, in :func:`render_input`'s layout, in any of ``inputs`` (canonical order).

    This is what an adapter trained on these inputs has seen; /analyze passes it only these fields.
    """
    found: set[str] = set()
    for text in inputs:
        found.update(name for name, marker in _MARKERS.items() if name not in found and marker.search(text))
        if len(found) == len(INPUT_FIELDS):
            break
    return [name for name in INPUT_FIELDS if name in found]


@dataclass(frozen=True)
class NewsItem:
    """A news text with optional fields, rendered by :func:`render_input` once the text is clipped to fit."""

    text: str
    fields: Mapping[str, Any] = field(default_factory=dict)
    prompt_format: str = "flashtune"  # how its prompt is written (PROMPT_FORMATS): its adapter's training format

    def render(self, text: str | None = None) -> str:
        return render_input(self.text if text is None else text, self.fields)


@dataclass(frozen=True)
class Example:
    """One training example in the internal form every dataset format is converted to."""

    instruction: str
    input: str
    output: str

    @property
    def label(self) -> Label | None:
        return parse_label(self.output)


# How a prompt is written: "flashtune" (the user's ``### 指令:`` layout, the default) or "chat_template" (the same
# instruction and input as a system and a user message through the tokenizer's chat template, for chat models).
# A job's ``prompt_format`` hyperparameter picks it; training_info.json records it, and serving reads it from there.
PROMPT_FORMATS = ("flashtune", "chat_template")


def render_prompt(
    text: str, instruction: str = DEFAULT_INSTRUCTION, prompt_format: str = "flashtune", tokenizer: Any = None
) -> str:
    """The prompt the model sees; the response follows it directly (``chat_template``: :func:`render_chat_prompt`
    with ``tokenizer``)."""
    if prompt_format == "chat_template":
        return render_chat_prompt(tokenizer, text, instruction)
    instruction = instruction.strip()
    text = text.strip()
    if text:
        return f"### 指令:\n{instruction}\n\n### 输入:\n{text}\n\n### 回答:\n"
    return f"### 指令:\n{instruction}\n\n### 回答:\n"


def render_chat_prompt(tokenizer: Any, text: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The instruction as the system message and the input as the user's, rendered by the tokenizer's chat template
    up to the assistant's turn (the response follows it directly). A template that takes no system message gets
    the instruction at the top of the user's. The begin-of-sequence token the template writes is left out where
    the tokenizer adds it itself, as every tokenisation of a prompt does (training and serving alike)."""
    if getattr(tokenizer, "chat_template", None) is None:
        raise ValueError("prompt_format 'chat_template' needs a tokenizer with a chat template")
    instruction, text = instruction.strip(), text.strip()
    try:
        messages = [{"role": "system", "content": instruction}, {"role": "user", "content": text or instruction}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - jinja's TemplateError and others: this template has no system role
        user = f"{instruction}\n\n{text}" if text else instruction
        messages = [{"role": "user", "content": user}]
        rendered = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    bos = getattr(tokenizer, "bos_token", None)
    if bos and rendered.startswith(bos) and tokenizer("x")["input_ids"][:1] == [tokenizer.bos_token_id]:
        rendered = rendered[len(bos) :]
    return str(rendered)


def prompt_format_of(training_info: Mapping[str, Any]) -> str:
    """The prompt format an adapter was trained with, from its training_info.json (before the record: flashtune)."""
    fmt = (training_info.get("hyperparameters") or {}).get("prompt_format")
    return fmt if fmt in PROMPT_FORMATS else "flashtune"


def in_format(text: str | NewsItem, prompt_format: str) -> str | NewsItem:
    """``text`` to be prompted in ``prompt_format``: a :class:`NewsItem` that says so, unless it is the default (a plain
    text is prompted in the default format). Every path that prompts an adapter (/analyze, the chat completions, the
    job's evaluation and a promotion's incumbent) passes its texts through here with that adapter's format
    (:func:`prompt_format_of`), and the prompt builder (``service.llm.scoring.build_prompts``) renders them."""
    if prompt_format == "flashtune":
        return text
    if isinstance(text, NewsItem):
        return replace(text, prompt_format=prompt_format)
    return NewsItem(text, prompt_format=prompt_format)


def render_response_prefix(label: Label, star: int, reaction: str) -> str:
    """The start of the standard response: importance (1-5 stars), label and market reaction (a word of
    :data:`REACTION_WORDS`), up to where the advice begins. /analyze generates its analysis as the continuation of
    this prefix filled with what it scored, so the text states exactly the scored label, stars and reaction."""
    if reaction not in REACTION_WORDS.values():
        raise ValueError(f"reaction must be one of {', '.join(REACTION_WORDS.values())}, got {reaction!r}")
    return RESPONSE_PREFIX_TEMPLATE.format(star=star, label=LABEL_WORDS[label], reaction=reaction)


def render_response(label: Label, star: int) -> str:
    """The standard response for a label and an importance (1-5 stars)."""
    return render_response_prefix(label, star, REACTION_WORDS[label]) + ADVICE[label]


def parse_label(response: str) -> Label | None:
    """The label a response states, in any of the recognised styles, or None."""
    for pattern, mapping in _LABEL_PATTERNS:
        match = pattern.search(response)
        if match:
            return mapping[match.group(1).lower() if match.group(1).isascii() else match.group(1)]
    return None


@dataclass(frozen=True)
class Stated:
    """What a response text states, each None where it does not say."""

    label: Label | None
    star: int | None
    reaction: str | None  # a word of REACTION_WORDS


_STAR_PATTERN = re.compile(r"这是一条([1-5])星级")
_REACTION_PATTERN = re.compile(r"出现(上涨|下跌|震荡)走势")


def parse_response(response: str) -> Stated:
    """The label (any recognised style), importance and market reaction a response text states."""
    star, reaction = _STAR_PATTERN.search(response), _REACTION_PATTERN.search(response)
    return Stated(parse_label(response), int(star.group(1)) if star else None, reaction.group(1) if reaction else None)


def is_valid_response(response: str) -> bool:
    """Whether a generated answer is in the standard format (label and reaction at their places)."""
    return bool(re.search(r"属于(利好|利空|中性)消息.*出现(上涨|下跌|震荡)走势", response, re.S))


def normalise_label(value: object) -> Label | None:
    """A label from a CSV/database cell: -1/0/1 or bearish/neutral/bullish (any case), else None."""
    text = str(value).strip().lower()
    table: dict[str, Label] = {
        "-1": "bearish",
        "-1.0": "bearish",
        "bearish": "bearish",
        "利空": "bearish",
        "看跌": "bearish",
        "0": "neutral",
        "0.0": "neutral",
        "neutral": "neutral",
        "中性": "neutral",
        "1": "bullish",
        "1.0": "bullish",
        "bullish": "bullish",
        "利好": "bullish",
        "看涨": "bullish",
    }
    return table.get(text)

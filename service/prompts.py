"""The prompt and response format shared by training, evaluation and /analyze.

Training renders every example with :func:`render_prompt` and appends the response; inference renders the
same prompt and scores the same response prefixes. Keeping both sides in this one module is what makes the
label probabilities of /analyze mean what the adapter learned.

The standard response format is the user's first style::

    这是一条{star}星级的财经快讯，属于{利好|利空|中性}消息。从市场反应来看，该消息发布后市场出现{上涨|下跌|震荡}走势。建议投资者…

Labels are also recognised in the user's second style (``看涨（Bullish）`` …) and in English.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

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
_STAR_PATTERN = re.compile(r"这是一条(\d)(?:\.\d)?星级")


@dataclass(frozen=True)
class Example:
    """One training example in the internal form every dataset format is converted to."""

    instruction: str
    input: str
    output: str

    @property
    def label(self) -> Label | None:
        return parse_label(self.output)


def render_prompt(text: str, instruction: str = DEFAULT_INSTRUCTION) -> str:
    """The prompt the model sees; the response follows it directly."""
    instruction = instruction.strip()
    text = text.strip()
    if text:
        return f"### 指令:\n{instruction}\n\n### 输入:\n{text}\n\n### 回答:\n"
    return f"### 指令:\n{instruction}\n\n### 回答:\n"


def render_response(label: Label, star: int) -> str:
    """The standard response for a label and an importance (1-5 stars)."""
    return (
        f"这是一条{star}星级的财经快讯，属于{LABEL_WORDS[label]}消息。"
        f"从市场反应来看，该消息发布后市场出现{REACTION_WORDS[label]}走势。{ADVICE[label]}"
    )


def parse_label(response: str) -> Label | None:
    """The label a response states, in any of the recognised styles, or None."""
    for pattern, mapping in _LABEL_PATTERNS:
        match = pattern.search(response)
        if match:
            return mapping[match.group(1).lower() if match.group(1).isascii() else match.group(1)]
    return None


def parse_star(response: str) -> int | None:
    match = _STAR_PATTERN.search(response)
    return int(match.group(1)) if match else None


def is_valid_response(response: str) -> bool:
    """Whether a generated answer is in the standard format (label and reaction at their places)."""
    return bool(re.search(r"属于(利好|利空|中性)消息.*出现(上涨|下跌|震荡)走势", response, re.S))


def normalise_label(value: object) -> Label | None:
    """A label from a CSV/database cell: -1/0/1 or bearish/neutral/bullish (any case), else None."""
    text = str(value).strip().lower()
    table: dict[str, Label] = {
        "-1": "bearish", "-1.0": "bearish", "bearish": "bearish", "利空": "bearish", "看跌": "bearish",
        "0": "neutral", "0.0": "neutral", "neutral": "neutral", "中性": "neutral",
        "1": "bullish", "1.0": "bullish", "bullish": "bullish", "利好": "bullish", "看涨": "bullish",
    }  # fmt: skip
    return table.get(text)

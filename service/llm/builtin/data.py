"""The built-in dataset: template flash news with rule-based labels a model can learn from the text.

The user's notebook fell back to 120 template instructions when the database was missing; this is the
project's own, larger version of that. The label follows from the event phrase (from the point of view of
gold, the user's market: easing and risk are bullish, tightening and strong growth bearish, routine news
neutral) and the importance from the institution, so a fine-tuned adapter can reach near-perfect accuracy on
the held-out split while a base model that never saw the rule cannot.
"""

from __future__ import annotations

import random
from typing import Literal

from service.llm.prompts import DEFAULT_INSTRUCTION, Example, Label, render_response

# (institution, importance in stars)
INSTITUTIONS: list[tuple[str, int]] = [
    ("美联储", 5),
    ("欧洲央行", 4),
    ("中国人民银行", 4),
    ("日本央行", 3),
    ("英国央行", 3),
    ("瑞士央行", 2),
    ("澳洲联储", 2),
    ("加拿大央行", 2),
    ("美国财政部", 4),
    ("国际货币基金组织", 3),
]

EVENTS: dict[Label, list[str]] = {
    "bullish": [
        "宣布降息{bp}个基点",
        "暗示将放缓缩表步伐",
        "表示将扩大资产购买规模",
        "警告经济衰退风险急剧上升",
        "宣布增持黄金储备{t}吨",
        "称避险需求大幅升温",
        "官员发表鸽派讲话",
        "承认通胀已大幅回落",
    ],
    "bearish": [
        "宣布加息{bp}个基点",
        "表示将继续收紧货币政策",
        "称就业市场强劲超出预期",
        "宣布加快缩减资产负债表",
        "官员发表鹰派讲话",
        "称美元走强趋势延续",
        "表示通胀压力仍然顽固",
        "宣布出售黄金储备{t}吨",
    ],
    "neutral": [
        "维持利率不变",
        "将于下周公布会议纪要",
        "发布例行季度报告",
        "官员出席年度论坛",
        "宣布人事调整",
        "召开例行新闻发布会",
        "更新官方网站数据目录",
        "表示将按计划评估政策",
    ],
}

PREFIXES = ["", "【快讯】", "金十数据讯，", "突发：", "据报道，"]


def _news(rng: random.Random, label: Label) -> tuple[str, int]:
    institution, star = rng.choice(INSTITUTIONS)
    event = rng.choice(EVENTS[label]).format(bp=rng.choice([25, 50, 75]), t=rng.randint(5, 60))
    return f"{rng.choice(PREFIXES)}{institution}{event}", star


def generate(count: int, seed: int, labels: Literal["rule", "random"] = "rule") -> list[Example]:
    """``count`` examples; ``labels="random"`` decorrelates the label from the text (for pretraining the base)."""
    rng = random.Random(seed)
    examples = []
    for i in range(count):
        label: Label = ("bearish", "neutral", "bullish")[i % 3]
        text, star = _news(rng, label)
        shown: Label = rng.choice(("bearish", "neutral", "bullish")) if labels == "random" else label
        examples.append(Example(DEFAULT_INSTRUCTION, text, render_response(shown, star)))
    rng.shuffle(examples)
    return examples


VALIDATION_ITEMS = 262  # every distinct example the 600 drawn hold beyond the 240 that train


def builtin_dataset() -> tuple[list[Example], list[Example]]:
    """The built-in (train, held-out) split: 240 and 262 distinct examples.

    The held-out split is the job's validation split: its evaluation, and the items its calibration temperature is
    fitted on (``service.llm.calibration``). It was 60 items until issue 24's measurements: with one or two mistakes
    among 60, the temperature fitted for the adapter trained with the defaults ranged from 0.38 to 0.74 (10th to 90th
    percentile over draws of 60 unseen items), and left the expected calibration error on unseen items above 0.03
    for one draw in five; fitted on 262 it ranges from 0.51 to 0.67 and stays at or below 0.03 for 199 draws in 200
    (``bench/calibration_split.py``, docs/benchmarks.md). The 240 training examples are the same as before, so the
    adapter is too.
    """
    seen: set[str] = set()
    unique = []
    for example in generate(600, seed=20240801):
        if example.input not in seen:
            seen.add(example.input)
            unique.append(example)
    return unique[:240], unique[240 : 240 + VALIDATION_ITEMS]

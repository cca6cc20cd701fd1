"""``prompt_format: "chat_template"``: the same instruction and input rendered through the tokenizer's chat template,
for training (token_cache), evaluation and serving (scoring.build_prompts, the engine's per-adapter format from
training_info.json); the default stays the user's format (service/llm/prompts.py)."""

from __future__ import annotations

import copy
from types import SimpleNamespace
from typing import Any

import pytest

from service.jobs.hyperparameters import Hyperparameters, resolve
from service.llm.builtin.model import builtin_tokenizer
from service.llm.prompts import NewsItem, prompt_format_of, render_chat_prompt, render_prompt
from service.llm.scoring import build_prompts
from service.serving.engine import in_format
from workers.training.token_cache import cache_key, tokenize_one

TEMPLATE = (
    "{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}\n{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
NO_SYSTEM = (
    "{% for m in messages %}{% if m['role'] == 'system' %}{{ raise_exception('no system role') }}{% endif %}"
    "[{{ m['role'] }}] {{ m['content'] }}\n{% endfor %}{% if add_generation_prompt %}[assistant] {% endif %}"
)
NEWS = "美联储宣布加息25个基点"


def chat_tokenizer(template: str = TEMPLATE) -> Any:
    tokenizer = copy.deepcopy(builtin_tokenizer())
    tokenizer.chat_template = template
    return tokenizer


def test_the_default_is_the_users_format() -> None:
    assert resolve(Hyperparameters(), "some/model").prompt_format == "flashtune"
    assert render_prompt(NEWS, "分析") == f"### 指令:\n分析\n\n### 输入:\n{NEWS}\n\n### 回答:\n"
    assert prompt_format_of({}) == "flashtune" and prompt_format_of({"hyperparameters": {"seed": 1}}) == "flashtune"


def test_chat_template_renders_system_and_user_messages() -> None:
    tokenizer = chat_tokenizer()
    prompt = render_prompt(NEWS, "分析以下财经快讯对市场的影响", "chat_template", tokenizer)
    assert prompt == f"<|system|>分析以下财经快讯对市场的影响\n<|user|>{NEWS}\n<|assistant|>"
    assert resolve(Hyperparameters(prompt_format="chat_template"), "m/x").prompt_format == "chat_template"
    assert prompt_format_of({"hyperparameters": {"prompt_format": "chat_template"}}) == "chat_template"


def test_a_template_without_a_system_role_gets_the_instruction_in_the_user_message() -> None:
    prompt = render_chat_prompt(chat_tokenizer(NO_SYSTEM), NEWS, "分析")
    assert prompt == f"[user] 分析\n\n{NEWS}\n[assistant] "


def test_no_chat_template_is_refused() -> None:
    with pytest.raises(ValueError, match="chat template"):
        render_chat_prompt(builtin_tokenizer(), NEWS, "分析")


def test_training_rows_train_the_response_only() -> None:
    from service.llm.prompts import Example

    tokenizer = chat_tokenizer()
    example = Example("分析", NEWS, "这是一条3星级的财经快讯，属于利空消息。")
    ids, labels = tokenize_one(example, tokenizer, "chat_template")
    prompt_ids = tokenizer(render_prompt(NEWS, "分析", "chat_template", tokenizer))["input_ids"]
    assert ids[: len(prompt_ids) - 1] == prompt_ids[:-1]
    assert labels[: len(prompt_ids) - 1] == [-100] * (len(prompt_ids) - 1)
    assert labels[-1] == tokenizer.eos_token_id
    assert cache_key([example], tokenizer, "chat_template") != cache_key([example], tokenizer)


def test_serving_prompts_an_adapter_in_its_format() -> None:
    tokenizer = chat_tokenizer()
    model = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=2048))
    item = in_format(NEWS, "chat_template")
    assert isinstance(item, NewsItem) and in_format(NEWS, "flashtune") == NEWS
    chat, plain = build_prompts(model, tokenizer, [item, NEWS], ["分析", "分析"])
    assert chat == render_prompt(NEWS, "分析", "chat_template", tokenizer)
    assert plain == render_prompt(NEWS, "分析")
    with_fields = in_format(NewsItem(NEWS, {"star": 4}), "chat_template")
    assert build_prompts(model, tokenizer, [with_fields], ["分析"])[0].endswith(f"{NEWS}\n星级:4\n<|assistant|>")

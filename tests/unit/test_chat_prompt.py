"""The chat completions' one prompt (service/serving/chat.py): every way of answering shows the model the same
clipped training prompt, keeps the system message, and counts ``prompt_tokens`` on what the model saw."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from service.core.errors import RequestError
from service.llm.prompts import DEFAULT_INSTRUCTION, render_prompt
from service.llm.scoring import RESPONSE_BUDGET, Prediction
from service.serving import chat
from service.serving.chat import ChatAnswer, ChatPrompt, chat_prompt, count_tokens
from service.serving.types import Analysis

CONTEXT = RESPONSE_BUDGET + 40  # the model's context: 40 tokens of news text fit


class CharTokenizer:
    """One token per character: enough for the prompt builder (encode, decode, a maximum length)."""

    model_max_length = 10_000

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


TOKENIZER = CharTokenizer()
MODEL = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=CONTEXT))
SYSTEM = "判断这条快讯对美元的影响"
LONG_NEWS = "美联储宣布加息25个基点。" * 20  # 260 characters: clipped to 40


class FakeServer:
    """The engine's two doors chat uses: the micro-batched analysis and a call on the model."""

    def __init__(self) -> None:
        self.submitted: list[tuple[Any, str]] = []

    def submit(self, text: Any, adapter: Any, max_new_tokens: int | None, instruction: str = "") -> Analysis:
        self.submitted.append((text, instruction))
        probs = {"bearish": 0.7, "neutral": 0.2, "bullish": 0.1}
        prediction = Prediction("bearish", probs, 4, "利空")
        return Analysis(prediction, "分析", None, "fake", 1.0, 1, False)

    def with_model(self, adapter: Any, fn: Any) -> Any:
        return fn(MODEL, TOKENIZER)


def _prompt() -> ChatPrompt:
    messages = [("system", SYSTEM), ("user", "an earlier question"), ("assistant", "an answer"), ("user", LONG_NEWS)]
    return chat_prompt(messages, max_chars=4000)


def test_the_system_message_is_the_instruction_and_the_last_user_message_the_input() -> None:
    prompt = _prompt()
    assert prompt == ChatPrompt(LONG_NEWS, SYSTEM)
    both = chat_prompt([("system", "a"), ("developer", "b"), ("user", " news ")], max_chars=100)
    assert both == ChatPrompt("news", "a\nb")
    assert chat_prompt([("user", "news")], max_chars=100).instruction == DEFAULT_INSTRUCTION


@pytest.mark.parametrize(
    "messages", [[("system", "only a system message")], [("user", "first"), ("user", "  ")], [("user", "x" * 101)]]
)
def test_a_conversation_without_a_usable_user_message_is_refused(messages: list[tuple[str, str]]) -> None:
    with pytest.raises(RequestError) as refused:
        chat_prompt(messages, max_chars=100)
    assert refused.value.status == 422 and refused.value.details == [{"field": "messages"}]


def test_the_rendered_prompt_is_clipped_to_the_context() -> None:
    rendered = _prompt().render(MODEL, TOKENIZER)
    assert rendered == render_prompt(LONG_NEWS[:40], SYSTEM)
    assert count_tokens(TOKENIZER, rendered) < count_tokens(TOKENIZER, render_prompt(LONG_NEWS, SYSTEM))


def _answers(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, ChatAnswer], list[str], FakeServer]:
    """The answer of every mode to the same prompt, and the prompts the model was shown."""
    shown: list[str] = []

    def logprobs(model: Any, tokenizer: Any, contexts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        shown.extend(contexts)
        return [[0.0, 1.0]]

    def generate_stream(
        model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, on_text: Any, stop: Any = None
    ) -> int:
        shown.append(prompt)
        on_text("利空")
        return 1

    async def streamed(server: Any, prompt: ChatPrompt) -> list[str | ChatAnswer]:
        return [piece async for piece in chat.stream(server, None, prompt, 8)]

    monkeypatch.setattr(chat, "continuation_logprobs", logprobs)
    monkeypatch.setattr(chat, "generate_stream", generate_stream)
    server, prompt = FakeServer(), _prompt()
    answers = {
        "choice": chat.answer(server, None, prompt, mode="choice", max_tokens=8, choices=["利好", "利空"]),
        "json": chat.answer(server, None, prompt, mode="json", max_tokens=8),
        "text": chat.answer(server, None, prompt, mode="text", max_tokens=8),
    }
    pieces = asyncio.run(streamed(server, prompt))
    assert pieces[:-1] == ["利空"] and isinstance(pieces[-1], ChatAnswer)
    answers["stream"] = pieces[-1]
    return answers, shown, server


def test_the_json_answer_keeps_the_system_message(monkeypatch: pytest.MonkeyPatch) -> None:
    answers, _, server = _answers(monkeypatch)
    assert server.submitted == [(LONG_NEWS, SYSTEM)]  # the engine builds its prompt from both, as render() does
    document = json.loads(answers["json"].content)
    assert document["label"] == "bearish" and document["analysis"] == "分析"


def test_every_mode_shows_and_counts_the_same_clipped_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    answers, shown, _ = _answers(monkeypatch)
    rendered = _prompt().render(MODEL, TOKENIZER)
    assert shown == [rendered] * 3  # guided choice, text, streamed text
    clipped = count_tokens(TOKENIZER, rendered)
    assert {mode: a.prompt_tokens for mode, a in answers.items()} == dict.fromkeys(answers, clipped)
    assert answers["choice"].content == "利空" and answers["text"].content == answers["stream"].content == "利空"
    assert answers["text"].finish_reason == "stop" and answers["choice"].completion_tokens == 2

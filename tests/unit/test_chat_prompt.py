"""The chat completions' one prompt and its limits (service/serving/chat.py), and what each request parameter does
(service/api/schemas/chat.py): every way of answering shows the model the same clipped training prompt, keeps the
system message and counts ``prompt_tokens`` on what the model saw; a guided choice of labels is /analyze's label;
the whole conversation is bounded in characters and tokens, naming the message at fault; a parameter is honoured or
refused by name."""

from __future__ import annotations

import asyncio
import json
from types import SimpleNamespace
from typing import Any

import pytest

from service.api.schemas.chat import ChatRequest
from service.core.config import Settings
from service.core.errors import RequestError
from service.llm.prompts import DEFAULT_INSTRUCTION, LABEL_PREFIX_TEMPLATE, render_prompt
from service.llm.scoring import RESPONSE_BUDGET, Prediction
from service.serving import chat
from service.serving.chat import ChatAnswer, ChatPrompt, Fitted, Options, Piece, chat_prompt, count_tokens, fit
from service.serving.types import Analysis

CONTEXT = RESPONSE_BUDGET + 40  # the model's context: 40 tokens of news text fit beside /analyze's response budget


class CharTokenizer:
    """One token per character: enough for the prompt builder (encode, decode, a maximum length)."""

    model_max_length = 10_000

    def __call__(self, text: str, add_special_tokens: bool = True) -> dict[str, list[int]]:
        return {"input_ids": [ord(c) for c in text]}

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return "".join(chr(i) for i in ids)


class ChatCharTokenizer(CharTokenizer):
    """The same, with a chat template: ``<|role|>content`` lines, then ``<|assistant|>``."""

    chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"

    def apply_chat_template(self, messages: list[dict[str, str]], tokenize: bool, add_generation_prompt: bool) -> str:
        return "".join(f"<|{m['role']}|>{m['content']}\n" for m in messages) + "<|assistant|>"


TOKENIZER = CharTokenizer()
CHAT_TOKENIZER = ChatCharTokenizer()
MODEL = SimpleNamespace(config=SimpleNamespace(max_position_embeddings=CONTEXT))
SYSTEM = "判断这条快讯对美元的影响"
LONG_NEWS = "美联储宣布加息25个基点。" * 20  # 260 characters: clipped to 40
STYLED = "这是一条5星级的财经快讯，属于"
SETTINGS = Settings(max_text_chars=4000, max_chat_chars=16_000, max_new_tokens_limit=256)


class FakeServer:
    """The engine's doors chat uses: the micro-batched analysis, a call on the model, the token count, the prompt
    format of an adapter (every adapter's ``prompt_format``, with a tokenizer that has a chat template for
    ``chat_template``)."""

    def __init__(self, probs: dict[str, float] | None = None, prompt_format: str = "flashtune") -> None:
        self.submitted: list[tuple[Any, str, int | None]] = []
        self.probs = probs or {"bearish": 0.7, "neutral": 0.2, "bullish": 0.1}
        self.format = prompt_format
        self.tokenizer = CHAT_TOKENIZER if prompt_format == "chat_template" else TOKENIZER

    def submit(self, text: Any, adapter: Any, max_new_tokens: int | None, instruction: str = "") -> Analysis:
        self.submitted.append((text, instruction, max_new_tokens))
        label = max(self.probs, key=self.probs.__getitem__)
        prediction = Prediction(label, self.probs, 4, "下跌")  # type: ignore[arg-type]
        return Analysis(prediction, "分析", None, "fake", 1.0, 1, False)

    def with_model(self, adapter: Any, fn: Any) -> Any:
        return fn(MODEL, self.tokenizer)

    def count_tokens(self, text: str) -> int:
        return count_tokens(self.tokenizer, text)

    def prompt_format(self, adapter: Any) -> str:
        return self.format


def _prompt() -> ChatPrompt:
    messages = [("system", SYSTEM), ("user", "an earlier question"), ("assistant", "an answer"), ("user", LONG_NEWS)]
    return chat_prompt(messages, max_chars=4000, max_total_chars=16_000)


def _fitted(server: Any, options: Options | None = None) -> Fitted:
    return fit(server, None, _prompt(), options or Options(max_tokens=8), limit=2048)


# ------------------------------------------------------------------------------------------------- the prompt
def test_the_system_message_is_the_instruction_and_the_last_user_message_the_input() -> None:
    prompt = _prompt()
    assert (prompt.text, prompt.instruction) == (LONG_NEWS, SYSTEM)
    assert prompt.input_field == "messages[3].content" and prompt.instruction_fields == ("messages[0].content",)
    both = chat_prompt([("system", "a"), ("developer", "b"), ("user", " news ")], max_chars=100, max_total_chars=999)
    assert (both.text, both.instruction) == ("news", "a\nb")
    plain = chat_prompt([("user", "news")], max_chars=100, max_total_chars=999)
    assert plain.instruction == DEFAULT_INSTRUCTION and plain.instruction_fields == ()


@pytest.mark.parametrize(
    ("messages", "field"),
    [
        ([("system", "only a system message")], "messages"),
        ([("user", "first"), ("user", "  ")], "messages"),
        ([("user", "x" * 101)], "messages[0].content"),
        ([("system", "s" * 101), ("user", "news")], "messages[0].content"),  # every message, not only the user's
        ([("system", "s" * 80), ("assistant", "a" * 80), ("user", "news")], "messages"),  # all of them together
    ],
)
def test_a_conversation_over_the_limits_or_without_a_user_message_is_refused(
    messages: list[tuple[str, str]], field: str
) -> None:
    with pytest.raises(RequestError) as refused:
        chat_prompt(messages, max_chars=100, max_total_chars=150)
    assert refused.value.status == 422 and refused.value.details == [{"field": field}]


def test_guided_choices_are_bounded_in_characters() -> None:
    chat.check_choices(["利好", "利空"], room_chars=10)
    refusals = [(["利好", "x" * 201], 999, "guided_choice[1]"), (["利好", "利空"], 3, "guided_choice")]
    for choices, room, field in refusals:
        with pytest.raises(RequestError) as refused:
            chat.check_choices(choices, room_chars=room)
        assert refused.value.details == [{"field": field}]


def test_the_rendered_prompt_is_clipped_to_the_context() -> None:
    fitted = _fitted(FakeServer())
    rendered = fitted.prompt.render(MODEL, TOKENIZER)
    assert rendered == render_prompt(LONG_NEWS[:40], SYSTEM)
    assert fitted.prompt_tokens == count_tokens(TOKENIZER, rendered) < count_tokens(TOKENIZER, render_prompt(LONG_NEWS))


def test_the_prompt_leaves_room_for_the_answer_and_stays_under_the_token_limit() -> None:
    scaffold = count_tokens(TOKENIZER, render_prompt("x", SYSTEM))
    long_answer = fit(FakeServer(), None, _prompt(), Options(max_tokens=CONTEXT - scaffold - 20), limit=2048)
    assert long_answer.prompt.text == LONG_NEWS[:20]  # the input gives way to max_tokens
    capped = fit(FakeServer(), None, _prompt(), Options(mode="choice"), limit=scaffold + 25)
    assert capped.prompt.text == LONG_NEWS[:25]  # and to FLASHTUNE_MAX_CHAT_PROMPT_TOKENS


def test_an_instruction_that_leaves_no_room_is_refused_by_name() -> None:
    long_system = [("system", "s" * 300), ("user", "news")]
    prompt = chat_prompt(long_system, max_chars=4000, max_total_chars=16_000)
    with pytest.raises(RequestError) as refused:
        fit(FakeServer(), None, prompt, Options(max_tokens=8), limit=2048)
    assert refused.value.status == 422 and refused.value.details == [{"field": "messages[0].content"}]
    plain = chat_prompt([("user", "news")], max_chars=4000, max_total_chars=16_000)
    with pytest.raises(RequestError) as refused:  # the default instruction: max_tokens took the room
        options = Options(max_tokens=CONTEXT, max_tokens_field="max_completion_tokens")
        fit(FakeServer(), None, plain, options, limit=2048)
    assert refused.value.details == [{"field": "max_completion_tokens"}]


def test_a_guided_choice_over_the_token_limit_is_refused_by_name() -> None:
    with pytest.raises(RequestError) as refused:
        fit(FakeServer(), None, _prompt(), Options(mode="choice", choices=("利好", "x" * 65)), limit=2048)
    assert refused.value.details == [{"field": "guided_choice[1]"}]


# ------------------------------------------------------------------------------------------------ the answers
def _answers(monkeypatch: pytest.MonkeyPatch) -> tuple[dict[str, ChatAnswer], list[str], FakeServer]:
    """The answer of every mode to the same prompt, and the prompts the model was shown."""
    shown: list[str] = []

    def generate_stream(
        model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, on_text: Any, stop: Any = None
    ) -> int:
        shown.append(prompt)
        on_text("利空")
        return 1

    async def streamed(server: Any, fitted: Fitted) -> list[Piece | ChatAnswer]:
        return [piece async for piece in chat.stream(server, None, fitted, Options(max_tokens=8))]

    monkeypatch.setattr(chat, "generate_stream", generate_stream)
    server = FakeServer()
    fitted = _fitted(server)
    answers = {
        "choice": chat.answer(server, None, fitted, Options(mode="choice", choices=("利好", "利空"))),
        "json": chat.answer(server, None, fitted, Options(mode="json", max_tokens=8)),
        "text": chat.answer(server, None, fitted, Options(max_tokens=8)),
    }
    pieces = asyncio.run(streamed(server, fitted))
    assert pieces[:-1] == [Piece(0, "利空", [])] and isinstance(pieces[-1], ChatAnswer)
    answers["stream"] = pieces[-1]
    return answers, shown, server


def test_the_json_answer_keeps_the_system_message(monkeypatch: pytest.MonkeyPatch) -> None:
    answers, _, server = _answers(monkeypatch)
    assert (LONG_NEWS[:40], SYSTEM, 8) in server.submitted  # the engine builds its prompt from both, as render() does
    document = json.loads(answers["json"].choices[0].content)
    assert document["label"] == "bearish" and document["analysis"] == "分析"


def test_every_mode_shows_and_counts_the_same_clipped_prompt(monkeypatch: pytest.MonkeyPatch) -> None:
    answers, shown, server = _answers(monkeypatch)
    rendered = _prompt().render(MODEL, TOKENIZER)
    assert shown == [rendered] * 2  # text, streamed text
    assert {(text, instruction) for text, instruction, _ in server.submitted} == {(LONG_NEWS[:40], SYSTEM)}
    clipped = count_tokens(TOKENIZER, rendered)
    assert {mode: a.prompt_tokens for mode, a in answers.items()} == dict.fromkeys(answers, clipped)
    assert answers["choice"].choices[0].content == "利空"
    assert answers["text"].choices[0].content == answers["stream"].choices[0].content == "利空"
    assert answers["text"].choices[0].finish_reason == "stop" and answers["choice"].completion_tokens == 2


@pytest.mark.parametrize(
    ("choices", "expected"),
    [
        (("利好", "利空", "中性"), "利空"),
        (("bullish", "bearish"), "bearish"),
        (("看涨", "中性"), "中性"),  # /analyze's bearish is not offered: the likelier of the two offered
        ((f"{STYLED}利好", f"{STYLED}利空"), f"{STYLED}利空"),
    ],
)
def test_label_choices_follow_the_analyze_probabilities(choices: tuple[str, ...], expected: str) -> None:
    server = FakeServer()
    answer = chat.answer(server, None, _fitted(server), Options(mode="choice", choices=choices))
    assert answer.choices[0].content == expected
    assert server.submitted[-1][2] == 0  # /analyze's scorer, without generating an analysis


def test_other_choices_are_scored_at_the_label_position(monkeypatch: pytest.MonkeyPatch) -> None:
    contexts: list[str] = []

    def logprobs(model: Any, tokenizer: Any, shown: list[str], candidates: list[list[str]]) -> list[list[float]]:
        contexts.extend(shown)
        return [[-2.0, -1.0, -3.0]]

    monkeypatch.setattr(chat, "continuation_logprobs", logprobs)
    server = FakeServer()
    fitted = _fitted(server)
    answer = chat.answer(server, None, fitted, Options(mode="choice", choices=("yes", "no", "maybe")))
    assert answer.choices[0].content == "no"
    assert contexts == [fitted.prompt.render(MODEL, TOKENIZER) + LABEL_PREFIX_TEMPLATE.format(star=4)]


# --------------------------------------------------------------------------------------------- the parameters
def _request(**body: Any) -> ChatRequest:
    return ChatRequest.model_validate({"model": "builtin", "messages": [{"role": "user", "content": "news"}], **body})


def test_sampling_parameters_are_honoured() -> None:
    options = _request(
        temperature=0.7, top_p=0.9, seed=7, stop=["。", "\n"], logprobs=True, top_logprobs=3, n=2, max_tokens=20
    ).options(SETTINGS)
    assert options.mode == "text" and options.n == 2 and options.seed == 7 and options.max_tokens == 20
    s = options.sampling
    assert (s.temperature, s.top_p, s.top_logprobs, s.stop) == (0.7, 0.9, 3, ("。", "\n"))
    assert not options.plain and _request().options(SETTINGS).plain
    assert _request(max_completion_tokens=9).options(SETTINGS).max_tokens_field == "max_completion_tokens"


@pytest.mark.parametrize(
    ("body", "status", "field"),
    [
        ({"tools": [{"type": "function", "function": {"name": "f"}}]}, 400, "tools"),
        ({"tool_choice": "auto"}, 400, "tool_choice"),
        ({"frequency_penalty": 0.5}, 400, "frequency_penalty"),
        ({"logit_bias": {"1": 5}}, 400, "logit_bias"),
        ({"guided_json": {"type": "object"}}, 400, "guided_json"),
        ({"top_logprobs": 2}, 400, "top_logprobs"),
        ({"response_format": {"type": "json_schema", "json_schema": {}}}, 400, "response_format.type"),
        ({"guided_choice": ["利好", "利空"], "temperature": 0.8}, 400, "temperature"),
        ({"guided_choice": ["利好", "利空"], "n": 2}, 400, "n"),
        ({"response_format": {"type": "json_object"}, "logprobs": True}, 400, "logprobs"),
        ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]}, 400, None),
        ({"max_tokens": 257}, 422, "max_tokens"),
        ({"max_tokens": 5, "max_completion_tokens": 6}, 422, "max_tokens"),
        ({"stop": ["a", "b", "c", "d", "e"]}, 422, "stop"),
        ({"stop": ["。", ""]}, 422, "stop[1]"),
    ],
)
def test_a_parameter_that_is_not_honoured_is_refused_by_name(body: dict[str, Any], status: int, field: str) -> None:
    with pytest.raises(RequestError) as refused:
        _request(**body).options(SETTINGS)
    assert refused.value.status == status
    assert refused.value.details[0]["field"] == (field or "messages[0].content[0].type")


def test_parameters_without_effect_are_accepted() -> None:
    options = _request(user="u1", store=False, frequency_penalty=0, tool_choice="none", modalities=["text"], seed=3)
    assert options.options(SETTINGS).mode == "text"
    assert _request(guided_choice=["利好", "利空"], temperature=0, seed=1).options(SETTINGS).mode == "choice"


# ------------------------------------------------------------------------------------------ the prompt format
def test_a_chat_template_adapter_is_prompted_through_its_template_in_every_mode(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """An adapter trained with ``prompt_format: chat_template`` (its training_info.json, read by the engine) is shown
    the conversation through the tokenizer's chat template, clipped to the same limits; the label answers go to
    /analyze's scorer, which renders the same text and instruction in the adapter's format
    (tests/unit/test_prompt_format.py)."""
    shown: list[str] = []

    def generate_stream(model: Any, tokenizer: Any, prompt: str, max_new_tokens: int, on_text: Any, stop: Any) -> int:
        shown.append(prompt)
        return 0

    def logprobs(model: Any, tokenizer: Any, contexts: list[str], candidates: list[list[str]]) -> list[list[float]]:
        shown.extend(contexts)
        return [[-1.0, -2.0]]

    monkeypatch.setattr(chat, "generate_stream", generate_stream)
    monkeypatch.setattr(chat, "continuation_logprobs", logprobs)
    server = FakeServer(prompt_format="chat_template")
    scaffold = count_tokens(CHAT_TOKENIZER, render_prompt("x", SYSTEM, "chat_template", CHAT_TOKENIZER))
    fitted = fit(server, None, _prompt(), Options(max_tokens=8), limit=scaffold + 25)
    assert fitted.prompt.prompt_format == "chat_template" and fitted.prompt.text == LONG_NEWS[:25]
    rendered = fitted.prompt.render(MODEL, CHAT_TOKENIZER)
    assert rendered == f"<|system|>{SYSTEM}\n<|user|>{LONG_NEWS[:25]}\n<|assistant|>"
    assert fitted.prompt_tokens == count_tokens(CHAT_TOKENIZER, rendered) <= scaffold + 25
    chat.answer(server, None, fitted, Options(max_tokens=8))
    chat.answer(server, None, fitted, Options(mode="choice", choices=("yes", "no")))
    chat.answer(server, None, fitted, Options(mode="choice", choices=("利好", "利空")))
    assert shown == [rendered, rendered + LABEL_PREFIX_TEMPLATE.format(star=4)]
    assert server.submitted == [(LONG_NEWS[:25], SYSTEM, 0), (LONG_NEWS[:25], SYSTEM, 0)]
    assert _fitted(FakeServer()).prompt.prompt_format == "flashtune"  # the default: the user's layout

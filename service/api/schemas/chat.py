"""The request of ``POST /v1/chat/completions`` and what each of its parameters does here.

Every parameter OpenAI's client sends is either honoured or refused with a 400 ``unsupported_parameter`` that
names it; none is silently ignored:

- honoured: ``model``, ``messages`` (text content), ``max_tokens`` / ``max_completion_tokens``, ``temperature``,
  ``top_p``, ``seed``, ``stop``, ``n``, ``logprobs`` / ``top_logprobs``, ``stream`` / ``stream_options``,
  ``response_format`` (``text``, ``json_object``), ``guided_choice``;
- accepted and without effect on the answer, by their nature: ``user``, ``store``, ``metadata``, ``service_tier``,
  ``safety_identifier``, ``prompt_cache_key``, ``parallel_tool_calls``, ``modalities: ["text"]``, and
  ``frequency_penalty`` / ``presence_penalty`` at 0, an empty ``logit_bias``, ``tool_choice: "none"``;
- refused: ``tools``, ``tool_choice``, ``functions``, ``function_call``, non-zero penalties, ``logit_bias``,
  ``response_format`` ``json_schema``, content parts other than text, and any other field. With ``guided_choice``
  or ``json_object`` the answer is scored, not sampled: ``temperature`` > 0, ``top_p`` < 1, ``stop``, ``logprobs``
  and ``n`` > 1 are refused there.

Malformed values (a ``temperature`` of 3, ``max_tokens`` over ``FLASHTUNE_MAX_NEW_TOKENS_LIMIT``) are 422s naming the
field, as everywhere in the API.
"""

from __future__ import annotations

from typing import Any, Literal

from pydantic import ConfigDict, Field

from service.core.bodies import RequestBody
from service.core.config import Settings
from service.core.errors import RequestError
from service.llm.sampling import Sampling
from service.serving.chat import DEFAULT_MAX_TOKENS, Mode, Options, invalid

MAX_N = 8
MAX_STOP = 4
MAX_STOP_CHARS = 64
MAX_TOP_LOGPROBS = 20
WITHOUT_EFFECT = frozenset(
    ("user", "store", "metadata", "service_tier", "safety_identifier", "prompt_cache_key", "parallel_tool_calls")
)


def unsupported(field: str, message: str) -> RequestError:
    return RequestError(400, "unsupported_parameter", message, [{"field": field}])


class ChatMessage(RequestBody):
    model_config = ConfigDict(extra="ignore")  # name, tool_calls, refusal: not shown to the model
    role: Literal["system", "developer", "user", "assistant", "tool"]
    content: str | list[dict[str, Any]] | None = None

    @property
    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(str(p.get("text", "")) for p in self.content)
        return self.content or ""

    def check(self, index: int) -> None:
        """Content parts must be text (``{"type": "text", "text": ...}``)."""
        for j, part in enumerate(self.content if isinstance(self.content, list) else []):
            if part.get("type") != "text" or not isinstance(part.get("text"), str):
                field = f"messages[{index}].content[{j}]"
                raise unsupported(f"{field}.type", f"{field}: only text content parts are supported")


class ChatRequest(RequestBody):
    # Known fields are strict ("n": true is a 422); unknown ones are kept so that options() can name them
    model_config = ConfigDict(extra="allow")
    model: str = Field(min_length=1, max_length=512)
    messages: list[ChatMessage] = Field(min_length=1, max_length=256)
    max_tokens: int | None = Field(default=None, ge=1)
    max_completion_tokens: int | None = Field(default=None, ge=1)
    temperature: float | None = Field(default=None, ge=0, le=2)
    top_p: float | None = Field(default=None, ge=0, le=1)
    n: int = Field(default=1, ge=1, le=MAX_N)
    stop: str | list[str] | None = None
    seed: int | None = Field(default=None, ge=-(2**53), le=2**53)  # beyond, a JSON number is no exact integer
    logprobs: bool | None = None
    top_logprobs: int | None = Field(default=None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: dict[str, Any] | None = None
    response_format: dict[str, Any] | None = None
    guided_choice: list[str] | None = Field(default=None, min_length=1, max_length=64)
    tools: list[Any] | None = None
    tool_choice: Any = None
    functions: list[Any] | None = None
    function_call: Any = None
    frequency_penalty: float | None = Field(default=None, ge=-2, le=2)
    presence_penalty: float | None = Field(default=None, ge=-2, le=2)
    logit_bias: dict[str, Any] | None = None

    def conversation(self) -> list[tuple[str, str]]:
        """The messages as ``(role, text)`` pairs."""
        return [(m.role, m.text) for m in self.messages]

    def options(self, settings: Settings) -> Options:
        """How this request is answered; 400 for a parameter that is not supported, 422 for a bad value."""
        self._refuse_unsupported()
        for i, message in enumerate(self.messages):
            message.check(i)
        mode = self._mode()
        max_tokens, field = self._max_tokens(settings.max_new_tokens_limit)
        sampling = Sampling(
            temperature=self.temperature or 0.0,
            top_p=1.0 if self.top_p is None else self.top_p,
            top_logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            stop=self._stops(),
        )
        if mode != "text":
            self._refuse_sampling(mode)
        choices = tuple(self.guided_choice or ())
        return Options(mode, max_tokens, field, self.n, sampling, self.seed, choices)

    def _refuse_unsupported(self) -> None:
        if self.tools or self.functions:
            raise unsupported("tools" if self.tools else "functions", "tools and function calling are not supported")
        if self.tool_choice not in (None, "none") or self.function_call not in (None, "none"):
            field = "tool_choice" if self.tool_choice not in (None, "none") else "function_call"
            raise unsupported(field, f"{field} is not supported: there are no tools")
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(self, name):
                raise unsupported(name, f"{name} is not supported (only 0)")
        if self.logit_bias:
            raise unsupported("logit_bias", "logit_bias is not supported")
        if self.top_logprobs is not None and not self.logprobs:
            raise unsupported("top_logprobs", "top_logprobs needs logprobs: true")
        for name, value in (self.model_extra or {}).items():
            if name not in WITHOUT_EFFECT and not (name == "modalities" and value == ["text"]):
                raise unsupported(name[:64], f"the parameter {name[:64]!r} is not supported")

    def _mode(self) -> Mode:
        format_type = (self.response_format or {}).get("type", "text")
        if format_type not in ("text", "json_object"):
            message = f"response_format type {str(format_type)[:64]!r} is not supported (text, json_object)"
            raise unsupported("response_format.type", message)
        if self.guided_choice:
            if format_type != "text":
                raise unsupported("response_format", "guided_choice answers a choice, not a JSON document")
            return "choice"
        return "json" if format_type == "json_object" else "text"

    def _max_tokens(self, limit: int) -> tuple[int, str]:
        """The tokens an answer may generate and the field that set it (default 128, at most ``limit``)."""
        given = [
            (n, v)
            for n, v in (("max_completion_tokens", self.max_completion_tokens), ("max_tokens", self.max_tokens))
            if v
        ]
        if len(given) == 2 and given[0][1] != given[1][1]:
            raise invalid(
                "max_tokens and max_completion_tokens differ: send one", "max_tokens", "max_completion_tokens"
            )
        if not given:
            return min(DEFAULT_MAX_TOKENS, limit), "max_tokens"
        name, value = given[0]
        if value is not None and value > limit:
            raise invalid(f"{name} is over FLASHTUNE_MAX_NEW_TOKENS_LIMIT ({limit})", name)
        return int(value or DEFAULT_MAX_TOKENS), name

    def _stops(self) -> tuple[str, ...]:
        stops = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        if len(stops) > MAX_STOP:
            raise invalid(f"stop holds {len(stops)} strings; at most {MAX_STOP}", "stop")
        for i, stop in enumerate(stops):
            if not 1 <= len(stop) <= MAX_STOP_CHARS:
                field = "stop" if isinstance(self.stop, str) else f"stop[{i}]"
                raise invalid(f"{field} must be 1 to {MAX_STOP_CHARS} characters", field)
        return tuple(stops)

    def _refuse_sampling(self, mode: Mode) -> None:
        """A guided choice or a JSON document is scored, not sampled: sampling parameters would change nothing."""
        what = "guided_choice" if mode == "choice" else "response_format json_object"
        refused = {
            "temperature": bool(self.temperature),
            "top_p": self.top_p is not None and self.top_p < 1,
            "stop": bool(self.stop),
            "logprobs": bool(self.logprobs),
            "n": self.n > 1,
        }
        for name, given in refused.items():
            if given:
                raise unsupported(name, f"{name} is not supported with {what}: the answer is scored, not sampled")

"""Requests and responses of ``/analyze`` and ``/analyze/batch`` (``/v1/chat/completions``: ``schemas/chat.py``).

A response is built from the serving engine's domain result (``service.serving.types.Analysis``) with ``of``.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import AllowInfNan, BaseModel, Field, StrictInt, StrictStr, field_validator
from pydantic import Strict as StrictMode

from service.core.bodies import RequestBody
from service.llm.prompts import LABEL_IDS, LABELS, MAX_FIELD_CHARS, PRE_RET_RANGE, VOLATILITY_RANGE, Label
from service.serving.types import Analysis, InputContext

StrictFloat = Annotated[float, StrictMode(), AllowInfNan(False)]  # JSON numbers only (ints too), no bools
# A metadata string as the published schema states it: one line (no control characters), at most MAX_FIELD_CHARS
OneLine = Annotated[StrictStr, Field(max_length=MAX_FIELD_CHARS, pattern=r"^[^\x00-\x1f\x7f]*$")]
Figure = OneLine | StrictInt | StrictFloat


class Strict(RequestBody):
    """A request body: unknown fields refused, no JSON value converted (service/core/bodies.py)."""


def _one_line(value: object) -> object:
    """A metadata string (``OneLine``: one line, at most MAX_FIELD_CHARS), stripped; empty means not given."""
    if not isinstance(value, str):
        return value
    return value.strip() or None


# ------------------------------------------------------------------------------------------------------ analyze
class MarketContext(Strict):
    """The market around the event; fractions, not percent (0.004 is 0.4%)."""

    pre_ret: StrictFloat | None = Field(
        default=None,
        ge=PRE_RET_RANGE[0],
        le=PRE_RET_RANGE[1],
        description="return of the traded instrument before the event",
    )
    volatility: StrictFloat | None = Field(
        default=None,
        ge=VOLATILITY_RANGE[0],
        le=VOLATILITY_RANGE[1],
        description="recent volatility (e.g. high-low range / price)",
    )
    trend: Literal["up", "down", "flat"] | None = None


class NewsMetadata(Strict):
    """What a news feed tells about the item: importance, country, and a calendar release's figures."""

    star: StrictInt | None = Field(default=None, ge=1, le=5, description="importance, 1-5 stars")
    country: OneLine | None = None
    previous: Figure | None = None
    consensus: Figure | None = None
    actual: Figure | None = None

    _lines = field_validator("country", "previous", "consensus", "actual", mode="after")(_one_line)


class AnalyzeItem(Strict):
    text: str = Field(min_length=1)
    market_context: MarketContext | None = None
    metadata: NewsMetadata | None = None

    def given_fields(self) -> dict[str, Any]:
        """The optional input fields given (metadata and market context), by name."""
        given: dict[str, Any] = {}
        for part in (self.metadata, self.market_context):
            if part is not None:
                given.update({k: v for k, v in part.model_dump().items() if v is not None})
        return given


Generation = Literal["prefix", "free"]
GENERATION_HELP = (
    "prefix (default): the analysis continues the response prefix that states the scored importance, label and "
    "reaction, so it always agrees with them; free: generated from the prompt alone, and may disagree (consistent)"
)


ADAPTER_HELP = (
    "an alias (e.g. 'production': GET /aliases), an adapter name (job-<id>), 'latest' (the newest adapter with a "
    "held-out evaluation) or 'none' (the base model alone); default: FLASHTUNE_DEFAULT_ADAPTER ('latest')"
)
FORMAT_HELP = (
    "'agent': the result the user's local agent consumes, label -1/0/1 and probs as a list [bearish, neutral, "
    "bullish] (AgentAnalyzeResponse); 'flashtune': the full response (label name, probs by name, context fields)"
)
Format = Literal["flashtune", "agent"]


class AnalyzeRequest(AnalyzeItem):
    adapter: str | None = Field(default=None, min_length=1, max_length=128, description=ADAPTER_HELP)
    format: Format = Field(default="flashtune", description=FORMAT_HELP)
    max_new_tokens: int | None = Field(default=None, ge=0)
    generation: Generation = Field(default="prefix", description=GENERATION_HELP)


class LabelProbs(BaseModel):
    bearish: float
    neutral: float
    bullish: float


class AnalyzeResponse(BaseModel):
    label: Label
    label_id: int
    score: float
    probs: LabelProbs
    calibrated: bool = Field(
        default=False, description="probs scaled by the temperature the adapter's job fitted on its validation split"
    )
    temperature: float | None = Field(default=None, description="the calibration temperature applied, if any")
    importance: int | None
    market_reaction: str | None
    analysis: str
    generation: Generation = Field(default="prefix", description=GENERATION_HELP)
    consistent: bool | None = Field(
        default=None,
        description="the analysis states the label (and no other importance or reaction); null without analysis",
    )
    probs_list: list[float] = Field(description="the probabilities as a list: [bearish, neutral, bullish]")
    adapter: str = Field(description="the adapter that answered; 'none': the base model alone")
    alias: str | None = Field(
        default=None, description="the alias the request named it by ('production', or 'latest'); null: by name"
    )
    base_model: str
    latency_ms: float
    batch_size: int = Field(description="requests that shared this forward pass (micro-batching)")
    merged: bool = Field(default=False, description="served by a copy of the base with the adapter merged in")
    context_used: list[str] = Field(default_factory=list, description="given fields put into the model input")
    context_ignored: list[str] = Field(
        default_factory=list, description="given fields left out: the adapter's training inputs never had them"
    )

    @classmethod
    def of(cls, result: Analysis, context: InputContext, alias: str | None = None) -> AnalyzeResponse:
        summary = result.summary()
        return cls.model_validate(
            {
                **summary,
                "probs_list": [summary["probs"][label] for label in LABELS],
                "adapter": result.adapter or "none",
                "alias": alias,
                "base_model": result.base_model,
                "latency_ms": result.latency_ms,
                "batch_size": result.batch_size,
                "merged": result.merged,
                "context_used": context.used,
                "context_ignored": context.ignored,
            }
        )


class AnalyzeBatchRequest(Strict):
    items: list[str | AnalyzeItem] = Field(min_length=1, description="texts, or {text, market_context?, metadata?}")
    adapter: str | None = Field(default=None, min_length=1, max_length=128, description=ADAPTER_HELP)
    format: Format = Field(default="flashtune", description=FORMAT_HELP)
    max_new_tokens: int | None = Field(default=None, ge=0)
    generation: Generation = Field(default="prefix", description=GENERATION_HELP)


class AgentAnalyzeResponse(BaseModel):
    """``"format": "agent"``: the sentiment result the user's local agent consumes, and what served it."""

    label: int = Field(description="-1 bearish, 0 neutral, 1 bullish")
    probs: list[float] = Field(description="[bearish, neutral, bullish]")
    score: float = Field(description="the probability of the label")
    importance: int | None
    market_reaction: str | None
    analysis: str
    adapter: str = Field(description="the adapter that answered; 'none': the base model alone")
    alias: str | None = Field(default=None, description="the alias the request named it by; null: by name")
    base_model: str
    latency_ms: float


def answer(
    result: Analysis, context: InputContext, alias: str | None, format: Format
) -> AnalyzeResponse | AgentAnalyzeResponse:
    """The response to one analysed item in the requested ``format``."""
    full = AnalyzeResponse.of(result, context, alias)
    if format == "flashtune":
        return full
    return AgentAnalyzeResponse(
        label=LABEL_IDS[full.label],
        probs=full.probs_list,
        score=full.score,
        importance=full.importance,
        market_reaction=full.market_reaction,
        analysis=full.analysis,
        adapter=full.adapter,
        alias=alias,
        base_model=full.base_model,
        latency_ms=full.latency_ms,
    )


class AnalyzeBatchResponse(BaseModel):
    data: list[AnalyzeResponse | AgentAnalyzeResponse]

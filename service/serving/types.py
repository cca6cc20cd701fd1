"""What the serving engine answers with: domain results, which the API turns into its response shapes."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from service.llm.prompts import LABEL_IDS
from service.llm.scoring import Prediction


@dataclass(frozen=True)
class Analysis:
    """One analysed news item: the scored prediction, the generated analysis and how it was served."""

    prediction: Prediction
    analysis: str  # the generated text ("" with max_new_tokens 0)
    adapter: str | None  # None: the base alone
    base_model: str
    latency_ms: float  # of the whole micro-batch that served it
    batch_size: int  # requests that shared its forward pass
    merged: bool  # served by a copy of the base with the adapter merged in
    free: bool = False  # the analysis was freely generated, not written after the scored response prefix

    @property
    def consistent(self) -> bool | None:
        """Whether the analysis states the scored label (and no other importance or reaction); None without text.
        Always true unless the text was freely generated."""
        return self.prediction.agrees_with(self.analysis) if self.analysis else None

    def summary(self) -> dict[str, Any]:
        """The answer itself, as /analyze and the JSON mode of /v1/chat/completions give it (figures rounded)."""
        p = self.prediction
        return {
            "label": p.label,
            "label_id": LABEL_IDS[p.label],
            "score": round(p.score, 6),
            "probs": {k: round(v, 6) for k, v in p.probs.items()},
            "calibrated": p.temperature is not None,
            "temperature": None if p.temperature is None else round(p.temperature, 4),
            "importance": p.importance,
            "market_reaction": p.market_reaction,
            "analysis": self.analysis,
            "generation": "free" if self.free else "prefix",
            "consistent": self.consistent,
        }


@dataclass(frozen=True)
class InputContext:
    """Which given optional fields of a news item went into the model input, and which were left out."""

    used: list[str]
    ignored: list[str]

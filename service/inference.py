"""The serving model: one base in memory, adapters attached by name, analysis of news items.

The base is loaded on the first request (``/healthz`` never loads it). Adapters are loaded into the same
PeftModel with ``load_adapter`` and selected with ``set_adapter``; ``adapter=None`` runs the base with the
adapters disabled. A lock serialises use of the model: the API runs this code in worker threads, never on
the event loop.
"""

from __future__ import annotations

import threading
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.config import Settings
from service.modeling import load_model, load_tokenizer, pick_device, plan_load, resolve_base_model
from service.prompts import LABEL_IDS, render_prompt
from service.scoring import classify, generate

DEFAULT_MAX_NEW_TOKENS = 80


@dataclass(frozen=True)
class AdapterRef:
    name: str
    path: Path


class ModelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_model = settings.base_model
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._loaded: set[str] = set()

    @property
    def ready(self) -> bool:
        return self._model is not None

    def _ensure_base(self) -> None:
        if self._model is None:
            source = resolve_base_model(self.base_model, self.settings.data_dir)
            plan = plan_load(pick_device(self.settings.device), "auto")
            self._tokenizer = load_tokenizer(source)
            self._model = load_model(source, plan).eval()

    def _select(self, adapter: AdapterRef | None) -> None:
        from peft import PeftModel

        if adapter is None:
            return
        if adapter.name not in self._loaded:
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(adapter.path), adapter_name=adapter.name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(adapter.path), adapter_name=adapter.name)
            self._model.eval()
            self._loaded.add(adapter.name)
        self._model.set_adapter(adapter.name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name in self._loaded:
                self._model.delete_adapter(name)
                self._loaded.discard(name)

    def analyze(self, texts: list[str], adapter: AdapterRef | None, max_new_tokens: int | None) -> list[dict[str, Any]]:
        """Label, probabilities, importance, reaction and generated analysis for each text."""
        started = time.perf_counter()
        new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        with self._lock:
            self._ensure_base()
            self._select(adapter)
            context = self._model.disable_adapter() if adapter is None and self._loaded else nullcontext()
            with context:
                predictions = classify(self._model, self._tokenizer, texts)
                prompts = [render_prompt(t) for t in texts]
                analyses = generate(self._model, self._tokenizer, prompts, new_tokens)
        latency = (time.perf_counter() - started) * 1000
        return [
            {
                "label": p.label,
                "label_id": LABEL_IDS[p.label],
                "score": round(p.score, 6),
                "probs": {k: round(v, 6) for k, v in p.probs.items()},
                "importance": p.importance,
                "market_reaction": p.market_reaction,
                "analysis": text,
                "adapter": adapter.name if adapter else None,
                "base_model": self.base_model,
                "latency_ms": round(latency, 2),
            }
            for p, text in zip(predictions, analyses, strict=True)
        ]

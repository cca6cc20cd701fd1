"""The serving model: one base in memory, adapters attached by name, analysis of news items.

The base is loaded on the first request (``/healthz`` never loads it). Adapters are loaded into the same
PeftModel with ``load_adapter`` and selected with ``set_adapter``; at most ``max_adapters`` stay loaded, the
least recently used is evicted. ``adapter=None`` runs the base with the adapters disabled. A lock serialises use
of the model; single requests go through a :class:`~service.batching.MicroBatcher`, so concurrent requests
share forward passes. The API calls this from worker threads, never on the event loop.
"""

from __future__ import annotations

import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

from service.batching import MicroBatcher
from service.config import Settings
from service.modeling import load_model, load_tokenizer, pick_device, plan_load, resolve_base_model
from service.prompts import LABEL_IDS
from service.scoring import Prediction, build_prompts, classify, generate

DEFAULT_MAX_NEW_TOKENS = 80
T = TypeVar("T")


# Files that torch.load / pickle could execute code from: an adapter folder holding any of them is refused.
PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".pkl", ".pickle", ".ckpt", ".joblib", ".npy", ".npz")
ADAPTER_WEIGHTS = "adapter_model.safetensors"


class UnsafeAdapterError(Exception):
    """An adapter folder that is not plain safetensors (or not inside the adapters root): never loaded."""


def check_adapter_files(path: Path, root: Path) -> None:
    """Refuse to load an adapter unless it is a real folder under ``root`` holding a regular safetensors file
    and no pickle-capable file.

    PEFT falls back to ``adapter_model.bin`` (torch.load) when there is no safetensors file, and to the hub when
    the folder is missing; both would let a planted file decide what runs, so neither is allowed to happen.
    """
    try:
        folder = path.resolve(strict=True)
        inside = folder.is_relative_to(root.resolve(strict=True))
    except OSError as exc:
        raise UnsafeAdapterError(f"adapter {path.name} has no files") from exc
    weights = folder / ADAPTER_WEIGHTS
    if not inside or path.is_symlink() or not folder.is_dir():
        raise UnsafeAdapterError(f"adapter {path.name} is not a folder in the adapters directory")
    if weights.is_symlink() or not weights.is_file():
        raise UnsafeAdapterError(f"adapter {path.name} has no {ADAPTER_WEIGHTS}; only safetensors adapters load")
    unsafe = sorted(p.name for p in folder.iterdir() if p.name.lower().endswith(PICKLE_SUFFIXES))
    if unsafe:
        raise UnsafeAdapterError(f"adapter {path.name} holds pickle-capable files ({', '.join(unsafe)}); "
                                 "it is refused, only safetensors adapters load")  # fmt: skip


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
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self.max_adapters = settings.max_loaded_adapters
        self._batcher = MicroBatcher(self._run_group, settings.batch_max_size, settings.batch_wait_ms)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

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
        if adapter.name in self._loaded:
            self._loaded.move_to_end(adapter.name)
        else:
            check_adapter_files(adapter.path, self.settings.adapters_dir)
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(adapter.path), adapter_name=adapter.name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(adapter.path), adapter_name=adapter.name)
            self._model.eval()
            self._loaded[adapter.name] = None
            while len(self._loaded) > self.max_adapters:
                evicted, _ = self._loaded.popitem(last=False)
                self._model.delete_adapter(evicted)
        self._model.set_adapter(adapter.name)

    def unload(self, name: str) -> None:
        with self._lock:
            if name not in self._loaded:
                return
            del self._loaded[name]
            if self._loaded:
                self._model.delete_adapter(name)
            else:  # peft keeps at least one adapter: drop the LoRA layers and serve the bare base again
                self._model = self._model.unload()

    def submit(self, text: str, adapter: AdapterRef | None, max_new_tokens: int | None) -> dict[str, Any]:
        """Analyze one text, sharing a forward pass with whatever other requests arrive at the same time."""
        if adapter is not None and adapter.name not in self._loaded:  # fail this request alone, before batching
            check_adapter_files(adapter.path, self.settings.adapters_dir)
        result: dict[str, Any] = self._batcher.submit(text, (adapter, max_new_tokens))
        return result

    def _run_group(self, texts: list[str], group: Any) -> list[dict[str, Any]]:
        adapter, max_new_tokens = group
        return self.analyze(texts, adapter, max_new_tokens)

    def run(self, adapter: AdapterRef | None, fn: Callable[[Any, Any], T]) -> T:
        """Call ``fn(model, tokenizer)`` with ``adapter`` active (None: the base alone), holding the model lock."""
        with self._lock:
            self._ensure_base()
            self._select(adapter)
            context = self._model.disable_adapter() if adapter is None and self._loaded else nullcontext()
            with context:
                return fn(self._model, self._tokenizer)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._ensure_base()
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def analyze(self, texts: list[str], adapter: AdapterRef | None, max_new_tokens: int | None) -> list[dict[str, Any]]:
        """Label, probabilities, importance, reaction and generated analysis for each text."""
        started = time.perf_counter()
        new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens

        def run(model: Any, tokenizer: Any) -> tuple[list[Prediction], list[str]]:
            predictions = classify(model, tokenizer, texts)
            return predictions, generate(model, tokenizer, build_prompts(model, tokenizer, texts), new_tokens)

        predictions, analyses = self.run(adapter, run)
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
                "batch_size": len(texts),
            }
            for p, text in zip(predictions, analyses, strict=True)
        ]

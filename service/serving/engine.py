"""The serving engine: one base in memory, adapters attached by name or merged, analysis of news items.

The base is loaded on the first request (``/healthz`` never loads it): on CUDA in 4-bit NF4 (``serve_quantization``
``auto``/``nf4``; its weights kept dequantised too where memory allows, ``serve_dense_nf4``, service/llm/nf4.py) or bf16
(``none``), on the CPU in float32. The adapters on it, attached to the one PeftModel or merged into a copy of the base
each (``FLASHTUNE_SERVE_MERGED``), are kept by ``service.serving.adapters``; ``adapter=None`` runs the base with the
adapters disabled. The NF4 base is only loaded if something needs it (the base alone, an adapter that is not merged).

A lock serialises use of the models; single requests go through a :class:`~service.serving.batching.MicroBatcher`, so
concurrent requests share forward passes. The batcher groups them by the model that serves them (the PeftModel
with the adapters attached, or one merged copy), not by adapter: a micro-batch whose requests use different
attached adapters (or the base) runs in one forward pass per stage, each request naming its adapter through
peft's ``adapter_names`` (mixed-batch LoRA). :meth:`ModelServer._serve` is the one place that decides how a
micro-batch runs, and :meth:`ModelServer._pass` the one that runs a pass; see there. A pass scores each item, scales
its label probabilities by its adapter's calibration (the temperature its job fitted, ``training_info.json``; the base
alone is served uncalibrated), and writes the analysis after the response prefix that states what was scored
(``service.llm.scoring.write_analyses``), unless the item asked for free generation. The chat completions of
``service.serving.chat`` run on :meth:`ModelServer.with_model`. The API calls this from worker threads, never on the
event loop, except :meth:`ModelServer.submit_async`, which only queues and awaits (the batcher's thread serves).

No request pays a CUDA-graph capture: label scoring never captures on a request's way (``defer``,
``service.llm.scoring_graphs``: a shape without its graph runs eagerly once). The batcher's thread captures what is
pending between requests (:meth:`ModelServer._idle`, once no request has come for a moment): when the base loads it
scores probe texts of three lengths eagerly (the widths of news items of ~20 to ~200 tokens), alone and two at a
time, which makes the scoring graphs of those widths wanted in one pass at 1 row and in two passes at every row
bucket from 2 to ``batch_max_size`` (2, 4, 8, 16, 32), and captures them, before traffic: :attr:`ModelServer.warming`
says that such work is pending (``/readyz``), and a client that waits for it meets no capture with the probe
widths. Every shape is captured again after an adapter is loaded or evicted (the weights change), and a shape a
request meets later (a longer text) the same way, between requests: a request that arrives meanwhile waits for one
capture at most.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from dataclasses import dataclass
from typing import Any, TypeVar

from service.core.config import Settings
from service.core.layout import AdapterRef
from service.core.training_info import calibration_temperature, read_training_info
from service.llm.modeling import (
    cap_gpu_memory,
    free_gpu_bytes,
    fuse_layers,
    load_model,
    load_tokenizer,
    pick_device,
    plan_load,
    resolve_base_model,
)
from service.llm.nf4 import keep_dense_copies, nf4_layers
from service.llm.prompts import DEFAULT_INSTRUCTION, in_format, prompt_format_of
from service.llm.scoring import BASE, Prediction, Text, adapter_active, build_prompts, classify, write_analyses
from service.llm.scoring_graphs import ScoringGraphs
from service.serving.adapters import AttachedAdapters, InputFields, MergedModels, check_adapter_files, free_memory
from service.serving.batching import MicroBatcher
from service.serving.types import Analysis

DEFAULT_MAX_NEW_TOKENS = 80
# scored once when the base loads (alone: one pass; two at a time: two passes), so that the scoring graphs of their
# widths are captured at every batch size before any request
PROBE_TEXTS = (
    "美联储宣布加息25个基点，符合市场预期，美元指数小幅走强。",
    "央行公布最新货币政策报告，" * 6,
    "央行公布最新货币政策报告，" * 12,
)
log = logging.getLogger("flashtune.inference")
T = TypeVar("T")


@dataclass(frozen=True)
class Item:
    """One news item to analyse, with its adapter (None: the base alone) and the instruction of its prompt."""

    text: Text
    adapter: AdapterRef | None
    instruction: str = DEFAULT_INSTRUCTION
    free: bool = False  # the analysis freely generated from the prompt, not after the scored response prefix


@dataclass(frozen=True)
class _Served:
    prediction: Prediction
    analysis: str
    batch_size: int  # the forward batch it shared


class ModelServer:
    """The served base and its adapters behind one lock; single analyses micro-batched (see the module)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_model = settings.base_model
        self._lock = threading.Lock()
        self._tokenizer: Any = None
        self._attached = AttachedAdapters(settings)
        self._merged = MergedModels(settings, lambda: self._load_base("none"))
        self._input_fields = InputFields()
        self._temperatures: dict[str, float | None] = {}  # by adapter name, from training_info.json
        self._prompt_formats: dict[str, str] = {}  # by adapter name, from training_info.json
        self._probe = False  # the base loaded: the probe texts' scoring shapes are still to be found (see the module)
        self._batcher = MicroBatcher(self._run_group, settings.batch_max_size, settings.batch_wait_ms, self._idle)

    # ------------------------------------------------------------------------------------------------ state
    @property
    def max_adapters(self) -> int:
        return self._attached.limit

    @property
    def loaded_adapters(self) -> list[str]:
        return self._attached.names

    @property
    def merged_adapters(self) -> list[str]:
        return self._merged.names

    @property
    def ready(self) -> bool:
        return self._attached.model is not None or bool(self._merged)

    @property
    def warming(self) -> bool:
        """Whether CUDA graphs of label scoring are still to be captured between requests (see the module)."""
        return self._probe or self._attached.pending > 0 or self._merged.pending > 0

    def is_merged(self, adapter: AdapterRef | None) -> bool:
        """Whether ``adapter`` is served merged into its own copy of the base (``FLASHTUNE_SERVE_MERGED``)."""
        return self._merged.serves(adapter)

    def input_fields(self, adapter: AdapterRef | None, from_dataset: Callable[[str], list[str]]) -> list[str] | None:
        """The optional input fields the adapter's training inputs carried (``training_info.json``'s
        ``input_fields``, else ``from_dataset(its dataset id)``); None for the base alone, which takes every field."""
        return None if adapter is None else self._input_fields.get(adapter, from_dataset)

    def temperature(self, adapter: AdapterRef | None) -> float | None:
        """The calibration temperature of ``adapter``'s label probabilities (``training_info.json``; read once), None
        where there is none: the base alone, or a job that fitted none or found it did not help."""
        if adapter is None:
            return None
        if adapter.name not in self._temperatures:
            self._temperatures[adapter.name] = calibration_temperature(read_training_info(adapter.path))
        return self._temperatures[adapter.name]

    def prompt_format(self, adapter: AdapterRef | None) -> str:
        """How ``adapter``'s prompts are written: the ``prompt_format`` its job trained with (training_info.json;
        read once); the base alone: the default."""
        if adapter is None:
            return "flashtune"
        if adapter.name not in self._prompt_formats:
            self._prompt_formats[adapter.name] = prompt_format_of(read_training_info(adapter.path))
        return self._prompt_formats[adapter.name]

    # ------------------------------------------------------------------------------------------- lifecycle
    def _ensure_tokenizer(self) -> None:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(resolve_base_model(self.base_model, self.settings))

    def _ensure_base(self) -> None:
        self._ensure_tokenizer()
        if self._attached.model is None:
            self._attached.reset(self._load_base(self.settings.serve_quantization))
            self._probe = self._attached.scoring_graphs(BASE) is not None
            self._batcher.wake()

    def _load_base(self, quantization: str) -> Any:
        """A freshly loaded base as it is served: on CUDA with Liger's fused layer kernels (``fused_kernels``) and
        an NF4 base's weights kept dequantised where memory allows (``serve_dense_nf4``, service/llm/nf4.py)."""
        source = resolve_base_model(self.base_model, self.settings)
        settings, device = self.settings, pick_device(self.settings.device)
        if device == "cuda":  # the API's share of a GPU it may share with a worker (FLASHTUNE_SERVE_GPU_MEMORY_GIB)
            cap_gpu_memory(settings.serve_gpu_memory_gib)
        plan = plan_load(device, quantization, settings.compute_dtype, settings.cuda_capability)  # fp16 on a T4
        model = load_model(source, plan).eval()
        if model.device.type != "cuda":
            return model
        if self.settings.fused_kernels:
            fuse_layers(model)
        layers = nf4_layers(model) if self.settings.serve_dense_nf4 else []
        if layers:
            kept = keep_dense_copies(layers, free_gpu_bytes())
            log.info("NF4 base: %s", "dense copies of its weights kept" if kept else "dequantised per pass (no room)")
        return model

    def release(self) -> None:
        """Drop the base, the adapters and the merged copies; whatever is needed loads again on the next request."""
        with self._lock:
            self._attached.reset(None)
            self._merged.clear()
            self._input_fields.clear()
            self._temperatures.clear()
            self._prompt_formats.clear()
        free_memory()

    def unload(self, name: str) -> None:
        """Stop serving adapter ``name`` (its files are going): out of the merged and the attached caches."""
        with self._lock:
            self._input_fields.forget(name)
            self._temperatures.pop(name, None)
            self._prompt_formats.pop(name, None)
            if name in self._merged.names:
                self._merged.drop(name)
            self._attached.unload(name)

    # --------------------------------------------------------------------------------------------- running
    def with_model(self, adapter: AdapterRef | None, fn: Callable[[Any, Any], T]) -> T:
        """``fn(model, tokenizer)`` with ``adapter`` active (None: the base alone), holding the model lock: how the
        chat completions (``service.serving.chat``) and the benchmarks run on the served model. Routes call named
        operations instead."""
        with self._lock:
            if adapter is not None and self.is_merged(adapter):
                self._ensure_tokenizer()
                return fn(self._merged.get(adapter, self._tokenizer), self._tokenizer)
            self._ensure_base()
            if adapter is not None:
                self._attached.select(adapter)
            self._attached.decode_with_graphs(self._tokenizer)
            model = self._attached.model
            context = model.disable_adapter() if adapter is None and self._attached.names else nullcontext()
            try:
                with context:
                    return fn(model, self._tokenizer)
            finally:
                self._wake_if_warming()

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._ensure_tokenizer()
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

    def _queued(
        self, text: Text, adapter: AdapterRef | None, max_new_tokens: int | None, instruction: str, free: bool
    ) -> tuple[Item, tuple[str | None, int | None]]:
        """A request as the micro-batcher queues it: the item and the key of the passes it may share. An adapter
        not attached yet has its files checked first, so that a bad one fails this request alone."""
        if adapter is not None and adapter.name not in self._attached:
            check_adapter_files(adapter.path, self.settings.layout.adapters)
        model_key = adapter.name if adapter is not None and self.is_merged(adapter) else None  # None: attached
        return Item(text, adapter, instruction, free), (model_key, max_new_tokens)

    def submit(
        self,
        text: Text,
        adapter: AdapterRef | None,
        max_new_tokens: int | None,
        instruction: str = DEFAULT_INSTRUCTION,
        free: bool = False,
    ) -> Analysis:
        """Analyze one text, sharing a forward pass with whatever other requests arrive at the same time (whichever
        attached adapter they use); ``free``: the analysis freely generated (see :class:`Item`)."""
        result: Analysis = self._batcher.submit(*self._queued(text, adapter, max_new_tokens, instruction, free))
        return result

    async def submit_async(
        self,
        text: Text,
        adapter: AdapterRef | None,
        max_new_tokens: int | None,
        instruction: str = DEFAULT_INSTRUCTION,
        free: bool = False,
    ) -> Analysis:
        """As :meth:`submit`, awaited on the caller's event loop: the request is queued and its result handed back
        by the batcher's thread (``call_soon_threadsafe``), no thread blocked meanwhile."""
        result: Analysis = await self._batcher.submit_async(
            *self._queued(text, adapter, max_new_tokens, instruction, free)
        )
        return result

    def _wake_if_warming(self) -> None:
        """After a use that may have left graphs to capture (a new shape, an adapter loaded): tell the batcher's
        thread, which may be asleep (a call from another thread: /analyze/batch, a chat completion)."""
        if self.warming:
            self._batcher.wake()

    def _idle(self) -> bool:
        """One piece of background work, from the batcher's thread while no request waits: score the probe texts
        after the base loaded (eagerly: a few passes), else capture one pending scoring graph (three passes of its
        shape). Whether more may be left."""
        with self._lock:
            if self._probe:
                self._probe = False
                graphs = self._attached.scoring_graphs(BASE)
                with adapter_active(self._attached.model, BASE):
                    for text in PROBE_TEXTS:
                        for rows in (1, 2):  # one pass, two passes (service.llm.scoring.ONE_PASS_MAX_TEXTS)
                            classify(self._attached.model, self._tokenizer, [text] * rows, graphs=graphs)
                self._attached.share_shapes()
                return True
            if self._attached.model is not None and self._attached.capture_pending():
                return True
            return self._merged.capture_pending()

    def _run_group(self, items: list[Item], group: Any) -> list[Analysis]:
        _, max_new_tokens = group
        return self.analyze_items(items, max_new_tokens)

    def analyze(
        self, texts: Sequence[Text], adapter: AdapterRef | None, max_new_tokens: int | None, free: bool = False
    ) -> list[Analysis]:
        """Label, probabilities, importance, reaction and generated analysis for each text."""
        return self.analyze_items([Item(text, adapter, free=free) for text in texts], max_new_tokens)

    def analyze_items(self, items: Sequence[Item], max_new_tokens: int | None) -> list[Analysis]:
        """As :meth:`analyze`, each item with its own adapter and instruction."""
        started = time.perf_counter()
        new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        served = self._serve(items, new_tokens)
        latency = round((time.perf_counter() - started) * 1000, 2)
        self._wake_if_warming()
        return [
            Analysis(
                prediction=s.prediction,
                analysis=s.analysis,
                adapter=r.adapter.name if r.adapter else None,
                base_model=self.base_model,
                latency_ms=latency,
                batch_size=s.batch_size,
                merged=self.is_merged(r.adapter),
                free=r.free,
            )
            for s, r in zip(served, items, strict=True)
        ]

    def _chunks(self, adapters: Sequence[AdapterRef | None]) -> list[list[int]]:
        """The items of a micro-batch by the model that serves them (each merged copy, the attached PeftModel), the
        attached ones cut so that no chunk needs more than ``max_adapters`` distinct adapters loaded at once."""
        chunks: dict[Any, list[list[int]]] = {}
        for i, adapter in enumerate(adapters):
            key = ("merged", adapter.name) if adapter is not None and self.is_merged(adapter) else ("attached",)
            own = chunks.setdefault(key, [[]])
            names = {a.name for a in (adapters[j] for j in own[-1]) if a is not None}
            if adapter is not None and adapter.name not in names and len(names) >= self.max_adapters:
                own.append([])
            own[-1].append(i)
        return [chunk for own in chunks.values() for chunk in own]

    def _serve(self, items: Sequence[Item], new_tokens: int) -> list[_Served]:
        """The prediction, generated text and forward batch size of each request; the one place that decides how a
        micro-batch runs:

        - a merged adapter's items run on its merged copy (a plain model: one pass for them);
        - the others share the attached PeftModel, in chunks of at most ``max_adapters`` distinct adapters, all
          loaded at once (:meth:`_chunks`); a chunk of one adapter (or the base alone) runs plainly with it
          selected, a chunk of several in one forward pass per stage, each item naming its adapter (``__base__``:
          none) through peft's ``adapter_names``, if peft can mix every one of them
          (:func:`~service.serving.adapters.mixes_in_batch`); otherwise one pass per adapter.
        """
        out: dict[int, _Served] = {}
        for chunk in self._chunks([r.adapter for r in items]):
            first = items[chunk[0]].adapter
            with self._lock:
                if first is not None and self.is_merged(first):
                    self._ensure_tokenizer()
                    model = self._merged.get(first, self._tokenizer)
                    out.update(
                        self._pass(model, items, chunk, None, self._merged.scoring_graphs(first.name), new_tokens)
                    )
                    continue
                self._ensure_base()
                needed = {a.name: a for a in (items[i].adapter for i in chunk) if a is not None}
                self._attached.load(list(needed.values()))
                self._attached.decode_with_graphs(self._tokenizer)  # for a chunk of one adapter; mixed: generate()
                model = self._attached.model
                names = [BASE if a is None else a.name for a in (items[i].adapter for i in chunk)]
                distinct = list(dict.fromkeys(names))
                if len(distinct) > 1 and self._attached.mixable(needed):
                    self._attached.gather()  # all their LoRA deltas in one gathered pass per layer
                    out.update(self._pass(model, items, chunk, names, None, new_tokens))
                    continue
                for name in distinct:  # one adapter (or the base) at a time
                    indices = [i for i, n in zip(chunk, names, strict=True) if n == name]
                    with adapter_active(model, name):  # a bare base (no adapter loaded yet) runs as it is
                        graphs = self._attached.scoring_graphs(name)
                        out.update(self._pass(model, items, indices, None, graphs, new_tokens))
        return [out[i] for i in range(len(items))]

    def _pass(
        self,
        model: Any,
        items: Sequence[Item],
        indices: list[int],
        adapter_names: list[str] | None,
        graphs: ScoringGraphs | None,
        new_tokens: int,
    ) -> dict[int, _Served]:
        """Score and generate for the items at ``indices`` in one batch: the one place that runs a pass
        (``adapter_names``: each item's adapter, for peft's mixed batch; ``graphs``: the model's scoring graphs); the
        probabilities calibrated for each item's adapter, the analysis written after what was scored (see the
        module)."""
        chosen = [items[i] for i in indices]
        texts = [in_format(r.text, self.prompt_format(r.adapter)) for r in chosen]
        instructions = [r.instruction for r in chosen]
        tokenizer = self._tokenizer
        scored = classify(model, tokenizer, texts, instructions, adapter_names=adapter_names, graphs=graphs)
        predictions = [p.calibrated(self.temperature(r.adapter)) for p, r in zip(scored, chosen, strict=True)]
        prompts = build_prompts(model, tokenizer, texts, instructions)
        free = [r.free for r in chosen]
        analyses = write_analyses(model, tokenizer, prompts, predictions, new_tokens, free, adapter_names)
        return {i: _Served(p, a, len(indices)) for i, p, a in zip(indices, predictions, analyses, strict=True)}

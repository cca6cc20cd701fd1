"""The serving model: one base in memory, adapters attached by name, analysis of news items.

The base is loaded on the first request (``/healthz`` never loads it): on CUDA in 4-bit NF4 (``serve_quantization``
``auto``/``nf4``; its weights kept dequantised too where memory allows, ``serve_dense_nf4``, service/llm/nf4.py) or bf16
(``none``), on the CPU in float32. Adapters are loaded into the same PeftModel with
``load_adapter`` and selected with ``set_adapter``; at most ``max_adapters`` stay loaded, the least recently used
is evicted. ``adapter=None`` runs the base with the adapters disabled.

Merged serving (``FLASHTUNE_SERVE_MERGED``: adapter names or ``all``): such an adapter is instead merged into its
own unquantised copy of the base (bf16 on CUDA, float32 on the CPU), which then runs as a plain model with no
LoRA layers and no NF4 dequantisation: faster, at the memory of a full copy per adapter (at most
``max_merged_models`` copies, least recently used dropped). The NF4 base is then only loaded if something still
needs it (the base alone, an adapter that is not merged).

A lock serialises use of the models; single requests go through a :class:`~service.serving.batching.MicroBatcher`, so
concurrent requests share forward passes. The batcher groups them by the model that serves them (the PeftModel
with the adapters attached, or one merged copy), not by adapter: a micro-batch whose requests use different
attached adapters (or the base) runs in one forward pass per stage, each request naming its adapter through
peft's ``adapter_names`` (mixed-batch LoRA). :meth:`ModelServer._serve` is the one place that decides how a
micro-batch runs; see there. The API calls this from worker threads, never on the event loop.
"""

from __future__ import annotations

import gc
import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Sequence
from contextlib import nullcontext
from pathlib import Path
from typing import Any, TypeVar

import torch

from service.core.config import Settings
from service.core.layout import AdapterRef
from service.core.training_info import FILENAME as TRAINING_INFO
from service.core.training_info import read_training_info
from service.datasets.store import dataset_input_fields
from service.llm.decoding import GraphDecoder, attach, decoder_for, eos_ids
from service.llm.modeling import fuse_layers, load_model, load_tokenizer, pick_device, plan_load, resolve_base_model
from service.llm.nf4 import keep_dense_copies, nf4_layers
from service.llm.prompts import INPUT_FIELDS, LABEL_IDS
from service.llm.scoring import BASE, Prediction, Text, adapter_active, build_prompts, classify, generate
from service.llm.scoring_graphs import ScoringGraphs
from service.serving.batching import MicroBatcher

DEFAULT_MAX_NEW_TOKENS = 80
log = logging.getLogger("flashtune.inference")
T = TypeVar("T")
# LoRA layer classes whose forward takes adapter_names (peft.tuners.lora: Linear, Embedding, Conv*; bitsandbytes
# NF4/int8); peft refuses mixed batches on the others (MultiheadAttention, ParamWrapper, tensor-parallel, ...).
MIXED_BATCH_LAYERS = frozenset({"Linear", "Embedding", "Conv1d", "Conv2d", "Conv3d", "Linear4bit", "Linear8bitLt"})


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
        raise UnsafeAdapterError(
            f"adapter {path.name} holds pickle-capable files ({', '.join(unsafe)}); "
            "it is refused, only safetensors adapters load"
        )


def mixes_in_batch(model: Any, name: str) -> bool:
    """Whether peft can run the loaded adapter ``name`` of ``model`` in a mixed batch (``adapter_names``): a plain
    LoRA adapter (no DoRA or other variant) on layers that support it, none of them merged."""
    from peft.tuners.lora import LoraLayer
    from peft.utils import PeftType

    config = model.peft_config.get(name)
    if config is None or config.peft_type != PeftType.LORA or getattr(config, "use_dora", False):
        return False
    layers = [m for m in model.modules() if isinstance(m, LoraLayer) and name in (*m.lora_A, *m.lora_embedding_A)]
    return not any(
        layer.merged
        or type(layer).__name__ not in MIXED_BATCH_LAYERS
        or name in getattr(layer, "lora_variant", {})
        or layer.use_dora.get(name, False)
        for layer in layers
    )


def _adapter_in_base_dtype(model: Any, name: str) -> None:
    """On CUDA, cast adapter ``name``'s LoRA weights to the base's compute dtype (bf16). peft loads them in float32,
    and each LoRA layer then casts its input to float32 and its output back, and multiplies in float32: measured
    ~1.5 ms of float32 GEMMs plus the casts in a 7B label-scoring pass (docs/benchmarks.md)."""
    from peft.tuners.lora import LoraLayer

    if model.device.type != "cuda":
        return
    dtype = model.get_input_embeddings().weight.dtype
    for module in model.modules():
        if isinstance(module, LoraLayer) and name in module.lora_A:
            module.lora_A[name].to(dtype)
            module.lora_B[name].to(dtype)


def _free_memory() -> None:
    """Give the memory of dropped models back now (and to the GPU), not at the next garbage collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


class ModelServer:
    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_model = settings.base_model
        self._lock = threading.Lock()
        self._model: Any = None
        self._tokenizer: Any = None
        self._loaded: OrderedDict[str, None] = OrderedDict()  # least recently used first
        self._mixable: dict[str, bool] = {}  # loaded adapter -> whether it can share a mixed batch
        self._merged: OrderedDict[str, Any] = OrderedDict()  # adapter name -> merged model, least recently used first
        self._input_fields: dict[str, tuple[int, list[str]]] = {}  # adapter name -> (training_info mtime, fields)
        self._graphs: dict[tuple[str, str], ScoringGraphs] = {}  # (model, adapter) -> its scoring CUDA graphs
        self.max_adapters = settings.max_loaded_adapters
        self._batcher = MicroBatcher(self._run_group, settings.batch_max_size, settings.batch_wait_ms)

    @property
    def loaded_adapters(self) -> list[str]:
        return list(self._loaded)

    @property
    def merged_adapters(self) -> list[str]:
        return list(self._merged)

    @property
    def ready(self) -> bool:
        return self._model is not None or bool(self._merged)

    def is_merged(self, adapter: AdapterRef | None) -> bool:
        """Whether ``adapter`` is served merged into its own copy of the base (``FLASHTUNE_SERVE_MERGED``)."""
        return adapter is not None and self.settings.serves_merged(adapter.name)

    def _source(self) -> str:
        return resolve_base_model(self.base_model, self.settings.data_dir)

    def _ensure_tokenizer(self) -> None:
        if self._tokenizer is None:
            self._tokenizer = load_tokenizer(self._source())

    def _ensure_base(self) -> None:
        self._ensure_tokenizer()
        if self._model is None:
            plan = plan_load(pick_device(self.settings.device), self.settings.serve_quantization)
            self._model = self._prepared(load_model(self._source(), plan).eval())

    def _prepared(self, model: Any) -> Any:
        """A freshly loaded model as it is served: on CUDA with Liger's fused layer kernels (``fused_kernels``) and
        an NF4 base's weights kept dequantised where memory allows (``serve_dense_nf4``, service/llm/nf4.py)."""
        if model.device.type != "cuda":
            return model
        if self.settings.fused_kernels:
            fuse_layers(model)
        layers = nf4_layers(model) if self.settings.serve_dense_nf4 else []
        if layers:
            kept = keep_dense_copies(layers, torch.cuda.mem_get_info()[0])
            log.info("NF4 base: %s", "bf16 copies of its weights kept" if kept else "dequantised per pass (no room)")
        return model

    def _scoring_graphs(self, model: str, adapter: str) -> ScoringGraphs | None:
        """The CUDA graphs of label scoring on ``model`` ("attached": the base with its adapters; "merged": a merged
        copy) with ``adapter`` (``BASE``: none) active; None where scoring is not graphed."""
        if not self.settings.cuda_graph_scoring or pick_device(self.settings.device) != "cuda":
            return None
        return self._graphs.setdefault((model, adapter), ScoringGraphs())

    def _drop_graphs(self, model: str, adapter: str | None = None) -> None:
        """Forget graphs whose weights change or go (they replay the memory they were captured with): the scoring
        graphs, and for the attached model its graph decoder too."""
        for key in [k for k in self._graphs if k[0] == model and adapter in (None, k[1])]:
            del self._graphs[key]
        if model == "attached" and self._model is not None:
            attach(self._model, None)

    def _decode_with_graphs(self) -> None:
        """On CUDA, let the attached model decode with a graph decoder (service.llm.decoding), which captures a step
        per set of active adapters; made again after an adapter is loaded or removed (:meth:`_drop_graphs`)."""
        if self.settings.cuda_graph_decoding and self._model.device.type == "cuda" and decoder_for(self._model) is None:
            attach(self._model, GraphDecoder(self._model, eos_ids(self._tokenizer), self._tokenizer.pad_token_id))

    def _merged_model(self, adapter: AdapterRef) -> Any:
        """The base with ``adapter`` merged in, unquantised (bf16 on CUDA, float32 on the CPU); loaded on first use."""
        from peft import PeftModel

        if adapter.name in self._merged:
            self._merged.move_to_end(adapter.name)
            return self._merged[adapter.name]
        check_adapter_files(adapter.path, self.settings.layout.adapters)
        while len(self._merged) >= self.settings.max_merged_models:  # make room first: a copy is a whole model
            self._drop_merged(next(iter(self._merged)))
        base = self._prepared(load_model(self._source(), plan_load(pick_device(self.settings.device), "none")))
        model = PeftModel.from_pretrained(base, str(adapter.path)).merge_and_unload().eval()
        if model.device.type == "cuda" and self.settings.cuda_graph_decoding:
            # a plain model whose weights never change: its decoding step can be one CUDA graph (service.llm.decoding)
            attach(model, GraphDecoder(model, eos_ids(self._tokenizer), self._tokenizer.pad_token_id))
        self._merged[adapter.name] = model
        return model

    def _drop_merged(self, name: str) -> None:
        self._merged.pop(name, None)
        self._drop_graphs("merged", name)
        _free_memory()

    def input_fields(self, adapter: AdapterRef | None) -> list[str] | None:
        """The optional input fields the adapter's training inputs carried (``training_info.json``'s
        ``input_fields``, else read from its dataset); None for the base alone, which takes every field."""
        if adapter is None:
            return None
        try:
            stamp = (adapter.path / TRAINING_INFO).stat().st_mtime_ns
        except OSError:
            return []
        cached = self._input_fields.get(adapter.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = read_training_info(adapter.path)
        fields = info.get("input_fields")
        if not isinstance(fields, list):  # trained before the record existed: derive it from the dataset
            fields = dataset_input_fields(self.settings, str(info.get("dataset", ""))) if info.get("dataset") else []
        fields = [f for f in INPUT_FIELDS if f in fields]
        self._input_fields[adapter.name] = (stamp, fields)
        return fields

    def _load(self, adapters: Sequence[AdapterRef]) -> None:
        """Make ``adapters`` (at most ``max_adapters`` distinct) loaded and the most recently used; the least recently
        used others are evicted to stay within the limit."""
        from peft import PeftModel

        for adapter in adapters:  # touch the loaded ones first, so loading the others never evicts them
            if adapter.name in self._loaded:
                self._loaded.move_to_end(adapter.name)
        for adapter in adapters:
            if adapter.name in self._loaded:
                continue
            check_adapter_files(adapter.path, self.settings.layout.adapters)
            self._drop_graphs("attached")  # the model gains LoRA layers (and may lose an adapter below)
            if isinstance(self._model, PeftModel):
                self._model.load_adapter(str(adapter.path), adapter_name=adapter.name)
            else:
                self._model = PeftModel.from_pretrained(self._model, str(adapter.path), adapter_name=adapter.name)
            self._model.eval()
            _adapter_in_base_dtype(self._model, adapter.name)
            self._loaded[adapter.name] = None
            self._mixable[adapter.name] = mixes_in_batch(self._model, adapter.name)
            while len(self._loaded) > self.max_adapters:
                evicted, _ = self._loaded.popitem(last=False)
                self._mixable.pop(evicted, None)
                self._model.delete_adapter(evicted)

    def _select(self, adapter: AdapterRef | None) -> None:
        if adapter is None:
            return
        self._load([adapter])
        self._model.set_adapter(adapter.name)

    def release(self) -> None:
        """Drop the base, the adapters and the merged copies; whatever is needed loads again on the next request."""
        with self._lock:
            self._model = None
            self._loaded.clear()
            self._mixable.clear()
            self._merged.clear()
            self._input_fields.clear()
            self._graphs.clear()
        _free_memory()

    def unload(self, name: str) -> None:
        with self._lock:
            self._input_fields.pop(name, None)
            if name in self._merged:
                self._drop_merged(name)
            if name not in self._loaded:
                return
            del self._loaded[name]
            self._mixable.pop(name, None)
            self._drop_graphs("attached")
            if self._loaded:
                self._model.delete_adapter(name)
            else:  # peft keeps at least one adapter: drop the LoRA layers and serve the bare base again
                self._model = self._model.unload()

    def submit(self, text: Text, adapter: AdapterRef | None, max_new_tokens: int | None) -> dict[str, Any]:
        """Analyze one text, sharing a forward pass with whatever other requests arrive at the same time (whichever
        attached adapter they use)."""
        if adapter is not None and adapter.name not in self._loaded:  # fail this request alone, before batching
            check_adapter_files(adapter.path, self.settings.layout.adapters)
        merged = adapter is not None and self.is_merged(adapter)
        model_key = adapter.name if adapter is not None and merged else None  # None: the PeftModel, adapters attached
        result: dict[str, Any] = self._batcher.submit((text, adapter), (model_key, max_new_tokens))
        return result

    def _run_group(self, items: list[tuple[Text, AdapterRef | None]], group: Any) -> list[dict[str, Any]]:
        _, max_new_tokens = group
        return self.analyze_mixed([text for text, _ in items], [adapter for _, adapter in items], max_new_tokens)

    def run(self, adapter: AdapterRef | None, fn: Callable[[Any, Any], T]) -> T:
        """Call ``fn(model, tokenizer)`` with ``adapter`` active (None: the base alone), holding the model lock."""
        with self._lock:
            if adapter is not None and self.is_merged(adapter):
                self._ensure_tokenizer()
                return fn(self._merged_model(adapter), self._tokenizer)
            self._ensure_base()
            self._select(adapter)
            self._decode_with_graphs()
            context = self._model.disable_adapter() if adapter is None and self._loaded else nullcontext()
            with context:
                return fn(self._model, self._tokenizer)

    def count_tokens(self, text: str) -> int:
        with self._lock:
            self._ensure_tokenizer()
            return len(self._tokenizer(text, add_special_tokens=False)["input_ids"])

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

    def _serve(
        self, texts: list[Text], adapters: list[AdapterRef | None], new_tokens: int
    ) -> list[tuple[Prediction, str, int]]:
        """(prediction, generated text, forward batch size) for each text with its own adapter; the one place that
        decides how a micro-batch runs:

        - a merged adapter's items run on its merged copy (a plain model: one pass for them);
        - the others share the attached PeftModel, in chunks of at most ``max_adapters`` distinct adapters, all
          loaded at once (:meth:`_chunks`); a chunk of one adapter (or the base alone) runs plainly with it
          selected, a chunk of several in one forward pass per stage, each item naming its adapter (``__base__``:
          none) through peft's ``adapter_names``, if peft can mix every one of them (:func:`mixes_in_batch`);
          otherwise one pass per adapter.
        """
        out: list[tuple[Prediction, str, int] | None] = [None] * len(texts)

        def run_pass(model: Any, indices: list[int], names: list[str] | None, graphs: ScoringGraphs | None) -> None:
            part = [texts[i] for i in indices]
            predictions = classify(model, self._tokenizer, part, adapter_names=names, graphs=graphs)
            prompts = build_prompts(model, self._tokenizer, part)
            analyses = generate(model, self._tokenizer, prompts, new_tokens, adapter_names=names)
            for i, p, a in zip(indices, predictions, analyses, strict=True):
                out[i] = (p, a, len(indices))

        for chunk in self._chunks(adapters):
            first = adapters[chunk[0]]
            with self._lock:
                if first is not None and self.is_merged(first):
                    self._ensure_tokenizer()
                    run_pass(self._merged_model(first), chunk, None, self._scoring_graphs("merged", first.name))
                    continue
                self._ensure_base()
                needed = {a.name: a for a in (adapters[i] for i in chunk) if a is not None}
                self._load(list(needed.values()))
                self._decode_with_graphs()  # for a chunk of one adapter; mixed chunks decode with generate()
                names = [BASE if a is None else a.name for a in (adapters[i] for i in chunk)]
                distinct = list(dict.fromkeys(names))
                if len(distinct) > 1 and all(self._mixable.get(n, False) for n in needed):
                    run_pass(self._model, chunk, names, None)
                    continue
                for name in distinct:  # one adapter (or the base) at a time
                    indices = [i for i, n in zip(chunk, names, strict=True) if n == name]
                    with adapter_active(self._model, name):  # a bare base (no adapter loaded yet) runs as it is
                        run_pass(self._model, indices, None, self._scoring_graphs("attached", name))
        return [item for item in out if item is not None]

    def analyze(
        self, texts: list[Text], adapter: AdapterRef | None, max_new_tokens: int | None
    ) -> list[dict[str, Any]]:
        """Label, probabilities, importance, reaction and generated analysis for each text."""
        return self.analyze_mixed(texts, [adapter] * len(texts), max_new_tokens)

    def analyze_mixed(
        self, texts: list[Text], adapters: list[AdapterRef | None], max_new_tokens: int | None
    ) -> list[dict[str, Any]]:
        """As :meth:`analyze`, each text with its own adapter (None: the base alone)."""
        started = time.perf_counter()
        new_tokens = DEFAULT_MAX_NEW_TOKENS if max_new_tokens is None else max_new_tokens
        served = self._serve(texts, adapters, new_tokens)
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
                "batch_size": batch_size,
                "merged": self.is_merged(adapter),
            }
            for (p, text, batch_size), adapter in zip(served, adapters, strict=True)
        ]

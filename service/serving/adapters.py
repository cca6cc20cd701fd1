"""Adapters on the served base: attached to the one PeftModel, or merged into a copy of the base each.

:class:`AttachedAdapters` owns the served base once it is loaded: adapters are loaded into the same PeftModel with
``load_adapter`` and selected with ``set_adapter``; at most ``max_loaded_adapters`` stay loaded, the least recently
used is evicted. It knows which of them peft can run in a mixed batch (:func:`mixes_in_batch`).

:class:`MergedModels` (``FLASHTUNE_SERVE_MERGED``: adapter names or ``all``): such an adapter is instead merged
into its own unquantised copy of the base (bf16 on CUDA, float32 on the CPU), which then runs as a plain model
with no LoRA layers and no NF4 dequantisation: faster, at the memory of a full copy per adapter (at most
``max_merged_models`` copies, least recently used dropped).

Each cache owns the CUDA graphs captured on its models (label scoring, ``service.llm.scoring_graphs``; decoding,
``service.llm.decoding``), and forgets them whenever the weights they replay change or go; the scoring graphs of the
attached base, in all its adapter states, share one memory pool. The scoring graphs are
never captured by a request (``defer``, ``service.llm.scoring_graphs``): a shape a request meets without its graph
runs eagerly, and :meth:`AttachedAdapters.capture_pending` / :meth:`MergedModels.capture_pending` capture what is
pending, one graph a call, when the engine's model thread has nothing else to do. A model state (an adapter) seen for
the first time wants the shapes the others have, and after the weights change the same shapes are captured
again. Nothing is loaded
before :func:`check_adapter_files` has passed. :class:`InputFields` reads which optional input fields an adapter's
training inputs carried. None of this locks: the engine (``service.serving.engine``) calls it under its lock.
"""

from __future__ import annotations

import gc
from collections import OrderedDict
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import torch

from service.core.config import Settings
from service.core.layout import AdapterRef
from service.core.training_info import FILENAME as TRAINING_INFO
from service.core.training_info import read_training_info
from service.llm.decoding import GraphDecoder, attach, decoder_for, eos_ids
from service.llm.modeling import pick_device
from service.llm.prompts import INPUT_FIELDS
from service.llm.scoring import BASE, adapter_active
from service.llm.scoring_graphs import GraphPool, ScoringGraphs
from service.serving.gathered_lora import GatheredLoRA

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


def adapter_in_base_dtype(model: Any, name: str) -> None:
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


def free_memory() -> None:
    """Give the memory of dropped models back now (and to the GPU), not at the next garbage collection."""
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def _graphs_wanted(settings: Settings) -> bool:
    """Whether label scoring replays CUDA graphs (``cuda_graph_scoring`` on a CUDA device)."""
    return settings.cuda_graph_scoring and pick_device(settings.device) == "cuda"


# scoring graphs kept per model state (adapter): 4 widths, each in one pass at 1 row and in two at 2 to 32 rows
SCORING_SHAPES = 44


def _graphs_for(
    graphs: dict[str, ScoringGraphs], name: str, settings: Settings, pool: GraphPool | None = None
) -> ScoringGraphs:
    """``name``'s scoring graphs (deferred capture; every batch the micro-batcher makes; ``pool``: the model's
    shared pool), made wanting the shapes the other states of the model have."""
    own = graphs.get(name)
    if own is None:
        own = graphs[name] = ScoringGraphs(SCORING_SHAPES, defer=True, max_rows=settings.batch_max_size, pool=pool)
        for other in list(graphs.values()):
            for key, spec, keep in other.shapes():
                own.want(key, spec, keep)
    return own


class AttachedAdapters:
    """The served base and the adapters loaded into it, at most ``limit``, least recently used first."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.limit = settings.max_loaded_adapters
        self.model: Any = None  # the base; a PeftModel around it once an adapter is loaded
        self._loaded: OrderedDict[str, None] = OrderedDict()
        self._mixable: dict[str, bool] = {}  # loaded adapter -> whether it can share a mixed batch
        self._graphs: dict[str, ScoringGraphs] = {}  # active adapter (BASE: none) -> its scoring CUDA graphs
        self._pool = GraphPool()  # the one memory pool of those graphs
        self._gathered: GatheredLoRA | None = None  # the mixable adapters' stacked LoRA weights, while installed

    @property
    def names(self) -> list[str]:
        return list(self._loaded)

    def __contains__(self, name: object) -> bool:
        return name in self._loaded

    def reset(self, base: Any) -> None:
        """Serve ``base`` with no adapter loaded (None: nothing loaded at all)."""
        self.model = base
        self._loaded.clear()
        self._mixable.clear()
        self._graphs.clear()
        self._pool = GraphPool()
        self._gathered = None

    def mixable(self, names: Iterable[str]) -> bool:
        """Whether every one of the loaded adapters ``names`` can share a mixed batch."""
        return all(self._mixable.get(n, False) for n in names)

    def gather(self) -> None:
        """Before a mixed batch: the loaded mixable adapters' LoRA deltas computed in one gathered pass per layer
        (``service.serving.gathered_lora``), their weights stacked once per set of loaded adapters; with
        ``gathered_lora`` off, peft's loop over the batch's adapters."""
        if not self.settings.gathered_lora:
            self._drop_gathered()
        elif self._gathered is None:
            self._gathered = GatheredLoRA(self.model, [n for n in self._loaded if self._mixable.get(n, False)])
            self._gathered.install()

    def _drop_gathered(self) -> None:
        if self._gathered is not None:
            self._gathered.remove()
            self._gathered = None

    def scoring_graphs(self, name: str) -> ScoringGraphs | None:
        """The CUDA graphs of label scoring with ``name`` (``BASE``: none) active; None where scoring is not graphed."""
        return _graphs_for(self._graphs, name, self.settings, self._pool) if _graphs_wanted(self.settings) else None

    @property
    def pending(self) -> int:
        """Scoring graphs waiting to be captured."""
        return sum(g.pending for g in list(self._graphs.values()))

    def share_shapes(self) -> None:
        """Every model state (adapter) wants the scoring shapes any of them has."""
        every = [shape for graphs in list(self._graphs.values()) for shape in graphs.shapes()]
        for graphs in self._graphs.values():
            for key, spec, keep in every:
                graphs.want(key, spec, keep)

    def capture_pending(self) -> bool:
        """Capture one pending scoring graph, its adapter made active (the base: adapters disabled); whether one
        was pending. The caller holds the model lock and runs nothing else meanwhile."""
        for name, graphs in list(self._graphs.items()):
            if not graphs.pending:
                continue
            if self.model is None or (name != BASE and name not in self._loaded):
                del self._graphs[name]
                continue
            with adapter_active(self.model, name):
                graphs.capture_next(self.model)
            return True
        return False

    def decode_with_graphs(self, tokenizer: Any) -> None:
        """On CUDA, let the model decode with a graph decoder (service.llm.decoding), which captures a step per set
        of active adapters; made again after an adapter is loaded or removed (:meth:`_changing`)."""
        if self.settings.cuda_graph_decoding and self.model.device.type == "cuda" and decoder_for(self.model) is None:
            attach(self.model, GraphDecoder(self.model, eos_ids(tokenizer), tokenizer.pad_token_id))

    def _changing(self) -> None:
        """Forget the graphs captured on the model before its weights change: they replay the memory they were
        captured with. The scoring graphs' shapes are kept, to be captured again (:meth:`capture_pending`)."""
        for graphs in self._graphs.values():
            graphs.invalidate()
        self._drop_gathered()  # its stacks copy the weights of the adapters loaded now
        if self.model is not None:
            attach(self.model, None)

    def load(self, adapters: Sequence[AdapterRef]) -> None:
        """Make ``adapters`` (at most ``limit`` distinct) loaded and the most recently used; the least recently used
        others are evicted to stay within the limit."""
        from peft import PeftModel

        for adapter in adapters:  # touch the loaded ones first, so loading the others never evicts them
            if adapter.name in self._loaded:
                self._loaded.move_to_end(adapter.name)
        for adapter in adapters:
            if adapter.name in self._loaded:
                continue
            check_adapter_files(adapter.path, self.settings.layout.adapters)
            self._changing()  # the model gains LoRA layers (and may lose an adapter below)
            if isinstance(self.model, PeftModel):
                self.model.load_adapter(str(adapter.path), adapter_name=adapter.name)
            else:
                self.model = PeftModel.from_pretrained(self.model, str(adapter.path), adapter_name=adapter.name)
            self.model.eval()
            adapter_in_base_dtype(self.model, adapter.name)
            self._loaded[adapter.name] = None
            self._mixable[adapter.name] = mixes_in_batch(self.model, adapter.name)
            while len(self._loaded) > self.limit:
                evicted, _ = self._loaded.popitem(last=False)
                self._mixable.pop(evicted, None)
                self._graphs.pop(evicted, None)
                self.model.delete_adapter(evicted)

    def select(self, adapter: AdapterRef) -> None:
        """Load ``adapter`` if needed and make it the active one."""
        self.load([adapter])
        self.model.set_adapter(adapter.name)

    def unload(self, name: str) -> None:
        if name not in self._loaded:
            return
        del self._loaded[name]
        self._mixable.pop(name, None)
        self._graphs.pop(name, None)
        self._changing()
        if self._loaded:
            self.model.delete_adapter(name)
        else:  # peft keeps at least one adapter: drop the LoRA layers and serve the bare base again
            self.model = self.model.unload()


class MergedModels:
    """Adapters merged into their own unquantised copy of the base, at most ``max_merged_models`` copies."""

    def __init__(self, settings: Settings, load_base: Callable[[], Any]) -> None:
        """``load_base``: a fresh unquantised copy of the base, prepared as the engine serves it."""
        self.settings = settings
        self._load_base = load_base
        self._models: OrderedDict[str, Any] = OrderedDict()  # adapter name -> merged model, least recently used first
        self._graphs: dict[str, ScoringGraphs] = {}  # adapter name -> the scoring CUDA graphs of its copy

    @property
    def names(self) -> list[str]:
        return list(self._models)

    def __len__(self) -> int:
        return len(self._models)

    def serves(self, adapter: AdapterRef | None) -> bool:
        """Whether ``adapter`` is served merged into its own copy of the base (``FLASHTUNE_SERVE_MERGED``)."""
        return adapter is not None and self.settings.serves_merged(adapter.name)

    def get(self, adapter: AdapterRef, tokenizer: Any) -> Any:
        """The base with ``adapter`` merged in, unquantised (bf16 on CUDA, float32 on the CPU); loaded on first use."""
        from peft import PeftModel

        if adapter.name in self._models:
            self._models.move_to_end(adapter.name)
            return self._models[adapter.name]
        check_adapter_files(adapter.path, self.settings.layout.adapters)
        while len(self._models) >= self.settings.max_merged_models:  # make room first: a copy is a whole model
            self.drop(next(iter(self._models)))
        model = PeftModel.from_pretrained(self._load_base(), str(adapter.path)).merge_and_unload().eval()
        if model.device.type == "cuda" and self.settings.cuda_graph_decoding:
            # a plain model whose weights never change: its decoding step can be one CUDA graph (service.llm.decoding)
            attach(model, GraphDecoder(model, eos_ids(tokenizer), tokenizer.pad_token_id))
        self._models[adapter.name] = model
        return model

    def scoring_graphs(self, name: str) -> ScoringGraphs | None:
        """The CUDA graphs of label scoring on ``name``'s copy; None where scoring is not graphed."""
        return _graphs_for(self._graphs, name, self.settings) if _graphs_wanted(self.settings) else None

    @property
    def pending(self) -> int:
        """Scoring graphs waiting to be captured."""
        return sum(g.pending for g in list(self._graphs.values()))

    def capture_pending(self) -> bool:
        """Capture one pending scoring graph of a merged copy; whether one was pending (as
        :meth:`AttachedAdapters.capture_pending`)."""
        for name, graphs in list(self._graphs.items()):
            if not graphs.pending:
                continue
            if name not in self._models:
                del self._graphs[name]
                continue
            graphs.capture_next(self._models[name])
            return True
        return False

    def drop(self, name: str) -> None:
        self._models.pop(name, None)
        self._graphs.pop(name, None)
        free_memory()

    def clear(self) -> None:
        self._models.clear()
        self._graphs.clear()


class InputFields:
    """Per adapter: the optional input fields its training inputs carried, kept until ``training_info.json``
    changes."""

    def __init__(self) -> None:
        self._cache: dict[str, tuple[int, list[str]]] = {}  # adapter name -> (training_info mtime, fields)

    def get(self, adapter: AdapterRef, from_dataset: Callable[[str], list[str]]) -> list[str]:
        """``training_info.json``'s ``input_fields``; for an adapter trained before that record existed, those of
        its dataset (``from_dataset(dataset id)``); none without a training_info.json."""
        try:
            stamp = (adapter.path / TRAINING_INFO).stat().st_mtime_ns
        except OSError:
            return []
        cached = self._cache.get(adapter.name)
        if cached is not None and cached[0] == stamp:
            return cached[1]
        info = read_training_info(adapter.path)
        fields = info.get("input_fields")
        if not isinstance(fields, list):  # trained before the record existed: derive it from the dataset
            fields = from_dataset(str(info["dataset"])) if info.get("dataset") else []
        fields = [f for f in INPUT_FIELDS if f in fields]
        self._cache[adapter.name] = (stamp, fields)
        return fields

    def forget(self, name: str) -> None:
        self._cache.pop(name, None)

    def clear(self) -> None:
        self._cache.clear()

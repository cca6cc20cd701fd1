"""Greedy decoding with a static KV cache and the decoding step captured as one CUDA graph.

transformers' ``generate`` spends milliseconds of Python on every token, and it reads the end-of-sequence flag
after each step, so that time is never hidden behind the GPU's work. Measured on an H200 with a merged bf16 copy of the
7B shape at batch 1: 147 tokens/s with its compiled static cache (6.8 ms per token, docs/benchmarks.md), while reading
the weights once takes ~3 ms. Here the whole step (the forward pass, the greedy choice, the end-of-sequence bookkeeping
and advancing the positions) is one graph: per token the CPU launches it and reads one flag. Measured on the same
machine: 174-175 tokens/s at batch 1 and ~4,400 at batch 32, and a new batch size costs ~2 s instead of 30-50 s of
compilation.

The decoding is ``model.generate(do_sample=False)``'s: the prompt's positions count its tokens only (left padding
skipped), a row that has ended gets the pad token from then on, and decoding stops when every row has ended or after
``max_new_tokens``. ``tests/unit/test_decoding.py`` checks the tokens against ``generate``'s.

A :class:`GraphDecoder` belongs to one model whose weights do not change while it is used: a merged copy, or a
PeftModel whose adapters stay loaded (the worker's evaluation of a trained adapter, ``workers.training.evaluation``; the
serving base with its adapters attached, ``service.serving.adapters``, which drops the decoder whenever an adapter is
loaded or removed). It keeps a static cache per batch size and cache length (rounded up to
:data:`CACHE_MULTIPLE`), at most ``limit`` of them, the least recently used dropped first, and only while one takes
at most :data:`CACHE_FRACTION_OF_FREE` of the free memory: a cache of 32 rows x 512 tokens of the 7B shape takes
8 GiB. A captured step replays the LoRA weights that were active when it was captured, so each cache has one graph
per set of active adapters (:func:`active_adapters`: which adapter is selected, or none), all sharing that cache.
Capturing costs three eager steps. Only caches whose every layer is a plain static layer are graphed (a
sliding-window layer keeps Python-side state that a graph would freeze); on anything else, or if capturing fails,
or without room for the cache, :meth:`GraphDecoder.generate` returns None and the caller decodes with ``generate``.
"""

from __future__ import annotations

import inspect
import logging
import weakref
from collections import OrderedDict
from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from service.llm.graph_capture import record
from service.llm.modeling import free_gpu_bytes

log = logging.getLogger("flashtune.inference")
CACHE_MULTIPLE = 256
CACHE_FRACTION_OF_FREE = 0.5  # a static cache is made only while it takes at most this share of the free memory
_DECODERS: weakref.WeakKeyDictionary[Any, GraphDecoder] = weakref.WeakKeyDictionary()


def eos_ids(tokenizer: Any) -> list[int]:
    """The tokenizer's end-of-sequence token ids (one, or several)."""
    eos = tokenizer.eos_token_id
    return list(eos) if isinstance(eos, (list, tuple)) else [eos]


def attach(model: Any, decoder: GraphDecoder | None) -> None:
    """Decode ``model``'s generations with ``decoder`` (None: with ``generate`` again); see :func:`decoder_for`."""
    if decoder is None:
        _DECODERS.pop(model, None)
    else:
        _DECODERS[model] = decoder


def decoder_for(model: Any) -> GraphDecoder | None:
    """The decoder attached to ``model``, if any."""
    return _DECODERS.get(model)


def active_adapters(model: Any) -> Hashable:
    """What a PeftModel's forward pass applies now: ``(True, ())`` with its adapters disabled, else ``(False,
    active adapter names)`` (the first LoRA layer's view: peft sets every layer at once); None without adapters."""
    try:
        from peft.tuners.tuners_utils import BaseTunerLayer
    except ImportError:
        return None
    for module in model.modules():
        if isinstance(module, BaseTunerLayer):
            return (True, ()) if module.disable_adapters else (False, tuple(module.active_adapters))
    return None


@dataclass
class _Step:
    """One batch size and cache length: the static cache and the tensors the captured step reads and advances."""

    cache: Any
    ids: torch.Tensor  # (rows, 1): the token fed to the next step
    positions: torch.Tensor  # (rows, 1): its position
    mask: torch.Tensor  # (rows, cache length): 0 on the prompt's left padding
    finished: torch.Tensor  # (rows,): the row has produced an end-of-sequence token
    graphs: dict[Hashable, Any] = field(default_factory=dict)  # by active adapters (:func:`active_adapters`)


class GraphDecoder:
    """Greedy decoding of one model, the step replayed from a CUDA graph (``graphs=False``: run eagerly, for tests)."""

    def __init__(
        self, model: Any, eos_ids: Sequence[int], pad_id: int | None, limit: int = 2, graphs: bool = True
    ) -> None:
        device = next(model.parameters()).device
        # weakly: the registry maps the model to its decoder, and a strong reference back would keep a dropped
        # merged copy (a whole model) alive
        self._model = weakref.ref(model)
        self.limit, self.graphs, self.broken = limit, graphs, False
        self.eos = torch.tensor(list(eos_ids), device=device)
        self.pad = torch.tensor(eos_ids[0] if pad_id is None else pad_id, device=device)
        # the cache argument is ``cache`` in transformers 5.24, ``past_key_values`` in 5.17 (the GPU machine's); a
        # PeftModel passes it on to its base model
        inner = model.get_base_model() if hasattr(model, "get_base_model") else model
        self._cache_arg = "cache" if "cache" in inspect.signature(inner.forward).parameters else "past_key_values"
        self._steps: OrderedDict[tuple[int, int], _Step] = OrderedDict()

    @property
    def model(self) -> Any:
        model = self._model()
        if model is None:
            raise RuntimeError("the model of this decoder was dropped")
        return model

    def generate(
        self,
        input_ids: torch.Tensor,
        attention_mask: torch.Tensor,
        max_new_tokens: int,
        on_tokens: Callable[[torch.Tensor], bool] | None = None,
    ) -> torch.Tensor | None:
        """The new tokens (rows x at most ``max_new_tokens``) for a left-padded batch; ``on_tokens`` gets each step's
        tokens (on the CPU) and stops decoding by returning False. None where this model cannot be decoded here."""
        rows, prompt = input_ids.shape
        length = -(-(prompt + max_new_tokens) // CACHE_MULTIPLE) * CACHE_MULTIPLE
        step = None if self.broken else self._step(rows, length)
        graph = None if step is None else self._graph(step)
        if step is None or (self.graphs and graph is None):
            return None
        step.cache.reset()
        step.mask.fill_(1)
        step.mask[:, :prompt].copy_(attention_mask)
        positions = attention_mask.long().cumsum(-1) - 1  # as generate() numbers a left-padded prompt
        positions.masked_fill_(attention_mask == 0, 1)
        logits = self._forward(step, input_ids, positions, attention_mask)  # the prefill runs eagerly
        token = logits[:, -1].argmax(-1)
        step.finished.copy_(torch.isin(token, self.eos))
        step.ids.copy_(token[:, None])
        step.positions.copy_(positions[:, -1:] + 1)
        tokens = [token]
        while on_tokens is None or on_tokens(token.cpu()):
            if len(tokens) == max_new_tokens or bool(step.finished.all()):
                break
            if graph is not None:
                graph.replay()
            else:
                self._advance(step)
            token = step.ids[:, 0].clone()
            tokens.append(token)
        return torch.stack(tokens, dim=1)

    def _forward(self, step: _Step, ids: torch.Tensor, positions: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        out = self.model(
            input_ids=ids,
            attention_mask=mask,
            position_ids=positions,
            use_cache=True,
            logits_to_keep=1,
            **{self._cache_arg: step.cache},
        )
        return out.logits  # type: ignore[no-any-return]

    def _advance(self, step: _Step) -> None:
        """One decoding step, all on the device: what the graph records."""
        logits = self._forward(step, step.ids, step.positions, step.mask)
        token = torch.where(step.finished, self.pad, logits[:, -1].argmax(-1))
        step.finished |= torch.isin(token, self.eos)
        step.ids.copy_(token[:, None])
        step.positions.add_(1)

    def _step(self, rows: int, length: int) -> _Step | None:
        key = (rows, length)
        if key in self._steps:
            self._steps.move_to_end(key)
            return self._steps[key]
        from transformers import StaticCache
        from transformers.cache_utils import StaticLayer

        while len(self._steps) >= self.limit:  # free the least recently used cache before allocating another
            self._steps.popitem(last=False)
        device = self.eos.device
        if device.type == "cuda" and not self._room_for(rows, length):
            return None  # generate() decodes this batch; smaller ones still get a cache
        step = _Step(
            cache=StaticCache(config=self.model.config, max_cache_len=length),
            ids=torch.zeros((rows, 1), dtype=torch.long, device=device),
            positions=torch.zeros((rows, 1), dtype=torch.long, device=device),
            mask=torch.ones((rows, length), dtype=torch.long, device=device),
            finished=torch.zeros(rows, dtype=torch.bool, device=device),
        )
        if any(type(layer) is not StaticLayer for layer in getattr(step.cache, "layers", [None])):
            log.info("graph decoding is off for this model: its cache has layers other than plain static ones")
            self.broken = True
            return None
        self._forward(step, step.ids, step.positions, step.mask)  # allocates the cache's tensors, before any capture
        self._steps[key] = step
        return step

    def _room_for(self, rows: int, length: int) -> bool:
        """Whether a static cache of ``rows`` x ``length`` takes at most :data:`CACHE_FRACTION_OF_FREE` of the memory
        free now (it stays allocated, unlike ``generate``'s, so a smaller GPU keeps room for the passes)."""
        config = self.model.config
        heads = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        need = 2 * config.num_hidden_layers * rows * length * heads * head_dim * self.model.dtype.itemsize
        free = free_gpu_bytes()  # within the API's GPU budget, if any (FLASHTUNE_SERVE_GPU_MEMORY_GIB)
        if need <= CACHE_FRACTION_OF_FREE * free:
            return True
        log.info(
            "decoding %d rows x %d tokens with generate(): a static cache would take %.1f of %.1f GiB free",
            rows,
            length,
            need / 2**30,
            free / 2**30,
        )
        return False

    def _graph(self, step: _Step) -> Any:
        """The step's graph for the adapters active now, captured on first use; None without graphs, or if
        capturing failed (decoding is then left to ``generate`` for good)."""
        if not self.graphs:
            return None
        variant = active_adapters(self.model)
        if variant not in step.graphs:
            try:
                step.graphs[variant] = self._capture(step)
            except Exception as exc:  # noqa: BLE001 - any failure to capture leaves decoding to generate()
                log.warning("graph decoding is off for this model: capturing the step failed (%s)", exc)
                self.broken = True
                return None
        return step.graphs[variant]

    def _capture(self, step: _Step) -> Any:
        """Record one step (``service.llm.graph_capture``). The cache is reset before each use; here too, since a graph
        captured for other adapters may have left it full."""
        step.cache.reset()
        step.positions.zero_()
        step.finished.zero_()
        step.mask.fill_(1)
        graph, _ = record(lambda: self._advance(step))
        return graph

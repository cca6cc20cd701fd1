"""Mixed-adapter batches with every adapter's LoRA delta in one gathered computation per layer.

peft runs a mixed batch (``adapter_names``: each row's adapter) by looping, in each LoRA layer, over the distinct
adapters of the batch: one small matmul pair and one indexed update per adapter, so a micro-batch of 50 adapters
runs 50 of them per layer. :class:`GatheredLoRA` instead stacks, once per set of loaded adapters, each LoRA
``Linear`` layer's weights of all of them (``A`` as ``[N + 1, in, r_max]``, ``B`` times the adapter's scaling as
``[N + 1, r_max, out]``; index 0 is the base alone, all zeros; adapters of smaller rank padded with zeros, which add
nothing), and while it is installed such a layer answers peft's mixed batch with::

    result = base(x) + bmm(bmm(x, A[rows]), B[rows])     # rows: each row's adapter index, gathered once per pass

the gathered matrix-vector idea of Punica/S-LoRA ("BGMV") in two batched torch matmuls. It is exact against peft's
loop up to rounding (the scaling is folded into ``B``). Only the mixed path changes: peft calls a layer's
``_mixed_batch_forward`` only when ``adapter_names`` is given, and this replaces that method on the layer instance;
a batch of one adapter runs as before. Layers it cannot stack (embeddings, convolutions, a LoRA bias, DoRA or
another variant) keep peft's loop, as does a layer in training mode. ``FLASHTUNE_GATHERED_LORA=false`` turns it off
(``service.serving.adapters.AttachedAdapters.gather``).
"""

from __future__ import annotations

from collections.abc import Sequence
from functools import partial
from typing import Any

import torch
from torch import nn

BASE = "__base__"  # peft's adapter name for "no adapter" in adapter_names (service.llm.scoring.BASE)
STACKED_LAYERS = frozenset({"Linear", "Linear4bit", "Linear8bitLt"})  # peft LoRA layers on a linear base
VARIANT_KWARGS = ("alora_offsets",)  # peft.tuners.lora.layer.VARIANT_KWARG_KEYS: never passed to the base layer


def _stackable(layer: Any, names: Sequence[str]) -> list[str]:
    """The adapters of ``names`` that ``layer`` holds, if the layer can run all of them gathered; else []."""
    if type(layer).__name__ not in STACKED_LAYERS or not hasattr(layer, "_mixed_batch_forward"):
        return []
    present = [n for n in names if n in layer.lora_A]
    for name in present:
        a, b = layer.lora_A[name], layer.lora_B[name]
        plain = isinstance(a, nn.Linear) and isinstance(b, nn.Linear) and b.bias is None
        if not plain or name in getattr(layer, "lora_variant", {}) or layer.use_dora.get(name, False):
            return []
    return present


def _stacks(layer: Any, names: Sequence[str], present: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """``layer``'s LoRA weights of ``names`` (row ``i + 1``: ``names[i]``; row 0 and absent adapters: zeros)."""
    weights = [(layer.lora_A[n].weight, layer.lora_B[n].weight, float(layer.scaling[n])) for n in present]
    dtype = weights[0][0].dtype
    for a, b, _ in weights:
        dtype = torch.promote_types(dtype, torch.promote_types(a.dtype, b.dtype))
    device = weights[0][0].device
    rank = max(a.shape[0] for a, _, _ in weights)
    fan_in, fan_out = weights[0][0].shape[1], weights[0][1].shape[0]
    stack_a = torch.zeros(len(names) + 1, fan_in, rank, dtype=dtype, device=device)
    stack_b = torch.zeros(len(names) + 1, rank, fan_out, dtype=dtype, device=device)
    with torch.no_grad():
        for name, (a, b, scaling) in zip(present, weights, strict=True):
            i, r = names.index(name) + 1, a.shape[0]
            stack_a[i, :, :r] = a.t().to(dtype)
            stack_b[i, :r, :] = (b.float() * scaling).t().to(dtype)
    return stack_a, stack_b


class GatheredLoRA:
    """The stacked LoRA weights of the adapters ``names`` on ``model`` (a PeftModel), installed on its layers."""

    def __init__(self, model: Any, names: Sequence[str]) -> None:
        self.names = tuple(names)
        self.index = {BASE: 0} | {name: i + 1 for i, name in enumerate(self.names)}
        self._rows: tuple[list[str], dict[torch.device, torch.Tensor | None]] | None = None
        self.layers: list[nn.Module] = []
        self._stacks: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}
        for module in model.modules():
            present = _stackable(module, self.names) if hasattr(module, "lora_A") else []
            if present:
                self.layers.append(module)
                self._stacks[id(module)] = _stacks(module, self.names, present)

    @property
    def stacked_bytes(self) -> int:
        """The memory the stacks take (a copy of the adapters' LoRA weights, padded to the largest rank)."""
        return sum(t.numel() * t.element_size() for pair in self._stacks.values() for t in pair)

    def install(self) -> None:
        """Make each stacked layer answer mixed batches gathered (its instance's ``_mixed_batch_forward``)."""
        for layer in self.layers:
            stack_a, stack_b = self._stacks[id(layer)]
            layer._mixed_batch_forward = partial(self._forward, layer, stack_a, stack_b)  # type: ignore[assignment]

    def remove(self) -> None:
        """Give the layers peft's own mixed-batch loop back."""
        for layer in self.layers:
            layer.__dict__.pop("_mixed_batch_forward", None)
        self._rows = None

    def rows(self, names: list[str], device: torch.device) -> torch.Tensor | None:
        """Each row's adapter index on ``device``; None if a row names an adapter that is not stacked. peft hands
        every layer of one pass the same list, so it is looked up once per pass (the list is kept, so that
        ``is`` cannot match a new list at the old one's address)."""
        if self._rows is None or self._rows[0] is not names:
            self._rows = (names, {})
        cached = self._rows[1]
        if device not in cached:
            found = [self.index.get(name) for name in names]
            cached[device] = None if None in found else torch.tensor(found, dtype=torch.long).to(device)
        return cached[device]

    def _forward(
        self,
        layer: Any,
        stack_a: torch.Tensor,
        stack_b: torch.Tensor,
        x: torch.Tensor,
        *args: Any,
        adapter_names: list[str],
        **kwargs: Any,
    ) -> torch.Tensor:
        """``layer``'s mixed-batch forward: its base output plus every row's LoRA delta, gathered."""
        rows = None
        if not layer.training and all(kwargs.get(k) is None for k in VARIANT_KWARGS):
            rows = self.rows(adapter_names, x.device)
        if rows is None:  # peft's own loop
            peft_forward = type(layer)._mixed_batch_forward
            return peft_forward(layer, x, *args, adapter_names=adapter_names, **kwargs)  # type: ignore[no-any-return]
        for key in VARIANT_KWARGS:
            kwargs.pop(key, None)
        result: torch.Tensor = layer.base_layer(x, *args, **kwargs)
        rows_x = x.reshape(x.shape[0], -1, x.shape[-1]).to(stack_a.dtype)
        delta = torch.bmm(torch.bmm(rows_x, stack_a[rows]), stack_b[rows])
        result += delta.reshape(*result.shape).to(result.dtype)
        return result

"""bitsandbytes 4-bit (NF4) layers of a loaded model, and their bf16 copies.

bitsandbytes keeps an NF4 weight packed and, for a pass over many tokens, dequantises it to the compute dtype
and multiplies by that: ~7 ms of ``kDequantizeBlockwise`` per pass on the 7B shape (H200, docs/benchmarks.md), a
quarter of a label-scoring pass. Where memory allows, serving keeps each weight's bf16 copy, made once with the
very dequantisation bitsandbytes runs, and multiplies by it (:func:`keep_dense_copies`): label scoring went from
28.6 to 20.3 ms, as fast as an unquantised bf16 base, at ~4x the memory of the packed weights (12 GiB against 3.5
on the 7B shape). Passes over many tokens give bitsandbytes' own numbers, and with them the numbers the job's
evaluation saw. For a few rows (decoding steps) bitsandbytes on the GPU uses a fused 4-bit kernel instead, which
rounds differently from the plain bf16 product. Training keeps the copies for the whole job where they fit beside
its micro-batch (``workers.training.cuda.plan``), so that neither a pass nor its backward dequantises.

The copies are in the layers' compute dtype: bf16, or fp16 on a card without native bf16 (a T4 or V100,
``service.llm.modeling.pick_compute_dtype``). bitsandbytes is imported only when a model has such layers, never on a
plain CPU or bf16 path.
"""

from __future__ import annotations

from typing import Any

import torch

# Serving keeps the bf16 copies only while they take at most this share of the free GPU memory: the rest is for
# the passes' activations, the adapters and merged copies, and a training job that may share the GPU.
KEEP_FRACTION_OF_FREE = 0.5


def nf4_layers(model: Any) -> list[Any]:
    """The bitsandbytes 4-bit linear layers of ``model`` (none where bitsandbytes does not import)."""
    try:  # a bf16 base (quantization "none") must run even where bitsandbytes does not import
        from bitsandbytes.nn import Linear4bit
    except ImportError:
        return []
    return [m for m in model.modules() if isinstance(m, Linear4bit)]


def dequantized_bytes(layers: list[Any]) -> int:
    """Memory of the bf16 copies of these 4-bit weights, all held at once."""
    return sum(2 * layer.weight.quant_state.shape.numel() for layer in layers)


def dequantize(weight: Any, dtype: torch.dtype) -> torch.Tensor:
    """A 4-bit weight as a dense ``(out, in)`` matrix, computed as bitsandbytes' own matmul computes it."""
    from bitsandbytes.functional import dequantize_4bit

    return dequantize_4bit(weight.view(-1, 1), weight.quant_state).to(dtype)


def keep_dense_copies(layers: list[Any], free_bytes: int) -> bool:
    """Give each layer a bf16 copy of its weight and a forward pass that multiplies by it (:func:`use_dense_copies`),
    if the copies take at most :data:`KEEP_FRACTION_OF_FREE` of ``free_bytes``; returns whether they were kept."""
    if not layers or dequantized_bytes(layers) > KEEP_FRACTION_OF_FREE * free_bytes:
        return False
    use_dense_copies(layers)
    return True


def use_dense_copies(layers: list[Any], dtype: torch.dtype | None = None) -> None:
    """Give each layer a copy of its weight dequantised once, in ``dtype`` (default: the layer's compute dtype), and a
    forward pass that multiplies by it: the outputs are as the module docstring says, and a pass's backward needs the
    copy it already holds (the weight is frozen: only the input's gradient). The packed weight stays (loading or
    merging an adapter may read it)."""
    for layer in layers:
        dense_dtype = dtype or layer.compute_dtype or torch.bfloat16
        dense = dequantize(layer.weight, dense_dtype)
        bias = None if layer.bias is None else layer.bias.detach().to(dense_dtype)

        def forward(x: torch.Tensor, dense: torch.Tensor = dense, bias: torch.Tensor | None = bias) -> torch.Tensor:
            return torch.nn.functional.linear(x.to(dense.dtype), dense, bias).to(x.dtype)

        layer.forward = forward

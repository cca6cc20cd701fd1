"""service/llm/nf4.py: bf16 copies of NF4 weights give bitsandbytes' own outputs where it dequantises and multiplies
(bitsandbytes quantises on the CPU too, and there it always does)."""

from __future__ import annotations

from typing import Any

import bitsandbytes
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Params4bit

from service.llm.nf4 import dequantized_bytes, keep_dense_copies, nf4_layers


def _nf4_model(seed: int = 0) -> torch.nn.Module:
    """Two 4-bit layers quantised from random float32 ones, as ``from_pretrained`` with a BitsAndBytesConfig makes
    them (NF4, double quantisation, bf16 compute); the second without a bias."""
    torch.manual_seed(seed)
    layers = []
    for n_in, n_out, bias in ((64, 128, True), (128, 64, False)):
        plain = torch.nn.Linear(n_in, n_out, bias=bias)
        layer = Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4")
        layer.weight = Params4bit(
            plain.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
        )
        if bias:
            layer.bias = torch.nn.Parameter(plain.bias.data.clone(), requires_grad=False)
        layers.append(layer.to("cpu"))  # quantises
    return torch.nn.Sequential(*layers)


def test_dense_copies_give_bitsandbytes_outputs() -> None:
    model = _nf4_model()
    layers = nf4_layers(model)
    assert len(layers) == 2
    assert dequantized_bytes(layers) == 2 * (64 * 128 + 128 * 64)
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16)
    with torch.no_grad():
        before = model(x)
        assert keep_dense_copies(layers, free_bytes=10 * dequantized_bytes(layers))
        after = model(x)
    assert torch.equal(before, after)
    assert after.dtype == torch.bfloat16


def test_one_row_goes_to_bitsandbytes(monkeypatch: pytest.MonkeyPatch) -> None:
    """A one-row pass (a batch-1 decoding step) multiplies by the packed 4-bit weight (on the GPU bitsandbytes' gemv),
    a larger one by the dense copy."""
    model = _nf4_model()
    layers = nf4_layers(model)
    assert keep_dense_copies(layers, free_bytes=10 * dequantized_bytes(layers))
    rows: list[int] = []
    matmul_4bit = bitsandbytes.matmul_4bit

    def spy(x: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        rows.append(x.numel() // x.shape[-1])
        return matmul_4bit(x, *args, **kwargs)

    monkeypatch.setattr(bitsandbytes, "matmul_4bit", spy)
    with torch.no_grad():
        model(torch.randn(2, 1, 64, dtype=torch.bfloat16))
        assert rows == []
        model(torch.randn(1, 1, 64, dtype=torch.bfloat16))
    assert rows == [1, 1]  # both layers


def test_dense_copies_need_room() -> None:
    model = _nf4_model()
    layers = nf4_layers(model)
    plain_forward = layers[0].forward
    assert not keep_dense_copies(layers, free_bytes=dequantized_bytes(layers))  # the copies would take it all
    assert layers[0].forward == plain_forward
    assert not keep_dense_copies([], free_bytes=1 << 40)
    assert nf4_layers(torch.nn.Linear(4, 4)) == []

"""service/llm/nf4.py: bf16 copies of NF4 weights give bitsandbytes' own outputs where it dequantises and multiplies
(bitsandbytes quantises on the CPU too, and there it always does)."""

from __future__ import annotations

import torch
from bitsandbytes.nn import Linear4bit, Params4bit

from service.llm.nf4 import dequantized_bytes, keep_dense_copies, nf4_layers, use_dense_copies


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


def test_dense_copies_need_room() -> None:
    model = _nf4_model()
    layers = nf4_layers(model)
    plain_forward = layers[0].forward
    assert not keep_dense_copies(layers, free_bytes=dequantized_bytes(layers))  # the copies would take it all
    assert layers[0].forward == plain_forward
    assert not keep_dense_copies([], free_bytes=1 << 40)
    assert nf4_layers(torch.nn.Linear(4, 4)) == []


def test_dense_copies_train_as_bitsandbytes_does() -> None:
    """Training's copies (kept for the whole job): the same outputs and input gradients as bitsandbytes' own
    layers, which dequantise in every pass and again in its backward; the frozen weight gets no gradient."""
    model = _nf4_model()
    x = torch.randn(3, 7, 64, dtype=torch.bfloat16, requires_grad=True)
    before = model(x)
    before.float().square().sum().backward()
    grad_before, x.grad = x.grad, None
    use_dense_copies(nf4_layers(model), torch.bfloat16)
    after = model(x)
    after.float().square().sum().backward()
    assert torch.equal(before, after)
    assert x.grad is not None and grad_before is not None
    torch.testing.assert_close(x.grad, grad_before)
    assert all(p.grad is None for p in model.parameters())

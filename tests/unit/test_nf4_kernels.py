"""service/llm/nf4_kernels.py: the NF4 layout the kernel reads is bitsandbytes' own (checked against bitsandbytes'
CPU quantisation and dequantisation), and the kernel gives the dequantise-then-multiply product.

The kernel test runs the Triton kernel under Triton's CPU interpreter (``TRITON_INTERPRET=1``). The project's
environment does not carry Triton (the GPU machine's torch does): where it does not import, that one test is
skipped; it is the only skip here. The interpreter cannot multiply bf16 tiles with ``tl.dot`` (it returns
garbage for a plain bf16 ``tl.dot`` too), so the tensor-core path is checked in fp16 and float32 here and in bf16
by ``bench/nf4_decode_gpu.py`` on the GPU.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys

import bitsandbytes.functional as bnbf
import pytest
import torch
from bitsandbytes.nn import Linear4bit, Params4bit

from service.llm import nf4_kernels
from service.llm.nf4_kernels import (
    DOT_MIN_ROWS,
    KernelConfig,
    Nf4Weight,
    attach_decode_kernel,
    dequantize_reference,
    detach_decode_kernel,
    float_absmax,
    kernel_wanted,
    nested_absmax_reference,
    nf4_code,
    pick_config,
    quantize_reference,
)


def _layer(n_in: int, n_out: int, bias: bool, seed: int = 0) -> Linear4bit:
    """A 4-bit layer as ``from_pretrained`` with FlashTune's BitsAndBytesConfig makes it (NF4, double quantisation,
    bf16 compute), quantised on the CPU."""
    torch.manual_seed(seed)
    plain = torch.nn.Linear(n_in, n_out, bias=bias)
    layer = Linear4bit(n_in, n_out, bias=bias, compute_dtype=torch.bfloat16, quant_type="nf4")
    layer.weight = Params4bit(
        plain.weight.data.clone(), requires_grad=False, quant_type="nf4", compress_statistics=True
    )
    if bias:
        layer.bias = torch.nn.Parameter(plain.bias.data.clone(), requires_grad=False)
    return layer.to("cpu")


def test_the_code_is_bitsandbytes_nf4() -> None:
    assert torch.equal(bnbf.get_4bit_type("nf4", device="cpu").float(), nf4_code())


def test_quantiser_packs_as_bitsandbytes() -> None:
    torch.manual_seed(1)
    weight = torch.randn(96, 320)
    packed, state = bnbf.quantize_4bit(weight, blocksize=64, quant_type="nf4")
    ours, absmax = quantize_reference(weight)
    assert torch.equal(packed.view(-1), ours)  # first element of each pair in the high nibble
    assert torch.equal(state.absmax, absmax)
    assert torch.equal(
        bnbf.dequantize_4bit(packed, state), dequantize_reference(ours, absmax, (96, 320), torch.float32)
    )


def test_high_nibble_first() -> None:
    packed = torch.tensor([0x0F, 0x70], dtype=torch.uint8)
    dense = dequantize_reference(packed, torch.tensor([2.0]), (1, 4), torch.float32)
    assert dense.tolist() == [[-2.0, 2.0, 0.0, -2.0]]


def test_double_quantised_scales_and_dequantisation_equal_bitsandbytes() -> None:
    layer = _layer(320, 96, bias=True)
    state = layer.weight.quant_state
    assert state.nested and state.blocksize == 64
    absmax = float_absmax(state)
    reference = nested_absmax_reference(state.absmax, state.state2.code, state.state2.absmax, state.offset)
    assert torch.equal(absmax, reference)
    weight = Nf4Weight.of(layer)
    assert weight is not None and weight.shape == (96, 320) and weight.blocksize == 64
    assert weight.extra_bytes == 96 * 320 // 64 * 4
    dense = bnbf.dequantize_4bit(layer.weight.data, state).to(torch.bfloat16)
    assert torch.equal(dequantize_reference(weight.packed, weight.absmax, weight.shape, torch.bfloat16), dense)


def test_attached_layers_keep_their_forward_off_the_kernel() -> None:
    """On the CPU (and for inputs of more rows than the kernel takes) the layer's previous forward runs."""
    layer = _layer(128, 64, bias=False)
    calls: list[tuple[int, ...]] = []

    def previous(x: torch.Tensor) -> torch.Tensor:
        calls.append(tuple(x.shape))
        return x[..., :64]

    layer.forward = previous  # type: ignore[method-assign]
    assert attach_decode_kernel([layer], max_rows=4) == 128 * 64 // 64 * 4
    assert layer.forward is not previous
    assert attach_decode_kernel([layer], max_rows=4) == 0  # attached once only
    layer(torch.zeros(1, 1, 128))  # the CPU: not the kernel
    assert calls == [(1, 1, 128)]
    assert detach_decode_kernel([layer]) == 1
    assert layer.forward is previous


def test_kernel_only_where_asked_and_possible() -> None:
    assert not kernel_wanted("off", "cuda")
    assert not kernel_wanted("auto", "cpu")


def test_configs_fit_the_rows() -> None:
    for rows in range(1, 65):
        config = pick_config(rows, 4096, 11008)
        assert config.block_m >= rows or config.block_m == 64
        assert (config.block_m >= 16) == (rows >= DOT_MIN_ROWS)  # tl.dot needs tiles of at least 16 rows


def _kernel_error(dtype: torch.dtype, rows: int, k_in: int, config: KernelConfig | None) -> float:
    """The kernel's largest difference from dequantise-then-multiply, relative to the largest output."""
    torch.manual_seed(rows)
    n_out = 48
    packed, absmax = quantize_reference(torch.randn(n_out, k_in))
    dense = dequantize_reference(packed, absmax, (n_out, k_in), dtype)
    x = torch.randn(rows, 1, k_in).to(dtype)
    bias = torch.randn(n_out).to(dtype)
    out = nf4_kernels.nf4_linear(x, packed, absmax, nf4_code(), (n_out, k_in), bias, config=config)
    expected = x.float() @ dense.float().T + bias.float()
    assert out.shape == (rows, 1, n_out) and out.dtype == dtype
    return float((out.float() - expected).abs().max() / expected.abs().max())


# (dtype, rows, weights a row, configuration); 320 a row: the blocks of 64 do not align with the tiles of bytes;
# 96 a row: blocks of 64 weights span two rows (bitsandbytes' blocks run over the flattened weight)
def _layer_error() -> float:
    """A bitsandbytes layer (double quantisation, bias) with the kernel attached, against its dequantised weight."""
    from service.llm.nf4_kernels import DecodeForward

    DecodeForward.devices = ("cuda", "cpu")
    layer = _layer(320, 96, bias=True, seed=3)
    dense = bnbf.dequantize_4bit(layer.weight.data, layer.weight.quant_state).to(torch.bfloat16)
    attach_decode_kernel([layer], max_rows=8)
    x = torch.randn(2, 3, 320, dtype=torch.bfloat16)
    with torch.no_grad():
        out = layer(x)
    expected = x.float() @ dense.float().T + layer.bias.float()
    assert out.shape == (2, 3, 96) and out.dtype == torch.bfloat16
    assert not layer.forward.failed
    return float((out.float() - expected).abs().max() / expected.abs().max())


CASES = [
    ("bfloat16", 1, 320, None),
    ("bfloat16", 5, 320, None),
    ("float16", 3, 96, None),
    ("float16", 20, 320, None),  # tl.dot, rows masked
    ("float32", 16, 96, (16, 16, 32)),
    ("bfloat16", 7, 320, (8, 16, 32)),  # several tiles of a row's bytes, the last one partial
    ("bfloat16", 3, 320, (4, 16, 32, 4, 3, 3)),  # split-K: 5 tiles in 3 shares, the last one short
    ("float16", 20, 96, (32, 16, 16, 4, 3, 2)),  # split-K with tl.dot
    ("bfloat16", 2, 320, (2, 16, 64, 4, 3, 1, True)),  # NF4 values by selects instead of loads
    ("float16", 17, 320, (32, 32, 32, 4, 3, 2, True)),
]
TOLERANCE = {"float32": 1e-4, "float16": 2e-3, "bfloat16": 1e-2}


@pytest.mark.skipif(importlib.util.find_spec("triton") is None, reason="Triton is not installed here (the one skip)")
def test_kernel_equals_dequantise_then_multiply() -> None:
    """Run in a fresh interpreter: Triton reads ``TRITON_INTERPRET`` when it is imported."""
    script = (
        "import json, torch\n"
        "from tests.unit.test_nf4_kernels import CASES, _kernel_error, _layer_error\n"
        "from service.llm.nf4_kernels import KernelConfig\n"
        "errors = [_kernel_error(getattr(torch, d), r, k, c and KernelConfig(*c)) for d, r, k, c in CASES]\n"
        "print(json.dumps(errors + [_layer_error()]))\n"
    )
    env = {**os.environ, "TRITON_INTERPRET": "1"}
    done = subprocess.run([sys.executable, "-c", script], env=env, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    errors = json.loads(done.stdout.strip().splitlines()[-1])
    assert len(errors) == len(CASES) + 1
    for (dtype, rows, k_in, config), error in zip(CASES, errors[:-1], strict=True):
        assert error <= TOLERANCE[dtype], (dtype, rows, k_in, config, error)
    assert errors[-1] <= TOLERANCE["bfloat16"]  # a bitsandbytes layer through its attached forward


def test_the_setting_is_opt_in() -> None:
    from pydantic import ValidationError

    from service.core.config import Settings

    assert Settings().nf4_decode_kernel == "off"
    assert Settings(nf4_decode_kernel="auto").nf4_decode_kernel == "auto"
    with pytest.raises(ValidationError):
        Settings(nf4_decode_kernel="on")

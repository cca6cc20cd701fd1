"""A fused NF4 dequantise-and-multiply kernel (Triton) for matrix products of a few rows: the decoding steps.

For a product of a few rows bitsandbytes either runs its own 4-bit kernel or (serving's default on a GPU with room,
``service.llm.nf4.keep_dense_copies``) multiplies by each weight's bf16 copy: 2 bytes read per weight for every
token decoded. :func:`nf4_linear` reads the packed weight (half a byte per weight) and a float32 scale per block of
64 weights (1/16 byte per weight), dequantises in registers and multiplies: ``y = x @ dequant(W)^T (+ bias)``.
On the 7B shape (6.07e9 weights in its linear layers) a decoding step then reads 3.18 GiB of them (2.83 packed +
0.35 of scales) instead of 11.31 GiB of bf16 copies.

The layout is bitsandbytes 0.50's (``bitsandbytes.functional.quantize_4bit`` / ``dequantize_4bit`` and its
``backends/default/ops.py``; read from its source, not guessed):

- the weight ``(out, in)`` is flattened row-major and quantised in blocks of ``blocksize`` (64) consecutive
  elements, each block scaled by its absolute maximum (``absmax``), each element the index of the nearest of the
  16 NF4 values (:data:`NF4_CODE`, ``get_4bit_type("nf4")``);
- two elements per byte, the first (even flat index) in the **high** nibble: ``packed = (q[0::2] << 4) | q[1::2]``;
- dequantised as ``code[q] * absmax[i // blocksize]`` in float32, then cast to the compute dtype;
- with double quantisation (the FlashTune default) ``absmax`` is itself quantised: 8-bit indices into a code of its
  own, blocks of 256 with their own float32 absmax, plus one float32 ``offset``. :func:`float_absmax` undoes that
  once, when the kernel is attached to a layer, with bitsandbytes' own ``dequantize_blockwise``; the float32 scales
  take 4 bytes per 64 weights (0.35 GiB on the 7B shape) beside the packed weights, against 1 byte for the
  nested ones.

The dequantised weights equal bitsandbytes' bit for bit (the same float32 product, rounded the same way); only the
order of the sums differs from a dense product. :func:`dequantize_reference` is the pure-torch dequantisation, and
:func:`quantize_reference` a pure-torch NF4 quantiser following bitsandbytes' algorithm, for tests on any machine.

Serving attaches the kernel to an NF4 base's layers (:func:`attach_decode_kernel`, setting ``nf4_decode_kernel``):
inputs of at most :data:`MAX_ROWS` rows go through the kernel, larger ones (prompts, label scoring) through the
forward the layer had (its bf16 copy, or bitsandbytes). Triton is imported only when the kernel is used; without
CUDA or Triton nothing is attached. A Triton launch costs tens of microseconds of Python, so the kernel pays off in
the captured decoding step (``service.llm.decoding``), where the graph replays the launches.
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch

log = logging.getLogger("flashtune.inference")

MAX_ROWS = 64  # inputs with more rows than this go through the layer's previous forward
DOT_MIN_ROWS = 9  # from this many rows on, the kernel multiplies with tensor cores (tl.dot, tiles of >= 16 rows)

# bitsandbytes' NF4 code (``bitsandbytes.functional.get_4bit_type("nf4")``, 0.50.2), index order = nibble value
NF4_CODE = (
    -1.0,
    -0.6961928009986877,
    -0.5250730514526367,
    -0.39491748809814453,
    -0.28444138169288635,
    -0.18477343022823334,
    -0.09105003625154495,
    0.0,
    0.07958029955625534,
    0.16093020141124725,
    0.24611230194568634,
    0.33791524171829224,
    0.44070982933044434,
    0.5626170039176941,
    0.7229568362236023,
    1.0,
)


def nf4_code(device: torch.device | str = "cpu") -> torch.Tensor:
    return torch.tensor(NF4_CODE, dtype=torch.float32, device=device)


# ---------------------------------------------------------------------------------------------- pure torch
def quantize_reference(weight: torch.Tensor, blocksize: int = 64) -> tuple[torch.Tensor, torch.Tensor]:
    """NF4-quantise ``weight`` as bitsandbytes' ``quantize_4bit`` does (no double quantisation): returns the packed
    bytes (``numel / 2`` uint8, the first element of each pair in the high nibble) and the float32 absmax of each
    block of ``blocksize`` consecutive elements of the row-major flattened weight."""
    flat = weight.reshape(-1).float()
    if flat.numel() % 2:
        raise ValueError("an NF4 weight needs an even number of elements")
    padded = torch.nn.functional.pad(flat, (0, (-flat.numel()) % blocksize))
    blocks = padded.view(-1, blocksize)
    absmax = blocks.abs().amax(dim=1)
    scaled = torch.clamp(blocks * (1.0 / absmax.clamp(min=1e-38))[:, None], -1, 1).reshape(-1)[: flat.numel()]
    code = nf4_code(weight.device)
    q = torch.bucketize(scaled, (code[:-1] + code[1:]) / 2).to(torch.uint8)
    return (q[0::2] << 4) | q[1::2], absmax


def dequantize_reference(
    packed: torch.Tensor, absmax: torch.Tensor, shape: tuple[int, int], dtype: torch.dtype, blocksize: int = 64
) -> torch.Tensor:
    """The dense ``shape`` weight of NF4 ``packed`` bytes with float32 ``absmax``, as bitsandbytes dequantises it."""
    flat = packed.reshape(-1).view(torch.uint8)
    n = shape[0] * shape[1]
    q = torch.stack([flat >> 4, flat & 0xF], dim=1).reshape(-1)[:n].long()
    values = nf4_code(flat.device)[q]
    scales = absmax.float().repeat_interleave(blocksize)[:n]
    return (values * scales).reshape(shape).to(dtype)


def float_absmax(quant_state: Any) -> torch.Tensor:
    """The float32 absmax of each block of a bitsandbytes ``QuantState``: itself, or, with double quantisation,
    dequantised by bitsandbytes' own ``dequantize_blockwise`` plus the offset (as ``dequantize_4bit`` does)."""
    if not quant_state.nested:
        return quant_state.absmax.float().contiguous()
    from bitsandbytes.functional import dequantize_blockwise

    absmax = dequantize_blockwise(quant_state.absmax, quant_state.state2)
    absmax += quant_state.offset
    return absmax.float().contiguous()


def nested_absmax_reference(
    quantized: torch.Tensor, code: torch.Tensor, absmax2: torch.Tensor, offset: torch.Tensor, blocksize2: int = 256
) -> torch.Tensor:
    """Pure torch: the float32 absmax of double quantisation, ``code[q] * absmax2[i // blocksize2] + offset``."""
    scales = absmax2.float().repeat_interleave(blocksize2)[: quantized.numel()]
    return code.float()[quantized.reshape(-1).long()] * scales + offset.float()


# ---------------------------------------------------------------------------------------------- the kernel
@dataclass(frozen=True)
class KernelConfig:
    block_m: int
    block_n: int
    block_kb: int  # packed bytes of a row per iteration (twice as many weights)
    num_warps: int = 4
    num_stages: int = 3
    split_k: int = 1  # > 1: shares of each row's bytes run in parallel, float32 partials summed by a second kernel
    select_code: bool = False  # NF4 values by a tree of selects on the nibble's bits instead of loads from the code


def pick_config(rows: int, n_out: int, k_in: int) -> KernelConfig:
    """A launch configuration by shape: guessed, not yet measured (``bench/nf4_decode_gpu.py`` sweeps others).

    Each program reads the rows' whole inputs, so the inputs read per weight byte grow as ``4 * block_m /
    block_n``: the more rows, the wider the tile of outputs; shares of the rows' bytes (split-K) then keep enough
    programs in flight for the memory bandwidth when ``n_out`` is small."""
    block_m = 1 if rows <= 1 else 1 << (rows - 1).bit_length()
    if rows < DOT_MIN_ROWS:
        # multiply-and-add on CUDA cores, the products kept per column of the tile and summed once at the end
        if block_m <= 2:
            return KernelConfig(block_m, 16, 128)
        if block_m == 4:
            return KernelConfig(4, 16, 64)
        return KernelConfig(8, 32, 64, num_warps=8)
    return KernelConfig(max(16, min(block_m, 64)), 64, 64, split_k=4 if n_out <= 4096 else 2)


_KERNEL: Any = None


def triton_available() -> bool:
    try:
        import triton  # noqa: F401
    except ImportError:
        return False
    return True


def _kernel() -> Any:
    global _KERNEL
    if _KERNEL is None:
        _KERNEL = _build_kernel()
    return _KERNEL


def _build_kernel() -> Any:
    from service.llm import nf4_triton

    return nf4_triton.nf4_matmul, nf4_triton.sum_splits


def nf4_linear(
    x: torch.Tensor,
    packed: torch.Tensor,
    absmax: torch.Tensor,
    code: torch.Tensor,
    shape: tuple[int, int],
    bias: torch.Tensor | None = None,
    blocksize: int = 64,
    config: KernelConfig | None = None,
) -> torch.Tensor:
    """``x @ dequant(W)^T + bias`` for the NF4 weight ``W`` of ``shape`` (out, in): ``packed`` its bytes (as
    bitsandbytes stores them), ``absmax`` the float32 scale of each block, ``code`` the 16 float32 NF4 values. In
    ``x``'s dtype (bf16 or fp16; the weight is dequantised to it, as bitsandbytes does, and summed in float32)."""
    n_out, k_in = shape
    if k_in % 2 or x.shape[-1] != k_in:
        raise ValueError(f"input of {x.shape[-1]} features for an NF4 weight of shape {shape}")
    lead = x.shape[:-1]
    x2 = x.reshape(-1, k_in)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    rows = x2.shape[0]
    out = torch.empty((rows, n_out), dtype=x.dtype, device=x.device)
    if rows == 0:
        return out.reshape(*lead, n_out)
    config = config or pick_config(rows, n_out, k_in)
    matmul, sum_splits = _kernel()
    tiles = -(-(k_in // 2) // config.block_kb)
    split = max(1, min(config.split_k, tiles))
    tiles_per_split = -(-tiles // split)
    target = out if split == 1 else torch.empty((split, rows, n_out), dtype=torch.float32, device=x.device)
    grid = (-(-n_out // config.block_n), -(-rows // config.block_m), split)
    matmul[grid](
        x2,
        packed,
        absmax,
        code,
        out if bias is None else bias,
        target,
        rows,
        n_out,
        k_in // 2,
        tiles_per_split,
        x2.stride(0),
        n_out,
        BLOCKSIZE=blocksize,
        HAS_BIAS=bias is not None and split == 1,
        USE_DOT=config.block_m >= 16,
        SELECT_CODE=config.select_code,
        BLOCK_M=config.block_m,
        BLOCK_N=config.block_n,
        BLOCK_KB=config.block_kb,
        num_warps=config.num_warps,
        num_stages=config.num_stages,
    )
    if split > 1:
        block = 1024
        sum_splits[(-(-(rows * n_out) // block),)](
            target,
            out if bias is None else bias,
            out,
            rows,
            n_out,
            SPLIT_K=split,
            HAS_BIAS=bias is not None,
            BLOCK=block,
        )
    return out.reshape(*lead, n_out)


# ---------------------------------------------------------------------------------------------- serving
@dataclass
class Nf4Weight:
    """What the kernel reads of one bitsandbytes 4-bit layer: the packed bytes, float32 scales, the code."""

    packed: torch.Tensor
    absmax: torch.Tensor
    code: torch.Tensor
    shape: tuple[int, int]
    blocksize: int

    @classmethod
    def of(cls, layer: Any) -> Nf4Weight | None:
        """The layer's weight as the kernel reads it; None where the kernel cannot (not NF4, not 2-D, odd rows)."""
        state = getattr(layer.weight, "quant_state", None)
        if state is None or state.quant_type != "nf4" or len(state.shape) != 2 or state.shape[1] % 2:
            return None
        if state.blocksize % 2:
            return None
        return cls(
            packed=layer.weight.data.reshape(-1).view(torch.uint8),
            absmax=float_absmax(state),
            code=state.code.float().to(layer.weight.device).contiguous(),
            shape=(int(state.shape[0]), int(state.shape[1])),
            blocksize=int(state.blocksize),
        )

    @property
    def extra_bytes(self) -> int:
        return self.absmax.numel() * 4


def kernel_wanted(setting: str, device_type: str) -> bool:
    """Whether setting ``nf4_decode_kernel`` turns the kernel on here: ``auto`` with CUDA and Triton."""
    return setting == "auto" and device_type == "cuda" and triton_available()


def attach_decode_kernel(layers: list[Any], max_rows: int = MAX_ROWS) -> int:
    """Route inputs of at most ``max_rows`` rows of each bitsandbytes NF4 layer through :func:`nf4_linear`; the
    rest (and layers the kernel cannot read) keep the forward they had. Returns the extra bytes kept (the
    float32 scales). A captured graph replays the forward it was captured with: attach before capturing."""
    extra = 0
    for layer in layers:
        weight = Nf4Weight.of(layer)
        if weight is None or isinstance(layer.forward, DecodeForward):
            continue
        layer.forward = DecodeForward(layer, layer.forward, weight, max_rows)
        extra += weight.extra_bytes
    return extra


def detach_decode_kernel(layers: list[Any]) -> int:
    """Give each layer back the forward it had before :func:`attach_decode_kernel`; returns how many changed."""
    changed = 0
    for layer in layers:
        if isinstance(layer.forward, DecodeForward):
            layer.forward = layer.forward.previous
            changed += 1
    return changed


class DecodeForward:
    """A 4-bit layer's forward: the kernel for inputs of at most ``max_rows`` rows on CUDA without gradients,
    ``previous`` (the layer's forward before) for the rest. As ``Linear4bit.forward``: the input cast to the
    compute dtype, the output back to the input's dtype."""

    devices: tuple[str, ...] = ("cuda",)  # (the tests add "cpu", for Triton's interpreter)

    def __init__(
        self, layer: Any, previous: Callable[[torch.Tensor], torch.Tensor], weight: Nf4Weight, max_rows: int
    ) -> None:
        self.previous, self.weight, self.max_rows = previous, weight, max_rows
        self.dtype = layer.compute_dtype or torch.bfloat16
        self.bias = None if layer.bias is None else layer.bias.detach().to(self.dtype)
        self.failed = False

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if (
            self.failed
            or x.numel() > self.max_rows * x.shape[-1]
            or x.requires_grad
            or x.device.type not in self.devices
        ):
            return self.previous(x)
        w = self.weight
        try:
            out = nf4_linear(x.to(self.dtype), w.packed, w.absmax, w.code, w.shape, self.bias, w.blocksize)
        except Exception as exc:  # noqa: BLE001 - a kernel that does not compile here: the layer's own forward
            if torch.cuda.is_current_stream_capturing():
                raise  # the capture fails and the decoder falls back (service.llm.decoding)
            log.warning("the NF4 decoding kernel failed (%s): this layer multiplies as before", exc)
            self.failed = True
            return self.previous(x)
        return out.to(x.dtype)

"""The Triton kernels of ``service.llm.nf4_kernels`` (imported only when the kernel runs: this module needs Triton).

At module level, so that Triton's CPU interpreter (``TRITON_INTERPRET=1``, the unit tests) finds the helper the
kernel calls; see ``service.llm.nf4_kernels`` for the layout they read.
"""

import triton
import triton.language as tl


@triton.jit
def nf4_value(q):  # type: ignore[no-untyped-def]
    """``NF4_CODE[q]`` (float32) for nibbles ``q``, by 15 selects: no memory access. (Literals: a kernel may
    not read a Python tuple.)"""
    b0 = (q & 1) != 0
    b1 = (q & 2) != 0
    b2 = (q & 4) != 0
    v0 = tl.where(b1, tl.where(b0, -0.39491748809814453, -0.5250730514526367), tl.where(b0, -0.6961928009986877, -1.0))
    v1 = tl.where(b1, tl.where(b0, 0.0, -0.09105003625154495), tl.where(b0, -0.18477343022823334, -0.28444138169288635))
    v2 = tl.where(
        b1,
        tl.where(b0, 0.33791524171829224, 0.24611230194568634),
        tl.where(b0, 0.16093020141124725, 0.07958029955625534),
    )
    v3 = tl.where(b1, tl.where(b0, 1.0, 0.7229568362236023), tl.where(b0, 0.5626170039176941, 0.44070982933044434))
    return tl.where((q & 8) != 0, tl.where(b2, v3, v2), tl.where(b2, v1, v0)).to(tl.float32)


@triton.jit
def nf4_matmul(  # type: ignore[no-untyped-def]
    x_ptr,
    w_ptr,
    absmax_ptr,
    code_ptr,
    bias_ptr,
    out_ptr,
    M,
    N,
    row_bytes,
    tiles_per_split,
    stride_xm,
    stride_om,
    BLOCKSIZE: tl.constexpr,
    HAS_BIAS: tl.constexpr,
    USE_DOT: tl.constexpr,
    SELECT_CODE: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_KB: tl.constexpr,
):
    pid_n = tl.program_id(0)
    pid_m = tl.program_id(1)
    pid_k = tl.program_id(2)  # which share of the row's bytes (split-K); out_ptr then points at float32 partials
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask = offs_m < M
    n_mask = offs_n < N
    w_rows = offs_n.to(tl.int64) * row_bytes
    x_rows = offs_m.to(tl.int64) * stride_xm
    if USE_DOT:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    else:  # products summed element-wise over the iterations, reduced across the tile's columns once at the end
        acc3 = tl.zeros((BLOCK_M, BLOCK_N, BLOCK_KB), dtype=tl.float32)
    for tile in range(0, tiles_per_split):
        start = (pid_k * tiles_per_split + tile) * BLOCK_KB
        j = start + tl.arange(0, BLOCK_KB)  # byte index in the row: weights 2j (high nibble) and 2j+1 (low)
        j_mask = j < row_bytes
        w_mask = n_mask[:, None] & j_mask[None, :]
        byte = w_rows[:, None] + j[None, :]  # in the flattened weight: weights 2 * byte and 2 * byte + 1
        packed = tl.load(w_ptr + byte, mask=w_mask, other=0)
        scale = tl.load(absmax_ptr + byte // (BLOCKSIZE // 2), mask=w_mask, other=0.0)  # one block for both
        if SELECT_CODE:
            w_hi = (nf4_value((packed >> 4).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty)
            w_lo = (nf4_value((packed & 15).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty)
        else:
            w_hi = (tl.load(code_ptr + (packed >> 4).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty)
            w_lo = (tl.load(code_ptr + (packed & 15).to(tl.int32)) * scale).to(x_ptr.dtype.element_ty)
        k = 2 * start + tl.arange(0, 2 * BLOCK_KB)
        x = tl.load(
            x_ptr + x_rows[:, None] + k[None, :], mask=m_mask[:, None] & (k < 2 * row_bytes)[None, :], other=0.0
        )
        x_even, x_odd = tl.split(tl.reshape(x, (BLOCK_M, BLOCK_KB, 2)))
        if USE_DOT:
            acc += tl.dot(x_even, tl.trans(w_hi))
            acc += tl.dot(x_odd, tl.trans(w_lo))
        else:
            acc3 += x_even.to(tl.float32)[:, None, :] * w_hi.to(tl.float32)[None, :, :]
            acc3 += x_odd.to(tl.float32)[:, None, :] * w_lo.to(tl.float32)[None, :, :]
    if not USE_DOT:
        acc = tl.sum(acc3, axis=2)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs_n, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out = out_ptr + pid_k * M * stride_om + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :]
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def sum_splits(  # type: ignore[no-untyped-def]
    partial_ptr, bias_ptr, out_ptr, M, N, SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, BLOCK: tl.constexpr
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < M * N
    acc = tl.zeros((BLOCK,), dtype=tl.float32)
    for split in tl.static_range(SPLIT_K):  # in a fixed order: the same sums on every call
        acc += tl.load(partial_ptr + split * M * N + offs, mask=mask, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + offs % N, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, acc.to(out_ptr.dtype.element_ty), mask=mask)

"""The projections of kernels/gemv.py on a quantized weight (kernels/quant_weight.py): dequantize inside the GEMV.

Same three ops, same fusions and the same numerics contract as gemv.py (`norm_linear`, `linear_add`,
`act_linear_add`), for a `QuantWeight` of 4 or 8 bits. One row (batch-1 decode): one Triton GEMV that streams the
packed weight once, dequantizes in registers and reduces in fp32, so a 4-bit step reads ~1/4 of bf16's bytes. Several
rows: the norm / activation kernels, then the dequantize-GEMM (kernels/quant_matmul.py) with the residual add in
its epilogue.

Scales are applied per group, not per weight: `sum_k (q*s + z) * x = s * sum_k q*x + z * sum_k x` over a group, so
a tile multiplies integers by activations and scales once per (row, group). The launcher picks BLOCK_K so that a
tile holds whole groups or lies inside one: group sizes must be powers of two, or K (per output channel).
The twins are gemv.py's (`_linear` dequantizes, kernels/quant_weight.py); GPU numerics differ from them only in
summation order and in never rounding the dequantized weight to x's dtype.
"""

import torch

from ._triton import triton, tl
from .activation import silu_and_mul_triton
from .quant_matmul import quant_matmul_triton
from .quant_weight import QuantWeight, quant_linear_torch
from .rms_norm import rms_norm_triton

_PRO_NONE, _PRO_NORM, _PRO_SILU_MUL = 0, 1, 2
_MODE_PER_ROW, _MODE_TILE_IN_GROUP, _MODE_GROUPS_IN_TILE = 0, 1, 2


@triton.jit
def _x_at(x_ptr, norm_w_ptr, perm_ptr, k, k_mask, K, rstd,
          PROLOGUE: tl.constexpr, HAS_PERM: tl.constexpr):
    """The GEMV's input at (stored) columns k, in fp32, with the prologue applied as the unfused chain rounds it."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k_mask, other=0)
    x_dtype = x_ptr.dtype.element_ty
    if PROLOGUE == 2:
        gate = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        up = tl.load(x_ptr + K + k, mask=k_mask, other=0.0).to(tl.float32)
        silu = (gate / (1.0 + tl.exp(-gate))).to(x_dtype).to(tl.float32)
        xk = (silu * up).to(x_dtype).to(tl.float32)
    else:
        xk = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
        if PROLOGUE == 1:
            nw = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            xk = ((xk * rstd).to(x_dtype).to(tl.float32) * nw).to(x_dtype).to(tl.float32)
    return xk


@triton.jit
def _quant_gemv_kernel(
    x_ptr, norm_w_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, y_ptr,
    N, K, stride_qn, stride_sn, eps,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    row_mask = rows < N
    rstd = 0.0
    if PROLOGUE == 1:  # RMSNorm statistics of the one input row (order-free, so act-order needs no gather here)
        cols = tl.arange(0, BLOCK_K)
        sq = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_ptr + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            sq += xk * xk
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    BLOCK_C: tl.constexpr = BLOCK_K // PACK  # stored columns (bytes) per step
    c = tl.arange(0, BLOCK_C)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn  # (BLOCK_N, 1)
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * stride_sn
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_C), tl.float32)  # reduced over K once, after the loop
    xsum = tl.zeros((BLOCK_C,), tl.float32)  # per-row mode: sum of x, for the zeros
    acc_g = tl.zeros((BLOCK_N, NG), tl.float32)  # groups-in-tile mode: per (row, group of the tile)
    for k0 in range(0, K, BLOCK_K):
        col = k0 // PACK + c
        col_mask = col < K // PACK
        q = tl.load(q_rows + col[None, :], mask=row_mask[:, None] & col_mask[None, :], other=0)
        if BITS == 4:
            pair = 2 * col[:, None] + tl.arange(0, 2)[None, :]  # (BLOCK_C, 2): x read contiguously, then split
            x_lo, x_hi = tl.split(_x_at(x_ptr, norm_w_ptr, perm_ptr, pair, col_mask[:, None], K, rstd, PROLOGUE,
                                        HAS_PERM))
            qx = (q & 0xF).to(tl.float32) * x_lo[None, :] + (q >> 4).to(tl.float32) * x_hi[None, :]
            xs = x_lo + x_hi
        else:
            xs = _x_at(x_ptr, norm_w_ptr, perm_ptr, col, col_mask, K, rstd, PROLOGUE, HAS_PERM)
            qx = q.to(tl.float32) * xs[None, :]
        if MODE == 0:  # one scale per row: applied after the loop
            acc += qx
            xsum += xs
        elif MODE == 1:  # the tile lies inside one group: one scale per row
            s = tl.load(s_rows + k0 // GROUP, mask=row_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, 1)
            part = qx * s
            if HAS_ZERO:
                part += tl.load(z_rows + k0 // GROUP, mask=row_mask[:, None], other=0.0).to(tl.float32) * xs[None, :]
            acc += part
        else:  # whole groups in the tile: each (row, group)'s integer dot, then its scale
            g = k0 // GROUP + tl.arange(0, NG)
            g_mask = row_mask[:, None] & (g[None, :] < K // GROUP)
            s = tl.load(s_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)  # (BLOCK_N, NG)
            part = tl.sum(tl.reshape(qx, (BLOCK_N, NG, GROUP // PACK)), axis=2) * s
            if HAS_ZERO:
                z = tl.load(z_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
                part += z * tl.sum(tl.reshape(xs, (NG, GROUP // PACK)), axis=1)[None, :]
            acc_g += part
    y = tl.sum(acc, axis=1) + tl.sum(acc_g, axis=1)  # (BLOCK_N,)
    if MODE == 0:
        y = y * tl.load(s_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)
        if HAS_ZERO:
            y += tl.load(z_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32) * tl.sum(xsum, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32) + res
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def group_mode(w: QuantWeight, block_k: int) -> int | None:
    """How a BLOCK_K tile meets the groups, or None when the group size suits no tile (not a power of two)."""
    N, K = w.shape
    G = w.group_size
    if G == K:
        return _MODE_PER_ROW
    if G & (G - 1):
        return None
    return _MODE_TILE_IN_GROUP if G >= block_k else _MODE_GROUPS_IN_TILE


def _block_sizes(w: QuantWeight) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps) by measurement on an H200 (bench/quant_sweep.py, Llama-2-7B projections):
    enough rows a program that the input (and its norm / SwiGLU prologue) is re-read little, a K step of a few
    hundred columns, and at least ~2 programs per SM."""
    N, K = w.shape
    block_n, block_k, warps = GEMV_TILES[w.bits]
    while block_n > 4 and triton.cdiv(N, block_n) < 256:
        block_n //= 2
    return block_n, max(min(block_k, triton.next_power_of_2(K)), 32), warps


# bits -> (BLOCK_N, BLOCK_K, num_warps) of the one-row GEMV: the least total time over the 7B projections in
# bench/quant_sweep.py on an H200 (4-bit: 56-70 us a projection, from 108-123 us with per-column scale reads).
GEMV_TILES = {4: (16, 1024, 8), 8: (16, 512, 8)}


def _quant_gemv(x, w: QuantWeight, bias, residual, prologue, norm_weight=None, eps=0.0, tiles=None):
    N, K = w.shape
    BLOCK_N, BLOCK_K, warps, *mode = tiles or _block_sizes(w)
    mode = mode[0] if mode else group_mode(w, BLOCK_K)
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    _quant_gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, norm_weight if norm_weight is not None else x, w.qweight, w.scales,
        w.zeros if w.zeros is not None else w.scales, w.perm if w.perm is not None else x,
        bias if bias is not None else x, residual if residual is not None else x, y,
        N, K, w.qweight.stride(0), w.scales.stride(0), eps,
        BITS=w.bits, GROUP=w.group_size, MODE=mode, HAS_ZERO=w.zeros is not None,
        HAS_PERM=w.perm is not None, PROLOGUE=prologue, HAS_BIAS=bias is not None,
        HAS_RESIDUAL=residual is not None, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NG=max(BLOCK_K // w.group_size, 1),
        num_warps=warps, num_stages=3,
    )
    return y


def _check(x, w: QuantWeight, k_in, bias=None, residual=None):
    N, K = w.shape
    if x.dim() != 2 or x.shape[1] != k_in:
        raise ValueError(f"x must be (T, {k_in}) for a ({N}, {K}) weight, got {tuple(x.shape)}")
    dense = all(t.is_contiguous() for t in (w.qweight, w.scales, w.zeros) if t is not None)
    if not dense or (w.zeros is not None and w.zeros.stride(0) != w.scales.stride(0)):
        raise ValueError("qweight, scales and zeros must be contiguous (scales and zeros sharing strides)")
    if bias is not None and bias.shape != (N,):
        raise ValueError(f"bias must be ({N},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (x.shape[0], N):
        raise ValueError(f"residual must be ({x.shape[0]}, {N}), got {tuple(residual.shape)}")
    if len({t.device for t in (x, w.qweight, w.scales, bias, residual) if t is not None}) != 1:
        raise ValueError("x, the weight, bias and residual must be on one device")


def _gemv_ok(x, w: QuantWeight) -> bool:
    return x.shape[0] == 1 and x.is_contiguous() and group_mode(w, _block_sizes(w)[1]) is not None


def _linear_rows(x, w: QuantWeight, bias, residual=None):
    """Several rows: the dequantize-GEMM (residual in its epilogue); group sizes it cannot tile: the twin math."""
    try:
        return quant_matmul_triton(x, w, bias, residual)
    except NotImplementedError:
        y = quant_linear_torch(x, w, bias)
        return y if residual is None else residual + y


def quant_norm_linear_triton(x, norm_weight, eps, w: QuantWeight, bias=None):
    _check(x, w, w.shape[1], bias)
    if not _gemv_ok(x, w):
        return _linear_rows(rms_norm_triton(x, norm_weight, eps), w, bias)
    return _quant_gemv(x, w, bias, None, _PRO_NORM, norm_weight.contiguous(), eps)


def quant_linear_add_triton(x, w: QuantWeight, bias, residual):
    _check(x, w, w.shape[1], bias, residual)
    if not (_gemv_ok(x, w) and residual.is_contiguous()):
        return _linear_rows(x, w, bias, residual)
    return _quant_gemv(x, w, bias, residual, _PRO_NONE)


def quant_act_linear_add_triton(x, w: QuantWeight, residual):
    _check(x, w, 2 * w.shape[1], None, residual)
    if not (_gemv_ok(x, w) and residual.is_contiguous()):
        return _linear_rows(silu_and_mul_triton(x), w, None, residual)
    return _quant_gemv(x, w, None, residual, _PRO_SILU_MUL)

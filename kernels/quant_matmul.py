"""Dequantize-GEMM: y = x @ W.T (+ bias) (+ residual) for a quantized W (kernels/quant_weight.py), several rows.

Prefill and batched decode on the GPU. Each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in steps that
lie inside one group: the weight tile is loaded as integers, converted to x's dtype (exact: 4- and 8-bit integers fit
bf16's mantissa) and multiplied on the tensor cores; the group's scale multiplies the tile's fp32 product and its
zero the row sums of x (`sum_k (q*s + z) x = s * sum_k q x + z * sum_k x`). A 4-bit tile is two dots, the low
nibbles against x's even columns and the high ones against its odd columns, so nothing is interleaved in registers.

The twin is `kernels.quant_weight.quant_linear_torch` (+ residual): the weight dequantized to x's dtype and
nn.Linear. Not here: one-row GEMVs (kernels/quant_gemv.py), the CPU path (kernels/quant_cpu.py).
"""

import torch

from ._paged import _dot
from ._triton import triton, tl
from .quant_weight import QuantWeight, quant_linear_torch


def quant_matmul_torch(x, w: QuantWeight, bias=None, residual=None):
    y = quant_linear_torch(x, w, bias)
    return y if residual is None else residual + y


@triton.jit
def _dot_q(a, q, UPCAST: tl.constexpr, PRECISION: tl.constexpr):
    """a @ q for integer weights q: converted to a's dtype for the tensor cores (exact: they fit its mantissa);
    under TRITON_INTERPRET (UPCAST) straight to fp32, as the interpreter mishandles bf16."""
    if UPCAST:
        c = _dot(a.to(tl.float32), q.to(tl.float32), False, "ieee")
    else:
        c = _dot(a, q.to(a.dtype), False, PRECISION)
    return c


@triton.jit
def _x_cols(x_ptr, perm_ptr, rm, k, m_mask, k_mask, stride_xm, HAS_PERM: tl.constexpr):
    """x[rm, k] (BLOCK_M, len(k)); act-order reads column perm[k]."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k_mask, other=0)
    return tl.load(x_ptr + rm.to(tl.int64)[:, None] * stride_xm + k[None, :],
                   mask=m_mask[:, None] & k_mask[None, :], other=0.0)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, y_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, PER_ROW: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
):
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    BLOCK_C: tl.constexpr = BLOCK_K // PACK
    c = tl.arange(0, BLOCK_C)
    x_dtype = x_ptr.dtype.element_ty
    q_cols = q_ptr + rn.to(tl.int64)[None, :] * stride_qn  # (1, BLOCK_N): the weight read as (K, N)
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    xsum = tl.zeros((BLOCK_M,), tl.float32)  # per-row scales: row sums of x, for the zeros
    for k0 in range(0, K, BLOCK_K):
        col = k0 // PACK + c
        col_mask = col < K // PACK
        q = tl.load(q_cols + col[:, None], mask=col_mask[:, None] & n_mask[None, :], other=0)  # (BLOCK_C, BLOCK_N)
        if BITS == 4:
            a_lo = _x_cols(x_ptr, perm_ptr, rm, 2 * col, m_mask, col_mask, stride_xm, HAS_PERM)
            a_hi = _x_cols(x_ptr, perm_ptr, rm, 2 * col + 1, m_mask, col_mask, stride_xm, HAS_PERM)
            part = _dot_q(a_lo, q & 0xF, UPCAST_DOT, DOT_PRECISION)
            part += _dot_q(a_hi, q >> 4, UPCAST_DOT, DOT_PRECISION)
            rows_sum = tl.sum(a_lo.to(tl.float32), axis=1) + tl.sum(a_hi.to(tl.float32), axis=1)
        else:
            a = _x_cols(x_ptr, perm_ptr, rm, col, m_mask, col_mask, stride_xm, HAS_PERM)
            part = _dot_q(a, q, UPCAST_DOT, DOT_PRECISION)
            rows_sum = tl.sum(a.to(tl.float32), axis=1)
        if PER_ROW:
            acc += part
            xsum += rows_sum
        else:  # BLOCK_K divides GROUP: one group per step
            s = tl.load(s_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
            acc += part * s[None, :]
            if HAS_ZERO:
                z = tl.load(z_ptr + rn * stride_sn + k0 // GROUP, mask=n_mask, other=0.0).to(tl.float32)
                acc += rows_sum[:, None] * z[None, :]
    if PER_ROW:
        acc = acc * tl.load(s_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
        if HAS_ZERO:
            acc += xsum[:, None] * tl.load(z_ptr + rn * stride_sn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:  # the product rounded to x's dtype, then added: the twin's `residual + linear(x)`
        res = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=out_mask, other=0.0)
        acc = acc.to(x_dtype).to(tl.float32) + res.to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


def _tiles(M: int, w: QuantWeight) -> tuple[int, int, int, int, int]:
    """(BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages). BLOCK_K lies inside a group (<= 128 columns); small
    batches take 16-row tiles (tl.dot's minimum). Untuned on GPUs so far: bench/gpu_quant.py sweeps them."""
    N, K = w.shape
    block_k = min(w.group_size, 128) if w.group_size != K else 64
    block_m = 16 if M <= 16 else 32 if M <= 32 else 64 if M <= 256 else 128
    block_n = 64 if M <= 64 else 128
    return block_m, block_n, max(block_k, 32), 4, 3


def quant_matmul_triton(x, w: QuantWeight, bias=None, residual=None):
    N, K = w.shape
    G = w.group_size
    if G != K and (G & (G - 1) or G < 32):
        raise NotImplementedError(f"group size {G}: the GEMM tiles need a power of two >= 32, or per-channel")
    if x.dim() != 2 or x.shape[1] != K or x.stride(1) != 1:
        raise ValueError(f"x must be (M, {K}) with a unit column stride, got {tuple(x.shape)} {x.stride()}")
    if residual is not None and (residual.shape != (x.shape[0], N) or residual.stride(1) != 1):
        raise ValueError(f"residual must be ({x.shape[0]}, {N}) with a unit column stride")
    if not all(t.is_contiguous() for t in (w.qweight, w.scales, w.zeros) if t is not None) or (
            w.zeros is not None and w.zeros.stride(0) != w.scales.stride(0)):
        raise ValueError("qweight, scales and zeros must be contiguous (scales and zeros sharing strides)")
    M = x.shape[0]
    y = torch.empty((M, N), dtype=x.dtype, device=x.device)
    if M == 0:
        return y
    BLOCK_M, BLOCK_N, BLOCK_K, warps, stages = _tiles(M, w)
    fp32 = x.dtype == torch.float32
    _quant_matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N))](
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, w.perm if w.perm is not None else x,
        bias if bias is not None else x, residual if residual is not None else x, y,
        M, N, K, x.stride(0), w.qweight.stride(0), w.scales.stride(0),
        residual.stride(0) if residual is not None else 0, y.stride(0),
        BITS=w.bits, GROUP=G, PER_ROW=G == K, HAS_ZERO=w.zeros is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K,
        DOT_PRECISION="ieee" if fp32 else "tf32",  # fp32 stays fp32
        UPCAST_DOT=x.device.type == "cpu" and not fp32,  # CPU tensors mean TRITON_INTERPRET
        num_warps=warps, num_stages=stages,
    )
    return y

"""Dequantize-GEMM: y = x @ W.T (+ bias) (+ residual) for a quantized W (kernels/quant_weight.py), several rows.

Batched decode and prefill on the GPU. Up to DEQUANT_CUBLAS_ROWS rows (batched decode, small chunks), one fused
kernel: each program owns a (BLOCK_M, BLOCK_N) output tile and walks K in steps inside one group, loading the packed
tile (K contiguous per row, 4-bit nibbles split with `tl.join`), dequantizing it in fp32 with the group's scale and
zero, rounding it once to x's dtype (as the twin does) and multiplying on the tensor cores; the weight is read once
per BLOCK_M rows, so a 4-bit batch-32 step reads a quarter of bf16's bytes. With SWAP the tile is formed transposed,
y^T = W x^T: the dequantized weight tile is the MMA's first operand, whose rows (BLOCK_N >= 64) fill Hopper's
64-row warpgroup MMA while x's 17-32 rows are its narrow side, so every weight is dequantized once per step for all
of them (without it, two 16-row tiles dequantize it twice; measured on an H200: down_proj at 32 rows 44.4 -> 33.7 us,
w4a16 batch-32 decode ~5,200 -> ~5,700 tokens/s). Few output columns (N = 4,096) leave too
few programs for the GPU, so K is split among SPLIT_K programs per tile, whose fp32 partials a second kernel sums in a
fixed order (the result does not depend on which program finishes first) before the bias and residual epilogue.
At 17-32 rows the tiles are one warpgroup (64 weight rows) with at most 96 registers a thread, so that five
programs share an SM: with 2-3 warps a scheduler the kernel had been latency-bound (ncu on an H200: an instruction
issued every 2-2.6 cycles); w4a16 batch 32 5,601 -> 6,107 tokens/s.
On Hopper the GEMM lets the next kernel be scheduled once all its programs have started, and the sum kernel launches
with programmatic dependent launch (kernels/_triton.py), hiding its launch gap: w4a16 batch 32 ~5,515 -> ~5,630
tokens/s, batch 16 ~3,300 -> ~3,445 on an H200. The GEMM itself does not wait that way (launched early, its
programs held SM slots while the kernel before ran: batch 32 5,021 against 5,325).
More rows (prefill: compute-bound): the weight is dequantized by `dequantize_triton` and multiplied by cuBLAS.

The twin is `kernels.quant_weight.quant_linear_torch` (+ residual): the weight dequantized to x's dtype and
nn.Linear. Not here: one-row GEMVs (kernels/quant_gemv.py), the CPU path (kernels/quant_cpu.py).
"""

from typing import NamedTuple

import torch
import torch.nn.functional as F

from ._paged import _dot
from ._triton import dependent_launch, dependent_launches, dependents_early, triton, tl
from .quant_weight import QuantWeight, quant_linear_torch


def quant_matmul_torch(x, w: QuantWeight, bias=None, residual=None):
    y = quant_linear_torch(x, w, bias)
    return y if residual is None else residual + y


@triton.jit
def _epilogue(acc, rm, rn, bias_ptr, res_ptr, y_ptr, M, N, stride_rm, stride_ym,
              HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr):
    """y = [residual +] round(acc [+ bias]) for an fp32 (rows rm, columns rn) tile of the product."""
    m_mask, n_mask = rm < M, rn < N
    if HAS_BIAS:
        acc += tl.load(bias_ptr + rn, mask=n_mask, other=0.0).to(tl.float32)[None, :]
    out_mask = m_mask[:, None] & n_mask[None, :]
    if HAS_RESIDUAL:  # the product rounded to y's dtype, then added: the twin's `residual + linear(x)`
        res = tl.load(res_ptr + rm.to(tl.int64)[:, None] * stride_rm + rn[None, :], mask=out_mask, other=0.0)
        acc = acc.to(y_ptr.dtype.element_ty).to(tl.float32) + res.to(tl.float32)
    tl.store(y_ptr + rm.to(tl.int64)[:, None] * stride_ym + rn[None, :], acc.to(y_ptr.dtype.element_ty),
             mask=out_mask)


@triton.jit
def _quant_matmul_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, y_ptr, part_ptr,
    M, N, K, stride_xm, stride_qn, stride_sn, stride_rm, stride_ym,
    BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
    HAS_PERM: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, SPLIT_K: tl.constexpr,
    DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, SWAP: tl.constexpr, TRIGGER: tl.constexpr,
):
    """With SPLIT_K > 1, program (i, j, split) reduces its share of K's steps and writes the fp32 partial to
    part[split] (SPLIT_K, M, N); `_split_k_sum_kernel` adds them up in split order (deterministic) and finishes.
    SWAP: the (BLOCK_N, BLOCK_M) tile W x^T, transposed once after the loop (same products, same fp32 sums).
    TRIGGER (Hopper): the next kernel (the split-K sum, the decode step's next small kernel) is scheduled once all of
    this one's programs have started; it waits for this one's end itself."""
    dependents_early(TRIGGER)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    m_mask, n_mask = rm < M, rn < N
    steps = tl.cdiv(tl.cdiv(K, BLOCK_K), SPLIT_K)  # K steps of each split
    k_lo = tl.program_id(2) * steps * BLOCK_K
    k_hi = tl.minimum(K, k_lo + steps * BLOCK_K)
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    BLOCK_C: tl.constexpr = BLOCK_K // PACK
    x_dtype = x_ptr.dtype.element_ty
    x_rows = x_ptr + rm.to(tl.int64)[:, None] * stride_xm  # (BLOCK_M, 1)
    x_cols = x_ptr + rm.to(tl.int64)[None, :] * stride_xm  # (1, BLOCK_M): x^T's columns, for SWAP
    q_rows = q_ptr + rn.to(tl.int64)[:, None] * stride_qn  # (BLOCK_N, 1): the weight's rows, K contiguous
    s_rows = s_ptr + rn.to(tl.int64) * stride_sn
    z_rows = z_ptr + rn.to(tl.int64) * stride_sn
    if SWAP:
        acc_t = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for k0 in range(k_lo, k_hi, BLOCK_K):  # BLOCK_K divides GROUP: one scale (and zero) per row and step
        k = k0 + tl.arange(0, BLOCK_K)
        k_mask = k < K
        xk = tl.load(perm_ptr + k, mask=k_mask, other=0) if HAS_PERM else k
        col = k0 // PACK + tl.arange(0, BLOCK_C)
        q = tl.load(q_rows + col[None, :], mask=n_mask[:, None] & (col < K // PACK)[None, :], other=0)
        if BITS == 4:  # columns 2j and 2j + 1 are byte j's low and high nibbles
            q = tl.reshape(tl.join(q & 0xF, q >> 4), (BLOCK_N, BLOCK_K))
        g = k0 // GROUP
        w = q.to(tl.float32) * tl.load(s_rows + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        if HAS_ZERO:
            w += tl.load(z_rows + g, mask=n_mask, other=0.0).to(tl.float32)[:, None]
        w = w.to(x_dtype)  # the twin's weight, dequantized in fp32 and rounded once to x's dtype
        if SWAP:
            a_t = tl.load(x_cols + xk[:, None], mask=k_mask[:, None] & m_mask[None, :], other=0.0)  # (BLOCK_K, BLOCK_M)
            acc_t += _dot(w, a_t, UPCAST_DOT, DOT_PRECISION)
        else:
            a = tl.load(x_rows + xk[None, :], mask=m_mask[:, None] & k_mask[None, :], other=0.0)  # (BLOCK_M, BLOCK_K)
            acc += _dot(a, tl.trans(w), UPCAST_DOT, DOT_PRECISION)
    if SWAP:
        acc = tl.trans(acc_t)
    if SPLIT_K == 1:
        _epilogue(acc, rm, rn, bias_ptr, res_ptr, y_ptr, M, N, stride_rm, stride_ym, HAS_BIAS, HAS_RESIDUAL)
    else:
        part = part_ptr + (tl.program_id(2) * M + rm.to(tl.int64))[:, None] * N + rn[None, :]
        tl.store(part, acc, mask=m_mask[:, None] & n_mask[None, :])


@triton.jit
def _split_k_sum_kernel(part_ptr, bias_ptr, res_ptr, y_ptr, M, N, stride_rm, stride_ym,
                        SPLIT_K: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr,
                        BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, PDL: tl.constexpr):
    dependent_launch(PDL)
    rm = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)
    rn = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)
    mask = (rm < M)[:, None] & (rn < N)[None, :]
    offs = rm.to(tl.int64)[:, None] * N + rn[None, :]
    acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    for split in tl.static_range(SPLIT_K):
        acc += tl.load(part_ptr + split * M * N + offs, mask=mask, other=0.0)
    _epilogue(acc, rm, rn, bias_ptr, res_ptr, y_ptr, M, N, stride_rm, stride_ym, HAS_BIAS, HAS_RESIDUAL)


@triton.jit
def _dequantize_kernel(q_ptr, s_ptr, z_ptr, w_ptr, N, K, stride_qn, stride_sn,
                       BITS: tl.constexpr, GROUP: tl.constexpr, HAS_ZERO: tl.constexpr,
                       BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    """w[n, k] = q * s + z, computed in fp32 and rounded once to w's dtype (the stored column order)."""
    rn = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
    k = tl.program_id(1) * BLOCK_K + tl.arange(0, BLOCK_K)
    PACK: tl.constexpr = 2 if BITS == 4 else 1
    col = tl.program_id(1) * (BLOCK_K // PACK) + tl.arange(0, BLOCK_K // PACK)
    n_mask = rn < N
    q = tl.load(q_ptr + rn.to(tl.int64)[:, None] * stride_qn + col[None, :],
                mask=n_mask[:, None] & (col < K // PACK)[None, :], other=0)
    if BITS == 4:
        q = tl.reshape(tl.join(q & 0xF, q >> 4), (BLOCK_N, BLOCK_K))
    mask = n_mask[:, None] & (k < K)[None, :]
    g = rn.to(tl.int64)[:, None] * stride_sn + (k // GROUP)[None, :]
    w = q.to(tl.float32) * tl.load(s_ptr + g, mask=mask, other=0.0).to(tl.float32)
    if HAS_ZERO:
        w += tl.load(z_ptr + g, mask=mask, other=0.0).to(tl.float32)
    tl.store(w_ptr + rn.to(tl.int64)[:, None] * K + k[None, :], w.to(w_ptr.dtype.element_ty), mask=mask)


def dequantize_triton(w: QuantWeight, dtype: torch.dtype) -> torch.Tensor:
    """The (N, K) weight in its stored column order (act-order: the input's columns perm), in `dtype`."""
    N, K = w.shape
    out = torch.empty((N, K), dtype=dtype, device=w.device)
    BLOCK_N, BLOCK_K = 16, 256
    _dequantize_kernel[(triton.cdiv(N, BLOCK_N), triton.cdiv(K, BLOCK_K))](
        w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, out, N, K, w.qweight.stride(0),
        w.scales.stride(0), BITS=w.bits, GROUP=w.group_size, HAS_ZERO=w.zeros is not None,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, num_warps=4)
    return out


class GemmTiles(NamedTuple):
    """One launch shape of `_quant_matmul_kernel`; maxnreg caps the registers a thread (None: the compiler's
    choice), so that more programs fit an SM."""
    block_m: int
    block_n: int
    block_k: int
    warps: int
    stages: int
    split_k: int
    swap: bool
    maxnreg: int | None = None


def _tiles(M: int, w: QuantWeight) -> GemmTiles:
    """GEMM_TILES' entry for M rows and w's width; BLOCK_K divides the group (a per-channel weight is one group of
    K)."""
    N, K = w.shape
    t = GemmTiles(*GEMM_TILES[16 if M <= 16 else 32 if M <= 32 else 64][N >= WIDE_N])
    block_k = t.block_k
    while w.group_size != K and w.group_size % block_k:
        block_k //= 2
    # past DEQUANT_CUBLAS_ROWS rows only an act-order prefill comes here (see quant_matmul_triton): no split needed
    return t._replace(block_k=block_k, split_k=1 if M > DEQUANT_CUBLAS_ROWS else t.split_k)


# rows (<=) -> (tiles for N < WIDE_N, tiles for N >= WIDE_N) of the fused dequantize-GEMM, GemmTiles fields in order,
# measured on an H200 with `python -m bench.quant_sweep` (graph-timed, weights past the L2 cache) and kept only where
# the engine's decode rows confirm them: few output columns want narrow tiles and K split several ways, so that enough
# programs share the work (o_proj / down_proj at N=4096: down_proj at 16 rows 56 -> 27 us), many want wide ones.
# 17-32 rows: SWAP tiles of one warpgroup (64 weight rows), K split 8 ways for N < WIDE_N and 3 ways for the wide
# projections, at most 96 registers a thread so that 5 programs share an SM (2026-12-02 (6): with 2-3 warps a scheduler
# the kernel was latency-bound, ncu: issue 0.39-0.56 a cycle, stalls on fixed-latency dependencies first). End to end
# (batch 32 / 24 tokens/s): w4a16 5,601 / 4,254 -> 6,107 / 4,760, w8a16 5,753 / 4,481 -> 6,122 / 4,838.
# Past DEQUANT_CUBLAS_ROWS rows the weight is dequantized to x's dtype by `dequantize_triton` and multiplied by
# cuBLAS (prefill: compute-bound, where cuBLAS wins).
GEMM_TILES = {16: ((16, 32, 128, 4, 4, 4, False), (16, 32, 128, 4, 4, 2, False)),
              32: ((32, 64, 128, 4, 3, 8, True, 96), (32, 64, 128, 4, 3, 3, True, 96)),
              64: ((32, 64, 128, 4, 3, 4, False), (64, 32, 128, 4, 3, 1, False))}
WIDE_N = 8192
DEQUANT_CUBLAS_ROWS = 64


def quant_matmul_triton(x, w: QuantWeight, bias=None, residual=None, tiles=None):
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
    if x.is_cuda and M > DEQUANT_CUBLAS_ROWS and tiles is None and w.perm is None:  # act-order: the fused kernel
        y = F.linear(x, dequantize_triton(w, x.dtype), bias)
        return y if residual is None else residual + y
    BLOCK_M, BLOCK_N, BLOCK_K, warps, stages, split_k, swap, maxnreg = GemmTiles(*tiles) if tiles else _tiles(M, w)
    split_k = max(min(split_k, triton.cdiv(K, BLOCK_K)), 1)
    part = torch.empty((split_k, M, N) if split_k > 1 else (1,), dtype=torch.float32, device=x.device)
    bias_arg, res_arg = bias if bias is not None else x, residual if residual is not None else x
    pdl = dependent_launches(x)
    res_stride = residual.stride(0) if residual is not None else 0
    _quant_matmul_kernel[(triton.cdiv(M, BLOCK_M), triton.cdiv(N, BLOCK_N), split_k)](
        x, w.qweight, w.scales, w.zeros if w.zeros is not None else w.scales, w.perm if w.perm is not None else x,
        bias_arg, res_arg, y, part,
        M, N, K, x.stride(0), w.qweight.stride(0), w.scales.stride(0), res_stride, y.stride(0),
        BITS=w.bits, GROUP=w.group_size, HAS_ZERO=w.zeros is not None, HAS_PERM=w.perm is not None,
        HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        BLOCK_M=BLOCK_M, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, SPLIT_K=split_k,
        DOT_PRECISION="ieee" if x.dtype == torch.float32 else "tf32",  # fp32 stays fp32: no silent TF32
        UPCAST_DOT=x.device.type == "cpu" and x.dtype != torch.float32,  # CPU tensors mean TRITON_INTERPRET
        SWAP=bool(swap), TRIGGER=pdl, num_warps=warps, num_stages=stages, **({"maxnreg": maxnreg} if maxnreg else {}),
    )
    if split_k > 1:
        _split_k_sum_kernel[(triton.cdiv(M, 16), triton.cdiv(N, 128))](
            part, bias_arg, res_arg, y, M, N, res_stride, y.stride(0), SPLIT_K=split_k,
            HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None, BLOCK_M=16, BLOCK_N=128, PDL=pdl,
            num_warps=4, launch_pdl=pdl)
    return y

"""The projections of kernels/gemv.py on a quantized weight (kernels/quant_weight.py): dequantize inside the GEMV.

Same ops and the same numerics contract as gemv.py (`norm_linear`, `linear_add`, `act_linear_add`, and the MLP's
first half for `norm_mlp_add`), for a `QuantWeight` of 4 or 8 bits. One row (batch-1 decode): the RMSNorm or SiLU
kernel, then one Triton GEMV that streams the packed weight once, dequantizes in registers and reduces in fp32
(residual add and bias in its epilogue), so a 4-bit step reads ~1/4 of bf16's bytes. The gate_up GEMV writes
silu(gate) * up itself (`quant_norm_act_triton`: each program takes its features' gate and up rows, interleaved,
so the pair meets in its epilogue), one kernel less a layer (w4a16 batch 1: 397 -> 402 tokens/s). Unlike gemv.py's,
the norm is not recomputed inside every program of the GEMV: for these short programs that prologue cost more than
its own small kernel (Llama-2-7B w4a16 batch 1 on an H200: 363 -> 398 tokens/s; folded into the GEMV's loop instead,
sum of squares and 1/rms after it, 395.6 against 400.4). Several rows: the same kernels, then the dequantize-GEMM
(kernels/quant_matmul.py) with the residual add in its epilogue. On Hopper the GEMV and those kernels launch with
programmatic dependent launch (kernels/_triton.py `dependent_launches`).

Scales are applied per group, not per weight: `sum_k (q*s + z) * x = s * sum_k q*x + z * sum_k x` over a group, so
a tile multiplies integers by activations and scales once per (row, group). The launcher picks BLOCK_K so that a
tile holds whole groups or lies inside one: group sizes must be powers of two, or K (per output channel).
The weight is read as int32 words (8 nibbles or 4 bytes) and each code becomes a float by bit arithmetic
(`_plane_dot`), not by a conversion instruction: masked where it lies, its bits read as a float are a subnormal,
code * 2^(bit - 149), which times its input (scaled by a power of two) is the exact product, so one fused
multiply-add a code accumulates it (two instructions a code: the mask and the multiply-add). On an H200 that took
Llama-2-7B's four 4-bit projections from 62.4 to 57.0 us a layer (53.4 with GEMV_TILES' narrow tile) and batch-1
decode from 401 to 436 tokens/s (446-449 with it; 8-bit: 72.0 -> 66.2 us, 354 -> 386); the 2^23-based codes before
it needed an add a code more, and a conversion instruction (quarter rate) before that bounded the GEMV at 0.9-1.4
TB/s.
The twins are gemv.py's (`_linear` dequantizes, kernels/quant_weight.py); GPU numerics differ from them only in
summation order and in never rounding the dequantized weight to x's dtype.
"""

import torch

from ._triton import dependent_launch, dependent_launches, triton, tl
from .activation import silu_and_mul_triton
from .quant_matmul import WIDE_N, quant_matmul_triton
from .quant_weight import QuantWeight, quant_linear_torch
from .rms_norm import rms_norm_triton

_MODE_PER_ROW, _MODE_TILE_IN_GROUP, _MODE_GROUPS_IN_TILE = 0, 1, 2


@triton.jit
def _x_at(x_ptr, perm_ptr, k, k_mask, HAS_PERM: tl.constexpr):
    """The GEMV's input at (stored) columns k, in fp32 (act-order: the input's columns perm[k])."""
    if HAS_PERM:
        k = tl.load(perm_ptr + k, mask=k_mask, other=0)
    return tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)


@triton.jit
def _plane_dot(q, xj, acc, j: tl.constexpr, BITS: tl.constexpr, FMA: tl.constexpr):
    """acc + code j of each int32 word of q times xj * 2^-64, rounded once, for (BLOCK_N, BLOCK_W) words and their
    columns' inputs xj (BLOCK_W,). The code, masked where it lies (bit BITS * e; codes past the 23-bit mantissa are
    shifted down first: the top 3 nibbles by 20 bits, the top 2 bytes by 16), read as a float is the subnormal
    code * 2^(BITS * e - 149); xj times 2^(149 - BITS * e - 64) (exact) makes the product code * xj * 2^-64, which
    the fused multiply-add adds to acc with one rounding. FMA False is for TRITON_INTERPRET, whose multiply-add
    rounds twice: a multiply and an add, the same result for bf16 / fp16 inputs, whose products with 4-8-bit codes
    are exact. No conversion instruction, no bias to take off. This holds for |x| in [2^-62, 2^43): a smaller
    input's product is itself subnormal (absolute error under 2^-85 times the scale), a larger one overflows (fp16's
    largest is 2^16; a model's activations stay far below). GPUs keep fp32 subnormals in FMA at full speed (Triton
    emits no .ftz)."""
    LOW: tl.constexpr = 5 if BITS == 4 else 2  # codes 0..LOW-1 fit where they lie
    if j < LOW:
        e: tl.constexpr = j
        src = q
    else:
        e: tl.constexpr = j - LOW
        src = q >> (BITS * LOW)
    code = (src & (((1 << BITS) - 1) << (BITS * e))).to(tl.float32, bitcast=True)
    SCALE: tl.constexpr = 2.0 ** (149 - BITS * e - 64)
    xs = xj * SCALE
    if FMA:
        return tl.fma(code, xs[None, :], acc)
    return code * xs[None, :] + acc


@triton.jit
def _words_dot(q, xw, BLOCK_N: tl.constexpr, BLOCK_W: tl.constexpr, BITS: tl.constexpr, FMA: tl.constexpr):
    """sum_j code_j(q[n, w]) * xw[w, j] * 2^-64: (BLOCK_N, BLOCK_W) int32 words against their columns' inputs
    (BLOCK_W, PER), which are split into code planes in registers (x read contiguously, once per program). Bytes
    come as code + 128 (sign bits flipped); the caller takes 128 * sum(x) off."""
    qx = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)
    if BITS == 4:
        a, b = tl.split(tl.reshape(xw, (BLOCK_W, 2, 2, 2)))  # the last axis splits first: j % 2
        a0, a1 = tl.split(a)
        b0, b1 = tl.split(b)
        x0, x4 = tl.split(a0)
        x2, x6 = tl.split(a1)
        x1, x5 = tl.split(b0)
        x3, x7 = tl.split(b1)
        qx = _plane_dot(q, x0, qx, 0, BITS, FMA)
        qx = _plane_dot(q, x1, qx, 1, BITS, FMA)
        qx = _plane_dot(q, x2, qx, 2, BITS, FMA)
        qx = _plane_dot(q, x3, qx, 3, BITS, FMA)
        qx = _plane_dot(q, x4, qx, 4, BITS, FMA)
        qx = _plane_dot(q, x5, qx, 5, BITS, FMA)
        qx = _plane_dot(q, x6, qx, 6, BITS, FMA)
        qx = _plane_dot(q, x7, qx, 7, BITS, FMA)
    else:
        q = q ^ -2139062144  # 0x80808080: code + 128, unsigned
        a, b = tl.split(tl.reshape(xw, (BLOCK_W, 2, 2)))
        x0, x2 = tl.split(a)
        x1, x3 = tl.split(b)
        qx = _plane_dot(q, x0, qx, 0, BITS, FMA)
        qx = _plane_dot(q, x1, qx, 1, BITS, FMA)
        qx = _plane_dot(q, x2, qx, 2, BITS, FMA)
        qx = _plane_dot(q, x3, qx, 3, BITS, FMA)
    return qx


@triton.jit
def _quant_gemv_kernel(
    x_ptr, q_ptr, s_ptr, z_ptr, perm_ptr, bias_ptr, res_ptr, y_ptr,
    N, K, stride_qn, stride_sn,
    BITS: tl.constexpr, GROUP: tl.constexpr, MODE: tl.constexpr, HAS_ZERO: tl.constexpr, HAS_PERM: tl.constexpr,
    HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, ACT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, NG: tl.constexpr, STAGES: tl.constexpr, FMA: tl.constexpr,
    PDL: tl.constexpr,
):
    """q_ptr: the packed weight read as int32 words (stride_qn words a row); word w holds columns PER * w + j,
    j < PER, code j in bits [BITS * j, BITS * (j + 1)) (kernels/quant_weight.py's bytes, little-endian).
    ACT: the weight is a packed (gate | up) of N rows; the program's BLOCK_N rows are BLOCK_N / 2 features' gate and
    up rows, interleaved, and it writes silu(gate) * up for those features (y has N / 2 columns)."""
    HALF_N: tl.constexpr = BLOCK_N // 2  # ACT: features a program
    TWO_C: tl.constexpr = 2.0 ** 64  # _plane_dot's products are q * x * 2^-64
    OFFSET: tl.constexpr = 128.0 if BITS == 8 else 0.0  # bytes come as code + 128
    if ACT:
        r = tl.arange(0, BLOCK_N)
        feat = tl.program_id(0) * HALF_N + r // 2
        rows = feat + (r % 2) * (N // 2)  # gate row f, then up row f
        row_mask = feat < N // 2
    else:
        rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)
        row_mask = rows < N
    PER: tl.constexpr = 32 // BITS  # codes a word
    BLOCK_W: tl.constexpr = BLOCK_K // PER  # words a row a step
    wi = tl.arange(0, BLOCK_W)
    q_rows = q_ptr + rows.to(tl.int64)[:, None] * stride_qn  # (BLOCK_N, 1)
    dependent_launch(PDL)
    s_rows = s_ptr + rows.to(tl.int64)[:, None] * stride_sn
    z_rows = z_ptr + rows.to(tl.int64)[:, None] * stride_sn
    acc = tl.zeros((BLOCK_N, BLOCK_W), tl.float32)  # reduced over K once, after the loop
    xsum = tl.zeros((BLOCK_W,), tl.float32)  # per-row mode: sum of x, for the zeros
    acc_g = tl.zeros((BLOCK_N, NG), tl.float32)  # groups-in-tile mode: per (row, group of the tile)
    for k0 in tl.range(0, K, BLOCK_K, num_stages=STAGES):
        word = k0 // PER + wi
        w_mask = word < K // PER
        q = tl.load(q_rows + word[None, :], mask=row_mask[:, None] & w_mask[None, :], other=0)
        xw = _x_at(x_ptr, perm_ptr, word[:, None] * PER + tl.arange(0, PER)[None, :], w_mask[:, None],
                   HAS_PERM)  # (BLOCK_W, PER): the step's columns in order
        xs = tl.sum(xw, axis=1)
        qx = _words_dot(q, xw, BLOCK_N, BLOCK_W, BITS, FMA)
        if MODE == 0:  # one scale per row: applied after the loop
            acc += qx
            xsum += xs
        elif MODE == 1:  # the tile lies inside one group: one scale per row
            s = tl.load(s_rows + k0 // GROUP, mask=row_mask[:, None], other=0.0).to(tl.float32)  # (BLOCK_N, 1)
            part = qx * (s * TWO_C)
            zt = -OFFSET * s
            if HAS_ZERO:
                zt += tl.load(z_rows + k0 // GROUP, mask=row_mask[:, None], other=0.0).to(tl.float32)
            if HAS_ZERO or OFFSET != 0:
                part += zt * xs[None, :]
            acc += part
        else:  # whole groups in the tile: each (row, group)'s integer dot, then its scale
            g = k0 // GROUP + tl.arange(0, NG)
            g_mask = row_mask[:, None] & (g[None, :] < K // GROUP)
            s = tl.load(s_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)  # (BLOCK_N, NG)
            part = tl.sum(tl.reshape(qx, (BLOCK_N, NG, GROUP // PER)), axis=2) * (s * TWO_C)
            zt = -OFFSET * s
            if HAS_ZERO:
                zt += tl.load(z_rows + g[None, :], mask=g_mask, other=0.0).to(tl.float32)
            if HAS_ZERO or OFFSET != 0:
                part += zt * tl.sum(tl.reshape(xs, (NG, GROUP // PER)), axis=1)[None, :]
            acc_g += part
    y = tl.sum(acc, axis=1) + tl.sum(acc_g, axis=1)  # (BLOCK_N,)
    if MODE == 0:
        s = tl.load(s_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)
        y = y * (s * TWO_C)
        zt = -OFFSET * s
        if HAS_ZERO:
            zt += tl.load(z_ptr + rows * stride_sn, mask=row_mask, other=0.0).to(tl.float32)
        if HAS_ZERO or OFFSET != 0:
            y += zt * tl.sum(xsum, axis=0)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = y.to(x_ptr.dtype.element_ty).to(tl.float32) + res
    if ACT:  # the projection rounded to x's dtype, then silu_and_mul's arithmetic (kernels/activation.py)
        gate, up = tl.split(tl.reshape(y.to(x_ptr.dtype.element_ty).to(tl.float32), (HALF_N, 2)))
        silu = (gate / (1.0 + tl.exp(-gate))).to(x_ptr.dtype.element_ty).to(tl.float32)
        out = tl.program_id(0) * HALF_N + tl.arange(0, HALF_N)
        tl.store(y_ptr + out, (silu * up).to(y_ptr.dtype.element_ty), mask=out < N // 2)
    else:
        tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def group_mode(w: QuantWeight, block_k: int) -> int | None:
    """How a BLOCK_K tile meets the groups, or None when the group size suits no tile (not a power of two)."""
    N, K = w.shape
    G = w.group_size
    if G == K:
        return _MODE_PER_ROW
    if G & (G - 1) or G < 32 // w.bits:  # a group is whole int32 words of codes
        return None
    return _MODE_TILE_IN_GROUP if G >= block_k else _MODE_GROUPS_IN_TILE


def _block_sizes(w: QuantWeight) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages): GEMV_TILES, with fewer rows a program for a short N so that
    there are at least ~2 programs per SM, and a K step no longer than K."""
    N, K = w.shape
    block_n, block_k, warps, stages = GEMV_TILES[w.bits][N >= WIDE_N]
    while block_n > 4 and triton.cdiv(N, block_n) < 256:
        block_n //= 2
    return block_n, max(min(block_k, triton.next_power_of_2(K)), 32), warps, stages


# bits -> (tiles for N < WIDE_N, tiles for N >= WIDE_N) of the one-row GEMV, (BLOCK_N, BLOCK_K, num_warps,
# num_stages): the least total time over the Llama-2-7B projections on an H200 (graph-timed, weights past the L2
# cache; `python -m bench.quant_sweep`) confirmed by batch-1 decode end to end. 2026-12-02 (5), subnormal codes:
# 4-bit o_proj / down_proj 6.3 / 14.4 us with the narrow tile (6.8 / 17.5 with the wide one), batch 1 447.6 tokens/s
# against 436.1 with one tile for all and 443.6 with (8, 2048, 4, 2); 8-bit's narrow (8, 2048, 4, 1) 388.3 against
# 386.7 (noise-sized: one tile kept). Earlier end-to-end picks: 4-bit 397 tokens/s against 371 with 4 rows a program
# for N = 4,096, 306 with 2 stages, 337 with 4 rows everywhere; 8-bit 349 against 281 with (16, 512, 4, 3).
GEMV_TILES = {4: ((8, 4096, 8, 1), (8, 2048, 4, 1)), 8: ((8, 1024, 4, 3), (8, 1024, 4, 3))}


def _quant_gemv(x, w: QuantWeight, bias, residual, tiles=None, act=False):
    """act: silu(gate) * up of a packed (gate | up) weight (N / 2 columns), not the projection."""
    N, K = w.shape
    BLOCK_N, BLOCK_K, warps, stages = tiles or _block_sizes(w)
    y = torch.empty((1, N // 2 if act else N), dtype=x.dtype, device=x.device)
    words = w.qweight.view(torch.int32)  # _gemv_ok: rows of whole, aligned words
    pdl = dependent_launches(x)
    _quant_gemv_kernel[(triton.cdiv(N // 2, BLOCK_N // 2) if act else triton.cdiv(N, BLOCK_N),)](
        x, words, w.scales, w.zeros if w.zeros is not None else w.scales, w.perm if w.perm is not None else x,
        bias if bias is not None else x, residual if residual is not None else x, y,
        N, K, words.stride(0), w.scales.stride(0),
        BITS=w.bits, GROUP=w.group_size, MODE=group_mode(w, BLOCK_K), HAS_ZERO=w.zeros is not None,
        HAS_PERM=w.perm is not None, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        ACT=act,
        BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, NG=max(BLOCK_K // w.group_size, 1),
        STAGES=stages, FMA=x.is_cuda, PDL=pdl, num_warps=warps, launch_pdl=pdl,  # CPU: TRITON_INTERPRET, see _plane_dot
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
    """One contiguous row, a group size the tiles take, and a weight readable as int32 words (rows of whole words,
    4-byte aligned)."""
    words_ok = w.qweight.shape[1] % 4 == 0 and w.qweight.data_ptr() % 4 == 0
    return x.shape[0] == 1 and x.is_contiguous() and words_ok and group_mode(w, _block_sizes(w)[1]) is not None


def _linear_rows(x, w: QuantWeight, bias, residual=None):
    """Several rows: the dequantize-GEMM (residual in its epilogue); group sizes it cannot tile: the twin math."""
    try:
        return quant_matmul_triton(x, w, bias, residual)
    except NotImplementedError:
        y = quant_linear_torch(x, w, bias)
        return y if residual is None else residual + y


def quant_norm_linear_triton(x, norm_weight, eps, w: QuantWeight, bias=None):
    _check(x, w, w.shape[1], bias)
    x = rms_norm_triton(x, norm_weight, eps)
    return _quant_gemv(x, w, bias, None) if _gemv_ok(x, w) else _linear_rows(x, w, bias)


def quant_norm_act_triton(x, norm_weight, eps, w: QuantWeight):
    """silu(gate) * up of gate | up = linear(rms_norm(x)) for a packed (gate | up) weight, in one GEMV; None where
    that GEMV does not take x (several rows: the caller composes the ops)."""
    _check(x, w, w.shape[1])
    if not _gemv_ok(x, w) or w.shape[0] % 2:
        return None
    return _quant_gemv(rms_norm_triton(x, norm_weight, eps), w, None, None, act=True)


def quant_linear_add_triton(x, w: QuantWeight, bias, residual):
    _check(x, w, w.shape[1], bias, residual)
    if not (_gemv_ok(x, w) and residual.is_contiguous()):
        return _linear_rows(x, w, bias, residual)
    return _quant_gemv(x, w, bias, residual)


def quant_act_linear_add_triton(x, w: QuantWeight, residual):
    _check(x, w, 2 * w.shape[1], None, residual)
    x = silu_and_mul_triton(x)
    if not (_gemv_ok(x, w) and residual.is_contiguous()):
        return _linear_rows(x, w, None, residual)
    return _quant_gemv(x, w, None, residual)

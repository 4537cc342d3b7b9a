"""A decoder layer's projections with their neighbours fused in: norm -> matmul, act -> matmul -> residual add.

Three ops, each `y = [residual +] W · f(x) [+ bias]` for a weight W (N, K) as nn.Linear stores it, and the MLP
built from two of them:
  - `norm_linear(x, norm_weight, eps, weight, bias)`: f = RMSNorm (the layer's input / post-attention norm);
  - `linear_add(x, weight, bias, residual)`: f = identity, the residual stream added to the output (o_proj);
  - `act_linear_add(x, weight, residual)`: f = silu(gate) * up over a packed (gate | up) x (down_proj);
  - `norm_mlp_add(x, norm_weight, eps, gate_up, down)`: the whole MLP, x + down(silu(gate) * up) of
    gate | up = gate_up(rms_norm(x)); each path composes it as it runs fastest (a quantized one row: the SiLU in the
    gate_up GEMV's epilogue, kernels/quant_gemv.py; otherwise `norm_linear` then `act_linear_add`).
Numerics follow the unfused HF chain: the norm's output and the activation are rounded to x's dtype before the
matmul, the matmul's output is rounded before the residual add.

Why fuse: a batch-1 decode step streams every weight once, so it is bound by memory bandwidth, and on an H100 the
norms, the activation and the residual adds cost more in kernel launches than in bytes (4 of a layer's ~11
kernels). For one row (`x` of shape (1, K)) the Triton launcher runs a single GEMV kernel per op that recomputes
the row's norm statistics in every program (K values from L2: cheap) and streams W once (on an H200, Llama-2-7B
bf16 batch 1: 247 tokens/s so, 208 with the norm and SiLU as kernels of their own). With more rows the weight
is reused across rows and cuBLAS's GEMM wins, so the launcher runs the unfused chain on the other Triton kernels.
A weight that is not a tensor is quantized: a `QuantWeight` (its Triton path is kernels/quant_gemv.py, its twin
math kernels/quant_weight.py) or a CPU-packed one (kernels/quant_cpu.py); each runs its own `linear`.
Not here: GEMV for several rows, the attention in between.
"""

import torch
import torch.nn.functional as F

from ._triton import dependent_launch, dependent_launches, triton, tl
from .activation import silu_and_mul_torch, silu_and_mul_triton
from .quant_gemv import (quant_act_linear_add_triton, quant_linear_add_triton, quant_norm_act_triton,
                         quant_norm_linear_triton)
from .quant_weight import QuantWeight
from .rms_norm import rms_norm_torch, rms_norm_triton

_PRO_NONE, _PRO_NORM, _PRO_SILU_MUL = 0, 1, 2


def _linear(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """nn.Linear; a weight of another dtype (a CPU decode copy in bf16) sees x cast to it, the result cast back."""
    if not isinstance(weight, torch.Tensor):  # quantized: see the module docstring
        return weight.linear(x, bias)
    if weight.dtype == x.dtype:
        return F.linear(x, weight, bias)
    y = F.linear(x.to(weight.dtype), weight).to(x.dtype)
    return y if bias is None else y + bias


def norm_linear_torch(x, norm_weight, eps, weight, bias=None):
    return _linear(rms_norm_torch(x, norm_weight, eps), weight, bias)


def linear_add_torch(x, weight, bias, residual):
    return residual + _linear(x, weight, bias)  # rounded, then added in x.dtype: HF's `residual + hidden`


def act_linear_add_torch(x, weight, residual):
    return residual + _linear(silu_and_mul_torch(x), weight, None)


def norm_mlp_add_torch(x, norm_weight, eps, gate_up, down):
    return act_linear_add_torch(norm_linear_torch(x, norm_weight, eps, gate_up, None), down, x)


@triton.jit
def _gemv_kernel(
    x_ptr, norm_w_ptr, w_ptr, bias_ptr, res_ptr, y_ptr,
    N, K, stride_wn, eps,
    PROLOGUE: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_RESIDUAL: tl.constexpr, EVEN_K: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PDL: tl.constexpr,
):
    dependent_launch(PDL)
    rows = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # output features of this program
    row_mask = rows < N
    cols = tl.arange(0, BLOCK_K)
    x_dtype = x_ptr.dtype.element_ty
    if PROLOGUE == 1:  # RMSNorm statistics of the one input row, recomputed by every program
        sq = tl.zeros((BLOCK_K,), tl.float32)
        for k0 in range(0, K, BLOCK_K):
            xk = tl.load(x_ptr + k0 + cols, mask=(k0 + cols) < K, other=0.0).to(tl.float32)
            sq += xk * xk
        rstd = tl.rsqrt(tl.sum(sq, axis=0) / K + eps)
    acc = tl.zeros((BLOCK_N, BLOCK_K), tl.float32)  # reduced over K once, after the loop
    w_rows = w_ptr + rows.to(tl.int64)[:, None] * stride_wn
    for k0 in range(0, K, BLOCK_K):
        k = k0 + cols
        k_mask = k < K
        if PROLOGUE == 2:  # silu(gate) * up, rounded as the unfused twin rounds
            gate = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            up = tl.load(x_ptr + K + k, mask=k_mask, other=0.0).to(tl.float32)
            silu = (gate / (1.0 + tl.exp(-gate))).to(x_dtype).to(tl.float32)
            xk = (silu * up).to(x_dtype).to(tl.float32)
        else:
            xk = tl.load(x_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
            if PROLOGUE == 1:
                nw = tl.load(norm_w_ptr + k, mask=k_mask, other=0.0).to(tl.float32)
                xk = ((xk * rstd).to(x_dtype).to(tl.float32) * nw).to(x_dtype).to(tl.float32)
        if EVEN_K:
            w = tl.load(w_rows + k[None, :], mask=row_mask[:, None], other=0.0)
        else:
            w = tl.load(w_rows + k[None, :], mask=row_mask[:, None] & k_mask[None, :], other=0.0)
        acc += w.to(tl.float32) * xk[None, :]
    y = tl.sum(acc, axis=1)  # (BLOCK_N,)
    if HAS_BIAS:
        y += tl.load(bias_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
    if HAS_RESIDUAL:
        res = tl.load(res_ptr + rows, mask=row_mask, other=0.0).to(tl.float32)
        y = y.to(x_dtype).to(tl.float32) + res
    tl.store(y_ptr + rows, y.to(y_ptr.dtype.element_ty), mask=row_mask)


def _block_sizes(N: int, K: int) -> tuple[int, int, int, int]:
    """(BLOCK_N, BLOCK_K, num_warps, num_stages). From a sweep of 54 tiles over the 7B and 0.5B projections on an
    H100 in bf16, each rule within 3% of its shapes' best (bench numbers in README): few rows a program, so even a
    4096-wide output spreads over thousands of programs, and long K steps, so each program keeps 8-16 KB of loads
    in flight. Wide outputs (fused QKV, gate/up, LM head) take 4 rows and half of K a step, up to 2048 columns;
    narrow ones with short rows (o_proj) take 2 rows and 1024 columns; long rows (down_proj) take 4 rows."""
    k_pow2 = triton.next_power_of_2(K)
    if N >= 8192:
        return 4, min(2048, max(k_pow2 // 2, 16)), 4, 3
    if K <= 4096:
        return 2, min(1024, k_pow2), 4, 3
    return 4, 1024 if K > 8192 else 2048, 4, 3


def _gemv(x, weight, bias, residual, prologue, norm_weight=None, eps=0.0):
    N = weight.shape[0]
    K = weight.shape[1]
    y = torch.empty((1, N), dtype=x.dtype, device=x.device)
    BLOCK_N, BLOCK_K, warps, stages = _block_sizes(N, K)
    pdl = dependent_launches(x)
    _gemv_kernel[(triton.cdiv(N, BLOCK_N),)](
        x, norm_weight if norm_weight is not None else x, weight,
        bias if bias is not None else x, residual if residual is not None else x, y,
        N, K, weight.stride(0), eps,
        PROLOGUE=prologue, HAS_BIAS=bias is not None, HAS_RESIDUAL=residual is not None,
        EVEN_K=K % BLOCK_K == 0, BLOCK_N=BLOCK_N, BLOCK_K=BLOCK_K, PDL=pdl, num_warps=warps, num_stages=stages,
        launch_pdl=pdl,
    )
    return y


def _check(x, weight, k_in, bias=None, residual=None):
    if x.dim() != 2 or x.shape[1] != k_in or weight.dim() != 2 or weight.stride(1) != 1:
        raise ValueError(f"x (T, {k_in}) and a row-major weight (N, K), got {tuple(x.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"bias must be ({weight.shape[0]},), got {tuple(bias.shape)}")
    if residual is not None and residual.shape != (x.shape[0], weight.shape[0]):
        raise ValueError(f"residual must be ({x.shape[0]}, {weight.shape[0]}), got {tuple(residual.shape)}")
    if len({t.device for t in (x, weight, bias, residual) if t is not None}) != 1:
        raise ValueError("x, weight, bias and residual must be on one device")


def _one_row(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return x.shape[0] == 1 and x.is_contiguous() and weight.dtype == x.dtype


def norm_linear_triton(x, norm_weight, eps, weight, bias=None):
    if isinstance(weight, QuantWeight):
        return quant_norm_linear_triton(x, norm_weight, eps, weight, bias)
    _check(x, weight, weight.shape[1], bias)
    if not _one_row(x, weight):
        return _linear(rms_norm_triton(x, norm_weight, eps), weight, bias)
    return _gemv(x, weight, bias, None, _PRO_NORM, norm_weight.contiguous(), eps)


def _linear_add_rows(x, weight, bias, residual):
    """Several rows: cuBLAS adds the residual in its epilogue (one kernel, one rounding) where it can."""
    if isinstance(weight, torch.Tensor) and bias is None and weight.dtype == x.dtype == residual.dtype:
        return torch.addmm(residual, x, weight.t())
    return residual + _linear(x, weight, bias)


def linear_add_triton(x, weight, bias, residual):
    if isinstance(weight, QuantWeight):
        return quant_linear_add_triton(x, weight, bias, residual)
    _check(x, weight, weight.shape[1], bias, residual)
    if not (_one_row(x, weight) and residual.is_contiguous()):
        return _linear_add_rows(x, weight, bias, residual)
    return _gemv(x, weight, bias, residual, _PRO_NONE)


def act_linear_add_triton(x, weight, residual):
    if isinstance(weight, QuantWeight):
        return quant_act_linear_add_triton(x, weight, residual)
    _check(x, weight, 2 * weight.shape[1], None, residual)
    if not (_one_row(x, weight) and residual.is_contiguous()):
        return _linear_add_rows(silu_and_mul_triton(x), weight, None, residual)
    return _gemv(x, weight, None, residual, _PRO_SILU_MUL)


def norm_mlp_add_triton(x, norm_weight, eps, gate_up, down):
    if isinstance(gate_up, QuantWeight) and (act := quant_norm_act_triton(x, norm_weight, eps, gate_up)) is not None:
        return linear_add_triton(act, down, None, x)  # the gate_up GEMV wrote silu(gate) * up itself
    return act_linear_add_triton(norm_linear_triton(x, norm_weight, eps, gate_up, None), down, x)

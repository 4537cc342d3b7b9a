"""The CPU's decode-step ops: kernels/cpu_ops.c through ctypes, with the twins' signatures (the CPU's `KernelOps`).

A batch-1 decode step on a CPU is bound less by its matmuls than by the number of tensor ops around them: SmolLM2's
30 layers x ~40 ops cost ~8 ms of dispatch a token on a Xeon, as much as its int4 GEMVs. `norm_linear`,
`rope_store_kv` and `paged_decode_attention` here make the norm, rotary + KV store and the attention one C call each
(the SwiGLU gate stays torch's here: the C one is used inside the one-call step, kernels/cpu_decoder.py); the
projections stay PyTorch's (dense, or aten's int4 / int8 kernels: `_linear`)
or, for GGUF-grouped weights, kernels/cpu_qgemv.c's int8-activation GEMV, which adds the residual in its store.

The C file is compiled once per machine and source (`-O3 -march=native`; ~1 s) by kernels/cpu_build.py. Where
there is no compiler, or a call's dtypes or layouts are not the ones the C code takes (fp32
and bf16 activations, dense caches), the twin runs instead: the choice is per call and never changes the result
beyond summation order. Not here: prefill attention (SDPA is efficient for many rows), the projections' kernels.
"""


import torch

from . import cpu_qgemv
from .cpu_build import function as _fn
from .activation import silu_and_mul_torch
from .gemv import _linear
from .kv_int8 import check_quantized
from .kv_store import rope_store_kv_torch
from .paged_decode import paged_decode_attention_torch
from .rms_norm import rms_norm_torch

# Past this many keys a row (by its block table's width) the twin's SDPA, multi-threaded and tiled, is as fast or
# faster than the single-threaded C loop (measured: 1,000 keys, 9 query and 3 KV heads of 64: 130 us either way).
LONG_CONTEXT = 768


def _rows_ok(x: torch.Tensor) -> bool:
    return not x.is_cuda and x.dim() == 2 and x.stride(1) == 1


def rms_norm_cpu(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    fn = _fn("rms_norm", x.dtype)
    if fn is None or not _rows_ok(x) or weight.dtype != x.dtype or not weight.is_contiguous():
        return rms_norm_torch(x, weight, eps)
    y = torch.empty(x.shape, dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), weight.data_ptr(), y.data_ptr(), x.shape[0], x.shape[1], eps)
    return y


def silu_and_mul_cpu(x: torch.Tensor) -> torch.Tensor:
    fn = _fn("silu_mul", x.dtype)
    if fn is None or not _rows_ok(x) or x.shape[1] % 2:
        return silu_and_mul_torch(x)
    y = torch.empty((x.shape[0], x.shape[1] // 2), dtype=x.dtype)
    fn(x.data_ptr(), x.stride(0), y.data_ptr(), x.shape[0], x.shape[1] // 2)
    return y


def norm_linear_cpu(x, norm_weight, eps, weight, bias=None):
    return _linear(rms_norm_cpu(x, norm_weight, eps), weight, bias)


def _linear_add(x, weight, bias, residual):
    if isinstance(weight, cpu_qgemv.CpuQ8Weight) and bias is None:  # the residual added in the C kernel's store
        return weight.linear(x, residual=residual)
    return residual + _linear(x, weight, bias)


def linear_add_cpu(x, weight, bias, residual):
    return _linear_add(x, weight, bias, residual)


def act_linear_add_cpu(x, weight, residual):
    # torch's SwiGLU, not the C one: on this project's Xeon it measured faster at every row count (1 row: 16 against
    # 29 us; 2,048 rows: 2.5 against 31 ms, bf16). The C loop stays inside the one-call decode step (decode_layers),
    # where it saves a Python round trip a layer.
    return _linear_add(silu_and_mul_torch(x), weight, None, residual)


def norm_mlp_add_cpu(x, norm_weight, eps, gate_up, down):
    return act_linear_add_cpu(norm_linear_cpu(x, norm_weight, eps, gate_up, None), down, x)


def rope_store_kv_cpu(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> None:
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    fn = _fn("rope_store_kv", q.dtype)
    T, Hq, D = q.shape
    # (CPU tensors: a CUDA q has no C function; `fn` is None for other dtypes.) Checked in the order of their cost.
    ok = (fn is not None and not q.is_cuda and k.dtype == q.dtype and v.dtype == q.dtype and D % 2 == 0
          and q.stride(2) == 1 and k.stride(2) == 1 and v.stride(2) == 1 and k.dim() == 3 and v.dim() == 3
          and positions.dtype == torch.int64 and slot_mapping.dtype == torch.int64 and positions.is_contiguous()
          and slot_mapping.is_contiguous() and cos_sin.dtype == torch.float32 and cos_sin.stride(1) == 1
          and (quantized or k_cache.dtype == q.dtype) and k_cache.is_contiguous() and v_cache.is_contiguous()
          and k_cache.shape[2] == k.shape[1] and k_cache.shape[3] == D)
    if not ok:
        return rope_store_kv_torch(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, k_scale_zero,
                                   v_scale_zero)
    fn(q.data_ptr(), q.stride(0), q.stride(1), k.data_ptr(), k.stride(0), k.stride(1), v.data_ptr(), v.stride(0),
       v.stride(1), positions.data_ptr(), cos_sin.data_ptr(), cos_sin.stride(0), k_cache.data_ptr(),
       v_cache.data_ptr(), k_scale_zero.data_ptr() if quantized else None,
       v_scale_zero.data_ptr() if quantized else None, slot_mapping.data_ptr(), T, Hq, k.shape[1], D)


def paged_decode_attention_cpu(
    q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
    block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> torch.Tensor:
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    fn = _fn("paged_decode", q.dtype)
    B, Hq, D = q.shape
    ok = (fn is not None and not q.is_cuda and q.stride(2) == 1 and k_cache.is_contiguous() and v_cache.is_contiguous()
          and (quantized or k_cache.dtype == q.dtype) and block_tables.dtype == torch.int32
          and seq_lens.dtype == torch.int32 and block_tables.stride(1) == 1 and seq_lens.is_contiguous()
          and Hq % k_cache.shape[2] == 0 and block_tables.shape[1] * k_cache.shape[1] <= LONG_CONTEXT)
    if not ok:
        return paged_decode_attention_torch(q, k_cache, v_cache, block_tables, seq_lens, scale, k_scale_zero,
                                            v_scale_zero)
    out = torch.empty((B, Hq, D), dtype=q.dtype)
    fn(q.data_ptr(), q.stride(0), q.stride(1), k_cache.data_ptr(), v_cache.data_ptr(),
       k_scale_zero.data_ptr() if quantized else None, v_scale_zero.data_ptr() if quantized else None,
       k_cache.stride(0), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(), out.data_ptr(),
       B, Hq, k_cache.shape[2], D, k_cache.shape[1], scale)
    return out

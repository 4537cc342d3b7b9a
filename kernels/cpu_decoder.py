"""A CPU decode step's decoder layers in one C call (`decode_layers` in kernels/cpu_ops.c), and its twin.

With the projections on kernels/cpu_qgemv.c, a decode step of the embedded default spends as long in Python as in
arithmetic: ~10 calls a layer (norm, GEMV, rotary + store, attention, GEMV + residual, ...), each a few microseconds
of argument checks, ctypes and tensor allocation, x 30 layers. `decode_layers_cpu` runs the same chain with the same
C functions in one call; `decode_layers_torch` is the chain op by op, the oracle. Both take a `LayerStack`: the
layers' weights and caches, gathered once (the C side gets them as an array of structs).

The C call takes: bf16 or fp32 activations, every projection a `CpuQ8Weight` without bias, up to 16 rows, contexts
the C attention serves (cpu_ops.LONG_CONTEXT); anything else returns None and the model runs its layers as usual.
Not here: which model has this layer shape (engine/models/decoder.py builds the stack), the LM head.
"""
from __future__ import annotations

import ctypes
from dataclasses import dataclass

import torch

from . import cpu_build, cpu_ops
from .cpu_qgemv import MAX_K, MAX_ROWS, CpuQ8Weight
from .gemv import linear_add_torch, norm_linear_torch, norm_mlp_add_torch
from .kv_store import rope_store_kv_torch
from .paged_decode import paged_decode_attention_torch


class _Layer(ctypes.Structure):  # layer_t in cpu_ops.c
    _fields_ = [("norm1", ctypes.c_void_p), ("norm2", ctypes.c_void_p), ("tiles", ctypes.c_void_p * 4),
                ("dm", ctypes.c_void_p * 4), ("bits", ctypes.c_int64 * 4), ("k_cache", ctypes.c_void_p),
                ("v_cache", ctypes.c_void_p), ("k_sz", ctypes.c_void_p), ("v_sz", ctypes.c_void_p)]


@dataclass(frozen=True)
class DecoderLayerWeights:
    input_norm: torch.Tensor  # (H,)
    qkv: CpuQ8Weight  # (Hq D + 2 Hk D, H)
    o: CpuQ8Weight
    post_norm: torch.Tensor
    gate_up: CpuQ8Weight  # (2 I, H): gate | up
    down: CpuQ8Weight
    k_cache: torch.Tensor  # (blocks, page, Hk, D): act dtype, or uint8 codes with the scale/zero tensors below
    v_cache: torch.Tensor
    k_scale_zero: torch.Tensor | None = None
    v_scale_zero: torch.Tensor | None = None


class LayerStack:
    """The decoder's layers for a decode step, with their C structs (built once: the tensors must not move)."""

    def __init__(self, layers: list[DecoderLayerWeights], heads: int, kv_heads: int, head_dim: int, eps: float):
        self.layers, self.heads, self.kv_heads, self.head_dim, self.eps = layers, heads, kv_heads, head_dim, eps
        self.scale = head_dim ** -0.5
        first = layers[0]
        self.hidden, self.intermediate = first.qkv.shape[1], first.down.shape[1]
        self.dtype = first.input_norm.dtype
        self.structs = (_Layer * len(layers))()
        for s, w in zip(self.structs, layers):
            projections = (w.qkv, w.o, w.gate_up, w.down)
            s.norm1, s.norm2 = w.input_norm.data_ptr(), w.post_norm.data_ptr()
            s.tiles[:] = [p.tiles.data_ptr() for p in projections]
            s.dm[:] = [p.dm.data_ptr() for p in projections]
            s.bits[:] = [p.bits for p in projections]
            s.k_cache, s.v_cache = w.k_cache.data_ptr(), w.v_cache.data_ptr()
            s.k_sz = None if w.k_scale_zero is None else w.k_scale_zero.data_ptr()
            s.v_sz = None if w.v_scale_zero is None else w.v_scale_zero.data_ptr()


def decode_layers_torch(h, stack: LayerStack, positions, cos_sin, slot_mapping, block_tables, seq_lens):
    """(M, H) residual stream after every layer of `stack`, op by op (engine/models/decoder.py's chain)."""
    Q, D = stack.heads * stack.head_dim, stack.head_dim
    for w in stack.layers:
        qkv = norm_linear_torch(h, w.input_norm, stack.eps, w.qkv, None)
        q, k, v = qkv.split((Q, stack.kv_heads * D, stack.kv_heads * D), dim=-1)
        q, k, v = q.view(-1, stack.heads, D), k.view(-1, stack.kv_heads, D), v.view(-1, stack.kv_heads, D)
        sz = (w.k_scale_zero, w.v_scale_zero)
        rope_store_kv_torch(q, k, v, positions, cos_sin, w.k_cache, w.v_cache, slot_mapping, *sz)
        out = paged_decode_attention_torch(q, w.k_cache, w.v_cache, block_tables, seq_lens, stack.scale, *sz)
        h = linear_add_torch(out.reshape(-1, Q), w.o, None, h)
        h = norm_mlp_add_torch(h, w.post_norm, stack.eps, w.gate_up, w.down)
    return h


def decode_layers_cpu(h, stack: LayerStack, positions, cos_sin, slot_mapping, block_tables, seq_lens):
    """`decode_layers_torch` in one C call, or None where the C code does not take the call (module docstring)."""
    fn = cpu_build.function("decode_layers", h.dtype)
    M, first = h.shape[0], stack.layers[0]
    ok = (fn is not None and h.dtype == stack.dtype and h.dim() == 2 and h.shape[1] == stack.hidden
          and M <= MAX_ROWS and max(stack.hidden, stack.intermediate) <= MAX_K and not h.is_cuda
          and first.k_cache.shape[1] * block_tables.shape[1] <= cpu_ops.LONG_CONTEXT
          and positions.dtype == slot_mapping.dtype == torch.int64 and block_tables.dtype == torch.int32
          and seq_lens.dtype == torch.int32 and positions.is_contiguous() and slot_mapping.is_contiguous()
          and seq_lens.is_contiguous() and block_tables.stride(1) == 1 and cos_sin.stride(1) == 1)
    if not ok:
        return None
    out = h.contiguous().clone()
    fn(out.data_ptr(), M, ctypes.addressof(stack.structs), len(stack.layers), stack.hidden, stack.intermediate, stack.heads,
       stack.kv_heads, stack.head_dim, stack.eps, positions.data_ptr(), cos_sin.data_ptr(), cos_sin.stride(0),
       slot_mapping.data_ptr(), block_tables.data_ptr(), block_tables.stride(0), seq_lens.data_ptr(),
       first.k_cache.stride(0), first.k_cache.shape[1], stack.scale, cpu_build.pool_threads())
    return out

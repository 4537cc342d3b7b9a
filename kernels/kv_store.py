"""Write a step's new K/V into the paged KV cache, applying rotary embedding to q (in place) and k on the way.

The cache is (num_blocks, block_size, Hk, D) per layer for K and for V; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t, and a negative slot marks a padding row (CUDA-graph batches) whose K/V
are not written. One kernel per layer instead of a rotary kernel and a store kernel: the step's rotated k is only
ever read from the cache, so it goes straight there. Not here: choosing slots (the block manager does), reading the
cache (the attention kernels do), or the rotary table (engine/rope.py).
"""

import torch

from ._triton import triton, tl
from .rotary import _rotate_heads, rotary_torch


def rope_store_kv_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    rotary_torch(q, k, positions, cos_sin)  # k too, in place: the twin may write its inputs
    keep = slot_mapping >= 0  # boolean indexing syncs with the host; the twin is the CPU path and test oracle
    slots = slot_mapping[keep]
    Hk, D = k_cache.shape[2:]
    k_cache.view(-1, Hk, D)[slots] = k[keep]
    v_cache.view(-1, Hk, D)[slots] = v[keep]


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    n_q_heads, n_k_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + cols, mask=cols < HALF, other=0.0)  # (BLOCK_HALF,) fp32
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + cols, mask=cols < HALF, other=0.0)
    q_row = q_ptr + token * stride_qt
    _rotate_heads(q_row, q_row, stride_qh, stride_qh, cos, sin, n_q_heads, True, HALF, BLOCK_HQ, BLOCK_HALF)
    slot = tl.load(slot_ptr + token)  # int64; < 0: a padding row, nothing is written
    live = slot >= 0
    slot = tl.maximum(slot, 0)  # keeps the (masked) addresses in bounds
    _rotate_heads(k_ptr + token * stride_kt, k_cache_ptr + slot * stride_kc_slot, stride_kh, stride_kc_h,
                  cos, sin, n_k_heads, live, HALF, BLOCK_HK, BLOCK_HALF)
    heads = tl.arange(0, BLOCK_HK)
    d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_k_heads) & (d[None, :] < HEAD_DIM)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_h + d[None, :], v, mask=mask & live)


def _check(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping):
    T, Hq, D = q.shape
    Hk = k.shape[1]
    if k.dim() != 3 or k.shape[0] != T or k.shape[2] != D or v.shape != k.shape or D % 2:
        raise ValueError(f"q (T, Hq, D), k and v (T, Hk, D) with even D, got {tuple(q.shape)}, {tuple(k.shape)}, "
                         f"{tuple(v.shape)}")
    if k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != (Hk, D):
        raise ValueError(f"caches must be (blocks, block_size, {Hk}, {D}), got {tuple(k_cache.shape)}, "
                         f"{tuple(v_cache.shape)}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be ({T},) int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if positions.shape != (T,) or cos_sin.dim() != 2 or cos_sin.shape[1] != D or cos_sin.dtype != torch.float32:
        raise ValueError(f"positions (T,) and cos_sin (max_pos, {D}) fp32, got {tuple(positions.shape)}, "
                         f"{tuple(cos_sin.shape)} {cos_sin.dtype}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"k/v dtypes {k.dtype}/{v.dtype} must match the caches' {k_cache.dtype}/{v_cache.dtype}")
    for name, t in (("q", q), ("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache), ("cos_sin", cos_sin)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dim, got {t.stride()}")
    # Slots are flat (block, offset) indices, so a slot's stride is the offset stride of a block-contiguous cache.
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(0) != c.shape[1] * c.stride(1):
            raise ValueError(f"{name} blocks must be dense along block_size, got strides {c.stride()}")
    if len({t.device for t in (q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("q, k, v, positions, cos_sin, the caches and slot_mapping must be on one device")


def rope_store_kv_triton(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
) -> None:
    _check(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping)
    T, Hq, D = q.shape
    if T == 0:
        return
    Hk = k.shape[1]
    _rope_store_kv_kernel[(T,)](
        q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        Hq, Hk,
        HEAD_DIM=D, HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk),
        num_warps=4,
    )

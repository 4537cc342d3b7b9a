"""Write a step's new K/V into the paged KV cache, applying rotary embedding to q (in place) and k on the way.

The cache is (num_blocks, block_size, Hk, D) per layer for K and for V; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t, and a negative slot marks a padding row (CUDA-graph batches) whose K/V
are not written. One kernel per layer instead of a rotary kernel and a store kernel: the step's rotated k is only
ever read from the cache, so it goes straight there. With `k_scale_zero` / `v_scale_zero` the caches are int8 and
each (token, head) row is quantized on its way in (kernels/kv_int8.py). Not here: choosing slots (the block manager
does), reading the cache (the attention kernels do), or the rotary table (engine/rope.py).
"""

import torch

from ._triton import dependent_launch, dependent_launches, triton, tl
from .kv_int8 import check_quantized, quantize_kv
from .rotary import _rotate_heads, _rotated, rotary_torch


def rope_store_kv_torch(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor,
    k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor,
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> None:
    rotary_torch(q, k, positions, cos_sin)  # k too, in place: the twin may write its inputs
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    # Host sync: the twin is the CPU path (where it costs nothing) and the test oracle. Only CUDA-graph batches pad.
    if bool((slot_mapping < 0).any()):
        keep = slot_mapping >= 0
        slot_mapping, k, v = slot_mapping[keep], k[keep], v[keep]
    Hk, D = k_cache.shape[2:]
    if not quantized:
        k_cache.view(-1, Hk, D).index_copy_(0, slot_mapping, k)
        v_cache.view(-1, Hk, D).index_copy_(0, slot_mapping, v)
        return
    for cache, scale_zero, x in ((k_cache, k_scale_zero, k), (v_cache, v_scale_zero, v)):
        qx, sz = quantize_kv(x)
        cache.view(-1, Hk, D).index_copy_(0, slot_mapping, qx)
        scale_zero.view(-1, Hk, 2).index_copy_(0, slot_mapping, sz)


@triton.jit
def _scale_zero(lo, hi):
    """Row minimum and maximum (fp32) -> fp16 scale and zero, as kv_int8.quantize_kv."""
    return ((hi - lo) / 255.0).to(tl.float16), lo.to(tl.float16)


@triton.jit
def _codes(x, scale, zero):
    """fp32 rows -> uint8 codes against their (fp16) scale and zero."""
    s = scale.to(tl.float32)
    q = tl.floor((x - zero.to(tl.float32)[:, None]) / tl.where(s > 0, s, 1.0)[:, None] + 0.5)
    return tl.minimum(tl.maximum(q, 0.0), 255.0).to(tl.uint8)


@triton.jit
def _store_scale_zero(sz_ptr, heads, scale, zero, mask):
    tl.store(sz_ptr + heads * 2, scale, mask=mask)
    tl.store(sz_ptr + heads * 2 + 1, zero, mask=mask)


@triton.jit
def _store_quantized_k(src_ptr, dst_ptr, sz_ptr, stride_src_h, stride_dst_h, cos, sin, n_heads, write,
                       HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """Rotate one token's k heads (rounded to k's dtype, as the twin rotates in it) and store them as int8."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    o1, o2, mask = _rotated(src_ptr, stride_src_h, cos, sin, n_heads, HALF, BLOCK_H, BLOCK_HALF)
    o1, o2 = o1.to(tl.float32), o2.to(tl.float32)
    lo = tl.minimum(tl.min(tl.where(mask, o1, float("inf")), axis=1), tl.min(tl.where(mask, o2, float("inf")), axis=1))
    hi = tl.maximum(tl.max(tl.where(mask, o1, float("-inf")), axis=1),
                    tl.max(tl.where(mask, o2, float("-inf")), axis=1))
    scale, zero = _scale_zero(lo, hi)
    dst1 = dst_ptr + heads[:, None] * stride_dst_h + cols[None, :]
    tl.store(dst1, _codes(o1, scale, zero), mask=mask & write)
    tl.store(dst1 + HALF, _codes(o2, scale, zero), mask=mask & write)
    _store_scale_zero(sz_ptr, heads, scale, zero, (heads < n_heads) & write)


@triton.jit
def _rope_store_kv_kernel(
    q_ptr, k_ptr, v_ptr, pos_ptr, cos_sin_ptr, k_cache_ptr, v_cache_ptr, k_sz_ptr, v_sz_ptr, slot_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_cs,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    n_q_heads, n_k_heads,
    HEAD_DIM: tl.constexpr, HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr, QUANT: tl.constexpr, PDL: tl.constexpr,
):
    dependent_launch(PDL)
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
    heads = tl.arange(0, BLOCK_HK)
    d = tl.arange(0, BLOCK_D)
    mask = (heads[:, None] < n_k_heads) & (d[None, :] < HEAD_DIM)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + d[None, :], mask=mask)
    v_dst = v_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_h + d[None, :]
    if QUANT:
        sz_row = slot * n_k_heads * 2  # scale_zero (slots, Hk, 2), contiguous
        _store_quantized_k(k_ptr + token * stride_kt, k_cache_ptr + slot * stride_kc_slot, k_sz_ptr + sz_row,
                           stride_kh, stride_kc_h, cos, sin, n_k_heads, live, HALF, BLOCK_HK, BLOCK_HALF)
        vf = v.to(tl.float32)
        scale, zero = _scale_zero(tl.min(tl.where(mask, vf, float("inf")), axis=1),
                                  tl.max(tl.where(mask, vf, float("-inf")), axis=1))
        tl.store(v_dst, _codes(vf, scale, zero), mask=mask & live)
        _store_scale_zero(v_sz_ptr + sz_row, heads, scale, zero, (heads < n_k_heads) & live)
    else:
        _rotate_heads(k_ptr + token * stride_kt, k_cache_ptr + slot * stride_kc_slot, stride_kh, stride_kc_h,
                      cos, sin, n_k_heads, live, HALF, BLOCK_HK, BLOCK_HALF)
        tl.store(v_dst, v, mask=mask & live)


def _check(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, quantized):
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
    if not quantized and (k.dtype != k_cache.dtype or v.dtype != v_cache.dtype):
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
    k_scale_zero: torch.Tensor | None = None, v_scale_zero: torch.Tensor | None = None,
) -> None:
    quantized = check_quantized(k_cache, k_scale_zero, v_cache, v_scale_zero)
    _check(q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping, quantized)
    T, Hq, D = q.shape
    if T == 0:
        return
    Hk = k.shape[1]
    pdl = dependent_launches(q)
    _rope_store_kv_kernel[(T,)](
        q, k, v, positions, cos_sin, k_cache, v_cache,
        k_scale_zero if quantized else k_cache, v_scale_zero if quantized else v_cache, slot_mapping,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), v.stride(0), v.stride(1), cos_sin.stride(0),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        Hq, Hk,
        HEAD_DIM=D, HALF=D // 2, BLOCK_HALF=triton.next_power_of_2(D // 2), BLOCK_D=triton.next_power_of_2(D),
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk), QUANT=quantized, PDL=pdl,
        num_warps=4, launch_pdl=pdl,
    )

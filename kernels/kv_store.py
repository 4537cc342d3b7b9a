"""Write a step's new K/V rows into the paged KV cache.

The cache is (num_blocks, block_size, Hk, D) per layer for K and for V; `slot_mapping[t]` is the flat slot
`block * block_size + offset` of token t, and a negative slot marks a padding row (CUDA-graph batches) that is
skipped. Not here: choosing slots (the block manager does) or reading the cache (the attention kernels do).
"""

import torch

from ._triton import triton, tl

_TILE = 4096  # elements per program: a few heads of one token


def store_kv_torch(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    keep = slot_mapping >= 0  # boolean indexing syncs with the host; the twin is the CPU path and test oracle
    slots = slot_mapping[keep]
    Hk, D = k_cache.shape[2:]
    k_cache.view(-1, Hk, D)[slots] = k[keep]
    v_cache.view(-1, Hk, D)[slots] = v[keep]


@triton.jit
def _store_kv_kernel(
    k_ptr, v_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
    stride_kt, stride_kh, stride_vt, stride_vh,
    stride_kc_slot, stride_kc_h, stride_vc_slot, stride_vc_h,
    n_heads,
    HEAD_DIM: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    slot = tl.load(slot_ptr + token)  # int64
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HEAD_DIM) & (slot >= 0)  # (BLOCK_H, BLOCK_D)
    k = tl.load(k_ptr + token * stride_kt + heads[:, None] * stride_kh + cols[None, :], mask=mask)
    v = tl.load(v_ptr + token * stride_vt + heads[:, None] * stride_vh + cols[None, :], mask=mask)
    tl.store(k_cache_ptr + slot * stride_kc_slot + heads[:, None] * stride_kc_h + cols[None, :], k, mask=mask)
    tl.store(v_cache_ptr + slot * stride_vc_slot + heads[:, None] * stride_vc_h + cols[None, :], v, mask=mask)


def store_kv_triton(
    k: torch.Tensor, v: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, slot_mapping: torch.Tensor
) -> None:
    T, Hk, D = k.shape
    if v.shape != k.shape or k_cache.shape != v_cache.shape or k_cache.dim() != 4 or k_cache.shape[2:] != (Hk, D):
        raise ValueError(f"k, v (T, Hk, D) and caches (blocks, block_size, Hk, D), got {tuple(k.shape)}, "
                         f"{tuple(v.shape)}, {tuple(k_cache.shape)}, {tuple(v_cache.shape)}")
    if slot_mapping.shape != (T,) or slot_mapping.dtype != torch.int64:
        raise ValueError(f"slot_mapping must be ({T},) int64, got {tuple(slot_mapping.shape)} {slot_mapping.dtype}")
    if k.dtype != k_cache.dtype or v.dtype != v_cache.dtype:
        raise ValueError(f"k/v dtypes {k.dtype}/{v.dtype} must match the caches' {k_cache.dtype}/{v_cache.dtype}")
    for name, t in (("k", k), ("v", v), ("k_cache", k_cache), ("v_cache", v_cache)):
        if t.stride(-1) != 1:
            raise ValueError(f"{name} needs a unit stride in its last dim, got {t.stride()}")
    # Slots are flat (block, offset) indices, so a slot's stride is the offset stride of a block-contiguous cache.
    for name, c in (("k_cache", k_cache), ("v_cache", v_cache)):
        if c.stride(0) != c.shape[1] * c.stride(1):
            raise ValueError(f"{name} blocks must be dense along block_size, got strides {c.stride()}")
    if len({t.device for t in (k, v, k_cache, v_cache, slot_mapping)}) != 1:
        raise ValueError("k, v, the caches and slot_mapping must be on one device")
    if T == 0:
        return
    BLOCK_D = triton.next_power_of_2(D)
    BLOCK_H = min(triton.next_power_of_2(Hk), max(_TILE // BLOCK_D, 1))
    _store_kv_kernel[(T, triton.cdiv(Hk, BLOCK_H))](
        k, v, k_cache, v_cache, slot_mapping,
        k.stride(0), k.stride(1), v.stride(0), v.stride(1),
        k_cache.stride(1), k_cache.stride(2), v_cache.stride(1), v_cache.stride(2),
        Hk,
        HEAD_DIM=D, BLOCK_H=BLOCK_H, BLOCK_D=BLOCK_D,
        num_warps=4,
    )

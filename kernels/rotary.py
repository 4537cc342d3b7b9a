"""Rotary position embedding (NeoX / HF `rotate_half` layout): the twin, and the Triton helper that rotates heads.

`cos_sin` is the engine's precomputed table, (max_pos, D) fp32, each row `[cos(D/2) | sin(D/2)]`. For x split as
`x1 = x[..., :D/2]`, `x2 = x[..., D/2:]`: `out1 = x1*cos - x2*sin`, `out2 = x2*cos + x1*sin`. The Triton path runs
inside the KV store's kernel (`kv_store.rope_store_kv`), which rotates q in place and k on its way into the cache.
Not here: building the table (rope scaling lives with the model), or the GPT-J interleaved layout.
"""

import torch

from ._triton import triton, tl


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions].unsqueeze(1)  # (T, 1, D)
    for x in (q, k):
        # HF `apply_rotary_pos_emb`: cos/sin cast to x.dtype, arithmetic in x.dtype. `x1*c - x2*s` is HF's
        # `x1*c + (-x2)*s` bit for bit (negation is exact), without materialising rotate_half or [cos | cos].
        t = table.to(x.dtype)
        c, s = t[..., :half], t[..., half:]
        x1, x2 = x[..., :half], x[..., half:]
        x.copy_(torch.cat((x1 * c - x2 * s, x2 * c + x1 * s), dim=-1))


@triton.jit
def _rotated(src_ptr, stride_src_h, cos, sin, n_heads,
             HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr):
    """One token's heads (a pointer at the token's row) rotated: their two halves in x's dtype, and the mask of
    (head, column) entries that exist."""
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    src1 = src_ptr + heads[:, None] * stride_src_h + cols[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(src1, mask=mask, other=0.0)
    x2 = tl.load(src1 + HALF, mask=mask, other=0.0)
    # HF rounds the table to x.dtype first; doing the same keeps bf16 positions in step with HF.
    c = cos.to(x1.dtype).to(tl.float32)[None, :]
    s = sin.to(x1.dtype).to(tl.float32)[None, :]
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    return (x1f * c - x2f * s).to(x1.dtype), (x2f * c + x1f * s).to(x1.dtype), mask


@triton.jit
def _rotate_heads(
    src_ptr, dst_ptr, stride_src_h, stride_dst_h, cos, sin, n_heads, write,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    """Rotate one token's heads (pointers at the token's row) from src into dst; dst may be src (in place)."""
    o1, o2, mask = _rotated(src_ptr, stride_src_h, cos, sin, n_heads, HALF, BLOCK_H, BLOCK_HALF)
    dst1 = dst_ptr + tl.arange(0, BLOCK_H)[:, None] * stride_dst_h + tl.arange(0, BLOCK_HALF)[None, :]
    tl.store(dst1, o1, mask=mask & write)
    tl.store(dst1 + HALF, o2, mask=mask & write)

"""Rotary position embedding (NeoX / HF `rotate_half` layout), applied in place to q and k.

`cos_sin` is the engine's precomputed table, (max_pos, D) fp32, each row `[cos(D/2) | sin(D/2)]`. For x split as
`x1 = x[..., :D/2]`, `x2 = x[..., D/2:]`: `out1 = x1*cos - x2*sin`, `out2 = x2*cos + x1*sin`. Not here: building
the table (rope scaling lives with the model), or the GPT-J interleaved layout.
"""

import torch

from ._triton import triton, tl


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def rotary_torch(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    half = cos_sin.shape[-1] // 2
    table = cos_sin[positions]  # (T, D)
    cos = table[:, :half].repeat(1, 2).unsqueeze(1)  # (T, 1, D): HF's cat((freqs, freqs)).cos()
    sin = table[:, half:].repeat(1, 2).unsqueeze(1)
    for x in (q, k):
        # HF `apply_rotary_pos_emb`: cos/sin cast to x.dtype, arithmetic in x.dtype.
        c, s = cos.to(x.dtype), sin.to(x.dtype)
        x.copy_(x * c + _rotate_half(x) * s)


@triton.jit
def _rotate_heads(
    x_ptr, token, stride_t, stride_h, cos, sin, n_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_HALF: tl.constexpr,
):
    heads = tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_HALF)
    mask = (heads[:, None] < n_heads) & (cols[None, :] < HALF)
    ptr1 = x_ptr + token * stride_t + heads[:, None] * stride_h + cols[None, :]  # (BLOCK_H, BLOCK_HALF)
    x1 = tl.load(ptr1, mask=mask, other=0.0)
    x2 = tl.load(ptr1 + HALF, mask=mask, other=0.0)
    # HF rounds the table to x.dtype first; doing the same keeps bf16 positions in step with HF.
    c = cos.to(x1.dtype).to(tl.float32)[None, :]
    s = sin.to(x1.dtype).to(tl.float32)[None, :]
    x1f, x2f = x1.to(tl.float32), x2.to(tl.float32)
    tl.store(ptr1, (x1f * c - x2f * s).to(x1.dtype), mask=mask)
    tl.store(ptr1 + HALF, (x2f * c + x1f * s).to(x1.dtype), mask=mask)


@triton.jit
def _rotary_kernel(
    q_ptr, k_ptr, pos_ptr, cos_sin_ptr,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_cs,
    n_q_heads, n_k_heads,
    HALF: tl.constexpr, BLOCK_HALF: tl.constexpr, BLOCK_HQ: tl.constexpr, BLOCK_HK: tl.constexpr,
):
    token = tl.program_id(0).to(tl.int64)
    pos = tl.load(pos_ptr + token)
    cols = tl.arange(0, BLOCK_HALF)
    cos = tl.load(cos_sin_ptr + pos * stride_cs + cols, mask=cols < HALF, other=0.0)  # (BLOCK_HALF,) fp32
    sin = tl.load(cos_sin_ptr + pos * stride_cs + HALF + cols, mask=cols < HALF, other=0.0)
    _rotate_heads(q_ptr, token, stride_qt, stride_qh, cos, sin, n_q_heads, HALF, BLOCK_HQ, BLOCK_HALF)
    _rotate_heads(k_ptr, token, stride_kt, stride_kh, cos, sin, n_k_heads, HALF, BLOCK_HK, BLOCK_HALF)


def rotary_triton(q: torch.Tensor, k: torch.Tensor, positions: torch.Tensor, cos_sin: torch.Tensor) -> None:
    T, Hq, D = q.shape
    if k.dim() != 3 or k.shape[0] != T or k.shape[2] != D or D % 2:
        raise ValueError(f"q (T, Hq, D) and k (T, Hk, D) with even D, got {tuple(q.shape)} and {tuple(k.shape)}")
    if q.stride(-1) != 1 or k.stride(-1) != 1 or cos_sin.stride(-1) != 1:
        raise ValueError("q, k and cos_sin need a unit stride in their last dim")
    if positions.shape != (T,) or cos_sin.dim() != 2 or cos_sin.shape[1] != D or cos_sin.dtype != torch.float32:
        raise ValueError(f"positions (T,) and cos_sin (max_pos, {D}) fp32, got {tuple(positions.shape)}, "
                         f"{tuple(cos_sin.shape)} {cos_sin.dtype}")
    if len({t.device for t in (q, k, positions, cos_sin)}) != 1:
        raise ValueError("q, k, positions and cos_sin must be on one device")
    if T == 0:
        return
    Hk = k.shape[1]
    BLOCK_HALF = triton.next_power_of_2(D // 2)
    _rotary_kernel[(T,)](
        q, k, positions, cos_sin,
        q.stride(0), q.stride(1), k.stride(0), k.stride(1), cos_sin.stride(0),
        Hq, Hk,
        HALF=D // 2, BLOCK_HALF=BLOCK_HALF,
        BLOCK_HQ=triton.next_power_of_2(Hq), BLOCK_HK=triton.next_power_of_2(Hk),
        num_warps=4,
    )

"""SwiGLU gate of the Llama MLP: `silu(gate) * up` over a packed `gate_up_proj` output.

Numerics follow HF `act_fn(gate_proj(x)) * up_proj(x)`: silu in fp32, rounded to x.dtype, then the product rounded
again. Not here: the projections themselves.
"""

import torch
import torch.nn.functional as F

from ._triton import dependent_launch, dependent_launches, triton, tl

_BLOCK_I = 1024  # columns per program: wide enough to stream, small enough to keep many programs per row


def silu_and_mul_torch(x: torch.Tensor) -> torch.Tensor:
    gate, up = x.chunk(2, dim=-1)  # (T, I) each
    return F.silu(gate) * up


@triton.jit
def _silu_and_mul_kernel(
    x_ptr, y_ptr, stride_x, stride_y, I,
    BLOCK_I: tl.constexpr, PDL: tl.constexpr,
):
    dependent_launch(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.program_id(1) * BLOCK_I + tl.arange(0, BLOCK_I)
    mask = cols < I
    gate = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)
    up = tl.load(x_ptr + row * stride_x + I + cols, mask=mask, other=0.0)
    g = gate.to(tl.float32)
    # Round silu to x.dtype before the product, as the twin (and HF) do: two roundings, same as torch.
    silu = (g / (1.0 + tl.exp(-g))).to(gate.dtype)
    y = silu.to(tl.float32) * up.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, y.to(y_ptr.dtype.element_ty), mask=mask)


def silu_and_mul_triton(x: torch.Tensor) -> torch.Tensor:
    if x.shape[-1] % 2 or x.stride(-1) != 1:
        raise ValueError(f"x must be (..., 2I) with unit last stride, got {tuple(x.shape)} strides {x.stride()}")
    I = x.shape[-1] // 2
    x2 = x.reshape(-1, 2 * I)  # (T, 2I)
    y = torch.empty((*x.shape[:-1], I), dtype=x.dtype, device=x.device)
    y2 = y.view(-1, I)  # (T, I)
    BLOCK_I = min(_BLOCK_I, triton.next_power_of_2(I))
    if x2.shape[0] > 0 and I > 0:
        grid = (x2.shape[0], triton.cdiv(I, BLOCK_I))
        pdl = dependent_launches(x)
        _silu_and_mul_kernel[grid](x2, y2, x2.stride(0), y2.stride(0), I, BLOCK_I=BLOCK_I, PDL=pdl, num_warps=4,
                                   launch_pdl=pdl)
    return y

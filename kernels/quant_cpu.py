"""Quantized projections on the CPU: PyTorch's own weight-only kernels, with the weight packed once at load.

  - 4 bits: `aten._weight_int4pack_mm_for_cpu` (tinygemm's convention, w = (q - 8) * scale + zero, bf16 scales and
    zeros of shape (K / G, N, 2)) on a weight packed by `aten._convert_weight_to_int4pack_for_cpu`. Our
    `q * scale + zero` maps onto it exactly: zero' = zero + 8 * scale.
  - 8 bits, per output channel: `aten._weight_int8pack_mm`.
Both take bf16 activations (their fp32 and fp16 paths are 20-40x slower, measured on a Xeon with torch 2.14), so x
goes to bf16 and the result back to x's dtype. They are GEMV kernels: at prefill sizes a dense bf16 or fp32 matmul
is 10-30x faster, which is why the engine keeps a dense copy for many-row calls (engine/quant/).

`pack_for_cpu` returns None for what these kernels cannot take (odd sizes: int4 needs N % 16 == 0 and a group of
32-256; int8 crashes in torch 2.14 on several rows with K % 16 != 0; group-wise int8); the caller then keeps the
weight dequantized. Not here: the reference math (kernels/quant_weight.py), the GPU path (Triton).
"""

from __future__ import annotations

import torch

from .quant_weight import QuantWeight, unpack_int4

INT4_GROUPS = (32, 64, 128, 256)


class CpuInt4Weight:
    """A 4-bit weight in the layout of `aten._weight_int4pack_mm_for_cpu`."""

    def __init__(self, w: QuantWeight):
        N, K = w.shape
        q = unpack_int4(w.qweight).to(torch.int32)  # (N, K) in [0, 15]
        self.packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        scales = w.scales.float()
        zeros = w.zeros.float() if w.zeros is not None else torch.zeros_like(scales)
        # (K / G, N, 2): [scale, zero + 8 * scale], the kernel's (q - 8) * scale + zero
        self.scales_zeros = torch.stack((scales, zeros + 8 * scales), dim=-1).transpose(0, 1).contiguous().to(
            torch.bfloat16)
        self.group_size, self.perm, self.shape = w.group_size, w.perm, (N, K)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.perm is not None:
            xb = xb.index_select(-1, self.perm)
        y = torch.ops.aten._weight_int4pack_mm_for_cpu(xb, self.packed, self.group_size, self.scales_zeros)
        y = y.to(x.dtype)
        return y if bias is None else y + bias

    def nbytes(self) -> int:
        return self.packed.numel() + self.scales_zeros.numel() * 2


class CpuInt8Weight:
    """A per-output-channel int8 weight for `aten._weight_int8pack_mm`."""

    def __init__(self, w: QuantWeight):
        self.qweight = w.qweight.contiguous()
        self.scales = w.scales.reshape(-1).to(torch.bfloat16)
        self.perm, self.shape = w.perm, w.shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        xb = x.to(torch.bfloat16)
        if self.perm is not None:
            xb = xb.index_select(-1, self.perm)
        y = torch.ops.aten._weight_int8pack_mm(xb, self.qweight, self.scales).to(x.dtype)
        return y if bias is None else y + bias

    def nbytes(self) -> int:
        return self.qweight.numel() + self.scales.numel() * 2


def pack_for_cpu(w: QuantWeight) -> CpuInt4Weight | CpuInt8Weight | None:
    N, K = w.shape
    if w.bits == 4 and N % 16 == 0 and w.group_size in INT4_GROUPS:
        return CpuInt4Weight(w)
    if w.bits == 8 and w.group_size == K and w.zeros is None and K % 16 == 0:
        return CpuInt8Weight(w)
    return None

"""A weight matrix kept in low-bit integers (weight-only quantization), and its reference dequantization.

`QuantWeight` is the one in-memory form every quantized source lands in (round-to-nearest at load, AWQ, GPTQ,
GGUF Q4_1 / Q8_0 blocks): a (N, K) matrix as nn.Linear stores it, in groups of `group_size` consecutive input
columns, each row's group with its own scale and zero:

    w[n, k] = q[n, k] * scale[n, k // group_size] + zero[n, k // group_size]

  - 8 bits: `qweight` int8 (N, K), symmetric (`zeros` None); per output channel when group_size == K.
  - 4 bits: `qweight` uint8 (N, K // 2), column 2j in the low nibble and 2j + 1 in the high one, q in [0, 15];
    `zeros` holds the float offset (AWQ/GPTQ's integer zero point z becomes -z * scale; Q4_1's min m is it as is).
  - `perm` (GPTQ act-order): the stored columns are the input's columns in this order, so that each group is
    contiguous; `y = x[:, perm] @ w_stored.T`.

`quant_linear_torch` is the twin of the quantized projections (kernels/quant_gemv.py, quant_matmul.py): the weight
dequantized to x's dtype, then nn.Linear. Not here: producing these from checkpoints (engine/quant/), the CPU's
packed layouts (kernels/quant_cpu.py).
"""

from __future__ import annotations

from dataclasses import dataclass, replace

import torch
import torch.nn.functional as F


@dataclass(frozen=True, eq=False)
class QuantWeight:
    qweight: torch.Tensor
    scales: torch.Tensor  # (N, K // group_size), float
    zeros: torch.Tensor | None  # like scales; None: symmetric
    bits: int  # 4 or 8
    group_size: int
    perm: torch.Tensor | None = None  # (K,) int64

    def __post_init__(self):
        N, K = self.shape
        if self.bits not in (4, 8):
            raise ValueError(f"bits must be 4 or 8, got {self.bits}")
        want = torch.int8 if self.bits == 8 else torch.uint8
        if self.qweight.dtype != want or self.qweight.dim() != 2:
            raise ValueError(f"{self.bits}-bit qweight must be 2-D {want}, got {self.qweight.dtype}")
        if self.group_size < 1 or K % self.group_size or (self.bits == 4 and self.group_size % 2):
            raise ValueError(f"group_size {self.group_size} must divide K={K} (and be even for 4 bits)")
        groups = (N, K // self.group_size)
        if self.scales.shape != groups or (self.zeros is not None and self.zeros.shape != groups):
            raise ValueError(f"scales and zeros must be {groups}, got {tuple(self.scales.shape)}, "
                             f"{None if self.zeros is None else tuple(self.zeros.shape)}")
        if self.perm is not None and self.perm.shape != (K,):
            raise ValueError(f"perm must be ({K},), got {tuple(self.perm.shape)}")

    @property
    def shape(self) -> tuple[int, int]:
        rows, cols = self.qweight.shape
        return rows, cols * (2 if self.bits == 4 else 1)

    @property
    def device(self) -> torch.device:
        return self.qweight.device

    def to(self, device) -> "QuantWeight":
        move = lambda t: None if t is None else t.to(device)  # noqa: E731
        return replace(self, qweight=move(self.qweight), scales=move(self.scales), zeros=move(self.zeros),
                       perm=move(self.perm))

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.zeros, self.perm)
                   if t is not None)

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None) -> torch.Tensor:
        return quant_linear_torch(x, self, bias)


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """uint8 (N, K // 2) -> uint8 (N, K): low nibble first."""
    return torch.stack((packed & 0xF, packed >> 4), dim=-1).reshape(packed.shape[0], -1)


def pack_int4(q: torch.Tensor) -> torch.Tensor:
    """Integers in [0, 15], (N, K) with K even -> uint8 (N, K // 2): column 2j low, 2j + 1 high."""
    q = q.to(torch.uint8)
    return (q[:, 0::2] | (q[:, 1::2] << 4)).contiguous()  # row-major whatever q's layout (elementwise ops keep it)


def dequantize(w: QuantWeight, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The (N, K) weight in the input's column order: computed in fp32, rounded once to `dtype`."""
    q = unpack_int4(w.qweight) if w.bits == 4 else w.qweight
    G = w.group_size
    out = q.float() * w.scales.float().repeat_interleave(G, dim=1)
    if w.zeros is not None:
        out += w.zeros.float().repeat_interleave(G, dim=1)
    if w.perm is not None:
        out = torch.empty_like(out).index_copy_(1, w.perm, out)  # stored column j is input column perm[j]
    return out.to(dtype)


def quant_linear_torch(x: torch.Tensor, w: QuantWeight, bias: torch.Tensor | None = None) -> torch.Tensor:
    return F.linear(x, dequantize(w, x.dtype), bias)


def cat_rows(weights: list[QuantWeight]) -> QuantWeight:
    """Shards stacked along N (q | k | v, gate | up): they must share bits, groups, symmetry and column order."""
    first = weights[0]
    for w in weights[1:]:
        if (w.bits, w.group_size, w.zeros is None, w.perm is None) != (first.bits, first.group_size,
                                                                       first.zeros is None, first.perm is None):
            raise ValueError("packed shards must share bits, group size, zero points and act-order")
        if w.perm is not None and not torch.equal(w.perm, first.perm):
            raise ValueError("packed shards with different act-order permutations (GPTQ g_idx) cannot share "
                             "one input; quantize them with the same g_idx")
    cat = lambda name: torch.cat([getattr(w, name) for w in weights])  # noqa: E731
    return replace(first, qweight=cat("qweight"), scales=cat("scales"),
                   zeros=None if first.zeros is None else cat("zeros"))

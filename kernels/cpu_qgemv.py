"""GGUF-style 4- and 8-bit weights times int8-quantized activations on a CPU: kernels/cpu_qgemv.c (AVX512-VNNI,
threaded), its packing and its PyTorch twin.

llama.cpp's CPU decode multiplies Q4_1 (and Q8_0) weights by activations rounded to int8 in groups of 32 (Q8_1),
with integer dot products: 4x fewer bytes through the core than bf16 activations and one `vpdpbusd` per 64 byte
pairs. `CpuQ8Weight` does the same for a `QuantWeight` whose groups are GGUF's (32 columns, fp16 scales and mins:
the embedded default's Q4_1 projections and Q8_0 LM head), so their values stay exactly the file's; the only new
rounding is the activation's (amax / 127 a group, as llama.cpp). `gguf_groups` puts other weights in that form
(round-to-nearest w4a16 / w8a16, AWQ, GPTQ without act-order: their groups are whole numbers of 32-column blocks).
`pack_q8` returns None for what the C code cannot take (other group sizes or scale dtypes, act-order,
K > 16384, N % 4) and where the library has no VNNI build; the caller keeps its other kernels then. Whether this
beats PyTorch's int4 kernel is measured, not assumed (engine/quant/policy.py).

`qgemv_torch` is the twin and the oracle: the same int8 codes, the products summed in fp32 in another order.
Not here: the C build (kernels/cpu_build.py), aten's int4 / int8 kernels (kernels/quant_cpu.py).
"""
from __future__ import annotations

import torch

from .cpu_build import library, pool_threads
from .quant_weight import QuantWeight, unpack_int4

GROUP = 32
MAX_ROWS, MAX_K = 16, 16384  # the C code's activation buffers: rows a call, columns (a 7B's down_proj: 11008)


def available() -> bool:
    lib = library()
    return lib is not None and bool(lib.qgemv_available())


class CpuQ8Weight:
    """A (N, K) weight in the C kernel's tiles: 4 rows x 32 columns of codes, and fp16 (d, m) per row and group."""

    def __init__(self, tiles: torch.Tensor, dm: torch.Tensor, bits: int, shape: tuple[int, int]):
        self.tiles, self.dm, self.bits, self.shape = tiles, dm, bits, shape

    def linear(self, x: torch.Tensor, bias: torch.Tensor | None = None,
               residual: torch.Tensor | None = None) -> torch.Tensor:
        """[residual +] x W^T [+ bias], rounded to x's dtype before the residual add (as `residual + linear(x)`)."""
        N, K = self.shape
        lib = library()
        ok = (lib is not None and x.dtype in (torch.float32, torch.bfloat16) and x.dim() == 2 and x.stride(1) == 1
              and not x.is_cuda and x.shape[0] <= MAX_ROWS and bias is None
              and (residual is None or (residual.dtype == x.dtype and residual.is_contiguous())))
        if not ok:
            y = qgemv_torch(x, self, bias)
            return y if residual is None else residual + y
        y = torch.empty((x.shape[0], N), dtype=x.dtype)
        lib.qgemv(x.data_ptr(), x.stride(0), x.dtype == torch.bfloat16, x.shape[0], self.tiles.data_ptr(),
                  self.dm.data_ptr(), self.bits, N, K, y.data_ptr(),
                  None if residual is None else residual.data_ptr(), pool_threads())
        return y

    def nbytes(self) -> int:
        return self.tiles.numel() + self.dm.numel() * 2


FP16_NORMAL = (2.0 ** -14, 65504.0)  # fp16's normal range: a scale or zero inside it rounds by at most 2^-11


def gguf_groups(w: QuantWeight) -> QuantWeight | None:
    """`w` in GGUF's groups: 32 columns, fp16 scales and zeros, each 32-column block with its group's (a group of
    128, AWQ's and GPTQ's usual size, is four such blocks; an 8-bit weight's one scale a row, K / 32 of them). The
    codes are the same; scales and zeros not already fp16 are rounded to it (at most 2^-11 of each, far below a
    4-bit step). None where that cannot be done: act-order, a group size not a multiple of 32, a scale or zero
    outside fp16's normal range (it would lose more), or an 8-bit weight with zero points (the C code has none)."""
    if w.perm is not None or w.group_size % GROUP or (w.bits == 8 and w.zeros is not None):
        return None
    for t in (w.scales, w.zeros):
        if t is not None:
            a = t.float().abs()
            a = a[a > 0]
            if a.numel() and not (FP16_NORMAL[0] <= a.min().item() and a.max().item() <= FP16_NORMAL[1]):
                return None
    blocks = w.group_size // GROUP
    grouped = lambda t: None if t is None else t.to(torch.float16).repeat_interleave(blocks, dim=1)  # noqa: E731
    return QuantWeight(w.qweight, grouped(w.scales), grouped(w.zeros), w.bits, GROUP)


def pack_q8(w: QuantWeight) -> CpuQ8Weight | None:
    """The C kernel's layout of a GGUF-grouped weight (module docstring), or None where it does not apply."""
    N, K = w.shape
    fp16 = w.scales.dtype == torch.float16 and (w.zeros is None or w.zeros.dtype == torch.float16)
    if (not available() or w.group_size != GROUP or not fp16 or w.perm is not None or N % 4 or K > MAX_K
            or (w.bits == 8 and w.zeros is not None)):
        return None
    G = K // GROUP
    if w.bits == 4:
        q = unpack_int4(w.qweight).view(N, G, 2, 16)
        codes = (q[:, :, 0] | (q[:, :, 1] << 4)).view(N // 4, 4, G, 16).transpose(1, 2)  # (N/4, G, 4, 16)
        m = w.zeros if w.zeros is not None else torch.zeros_like(w.scales)
    else:  # u = q + 128, m = -128 d: the same formula as 4 bits (exact in fp16 while |d| < 512)
        u = (w.qweight.to(torch.int16) + 128).to(torch.uint8).view(N // 4, 4, G, 2, 16)
        codes = u.permute(0, 2, 3, 1, 4)  # (N/4, G, 2, 4, 16)
        m = -128 * w.scales
    tiles = codes.reshape(N // 4, -1).contiguous()
    dm = torch.cat((w.scales.view(N // 4, 4, G).transpose(1, 2), m.view(N // 4, 4, G).transpose(1, 2)), dim=-1)
    return CpuQ8Weight(tiles, dm.contiguous(), w.bits, (N, K))


def unpack_q8(w: CpuQ8Weight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(codes u (N, K) uint8, d (N, K/32), m (N, K/32)) fp32, from the tiles: w = d * u + m."""
    N, K = w.shape
    G = K // GROUP
    if w.bits == 4:
        b = w.tiles.view(N // 4, G, 4, 16).transpose(1, 2)  # (N/4, 4, G, 16)
        u = torch.stack((b & 0xF, b >> 4), dim=-2)  # (N/4, 4, G, 2, 16): columns 0-15, then 16-31
    else:
        u = w.tiles.view(N // 4, G, 2, 4, 16).permute(0, 3, 1, 2, 4)
    dm = w.dm.view(N // 4, G, 2, 4).permute(0, 3, 1, 2).float()  # (N/4, 4, G, 2)
    return u.reshape(N, K), dm[..., 0].reshape(N, G), dm[..., 1].reshape(N, G)


def quantize_act(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """x (M, K) -> int8 codes (M, K) as fp32, dx (M, K/32), sx = dx * sum(codes): the C code's roundings."""
    g = x.float().view(x.shape[0], -1, GROUP)
    amax = g.abs().amax(-1)
    c127 = torch.full_like(amax, 127.0)  # tensor / tensor: torch turns a division by a scalar into a reciprocal
    inv = torch.where(amax > 0, c127 / amax, torch.zeros_like(amax))
    q = torch.round(g * inv[..., None])
    dx = amax / c127
    return q.view(x.shape[0], -1), dx, dx * q.sum(-1)


def qgemv_torch(x: torch.Tensor, w: CpuQ8Weight, bias: torch.Tensor | None = None) -> torch.Tensor:
    N, K = w.shape
    u, d, m = unpack_q8(w)
    q, dx, sx = quantize_act(x)
    isum = torch.einsum("mgj,ngj->mng", q.view(-1, K // GROUP, GROUP), u.float().view(N, -1, GROUP))  # exact
    y = (isum * d * dx[:, None, :]).sum(-1) + (m * sx[:, None, :]).sum(-1)  # (M, N)
    y = y.to(x.dtype)
    return y if bias is None else y + bias

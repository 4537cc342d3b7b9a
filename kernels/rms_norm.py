"""RMSNorm over rows: the norm in front of a projection when several rows share the weight (prefill, batches).

Numerics follow HF `LlamaRMSNorm`: statistics in fp32, the normalised row rounded back to the input dtype, then
multiplied by the weight (output dtype = promote(weight, x)). Also the one-row case in front of a quantized GEMV
(kernels/quant_gemv.py); a dense weight's GEMV recomputes it in every program instead (kernels/gemv.py). Not here:
LayerNorm (the vision tower uses torch's).
"""

import torch

from ._triton import dependent_launch, dependent_launches, triton, tl

_MAX_BLOCK_H = 65536  # one row per program, held in registers; wider rows than any LLM's hidden size


def rms_norm_torch(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    # torch.rms_norm in fp32 is HF's `xf * rsqrt(xf.pow(2).mean(-1) + eps)` bit for bit (checked on 257 rows of
    # widths 64-4096), in one call instead of six from Python (on a CPU each costs microseconds; it is still a
    # composite there, which is why the CPU's decode path has its own, kernels/cpu_ops.py).
    y = torch.rms_norm(x.float(), (x.shape[-1],), None, eps)
    return weight * y.to(x.dtype)


@triton.jit
def _rms_norm_kernel(
    x_ptr, w_ptr, y_ptr, stride_x, stride_y, H, eps,
    BLOCK_H: tl.constexpr, PDL: tl.constexpr,
):
    dependent_launch(PDL)
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK_H)
    mask = cols < H
    x = tl.load(x_ptr + row * stride_x + cols, mask=mask, other=0.0)  # (BLOCK_H,) in x.dtype
    xf = x.to(tl.float32)
    mean_sq = tl.sum(xf * xf, axis=0) / H  # padded columns are 0 and do not count
    y = (xf * tl.rsqrt(mean_sq + eps)).to(x.dtype)  # HF rounds to x.dtype before the weight multiply
    w = tl.load(w_ptr + cols, mask=mask, other=0.0)
    # One rounding of an exact product: a (b)f16 x (b)f16 product fits fp32's mantissa, so this equals torch's.
    out = y.to(tl.float32) * w.to(tl.float32)
    tl.store(y_ptr + row * stride_y + cols, out.to(y_ptr.dtype.element_ty), mask=mask)


def _rows(t: torch.Tensor, name: str) -> torch.Tensor:
    if t.stride(-1) != 1:
        raise ValueError(f"{name} must have a unit stride in its last dim, got strides {t.stride()}")
    return t.reshape(-1, t.shape[-1])  # (T, H); a view whenever the leading dims allow one


def rms_norm_triton(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    H = x.shape[-1]
    if weight.shape != (H,):
        raise ValueError(f"weight must be ({H},), got {tuple(weight.shape)}")
    if weight.device != x.device:
        raise ValueError("x and weight must be on one device")
    BLOCK_H = triton.next_power_of_2(H)
    if BLOCK_H > _MAX_BLOCK_H:
        raise ValueError(f"hidden size {H} exceeds the single-pass limit {_MAX_BLOCK_H}")
    weight = weight.contiguous()
    x2 = _rows(x, "x")
    y = torch.empty(x.shape, dtype=torch.promote_types(weight.dtype, x.dtype), device=x.device)
    y2 = y.view(-1, H)
    if x2.shape[0] > 0:
        pdl = dependent_launches(x)
        _rms_norm_kernel[(x2.shape[0],)](
            x2, weight, y2, x2.stride(0), y2.stride(0), H, eps,
            BLOCK_H=BLOCK_H, PDL=pdl, launch_pdl=pdl,
            num_warps=min(max(BLOCK_H // 256, 1), 16),  # ~8 elements per thread per row
        )
    return y

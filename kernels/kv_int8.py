"""The int8 KV cache format (LMDeploy's quant_policy 8): per token and KV head, asymmetric, 8 bits.

A cache page is (num_blocks, block_size, Hk, D) uint8, and beside it `scale_zero` (num_blocks, block_size, Hk, 2)
fp16: for each (token, head) its row of D values x is stored as

    q = clamp(floor((x - zero) / scale + 0.5), 0, 255),  scale = (max(x) - min(x)) / 255,  zero = min(x)

with scale and zero rounded to fp16 first (so q is computed against the values that are stored), and read back as
`q * scale + zero`, rounded to the attention's dtype. A row's error is at most scale / 2 per value, plus fp16's
rounding of zero (2^-11 of |min|). The store ops quantize (kernels/kv_store.py), the attention ops dequantize
(kernels/paged_decode.py, paged_prefill.py); these are the twins' helpers and the format's one definition.
"""

import torch

QMAX = 255
SCALE_DTYPE = torch.float16


def quantize_kv(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """x (T, Hk, D) -> (uint8 (T, Hk, D), fp16 (T, Hk, 2) scale | zero)."""
    xf = x.float()
    lo, hi = xf.amin(dim=-1, keepdim=True), xf.amax(dim=-1, keepdim=True)
    scale = ((hi - lo) / QMAX).to(SCALE_DTYPE)
    zero = lo.to(SCALE_DTYPE)
    s = scale.float()
    q = torch.floor((xf - zero.float()) / torch.where(s > 0, s, 1.0) + 0.5).clamp(0, QMAX).to(torch.uint8)
    return q, torch.cat((scale, zero), dim=-1)


def dequantize_kv(q: torch.Tensor, scale_zero: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """uint8 (..., D) and fp16 (..., 2) -> (..., D) in `dtype`."""
    sz = scale_zero.float()
    return (q.float() * sz[..., :1] + sz[..., 1:]).to(dtype)


def check_quantized(k_cache: torch.Tensor, k_scale_zero: torch.Tensor | None, v_cache: torch.Tensor,
                    v_scale_zero: torch.Tensor | None) -> bool:
    """Whether the caches are int8 (both scale_zero given), checking their shapes; raises on a half-given pair."""
    if (k_scale_zero is None) != (v_scale_zero is None):
        raise ValueError("give both k_scale_zero and v_scale_zero, or neither")
    if k_scale_zero is None:
        return False
    want = (*k_cache.shape[:3], 2)
    for name, cache, sz in (("k", k_cache, k_scale_zero), ("v", v_cache, v_scale_zero)):
        if cache.dtype != torch.uint8 or sz.shape != want or sz.dtype != SCALE_DTYPE or not sz.is_contiguous():
            raise ValueError(f"an int8 {name} cache is uint8 with a contiguous fp16 scale_zero {want}, got "
                             f"{cache.dtype} and {sz.dtype} {tuple(sz.shape)}")
    return True

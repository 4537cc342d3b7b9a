"""Round-to-nearest weight quantization of a dense checkpoint at load (`EngineConfig.quantize` "w8a16" / "w4a16").

  - w8a16: int8, symmetric, one scale per output channel: s = max|w| / 127, q = round(w / s).
  - w4a16: int4, asymmetric, groups of 128 input columns (AWQ's and GPTQ's usual size; 64 or 32 where 128 does not
    divide the row, as SmolLM2's 576): s = (max - min) / 15, integer zero point z = round(-min / s), q =
    clamp(round(w / s) + z, 0, 15), w ~ (q - z) * s, which is AWQ's `pseudo_quantize_tensor`.
No calibration data, no search: what AWQ/GPTQ add on top of this is what their checkpoints carry
(engine/quant/formats.py). The embedding table and the LM head stay dense, as AWQ and GPTQ leave them.
"""
from __future__ import annotations

import torch

from kernels.quant_weight import QuantWeight, pack_int4

SCHEMES = ("w8a16", "w4a16")
INT4_GROUPS = (128, 64, 32)  # first that divides K; per output channel if none does


def int4_group(K: int) -> int:
    return next((g for g in INT4_GROUPS if K % g == 0), K)


def quantize_rtn(w: torch.Tensor, scheme: str) -> QuantWeight:
    """A dense (N, K) weight, quantized on its own device; scales and zeros in the weight's dtype."""
    if scheme not in SCHEMES:
        raise ValueError(f"quantize must be one of {', '.join(SCHEMES)}, got {scheme!r}")
    wf = w.float()
    if scheme == "w8a16":
        scales = (wf.abs().amax(dim=1, keepdim=True) / 127).clamp(min=1e-10)  # (N, 1)
        q = torch.round(wf / scales).clamp(-127, 127).to(torch.int8)
        return QuantWeight(q, scales.to(w.dtype), None, 8, w.shape[1])
    N, K = w.shape
    G = int4_group(K)
    if K % 2:
        raise ValueError(f"w4a16 needs an even number of input columns, got {K}")
    groups = wf.view(N, K // G, G)
    lo, hi = groups.amin(dim=2, keepdim=True), groups.amax(dim=2, keepdim=True)
    scales = ((hi - lo) / 15).clamp(min=1e-10)
    z = torch.round(-lo / scales).clamp(0, 15)
    q = (torch.round(groups / scales) + z).clamp(0, 15).view(N, K)
    return QuantWeight(pack_int4(q), scales.view(N, -1).to(w.dtype), (-z * scales).view(N, -1).to(w.dtype), 4, G)

"""Already-quantized checkpoints: AWQ and GPTQ tensors (as AutoAWQ, AutoGPTQ / GPTQModel and transformers write
them) turned into `kernels.quant_weight.QuantWeight`s, keyed like the dense weight they stand for.

A quantized projection `P` is stored as `P.qweight`, `P.qzeros`, `P.scales` (+ `P.g_idx` for GPTQ), int32 words of
32 / bits values each, with the dequantization `w[k, n] = (q[k, n] - z[g(k), n]) * s[g(k), n]`:

  AWQ ("gemm" version, 4 bits): qweight (K, N/8) and qzeros (K/G, N/8) packed along N, word j's 8 values in the
      nibble order [0, 2, 4, 6, 1, 3, 5, 7] (so unpacking reads nibbles [0, 4, 1, 5, 2, 6, 3, 7]); scales (K/G, N).
  GPTQ (4 or 8 bits): qweight (K*bits/32, N) packed along K in plain order; qzeros (K/G, N*bits/32) packed along N;
      scales (K/G, N); g_idx (K,) the group of each input column (act-order when it is not k // G). Checkpoint
      format "gptq" (v1) stores z - 1, "gptq_v2" stores z.
The config's `quantization_config` says which. Everything else in the checkpoint passes through unchanged.
"""
from __future__ import annotations

import torch

from kernels.quant_weight import QuantWeight, pack_int4

AWQ_PACK_ORDER = (0, 2, 4, 6, 1, 3, 5, 7)  # value i of 8 goes to nibble AWQ_PACK_ORDER.index(i)
AWQ_UNPACK_ORDER = (0, 4, 1, 5, 2, 6, 3, 7)  # value i of 8 comes from nibble AWQ_UNPACK_ORDER[i]
SUFFIXES = (".qweight", ".qzeros", ".scales", ".g_idx")


def unpack_cols(words: torch.Tensor, bits: int, order=None) -> torch.Tensor:
    """int32 (R, C) -> int32 (R, C * 32 / bits): each word's values, least significant first (or in `order`)."""
    per = 32 // bits
    shifts = torch.arange(per, device=words.device) * bits
    if order is not None:
        shifts = shifts[list(order)]
    values = (words[:, :, None] >> shifts) & ((1 << bits) - 1)  # arithmetic shift; the mask drops the sign
    return values.reshape(words.shape[0], -1)


def unpack_rows(words: torch.Tensor, bits: int) -> torch.Tensor:
    """int32 (R, C) packed along rows -> int32 (R * 32 / bits, C)."""
    return unpack_cols(words.t().contiguous(), bits).t()


def _quant(q_kn: torch.Tensor, z_gn: torch.Tensor, s_gn: torch.Tensor, bits: int, G: int,
           perm: torch.Tensor | None) -> QuantWeight:
    """From (K, N) integers, (K/G, N) zero points and scales to our (N, K) form: zero = -z * s, in fp32, where
    z * s is exact (an 8-bit integer times an fp16 scale fits fp32's mantissa; fp16 would round it)."""
    scales = s_gn.t().float().contiguous()
    q = q_kn.t()
    if bits == 4:
        return QuantWeight(pack_int4(q), scales, (-z_gn.t().float() * scales).contiguous(), 4, G, perm)
    # 8 bits: q in [0, 255] as int8 q - 128, the offset moved into the zero
    zeros = ((128 - z_gn.t().float()) * scales).contiguous()
    return QuantWeight((q - 128).to(torch.int8).contiguous(), scales, zeros, 8, G, perm)


def awq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, group_size: int) -> QuantWeight:
    K = qweight.shape[0]
    G = group_size if group_size > 0 else K
    q = unpack_cols(qweight, 4, AWQ_UNPACK_ORDER)  # (K, N)
    z = unpack_cols(qzeros, 4, AWQ_UNPACK_ORDER)  # (K/G, N)
    if scales.shape != (K // G, q.shape[1]) or z.shape != scales.shape:
        raise ValueError(f"AWQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} for group size {G}")
    return _quant(q, z, scales, 4, G, None)


def gptq_weight(qweight: torch.Tensor, qzeros: torch.Tensor, scales: torch.Tensor, g_idx: torch.Tensor | None,
                bits: int, group_size: int, v1: bool) -> QuantWeight:
    q = unpack_rows(qweight, bits)  # (K, N)
    K, N = q.shape
    G = group_size if group_size > 0 else K
    z = unpack_cols(qzeros, bits)[:, :N] + (1 if v1 else 0)  # (K/G, N)
    if scales.shape != (K // G, N) or z.shape != scales.shape:
        raise ValueError(f"GPTQ tensors disagree: qweight {tuple(qweight.shape)}, qzeros {tuple(qzeros.shape)}, "
                         f"scales {tuple(scales.shape)} for {bits} bits, group size {G}")
    perm = None
    if g_idx is not None and not torch.equal(g_idx.long(), torch.arange(K, device=g_idx.device) // G):
        # act-order: put each group's columns together; the kernels read x's columns in this order
        perm = torch.argsort(g_idx.long(), stable=True)
        if torch.bincount(g_idx.long(), minlength=K // G).ne(G).any():
            raise ValueError("GPTQ g_idx with groups of unequal size is not supported")
        q = q[perm]
    return _quant(q, z, scales, bits, G, perm)


def from_checkpoint(tensors: dict[str, torch.Tensor], qcfg: dict) -> dict[str, torch.Tensor | QuantWeight]:
    """The checkpoint's tensors with each quantized projection `P.qweight/...` replaced by `P.weight`."""
    method = qcfg.get("quant_method")
    bits, G = int(qcfg.get("bits", 4)), int(qcfg.get("group_size", 128))
    if method == "awq":
        version = str(qcfg.get("version", "gemm")).lower()
        if bits != 4 or version != "gemm" or not qcfg.get("zero_point", True):
            raise ValueError(f"AWQ checkpoints load in the 4-bit 'gemm' layout with zero points; this one is "
                             f"{bits} bits, version {version!r}, zero_point {qcfg.get('zero_point')}")
    elif method == "gptq":
        if bits not in (4, 8):
            raise ValueError(f"GPTQ checkpoints load with 4 or 8 bits, this one has {bits}")
        fmt = qcfg.get("checkpoint_format", "gptq")
        if fmt not in ("gptq", "gptq_v2"):
            raise ValueError(f"GPTQ checkpoint_format {fmt!r} is not supported (gptq, gptq_v2)")
    else:
        raise ValueError(f"quantization method {method!r} is not supported (awq, gptq)")
    out: dict = {}
    prefixes = {k[: -len(".qweight")] for k in tensors if k.endswith(".qweight")}
    for key, value in tensors.items():
        if not any(key.startswith(p + ".") and key.endswith(SUFFIXES) for p in prefixes):
            out[key] = value
    for p in sorted(prefixes):
        qweight, qzeros, scales = (tensors[f"{p}.{n}"] for n in ("qweight", "qzeros", "scales"))
        if method == "awq":
            out[f"{p}.weight"] = awq_weight(qweight, qzeros, scales, G)
        else:
            out[f"{p}.weight"] = gptq_weight(qweight, qzeros, scales, tensors.get(f"{p}.g_idx"), bits, G,
                                             v1=qcfg.get("checkpoint_format", "gptq") == "gptq")
    return out

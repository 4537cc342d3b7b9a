"""Quantized weights into the model: before the build (round-to-nearest of dense projections), after it (the form
each device runs).

Before: `quantize_weights` turns the dense projections of a checkpoint's tensors into `QuantWeight`s for
`EngineConfig.quantize` "w8a16" / "w4a16"; the loader then gives each quantized `Linear` its `QuantWeight` as
`weight` (engine/checkpoints/loader.py), the LM head included (int8 in both schemes). On a GPU that is the end: the
Triton ops take it as it is (a tied head stays dense there, as the embedding it shares).

After, on a CPU (`place_for_cpu`): PyTorch's int4/int8 kernels are GEMVs, 10-30x slower than a dense matmul at
prefill sizes, so each quantized Linear gets
  - `weight`: the dequantized weight in the model's dtype, a dense Parameter for prefill (the quantized model's own
    values, so prefill and decode compute with one set of weights), and
  - `lowp`: the weight packed for the decode steps (few rows, `Linear.weight_for`) to read. Weights in GGUF's
    groups (Q4_1, Q8_0: 32 columns, fp16 scales) or that can be put in them (round-to-nearest w4a16 / w8a16, AWQ,
    GPTQ without act-order: `gguf_groups`, which rounds scales to fp16 where they are not, and then both weights
    use those) go to kernels/cpu_qgemv.c, int8 activations on AVX512-VNNI, where the policy measured it faster
    (engine/quant/policy.py); the rest to `aten._weight_int4pack_mm_for_cpu` / `_weight_int8pack_mm`
    (kernels/quant_cpu.py). 8-bit weights in groups are re-rounded to one scale per row for
    the latter: one more rounding, of at most half a row's step (bench/quant_quality.py measures it on the embedded
    default's Q8_0 head). Shapes no kernel takes: bf16.
A tied LM head whose checkpoint ships a quantized copy (a GGUF's Q8_0 embedding: engine/quant/gguf.py) gets it the
same way. Memory on a CPU is therefore dense + packed; the point there is speed, and the 135M default needs ~0.4 GB.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.decoder import PACKED, Linear
from engine.quant.rtn import SCHEMES, quantize_rtn
from engine.quant.policy import cpu_policy
from kernels.cpu_qgemv import gguf_groups, pack_q8
from kernels.quant_cpu import pack_for_cpu
from kernels.quant_weight import QuantWeight, dequantize

PROJECTIONS = tuple(PACKED) + ("o_proj", "down_proj")  # checkpoint names of the decoder's projections
TIED_HEAD = "lm_head.weight"


def is_projection(key: str) -> bool:
    head, _, attr = key.rpartition(".")
    return attr == "weight" and head.rpartition(".")[2] in PROJECTIONS


def quantize_weights(weights: dict, scheme: str | None) -> dict:
    """`scheme` None, "auto" or "gguf": the tensors as they are; "w8a16" / "w4a16": dense projections quantized."""
    if scheme == "gguf" and not any(isinstance(v, QuantWeight) for v in weights.values()):
        raise ValueError("quantize='gguf' keeps a GGUF source's blocks; this checkpoint is not one (the embedded "
                         "default is): use w8a16 or w4a16")
    if scheme not in SCHEMES:
        return weights
    if any(isinstance(v, QuantWeight) for v in weights.values()):
        raise ValueError(f"quantize={scheme!r}: this checkpoint is already quantized (AWQ, GPTQ or GGUF blocks); "
                         "load it without `quantize`")
    out = {k: quantize_rtn(v, scheme) if is_projection(k) and v.dim() == 2 else v for k, v in weights.items()}
    # The LM head in int8 in both schemes (llama.cpp's Q4 files keep theirs at 6-8 bits too): a tied head is quantized
    # from the embedding, which itself stays dense for the lookup.
    head = weights.get(TIED_HEAD, weights.get("model.embed_tokens.weight"))
    if head is not None:
        out[TIED_HEAD] = quantize_rtn(head, "w8a16")
    return out


def _pack(qw: QuantWeight) -> tuple[QuantWeight, object]:
    """(the weight as it will run, its decode form): in GGUF's groups on the int8-activation C kernel where that
    measured faster (policy.py) and the weight can take them (kernels/cpu_qgemv.py `gguf_groups`), else as it is in
    aten's layouts (None where neither takes it)."""
    if cpu_policy().int8_act_decode and (grouped := gguf_groups(qw)) is not None:
        fast = pack_q8(grouped)
        if fast is not None:
            return grouped, fast
    return qw, pack_for_cpu(qw)


def place_for_cpu(model: nn.Module, dtype: torch.dtype, tied_head: QuantWeight | None = None) -> int:
    """Dense prefill weight + packed decode weight for every quantized Linear; returns how many were placed."""
    placed = 0
    for name, module in model.named_modules():
        if not isinstance(module, Linear):
            continue
        qw = module.weight if isinstance(module.weight, QuantWeight) else None
        tied = qw is None and name == "lm_head" and tied_head is not None
        if tied:
            qw = tied_head  # its dense weight is the embedding table
        if qw is None:
            continue
        qw, packed = _pack(qw)
        if not tied:  # prefill's dense weight: the values decode runs (scales as `_pack` keeps them)
            del module.weight  # the plain attribute the loader set
            module.weight = nn.Parameter(dequantize(qw, dtype), requires_grad=False)
        if packed is None and qw.bits == 8:  # groups (GGUF Q8_0, GPTQ 8-bit): the int8 kernel has one scale a row
            packed = pack_for_cpu(quantize_rtn(dequantize(qw), "w8a16"))
        module.lowp = packed if packed is not None else (
            None if dtype == torch.bfloat16 else dequantize(qw, torch.bfloat16))
        placed += 1
    return placed

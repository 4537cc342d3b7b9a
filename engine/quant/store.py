"""Quantized weights on disk: a dict of tensors and `QuantWeight`s as one safetensors file, read back memory-mapped.

Our own cache format, not a checkpoint format: a `QuantWeight` named `P` is stored as `P@qweight`, `P@scales`
(`P@zeros`, `P@perm` when present), its bits and group size in the file's metadata. Used to convert a GGUF's blocks
once (reading them through the `gguf` package takes seconds: it parses all 49k vocabulary strings).
"""
from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from kernels.quant_weight import QuantWeight

PARTS = ("qweight", "scales", "zeros", "perm")


def save_weights(weights: dict[str, torch.Tensor | QuantWeight], file: Path) -> None:
    tensors, quant = {}, {}
    for name, value in weights.items():
        if isinstance(value, QuantWeight):
            quant[name] = [value.bits, value.group_size]
            for part in PARTS:
                if getattr(value, part) is not None:
                    tensors[f"{name}@{part}"] = getattr(value, part).contiguous()
        else:
            tensors[name] = value.contiguous()
    save_file(tensors, str(file), metadata={"quant": json.dumps(quant)})


def load_weights(file: Path) -> dict[str, torch.Tensor | QuantWeight]:
    with safe_open(str(file), framework="pt") as f:
        quant = json.loads(f.metadata()["quant"])
        tensors = {key: f.get_tensor(key) for key in f.keys()}
    out = {k: v for k, v in tensors.items() if "@" not in k}
    for name, (bits, group) in quant.items():
        out[name] = QuantWeight(*(tensors.get(f"{name}@{p}") for p in PARTS[:3]), bits, group,
                                tensors.get(f"{name}@perm"))
    return out

"""AWQ and GPTQ packing as their writers do it (loops transcribed from AutoAWQ's `WQLinear_GEMM.from_linear` and
AutoGPTQ's `QuantLinear.pack`), the reference dequantization formula, and tiny quantized checkpoints built from a
random Llama: the tests' stand-in for the real tools, which are not installed here (no autoawq / gptqmodel /
optimum offline)."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file

from tests.tiny_checkpoints import make_tiny_lm

AWQ_ORDER_MAP = [0, 2, 4, 6, 1, 3, 5, 7]  # AutoAWQ: nibble i of a word holds column order_map[i]
INPUTS = {"q_proj": 0, "k_proj": 0, "v_proj": 0, "o_proj": 1, "gate_proj": 2, "up_proj": 2, "down_proj": 3}


def random_int_quant(K: int, N: int, G: int, bits: int = 4, seed: int = 0, act_order: bool = False,
                     order_seed: int = 0):
    """Integer weights q (K, N), zero points z and scales s (K/G, N), and g_idx (K,): what a quantizer outputs.
    With act-order the column order comes from `order_seed`: GPTQ's order is set by the input's Hessian, so
    projections that read one input (q, k, v; gate, up) share it."""
    gen = torch.Generator().manual_seed(seed)
    top = (1 << bits) - 1
    q = torch.randint(0, top + 1, (K, N), generator=gen)
    z = torch.randint(1, top + 1, (K // G, N), generator=gen)  # >= 1: GPTQ v1 cannot store a zero point of 0
    s = (torch.rand(K // G, N, generator=gen) * 0.02 + 0.005).half()
    g_idx = torch.arange(K) // G
    if act_order:  # columns quantized in a Hessian order: group i holds columns order[i*G:(i+1)*G]
        order = torch.randperm(K, generator=torch.Generator().manual_seed(order_seed))
        g_idx = torch.empty(K, dtype=torch.long)
        g_idx[order] = torch.arange(K) // G
    return q, z, s, g_idx.int()


def reference_dense(q, z, s, g_idx) -> torch.Tensor:
    """The written formula, (N, K) as nn.Linear stores it: w[n, k] = (q[k, n] - z[g(k), n]) * s[g(k), n]."""
    g = g_idx.long()
    return ((q.double() - z[g].double()) * s[g].double()).t().float()


def pack_awq(q: torch.Tensor, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    def pack(intweight):
        out = np.zeros((intweight.shape[0], intweight.shape[1] // 8), dtype=np.uint32)
        iw = intweight.numpy().astype(np.uint32)
        for col in range(intweight.shape[1] // 8):
            for i in range(8):
                out[:, col] |= iw[:, col * 8 + AWQ_ORDER_MAP[i]] << (i * 4)
        return torch.from_numpy(out.view(np.int32))
    return pack(q), pack(z)


def pack_gptq(q: torch.Tensor, z: torch.Tensor, bits: int, v1: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    per = 32 // bits
    iw = q.numpy().astype(np.uint32)
    qweight = np.zeros((iw.shape[0] // per, iw.shape[1]), dtype=np.uint32)
    i, row = 0, 0
    while row < qweight.shape[0]:
        for j in range(i, i + per):
            qweight[row] |= iw[j] << (bits * (j - i))
        i += per
        row += 1
    zeros = (z - 1 if v1 else z).numpy().astype(np.uint32)
    qzeros = np.zeros((zeros.shape[0], zeros.shape[1] // per), dtype=np.uint32)
    i, col = 0, 0
    while col < qzeros.shape[1]:
        for j in range(i, i + per):
            qzeros[:, col] |= zeros[:, j] << (bits * (j - i))
        i += per
        col += 1
    return torch.from_numpy(qweight.view(np.int32)), torch.from_numpy(qzeros.view(np.int32))


def make_tiny_quantized_lm(folder: Path, method: str, group: int = 32, bits: int = 4, act_order: bool = False):
    """The tiny Llama of tests/tiny_checkpoints.py with every projection replaced by random integer weights packed
    in `method`'s layout. Returns (folder, {projection key: reference dense weight})."""
    make_tiny_lm(folder)
    from safetensors.torch import load_file

    file = folder / "model.safetensors"
    tensors = load_file(str(file))
    reference = {}
    for seed, key in enumerate(sorted(k for k in tensors if k.endswith("_proj.weight"))):
        N, K = tensors[key].shape
        layer, inputs = int(key.split(".")[2]), INPUTS[key.split(".")[-2]]
        q, z, s, g_idx = random_int_quant(K, N, group, bits, seed, act_order, order_seed=10 * layer + inputs)
        prefix = key[: -len(".weight")]
        del tensors[key]
        if method == "awq":
            qweight, qzeros = pack_awq(q, z)
        else:
            qweight, qzeros = pack_gptq(q, z, bits)
            tensors[f"{prefix}.g_idx"] = g_idx
        tensors.update({f"{prefix}.qweight": qweight, f"{prefix}.qzeros": qzeros, f"{prefix}.scales": s})
        reference[key] = reference_dense(q, z, s, g_idx)
    save_file(tensors, str(file), metadata={"format": "pt"})
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = (
        {"quant_method": "awq", "bits": 4, "group_size": group, "zero_point": True, "version": "gemm"}
        if method == "awq" else
        {"quant_method": "gptq", "bits": bits, "group_size": group, "desc_act": act_order, "sym": False,
         "checkpoint_format": "gptq"})
    (folder / "config.json").write_text(json.dumps(config))
    return folder, reference

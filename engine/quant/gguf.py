"""A Llama GGUF's tensors with its 4- and 8-bit blocks kept: Q4_1 and Q8_0 become `QuantWeight`s, keyed like HF.

GGML block formats (32 weights of one row each, along the input dimension):
  Q4_1: fp16 d, fp16 m, 16 bytes; byte j holds weight j (low nibble) and weight j + 16 (high); w = d * q + m.
  Q8_0: fp16 d, 32 int8; w = d * q.
So Q4_1 is our 4-bit form with group 32, scale d and zero m; Q8_0 the 8-bit one, symmetric, group 32. Other types
(F32, F16, and any other block type) are dequantized by the `gguf` package. llama.cpp's converter permutes the rows
of attn_q / attn_k for its rotary layout; they are permuted back here, as transformers' GGUF loader does. The
embedding table stays dense (a lookup needs rows); where the LM head is tied to it, engine/quant/install.py gives
the head its own quantized copy from `TIED_HEAD`.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from kernels.quant_weight import QuantWeight, pack_int4

# GGUF tensor name (after "blk.N.") -> HF name (after "model.layers.N.")
LAYER_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj", "attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
}
TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}
TIED_HEAD = "lm_head.weight"  # the embedding's blocks, for the head when the file has no `output` tensor


def hf_name(name: str) -> str:
    stem, _, attr = name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, part = stem.split(".", 2)
        return f"model.layers.{layer}.{LAYER_NAMES[part]}.{attr}"
    return f"{TOP_NAMES[stem]}.{attr}"


def rotary_rows(n_rows: int, n_head: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation (transformers' `_reverse_permute_weights`)."""
    dim = n_rows // n_head // 2
    return torch.arange(n_rows).view(n_head, dim, 2).transpose(1, 2).reshape(-1)


def q4_1(blocks: np.ndarray, rows: int) -> QuantWeight:
    """uint8 (N, K/32 * 20) of Q4_1 blocks -> 4-bit QuantWeight, group 32, exact."""
    b = torch.from_numpy(np.require(blocks, requirements=["C", "W"])).view(rows, -1, 20)  # (N, K/32, 20), own copy
    d = b[:, :, 0:2].contiguous().view(torch.float16).squeeze(-1)
    m = b[:, :, 2:4].contiguous().view(torch.float16).squeeze(-1)
    qs = b[:, :, 4:]  # (N, K/32, 16)
    q = torch.cat((qs & 0xF, qs >> 4), dim=-1).reshape(rows, -1)  # weights 0..15 low, 16..31 high
    return QuantWeight(pack_int4(q), d, m, 4, 32)


def q8_0(blocks: np.ndarray, rows: int) -> QuantWeight:
    b = torch.from_numpy(np.require(blocks, requirements=["C", "W"])).view(rows, -1, 34)
    d = b[:, :, 0:2].contiguous().view(torch.float16).squeeze(-1)
    q = b[:, :, 2:].contiguous().view(torch.int8).reshape(rows, -1)
    return QuantWeight(q, d, None, 8, 32)


def read_gguf(path: Path, num_heads: int, num_kv_heads: int) -> dict[str, torch.Tensor | QuantWeight]:
    """HF-named tensors of a Llama GGUF: QuantWeight for Q4_1 / Q8_0 projections, dense fp32 for the rest."""
    from gguf import GGMLQuantizationType as T, GGUFReader
    from gguf.quants import dequantize

    out: dict = {}
    for t in GGUFReader(str(path)).tensors:
        name = hf_name(t.name)
        rows = int(t.shape[-1]) if len(t.shape) > 1 else 1  # GGUF shapes list the row length first
        if t.tensor_type == T.Q4_1 and name != "model.embed_tokens.weight":
            value = q4_1(t.data, rows)
        elif t.tensor_type == T.Q8_0 and name != "model.embed_tokens.weight":
            value = q8_0(t.data, rows)
        else:
            dense = dequantize(t.data, t.tensor_type) if t.tensor_type not in (T.F32, T.F16) else t.data
            value = torch.from_numpy(np.array(dense, dtype=np.float32))
            if name == "model.embed_tokens.weight" and t.tensor_type == T.Q8_0:
                out[TIED_HEAD] = q8_0(t.data, rows)
        for part, heads in ((".self_attn.q_proj.", num_heads), (".self_attn.k_proj.", num_kv_heads)):
            if part in name:
                order = rotary_rows(rows, heads)
                value = _rows(value, order)
        out[name] = value
    return out


def _rows(value: torch.Tensor | QuantWeight, order: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return value[order]
    return QuantWeight(value.qweight[order], value.scales[order],
                       None if value.zeros is None else value.zeros[order], value.bits, value.group_size)

"""The Llama / Qwen2 decoder (LLaVA-1.5's Vicuna, llava-interleave's Qwen2, SmolLM2), written on our kernels.

Attribute names equal the checkpoint's keys (`model.layers.N.self_attn.o_proj`, `model.norm`, `lm_head`), except
two packed projections: q/k/v live in one `qkv_proj` and gate/up in one `gate_up_proj`, so a step does one matmul
where the checkpoint has three or two. `PACKED` says how checkpoint keys land in them; the loader needs nothing
else. Tokens are packed into one (T, hidden) tensor with no batch padding; `AttentionMetadata` says where each
sequence starts.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from engine.attention import AttentionMetadata, PagedAttention
from engine.config import TextConfig
from kernels import KernelOps

# checkpoint name -> (our packed module, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


LOWP_MAX_ROWS = 8  # calls with at most this many rows (decode steps) use the low-precision weight copy


class Linear(nn.Linear):
    """nn.Linear that can also keep a low-precision copy of its weight for calls with few rows.

    On CPUs without bf16 matrix units, a bf16 matrix-vector product streams half the bytes and runs ~2.7x faster
    than fp32, while a bf16 matrix-matrix product (prefill) runs ~6x slower. So decode steps read the bf16 copy and
    prefill the fp32 weight; activations, norms, attention and the KV cache stay fp32 throughout.
    """

    lowp: torch.Tensor | None = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.lowp is None or x.shape[0] > LOWP_MAX_ROWS:
            return super().forward(x)
        out = F.linear(x.to(self.lowp.dtype), self.lowp).to(x.dtype)
        return out if self.bias is None else out + self.bias


def add_lowp_copies(model: nn.Module, dtype: torch.dtype) -> None:
    for module in model.modules():
        if isinstance(module, Linear):
            module.lowp = module.weight.detach().to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, ops: KernelOps, size: int, eps: float):
        super().__init__()
        self.ops, self.eps = ops, eps
        self.weight = nn.Parameter(torch.ones(size))

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        if residual is None:
            return self.ops.rms_norm(x, self.weight, self.eps)
        return self.ops.add_rms_norm(x, residual, self.weight, self.eps)


class Attention(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.ops = ops
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.qkv_shards = (self.q_size, self.kv_size, self.kv_size)
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(ops, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, x, positions, cos_sin, md: AttentionMetadata):
        qkv = self.qkv_proj(x)  # (T, q + 2kv)
        q, k, v = qkv.split(self.qkv_shards, dim=-1)
        q = q.view(-1, self.q_size // self.head_dim, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.kv_size // self.head_dim, self.head_dim)  # (T, Hk, D)
        v = v.view(-1, self.kv_size // self.head_dim, self.head_dim)
        self.ops.rotary(q, k, positions, cos_sin)
        out = self.attn(q, k, v, md)  # (T, Hq, D)
        return self.o_proj(out.reshape(-1, self.q_size))


class MLP(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.gate_up_shards = (cfg.intermediate_size, cfg.intermediate_size)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, x):
        return self.down_proj(self.ops.silu_and_mul(self.gate_up_proj(x)))


class DecoderLayer(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(ops, cfg)
        self.mlp = MLP(ops, cfg)
        self.input_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, x, residual, positions, cos_sin, md):
        if residual is None:
            residual, x = x, self.input_layernorm(x)
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(x, positions, cos_sin, md)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual


class DecoderModel(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(ops, cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(ops, cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, embeds, positions, cos_sin, md):
        x, residual = embeds, None  # (T, hidden)
        for layer in self.layers:
            x, residual = layer(x, residual, positions, cos_sin, md)
        x, _ = self.norm(x, residual)
        return x


class CausalLM(nn.Module):
    """Decoder + LM head. `forward` returns final hidden states; `logits` projects only the rows asked for."""

    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.config = cfg
        self.model = DecoderModel(ops, cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def forward(self, embeds, positions, cos_sin, md):
        return self.model(embeds, positions, cos_sin, md)

    def logits(self, hidden: torch.Tensor) -> torch.Tensor:
        return self.lm_head(hidden).float()

"""The Llama / Qwen2 decoder (LLaVA-1.5's Vicuna, llava-interleave's Qwen2, SmolLM2), written on our kernels.

Attribute names equal the checkpoint's keys (`model.layers.N.self_attn.o_proj`, `model.norm`, `lm_head`), except
two packed projections: q/k/v live in one `qkv_proj` and gate/up in one `gate_up_proj`, so a step does one matmul
where the checkpoint has three or two. `PACKED` says how checkpoint keys land in them; the loader needs nothing
else. Tokens are packed into one (T, hidden) tensor with no batch padding; `AttentionMetadata` says where each
sequence starts.
"""
from __future__ import annotations

import torch
from torch import nn

from engine.models.attention import AttentionMetadata, PagedAttention
from engine.config import TextConfig
from kernels import KernelOps

# checkpoint name -> (our packed module, shard index)
PACKED = {
    "q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
    "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1),
}


LOWP_MAX_ROWS = 8  # calls with at most this many rows (decode steps) use the low-precision weight copy


class Linear(nn.Linear):
    """nn.Linear's parameters, plus an optional low-precision copy of the weight for calls with few rows.

    On CPUs without bf16 matrix units, a bf16 matrix-vector product streams half the bytes and runs ~2.7x faster
    than fp32, while a bf16 matrix-matrix product (prefill) runs ~6x slower. So decode steps read the bf16 copy and
    prefill the fp32 weight; activations, norms, attention and the KV cache stay fp32 throughout. The layer's ops
    (kernels/gemv.py) take the weight this picks, fused with the norm, activation or residual add around them.
    """

    lowp: torch.Tensor | None = None

    def weight_for(self, x: torch.Tensor) -> torch.Tensor:
        return self.weight if self.lowp is None or x.shape[0] > LOWP_MAX_ROWS else self.lowp


def add_lowp_copies(model: nn.Module, dtype: torch.dtype) -> None:
    """A `dtype` copy for every Linear that has no decode weight yet (quantized ones have theirs: engine/quant/)."""
    for module in model.modules():
        if isinstance(module, Linear) and module.lowp is None and isinstance(module.weight, torch.Tensor):
            module.lowp = module.weight.detach().to(dtype)


class RMSNorm(nn.Module):
    """The norm's weight and epsilon; the norm itself runs fused into the projection it feeds (`ops.norm_linear`)."""

    def __init__(self, size: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(size))


class Attention(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.ops = ops
        self.q_size = cfg.num_attention_heads * cfg.head_dim
        self.kv_size = cfg.num_key_value_heads * cfg.head_dim
        self.head_dim = cfg.head_dim
        self.qkv_proj = Linear(cfg.hidden_size, self.q_size + 2 * self.kv_size, bias=cfg.qkv_bias)
        self.qkv_shards = (self.q_size, self.kv_size, self.kv_size)  # the split below; also read by the loader
        self.o_proj = Linear(self.q_size, cfg.hidden_size, bias=cfg.o_bias)
        self.attn = PagedAttention(ops, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim)

    def forward(self, h, norm: RMSNorm, positions, cos_sin, md: AttentionMetadata):
        """h + o_proj(attention(norm(h))); h (T, hidden) is the residual stream."""
        qkv = self.ops.norm_linear(h, norm.weight, norm.eps, self.qkv_proj.weight_for(h), self.qkv_proj.bias)
        q, k, v = qkv.split(self.qkv_shards, dim=-1)
        q = q.view(-1, self.q_size // self.head_dim, self.head_dim)  # (T, Hq, D)
        k = k.view(-1, self.kv_size // self.head_dim, self.head_dim)  # (T, Hk, D)
        v = v.view(-1, self.kv_size // self.head_dim, self.head_dim)
        out = self.attn(q, k, v, positions, cos_sin, md).reshape(-1, self.q_size)  # (T, Hq * D)
        return self.ops.linear_add(out, self.o_proj.weight_for(out), self.o_proj.bias, h)


class MLP(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.ops = ops
        self.gate_up_proj = Linear(cfg.hidden_size, 2 * cfg.intermediate_size, bias=False)
        self.gate_up_shards = (cfg.intermediate_size, cfg.intermediate_size)  # read by the loader
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, bias=False)

    def forward(self, h, norm: RMSNorm):
        """h + down_proj(silu(gate) * up), gate | up = gate_up_proj(norm(h))."""
        return self.ops.norm_mlp_add(h, norm.weight, norm.eps, self.gate_up_proj.weight_for(h),
                                     self.down_proj.weight_for(h))


class DecoderLayer(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.self_attn = Attention(ops, cfg)
        self.mlp = MLP(ops, cfg)
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, h, positions, cos_sin, md):
        h = self.self_attn(h, self.input_layernorm, positions, cos_sin, md)
        return self.mlp(h, self.post_attention_layernorm)


class DecoderModel(nn.Module):
    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.ops, self.config = ops, cfg
        self.embed_tokens = nn.Embedding(cfg.vocab_size, cfg.hidden_size)
        self.layers = nn.ModuleList(DecoderLayer(ops, cfg) for _ in range(cfg.num_hidden_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self._stack: tuple[int, object] | None = None  # (first k cache's address, LayerStack or None)

    def forward(self, embeds, positions, cos_sin, md):
        """The residual stream after the last layer, (T, hidden); the final norm runs fused into the LM head."""
        if not md.is_prefill and self.ops.decode_layers is not None and (stack := self.layer_stack()) is not None:
            h = self.ops.decode_layers(embeds, stack, positions, cos_sin, md.slot_mapping, md.block_tables,
                                       md.seq_lens)
            if h is not None:
                return h
        h = embeds
        for layer in self.layers:
            h = layer(h, positions, cos_sin, md)
        return h

    def layer_stack(self):
        """The layers as `ops.decode_layers` takes them (kernels/cpu_decoder.py), built at the first decode step (the
        caches are bound by then) and again if they move; None where a projection is not on the int8-activation
        kernel (kernels/cpu_qgemv.py) or has a bias."""
        first = self.layers[0].self_attn.attn
        if self._stack is None or self._stack[0] != first.k_cache.data_ptr():
            self._stack = (first.k_cache.data_ptr(), self._build_stack())
        return self._stack[1]

    def _build_stack(self):
        from kernels.cpu_decoder import DecoderLayerWeights, LayerStack
        from kernels.cpu_qgemv import CpuQ8Weight

        layers = []
        for layer in self.layers:
            at, mlp = layer.self_attn, layer.mlp
            projections = (at.qkv_proj, at.o_proj, mlp.gate_up_proj, mlp.down_proj)
            if any(not isinstance(p.lowp, CpuQ8Weight) or p.bias is not None for p in projections):
                return None
            norms = (layer.input_layernorm.weight, layer.post_attention_layernorm.weight)
            layers.append(DecoderLayerWeights(
                norms[0].detach(), at.qkv_proj.lowp, at.o_proj.lowp, norms[1].detach(), mlp.gate_up_proj.lowp,
                mlp.down_proj.lowp, at.attn.k_cache, at.attn.v_cache, at.attn.k_scale_zero, at.attn.v_scale_zero))
        cfg = self.config
        return LayerStack(layers, cfg.num_attention_heads, cfg.num_key_value_heads, cfg.head_dim, cfg.rms_norm_eps)


class CausalLM(nn.Module):
    """Decoder + LM head. `forward` returns the residual stream; `logits` norms and projects only the rows asked for."""

    def __init__(self, ops: KernelOps, cfg: TextConfig):
        super().__init__()
        self.config, self.ops = cfg, ops
        self.model = DecoderModel(ops, cfg)
        self.lm_head = Linear(cfg.hidden_size, cfg.vocab_size, bias=False)
        if cfg.tie_word_embeddings:
            self.lm_head.weight = self.model.embed_tokens.weight

    def embed(self, ids: torch.Tensor) -> torch.Tensor:
        return self.model.embed_tokens(ids)

    def decodes_on_host_pool(self, rows: int) -> bool:
        """Whether a decode step of `rows` rows runs every projection and the LM head on the C kernels' own thread
        pool (kernels/cpu_qgemv.py), so that torch is left only small ops."""
        from kernels.cpu_qgemv import CpuQ8Weight

        return (rows <= LOWP_MAX_ROWS and isinstance(self.lm_head.lowp, CpuQ8Weight)
                and self.model.layer_stack() is not None)

    def forward(self, embeds, positions, cos_sin, md):
        return self.model(embeds, positions, cos_sin, md)

    def logits(self, hidden: torch.Tensor, exact: bool = False) -> torch.Tensor:
        """Logits of the rows asked for, from `forward`'s un-normed hidden states. `exact`: through the LM head's
        own weight even for a few rows, never its low-precision decode copy (scoring: every row alike)."""
        norm = self.model.norm
        weight = self.lm_head.weight if exact else self.lm_head.weight_for(hidden)
        return self.ops.norm_linear(hidden, norm.weight, norm.eps, weight, None).float()

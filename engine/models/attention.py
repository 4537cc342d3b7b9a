"""Attention over the paged KV cache, and the metadata that describes one step's batch.

`AttentionMetadata` is an explicit argument threaded through the model (no module-global context). The layer
applies rotary embedding and writes the step's new K/V into the cache pages (one fused op), then attends from the
pages: `paged_prefill_attention` for
prompt tokens (plain, prefix-cached or chunked prefill alike), `paged_decode_attention` for one token per sequence.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from kernels import KernelOps


@dataclass
class AttentionMetadata:
    is_prefill: bool
    slot_mapping: torch.Tensor  # (T,) int64: where each new token's K/V goes; -1 = padding
    block_tables: torch.Tensor  # (B, max_blocks) int32
    seq_lens: torch.Tensor  # (B,) int32: keys per sequence after this step
    cu_seqlens_q: torch.Tensor | None = None  # (B+1,) int32, prefill only
    max_seqlen_q: int = 1


class PagedAttention(nn.Module):
    def __init__(self, ops: KernelOps, num_heads: int, num_kv_heads: int, head_dim: int):
        super().__init__()
        self.ops = ops
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.k_cache = self.v_cache = None  # bound by the model runner once the cache is allocated
        self.k_scale_zero = self.v_scale_zero = None  # an int8 cache's scales and zeros (kernels/kv_int8.py)

    def bind_cache(self, k_cache, v_cache, k_scale_zero=None, v_scale_zero=None) -> None:
        self.k_cache, self.v_cache, self.k_scale_zero, self.v_scale_zero = k_cache, v_cache, k_scale_zero, v_scale_zero

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, positions: torch.Tensor,
                cos_sin: torch.Tensor, md: AttentionMetadata) -> torch.Tensor:
        # q (T, Hq, D); k, v (T, Hk, D), not yet rotated
        int8 = (self.k_scale_zero, self.v_scale_zero)
        self.ops.rope_store_kv(q, k, v, positions, cos_sin, self.k_cache, self.v_cache, md.slot_mapping, *int8)
        if md.is_prefill:
            return self.ops.paged_prefill_attention(q, self.k_cache, self.v_cache, md.block_tables,
                                                    md.cu_seqlens_q, md.seq_lens, md.max_seqlen_q, self.scale, *int8)
        return self.ops.paged_decode_attention(q, self.k_cache, self.v_cache, md.block_tables, md.seq_lens,
                                               self.scale, *int8)

"""Runs the language model for one scheduled step: builds the packed inputs, runs prefill or decode, samples.

Split by phase: `prepare_prefill` / `prepare_decode` turn sequences into tensors (token ids, positions, slots,
block tables, image embeddings to splice), `run` executes, the sampler picks tokens. Decode on CUDA replays a
CUDA graph captured for the smallest batch-size bucket that holds the batch (engine/cuda_graphs.py).
"""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.block_manager import BlockManager
from engine.config import EngineConfig
from engine.kv_cache import allocate
from engine.models.decoder import CausalLM
from engine.rope import cos_sin_cache
from engine.sampler import Sampler
from engine.sequence import Sequence


class ModelRunner:
    def __init__(self, model: CausalLM, cfg: EngineConfig, blocks: BlockManager, max_model_len: int,
                 dtype: torch.dtype, device: torch.device, cuda_graphs: bool = False):
        self.model, self.cfg, self.blocks = model, cfg, blocks
        self.device, self.dtype = device, dtype
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // cfg.block_size)
        text = model.config
        self.cos_sin = cos_sin_cache(text.rope, text.head_dim, max_model_len, device)
        self.kv = allocate(text, blocks.num_blocks, cfg.block_size, dtype, device)
        for layer, (k, v) in zip(model.model.layers, self.kv):
            layer.self_attn.attn.k_cache, layer.self_attn.attn.v_cache = k, v
        self.sampler = Sampler(device)
        self.graphs = None
        if device.type == "cuda" and cuda_graphs:
            from engine.cuda_graphs import DecodeGraphs  # imported where used: CPU-only installs never need it

            self.graphs = DecodeGraphs(self, cfg.cuda_graph_batch_sizes, self.max_blocks_per_seq)

    def _tensor(self, values, dtype) -> torch.Tensor:
        return torch.tensor(values, dtype=dtype, pin_memory=self.device.type == "cuda").to(self.device,
                                                                                            non_blocking=True)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def prepare_prefill(self, seqs: list[Sequence]):
        ids, positions, slots, cu, lens = [], [], [], [0], []
        splices = []  # (row in the packed batch, image span, first feature row, count)
        for seq in seqs:
            start = seq.num_cached_tokens
            base = len(ids)
            ids.extend(seq.token_ids[start:])
            positions.extend(range(start, len(seq)))
            slots.extend(self.blocks.slot(seq, p) for p in range(start, len(seq)))
            cu.append(len(ids))
            lens.append(len(seq))
            for span in seq.images:
                lo, hi = max(span.offset, start), min(span.offset + span.length, len(seq))
                if lo < hi:
                    splices.append((base + lo - start, span, lo - span.offset, hi - lo))
        md = AttentionMetadata(
            is_prefill=True, slot_mapping=self._tensor(slots, torch.int64),
            block_tables=self._block_tables(seqs), seq_lens=self._tensor(lens, torch.int32),
            cu_seqlens_q=self._tensor(cu, torch.int32), max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])))
        ids_t = self._tensor(ids, torch.int64)
        embeds = self._embed_with_images(ids_t, splices)
        return embeds, self._tensor(positions, torch.int64), md

    def _embed_with_images(self, ids: torch.Tensor, splices) -> torch.Tensor:
        if not splices:
            return self.model.embed(ids)
        rows, feats = [], []
        for row, span, first, count in splices:
            rows.append(torch.arange(row, row + count))
            feats.append(span.embeds[first:first + count])
        rows_t = torch.cat(rows).to(self.device)
        # Placeholder ids may lie outside the vocabulary (an added <image> token): embed a valid id there first.
        safe = ids.clone()
        safe[rows_t] = 0
        embeds = self.model.embed(safe)  # (T, hidden)
        embeds[rows_t] = torch.cat(feats).to(device=self.device, dtype=embeds.dtype)
        return embeds

    def prepare_decode(self, seqs: list[Sequence]):
        ids = [s.last_token for s in seqs]
        positions = [len(s) - 1 for s in seqs]
        slots = [self.blocks.slot(s, len(s) - 1) for s in seqs]
        md = AttentionMetadata(is_prefill=False, slot_mapping=self._tensor(slots, torch.int64),
                               block_tables=self._block_tables(seqs),
                               seq_lens=self._tensor([len(s) for s in seqs], torch.int32))
        return self._tensor(ids, torch.int64), self._tensor(positions, torch.int64), md

    @staticmethod
    def _one_new_token(seqs: list[Sequence]) -> bool:
        """A prefill whose sequences each lack only their last token's KV (a prefix-cache hit: a retry, a resent
        prompt) is a decode step in all but name; it then runs as one, under the decode CUDA graph."""
        return all(len(s) - s.num_cached_tokens == 1 and
                   not any(sp.offset + sp.length >= len(s) for sp in s.images) for s in seqs)

    @torch.inference_mode()
    def run(self, seqs: list[Sequence], is_prefill: bool) -> list[int]:
        if is_prefill and self._one_new_token(seqs):
            is_prefill = False
        if is_prefill:
            embeds, positions, md = self.prepare_prefill(seqs)
            hidden = self.model(embeds, positions, self.cos_sin, md)
            last = md.cu_seqlens_q[1:].long() - 1
            logits = self.model.logits(hidden[last])
        elif self.graphs is not None and self.graphs.fits(len(seqs)):
            logits = self.graphs.run(seqs)
        else:
            ids, positions, md = self.prepare_decode(seqs)
            hidden = self.model(self.model.embed(ids), positions, self.cos_sin, md)
            logits = self.model.logits(hidden)
        return self.sampler(logits, seqs)

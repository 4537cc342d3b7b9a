"""Decode under CUDA graphs: one graph per batch-size bucket, captured once, replayed every step.

A decode step is hundreds of small kernel launches; replaying a captured graph removes the launch overhead that
dominates batch-1 decode. Inputs live in static buffers that each replay reads: token ids, positions, KV slots, block
tables and sequence lengths. A batch runs in the smallest bucket that holds it; the padding rows get slot -1 (no
KV write) and length 0 (no attention), so they cost almost nothing and touch nothing. Nothing inside the graph
synchronises with the host. The input ids may come from the device (the tokens of a step still in flight, when the
engine launches ahead); then they never visit the host.
"""
from __future__ import annotations

import torch

from engine.attention import AttentionMetadata
from engine.sequence import Sequence


class DecodeGraphs:
    def __init__(self, runner, batch_sizes: tuple[int, ...], max_blocks: int):
        self.runner = runner
        self.buckets = sorted(b for b in batch_sizes if b <= runner.cfg.max_num_seqs) or [1]
        n, dev = self.buckets[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)
        self.slots = torch.full((n,), -1, dtype=torch.int64, device=dev)
        self.block_tables = torch.zeros(n, max_blocks, dtype=torch.int32, device=dev)
        self.seq_lens = torch.zeros(n, dtype=torch.int32, device=dev)
        # Pinned host staging, written through numpy views: no allocation and no per-element torch call per step.
        # Two sets used in turn: a step is launched while the previous one may still be queued, its copies out of
        # the other set not yet run; the set before that is free again, as its step has been resolved (the engine
        # never has more than one step unresolved when it launches another).
        self.host = torch.zeros(2, 4, n, dtype=torch.int64).pin_memory()  # [turn]: ids, positions, slots, seq_lens
        self.host_tables = torch.zeros(2, n, max_blocks, dtype=torch.int32).pin_memory()
        self.host_np, self.host_tables_np = self.host.numpy(), self.host_tables.numpy()
        self.turn = 0
        self.graphs: dict[int, torch.cuda.CUDAGraph] = {}
        self.logits: dict[int, torch.Tensor] = {}
        self._capture()

    def _forward(self, bs: int) -> torch.Tensor:
        model, r = self.runner.model, self.runner
        md = AttentionMetadata(is_prefill=False, slot_mapping=self.slots[:bs], block_tables=self.block_tables[:bs],
                               seq_lens=self.seq_lens[:bs])
        hidden = model(model.embed(self.ids[:bs]), self.positions[:bs], r.cos_sin, md)
        return model.logits(hidden)

    @torch.inference_mode()
    def _capture(self) -> None:
        pool = None
        for bs in reversed(self.buckets):  # largest first, so smaller graphs reuse its memory pool
            self._forward(bs)  # warm-up: compiles the Triton kernels outside the capture
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                self.logits[bs] = self._forward(bs)
            pool = graph.pool()
            self.graphs[bs] = graph
        torch.cuda.synchronize()

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def run(self, seqs: list[Sequence], pending: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (len(seqs), V) of one decode step. `pending`: (B,) input ids on the device, sampled by a step still
        in flight and not yet appended on the host; they sit at position len(seq), one past the last known token."""
        n, ahead = len(seqs), pending is not None
        bs = next(b for b in self.buckets if b >= n)
        turn, self.turn = self.turn, self.turn ^ 1
        host, tables = self.host_np[turn], self.host_tables_np[turn]
        positions, slots = self.runner.decode_rows(seqs, ahead)
        if not ahead:
            host[0, :n] = [s.last_token for s in seqs]
        host[1, :n] = positions
        host[2, :n] = slots
        host[3, :n] = [p + 1 for p in positions]
        host[:, n:bs] = 0
        host[2, n:bs] = -1  # padding rows write nowhere and attend to nothing
        width = max(len(s.block_table) for s in seqs)
        for i, s in enumerate(seqs):
            tables[i, :len(s.block_table)] = s.block_table
        staged, staged_tables = self.host[turn], self.host_tables[turn]
        if ahead:  # device to device, queued after the step that samples them; padding rows keep stale valid ids
            self.ids[:n].copy_(pending)
        else:
            self.ids[:bs].copy_(staged[0, :bs], non_blocking=True)
        self.positions[:bs].copy_(staged[1, :bs], non_blocking=True)
        self.slots[:bs].copy_(staged[2, :bs], non_blocking=True)
        self.seq_lens[:bs].copy_(staged[3, :bs], non_blocking=True)
        # Table entries past a row's length are never read (the kernels stop at seq_lens), so stale ones may stay.
        self.block_tables[:n, :width].copy_(staged_tables[:n, :width], non_blocking=True)
        self.graphs[bs].replay()
        return self.logits[bs][:n]

"""Decode and prefill under CUDA graphs: one graph per batch-size (decode) or token-count (prefill) bucket, captured
once, replayed every step.

A decode step is hundreds of small kernel launches; replaying a captured graph removes the launch overhead that
dominates batch-1 decode. Inputs live in static buffers that each replay reads: token ids, positions, KV slots, block
tables and sequence lengths; the rotary rows they read (engine/runtime/rope.py `RotaryTable`) are rewritten in the
runner's table before each replay. A batch runs in the smallest bucket that holds it; the padding rows get slot -1 (no
KV write) and length 0 (no attention), so they cost almost nothing and touch nothing. Nothing inside the graph
synchronises with the host. The input ids may come from the device (the tokens of a step still in flight, when the
engine launches ahead); then they never visit the host.

Prefill is no different in kind: a 7B prefill of one image and a question is ~300 launches, and from Python they
take longer (~22 ms on an H100's host) than the GPU needs to run them (~15 ms). Prefill graphs are captured per
token-count bucket (every `PREFILL_STEP` tokens up to a cap) for up to a few sequences; a batch pads its tokens to
the bucket (padding rows: slot -1, in no sequence) and its sequences to the graph's count (no tokens, no keys).
All graphs share one memory pool: they never run at once, and each replay's output is read before the next one.
"""
from __future__ import annotations

from typing import Any, Callable

import torch

from engine.models.attention import AttentionMetadata
from engine.paging.sequence import Sequence
from vision.graphed import collector_paused


@torch.inference_mode()
def capture(sizes: list[int], forward: Callable[[int], Any], pool=None):
    """One graph of `forward(size)` per size, all in one memory pool: ({size: graph}, {size: forward's output,
    a static tensor each replay rewrites}, the pool). Largest first, so the smaller graphs reuse its memory. Each
    size runs once eagerly before its capture: that compiles the Triton kernels and picks the cuBLAS kernels."""
    graphs, outputs = {}, {}
    with collector_paused():
        for size in sorted(sizes, reverse=True):
            forward(size)
            torch.cuda.synchronize()
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                outputs[size] = forward(size)
            pool = graph.pool()
            graphs[size] = graph
    torch.cuda.synchronize()
    return graphs, outputs, pool


class DecodeGraphs:
    def __init__(self, runner, batch_sizes: tuple[int, ...], max_blocks: int, pool=None):
        self.runner = runner
        self.buckets = sorted(b for b in batch_sizes if b <= runner.cfg.max_num_seqs) or [1]
        n, dev = self.buckets[-1], runner.device
        self.ids = torch.zeros(n, dtype=torch.int64, device=dev)
        self.positions = torch.zeros(n, dtype=torch.int64, device=dev)  # rows of the runner's cos|sin table
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
        self.graphs, self.logits, self.pool = capture(self.buckets, self._forward, pool)

    def _forward(self, bs: int) -> torch.Tensor:
        model, r = self.runner.model, self.runner
        md = AttentionMetadata(is_prefill=False, slot_mapping=self.slots[:bs], block_tables=self.block_tables[:bs],
                               seq_lens=self.seq_lens[:bs])
        hidden = model(model.embed(self.ids[:bs]), self.positions[:bs], r.cos_sin, md)
        return model.logits(hidden)

    def fits(self, n: int) -> bool:
        return n <= self.buckets[-1]

    def run(self, seqs: list[Sequence], pending: torch.Tensor | None = None) -> torch.Tensor:
        """Logits (len(seqs), V) of one decode step. `pending`: (B,) input ids on the device, sampled by a step still
        in flight and not yet appended on the host; they sit at position len(seq), one past the last known token."""
        n, ahead = len(seqs), pending is not None
        bs = next(b for b in self.buckets if b >= n)
        turn, self.turn = self.turn, self.turn ^ 1
        host, tables = self.host_np[turn], self.host_tables_np[turn]
        positions, slots, rope_rows = self.runner.decode_rows(seqs, ahead)
        if not ahead:
            host[0, :n] = [s.last_token for s in seqs]
        host[1, :n] = rope_rows
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


PREFILL_STEP = 16  # prefill token buckets: every 16 tokens, so a batch pads by less than 16 rows


def prefill_buckets(max_tokens: int) -> list[int]:
    return list(range(PREFILL_STEP, max_tokens + 1, PREFILL_STEP))


class PrefillGraphs:
    """Prefill batches of at most `max_seqs` sequences and `buckets[-1]` new tokens, replayed from CUDA graphs.

    Static inputs: the (T, hidden) input embeddings (token embeddings with image features spliced in, built eagerly:
    the splice is host-driven) and the attention metadata. A batch's sequences are chunks (engine/paging/scheduler.py:
    a part of a prompt, or a decoding sequence's one token, each after its cached keys). A graph's output is the
    hidden state of the rows asked for (the rows that sample), written into one buffer that every graph shares; the
    LM head runs after the replay on those rows only, so padding sequences cost no vocabulary-wide matmul.
    """

    def __init__(self, runner, buckets: list[int], max_seqs: int, max_blocks: int, pool=None):
        self.runner = runner
        self.buckets, self.max_seqs, self.max_blocks = sorted(buckets), max_seqs, max_blocks
        t, b, dev = self.buckets[-1], max_seqs, runner.device
        self.embeds = torch.zeros(t, runner.model.config.hidden_size, dtype=runner.dtype, device=dev)
        self.out = torch.zeros(b, runner.model.config.hidden_size, dtype=runner.dtype, device=dev)
        # All integer inputs in two buffers, each filled on the host and sent in one copy:
        # int64: cos|sin rows (positions, engine/runtime/rope.py) [0, t), KV slots [t, 2t), the rows to return
        # [2t, 2t + b) (at most one per sequence);
        # int32: cu_seqlens_q [0, b], seq_lens [b + 1, 2b + 1), then the (b, max_blocks) block tables.
        self.host64 = torch.zeros(2 * t + b, dtype=torch.int64).pin_memory()
        self.host32 = torch.zeros(2 * b + 1 + b * max_blocks, dtype=torch.int32).pin_memory()
        self.np64, self.np32 = self.host64.numpy(), self.host32.numpy()
        self.np64[t:2 * t] = -1  # the warm-up and capture runs below write no KV and attend to nothing
        self.dev64, self.dev32 = self.host64.to(dev), self.host32.to(dev)
        self.positions, self.slots, self.last = self.dev64[:t], self.dev64[t:2 * t], self.dev64[2 * t:]
        self.cu_seqlens, self.seq_lens = self.dev32[:b + 1], self.dev32[b + 1:2 * b + 1]
        self.block_tables = self.dev32[2 * b + 1:].view(b, max_blocks)
        self.staged = torch.cuda.Event()  # the host buffers are free again once the copies out of them have run
        self.graphs, _, self.pool = capture(self.buckets, self._forward, pool)

    def _forward(self, tokens: int) -> None:  # output: self.out, shared by all the graphs
        model, r = self.runner.model, self.runner
        md = AttentionMetadata(is_prefill=True, slot_mapping=self.slots[:tokens], block_tables=self.block_tables,
                               seq_lens=self.seq_lens, cu_seqlens_q=self.cu_seqlens, max_seqlen_q=tokens)
        hidden = model(self.embeds[:tokens], self.positions[:tokens], r.cos_sin, md)
        torch.index_select(hidden, 0, self.last, out=self.out)

    def fits(self, num_seqs: int, num_tokens: int) -> bool:
        return num_seqs <= self.max_seqs and num_tokens <= self.buckets[-1]

    def run(self, seqs: list[Sequence], rows) -> torch.Tensor:
        """Hidden states (S, hidden) of the S rows `rows.sample_rows`, un-normed (the LM head's input). `rows`: the
        batch's `PrefillRows`, one chunk per sequence of `seqs`."""
        n, T, S = len(seqs), len(rows.ids), len(rows.sample_rows)
        t, b = self.buckets[-1], self.max_seqs
        tokens = next(k for k in self.buckets if k >= T)
        self.staged.synchronize()  # at once unless a prefill was launched and never resolved
        h64, h32 = self.np64, self.np32
        h64[:T] = rows.rope_rows
        h64[T:t] = 0
        h64[t:t + T] = rows.slots
        h64[t + T:2 * t] = -1  # padding rows write no KV
        h64[2 * t:2 * t + S] = rows.sample_rows
        h64[2 * t + S:] = 0
        h32[:n + 1] = rows.cu_seqlens
        h32[n + 1:b + 1] = T  # padding sequences: no tokens...
        h32[b + 1:b + 1 + n] = rows.seq_lens
        h32[b + 1 + n:2 * b + 1] = 0  # ...and no keys
        tables = h32[2 * b + 1:].reshape(b, self.max_blocks)
        for i, s in enumerate(seqs):  # entries past a sequence's length are never read
            tables[i, :len(s.block_table)] = s.block_table
        self.dev64.copy_(self.host64, non_blocking=True)
        self.dev32.copy_(self.host32, non_blocking=True)
        self.staged.record()
        self.embeds[:T].copy_(self.runner.prefill_embeds(rows))
        self.graphs[tokens].replay()
        return self.out[:S]

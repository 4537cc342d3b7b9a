"""Runs the language model for one scheduled step (engine/paging/scheduler.py's `Batch`): builds the packed inputs,
runs prefill or decode, samples the rows that need a token.

Split by phase: `prepare_prefill` / `prepare_decode` turn chunks into tensors (token ids, positions, slots,
block tables, image embeddings to splice), `launch` queues the step, the sampler picks tokens. A step whose chunks
are all one sampled token runs as a decode step; any other (prompt chunks, with or without other chats' decode
tokens: a decoding sequence is then a one-row chunk with cached context) runs through the prefill path, and only the
last row of each chunk that reaches its sequence's end is sampled. A scoring request's chunks are scored instead, each
row against the next token (engine/runtime/scorer.py), in an eager step. On CUDA, decode replays a CUDA graph captured
for the smallest batch-size bucket that holds the batch, and prefill one captured for the smallest token-count bucket
(engine/cuda_graphs.py; those keep the sampled rows only); batches too large for any, or with scoring rows, run
eagerly.

Rotary embedding reads one row of the runner's cos|sin table per token (engine/runtime/rope.py `RotaryTable`): the
`positions` handed to the model are those rows, which equal the positions except for tokens that dynamic NTK rotates
with a base of their sequence's own length (`Sequence.rope_len`).

`launch` never waits for the device: it returns a `LaunchedStep` whose tokens stay on the device, with a copy on its
way to pinned host memory. A decode step can take its input ids from a step still in flight (`after`), so the
engine queues step N+1 before it reads step N's tokens and the GPU never waits for the host's bookkeeping.
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass

import torch

from engine.models.attention import AttentionMetadata
from engine.paging.block_manager import BlockManager
from engine.config import EngineConfig, RopeConfig
from engine.runtime.kv_cache import allocate
from engine.models.decoder import CausalLM
from engine.runtime.rope import RotaryTable
from engine.runtime.sampler import Sampler, model_logprobs, to_device
from engine.runtime.scorer import chunk_nll
from engine.paging.scheduler import Batch, Chunk
from engine.paging.sequence import Sequence
from engine.sampling_params import TokenLogprob
from kernels.cpu_build import torch_on_one_thread


@dataclass
class PrefillRows:
    """A prefill batch on the host, tokens packed: `cu_seqlens` (B+1) bound each chunk's rows; `seq_lens` count
    its sequence's keys after the step (cached ones included); `sample_rows` are the rows whose logits are sampled
    (the last of each chunk that reaches its sequence's end); `scored` holds each scoring chunk's first row and
    targets (engine/runtime/scorer.py); `splices` say where image features replace placeholder rows: (row, image
    span, first feature row, count); `rope_lens` each row's `Sequence.rope_len` (dynamic NTK only) and `rope_rows`
    its cos|sin row (`RotaryTable.rows`, set when the step is launched)."""

    ids: list[int]
    positions: list[int]
    slots: list[int]
    cu_seqlens: list[int]
    seq_lens: list[int]
    sample_rows: list[int]
    splices: list[tuple]
    scored: list[tuple[int, list[int]]]
    rope_lens: list[int]
    rope_rows: list[int] | None = None


@dataclass
class LaunchedStep:
    """A step queued on the device. Its sampled tokens stay there (`tokens`, the input of a decode step launched
    after it) while a copy travels to `host`; `token_ids()` waits for that copy alone, not for later work, and
    returns one token per sequence of `seqs`: those that sample (`Batch.sampling`), so a chunk that ends inside its
    prompt has no entry, and a step of such chunks alone returns [] (once the step has run)."""

    batch: Batch
    seqs: list[Sequence]
    tokens: torch.Tensor  # (B,) int64 on the device
    host: torch.Tensor  # (B,) int64: pinned on CUDA; `tokens` itself elsewhere
    copied: torch.cuda.Event | None = None  # recorded after the copy to `host`; None where work is synchronous
    losses: torch.Tensor | None = None  # (C,) fp32 NLL sums of the batch's C scoring chunks, in row order
    # Where rows asked for log-probabilities: those R rows' sampled tokens' (R,), top values (R, k) and ids (R, k),
    # on the host (copied before `copied` is recorded): sampler.model_logprobs
    logprobs: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def chunk_losses(self) -> list[tuple[Chunk, float]]:
        """Each scoring chunk with its summed next-token NLL (waits for the step)."""
        scoring = [c for c in self.batch.chunks if c.scores]
        return list(zip(scoring, self.losses.tolist())) if scoring else []

    def token_ids(self) -> list[int]:
        if self.copied is not None:
            self.copied.synchronize()
        return self.host.tolist()

    def token_logprobs(self, tokens: list[int]) -> list[TokenLogprob | None]:
        """Each row's `TokenLogprob` for its token in `tokens` (`token_ids()`), None for a row that did not ask."""
        if self.logprobs is None:
            return [None] * len(tokens)
        if self.copied is not None:
            self.copied.synchronize()
        chosen, values, ids = (iter(t.tolist()) for t in self.logprobs)  # the rows that asked, in batch order
        out = []
        for seq, token in zip(self.seqs, tokens):
            k = seq.params.logprobs
            if k is None:
                out.append(None)
                continue
            top = tuple(zip(next(ids)[:k], next(values)[:k]))
            out.append(TokenLogprob(token, next(chosen), top))
        return out


class ModelRunner:
    def __init__(self, model: CausalLM, cfg: EngineConfig, blocks: BlockManager, max_model_len: int,
                 dtype: torch.dtype, device: torch.device, cuda_graphs: bool = False, rope: RopeConfig | None = None):
        self.model, self.cfg, self.blocks = model, cfg, blocks
        self.device, self.dtype = device, dtype
        self.max_model_len = max_model_len
        self.max_blocks_per_seq = -(-max_model_len // cfg.block_size)
        text = model.config
        # `rope`: the checkpoint's unless the engine overrides it (EngineConfig.rope_scaling_factor). A step computes
        # at most max_num_batched_tokens tokens, so that many step rows hold any step's dynamic-NTK tokens.
        self.rope = RotaryTable(rope or text.rope, text.head_dim, max_model_len, cfg.max_num_batched_tokens, device)
        self.cos_sin = self.rope.table
        self.kv = allocate(text, blocks.num_blocks, cfg.block_size, dtype, device, cfg.kv_cache_dtype == "int8")
        for layer, kv in zip(model.model.layers, self.kv):
            layer.self_attn.attn.bind_cache(*kv)
        self.sampler = Sampler(device)
        if device.type == "cuda":
            # Two pinned outboxes for sampled tokens, used in turn: at most one step is unresolved when another is
            # launched (the engine resolves step N before it launches N+2), so the host has read an outbox before
            # the step after next copies into it again.
            self._outboxes = [(torch.empty(cfg.max_num_seqs, dtype=torch.int64).pin_memory(), torch.cuda.Event())
                              for _ in range(2)]
            self._turn = 0
        self.graphs = self.prefill_graphs = None
        if device.type == "cuda" and cuda_graphs:
            # imported where used: CPU-only installs never need it
            from engine.runtime.cuda_graphs import DecodeGraphs, PrefillGraphs, prefill_buckets

            pool = None
            seqs = min(cfg.cuda_graph_prefill_seqs, cfg.max_num_seqs)
            buckets = prefill_buckets(min(cfg.cuda_graph_prefill_tokens, cfg.max_num_batched_tokens,
                                          seqs * max_model_len))
            if buckets:  # captured first: the largest graphs, whose pool the decode graphs then reuse
                self.prefill_graphs = PrefillGraphs(self, buckets, seqs, self.max_blocks_per_seq)
                pool = self.prefill_graphs.pool
            self.graphs = DecodeGraphs(self, cfg.cuda_graph_batch_sizes, self.max_blocks_per_seq, pool)

    def _tensor(self, values, dtype) -> torch.Tensor:
        return to_device(values, dtype, self.device)

    def _block_tables(self, seqs: list[Sequence]) -> torch.Tensor:
        width = max(len(s.block_table) for s in seqs)
        return self._tensor([s.block_table + [0] * (width - len(s.block_table)) for s in seqs], torch.int32)

    def prefill_rows(self, chunks: list[Chunk]) -> PrefillRows:
        """The host side of a prefill batch: every chunk's tokens packed one after another."""
        rows = PrefillRows([], [], [], [0], [], [], [], [], [])
        for c in chunks:
            seq, start, end = c.seq, c.start, c.end
            base = len(rows.ids)
            rows.ids.extend(seq.token_ids[start:end])
            rows.positions.extend(range(start, end))
            if self.rope.dynamic:
                rows.rope_lens.extend(seq.rope_len(p) for p in range(start, end))
            rows.slots.extend(self.blocks.slot(seq, p) for p in range(start, end))
            rows.cu_seqlens.append(len(rows.ids))
            rows.seq_lens.append(end)
            if c.samples:
                rows.sample_rows.append(len(rows.ids) - 1)
            if c.scores:
                rows.scored.append((base, c.score_targets))
            for span in seq.images:
                lo, hi = max(span.offset, start), min(span.offset + span.length, end)
                if lo < hi:
                    rows.splices.append((base + lo - start, span, lo - span.offset, hi - lo))
        return rows

    def prefill_embeds(self, rows: PrefillRows) -> torch.Tensor:
        """(T, hidden) input embeddings: token embeddings with the image features spliced in."""
        if not rows.splices:
            return self.model.embed(self._tensor(rows.ids, torch.int64))
        image_rows = [r for row, _, _, count in rows.splices for r in range(row, row + count)]
        ids = list(rows.ids)
        for r in image_rows:  # placeholder ids may lie outside the vocabulary (an added <image> token)
            ids[r] = 0
        embeds = self.model.embed(self._tensor(ids, torch.int64))
        feats = torch.cat([span.embeds[first:first + count] for _, span, first, count in rows.splices])
        embeds[self._tensor(image_rows, torch.int64)] = feats.to(device=self.device, dtype=embeds.dtype)
        return embeds

    def prepare_prefill(self, chunks: list[Chunk], rows: PrefillRows | None = None):
        """(embeds, each token's cos|sin row, metadata); the rows' values are queued to the device here."""
        rows = rows or self.prefill_rows(chunks)
        if rows.rope_rows is None:
            rows.rope_rows = self.rope.rows(rows.positions, rows.rope_lens)
        cu = rows.cu_seqlens
        md = AttentionMetadata(
            is_prefill=True, slot_mapping=self._tensor(rows.slots, torch.int64),
            block_tables=self._block_tables([c.seq for c in chunks]),
            seq_lens=self._tensor(rows.seq_lens, torch.int32), cu_seqlens_q=self._tensor(cu, torch.int32),
            max_seqlen_q=max(b - a for a, b in zip(cu, cu[1:])))
        return self.prefill_embeds(rows), self._tensor(rows.rope_rows, torch.int64), md

    def decode_rows(self, seqs: list[Sequence], ahead: bool) -> tuple[list[int], list[int], list[int]]:
        """Positions, KV slots and cos|sin rows of a decode step's input tokens: each sequence's last token
        (position len - 1), or with `ahead` the token a step in flight is still sampling (position len). Keys
        attended: position + 1. The rows' values are queued to the device here."""
        positions = [len(s) - 1 + ahead for s in seqs]
        lens = [s.rope_len(p) for s, p in zip(seqs, positions)] if self.rope.dynamic else []
        rope_rows = self.rope.rows(positions, lens)
        return positions, [self.blocks.slot(s, p) for s, p in zip(seqs, positions)], rope_rows

    def prepare_decode(self, seqs: list[Sequence], pending: torch.Tensor | None = None):
        """Decode inputs: each sequence's last token, or with `pending` ((B,) device ids that a step in flight
        sampled and the host has not appended yet) those ids (`decode_rows`)."""
        ahead = pending is not None
        positions, slots, rope_rows = self.decode_rows(seqs, ahead)
        md = AttentionMetadata(is_prefill=False, slot_mapping=self._tensor(slots, torch.int64),
                               block_tables=self._block_tables(seqs),
                               seq_lens=self._tensor([p + 1 for p in positions], torch.int32))
        ids = pending if ahead else self._tensor([s.last_token for s in seqs], torch.int64)
        return ids, self._tensor(rope_rows, torch.int64), md

    def _pending_ids(self, seqs: list[Sequence], after: LaunchedStep) -> torch.Tensor:
        """`after`'s tokens for `seqs`, gathered on the device. The batch is `after`'s minus the sequences that
        finish with it, in the same order; when none finish, the tokens are used as they are."""
        if len(seqs) == len(after.seqs):
            return after.tokens
        row = {s.seq_id: i for i, s in enumerate(after.seqs)}
        return after.tokens[self._tensor([row[s.seq_id] for s in seqs], torch.int64)]

    def _logits(self, batch: Batch, pending: torch.Tensor | None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(S, V) logits of the S rows that sample (`Batch.sampling`), or None where no row samples; and the NLL
        sums of the scoring chunks (`LaunchedStep.losses`), or None where there are none."""
        seqs = batch.seqs
        if batch.is_decode:
            if self.graphs is not None and self.graphs.fits(len(seqs)):
                return self.graphs.run(seqs, pending), None
            ids, rope_rows, md = self.prepare_decode(seqs, pending)
            return self.model.logits(self.model(self.model.embed(ids), rope_rows, self.cos_sin, md)), None
        rows = self.prefill_rows(batch.chunks)
        rows.rope_rows = self.rope.rows(rows.positions, rows.rope_lens)
        losses = None
        if not rows.scored and self.prefill_graphs is not None and self.prefill_graphs.fits(len(seqs), len(rows.ids)):
            hidden = self.prefill_graphs.run(seqs, rows)  # the graphs keep the sampled rows only
        else:
            embeds, rope_rows, md = self.prepare_prefill(batch.chunks, rows)
            hidden = self.model(embeds, rope_rows, self.cos_sin, md)
            if rows.scored:
                losses = chunk_nll(self.model, hidden, rows.scored)
            hidden = hidden[self._tensor(rows.sample_rows, torch.int64)]
        return (self.model.logits(hidden) if rows.sample_rows else None), losses

    def _torch_threads(self, batch: Batch):
        """One torch thread for a CPU decode step that runs on the C kernels' own pool (kernels/cpu_build.py
        `torch_on_one_thread`), torch's thread count for any other step. Measured on 2 cores (the embedded default,
        Q4_1 kept; with and without it interleaved in one process): 65 -> 72 tokens/s greedy, 63 -> 75 with the
        chat's sampling, 145 -> 161 for 4 chats at once."""
        if self.device.type == "cpu" and batch.is_decode and self.model.decodes_on_host_pool(len(batch.seqs)):
            return torch_on_one_thread()
        return contextlib.nullcontext()

    @torch.inference_mode()
    def launch(self, batch: Batch, after: LaunchedStep | None = None) -> LaunchedStep:
        """Queue one step and return without waiting for it. `after`: the decode step still in flight whose sampled
        tokens are this decode step's input ids; they go from its output to this step's input on the device."""
        assert after is None or batch.is_decode, "only a decode step takes its input from the device"
        seqs = batch.sampling
        pending = None if after is None else self._pending_ids(seqs, after)
        logprobs = None
        with self._torch_threads(batch):
            logits, losses = self._logits(batch, pending)
            if logits is None:
                tokens = torch.empty(0, dtype=torch.int64, device=self.device)
            else:
                wanted = model_logprobs(logits, seqs)  # before sampling adjusts the logits
                tokens = self.sampler(logits, seqs, pending)
                logprobs = None if wanted is None else wanted.pick(tokens)
        if self.device.type != "cuda":
            return LaunchedStep(batch, seqs, tokens, tokens, losses=losses, logprobs=logprobs)
        host, copied = self._outboxes[self._turn]
        self._turn ^= 1
        host = host[:len(seqs)]
        host.copy_(tokens, non_blocking=True)
        if logprobs is not None:  # rare (a request asked): fresh host tensors, queued before `copied` is recorded
            logprobs = tuple(t.to("cpu", non_blocking=True) for t in logprobs)
        copied.record()
        return LaunchedStep(batch, seqs, tokens, host, copied, losses, logprobs)

"""Paged KV-cache bookkeeping: which physical block holds which part of which sequence, with prefix caching.

Pure Python. A full block is keyed by a chained hash of (previous block's key, its token ids, the images it
covers, the length its keys were rotated for where dynamic NTK makes that matter: `_rope_key`); a later sequence
with the same prefix (a retry, a follow-up turn, the same system prompt) reuses those blocks instead of recomputing
them. Freed blocks keep their key until they are handed out again, so a prefix survives the request that made it. Tensors live in engine/kv_cache.py; this file never sees them.
"""
from __future__ import annotations

from collections import deque

from engine.paging.sequence import Sequence


class Block:
    __slots__ = ("block_id", "ref_count", "key", "token_ids")

    def __init__(self, block_id: int):
        self.block_id = block_id
        self.ref_count = 0
        self.key: int | None = None
        self.token_ids: tuple[int, ...] = ()


class BlockManager:
    def __init__(self, num_blocks: int, block_size: int, enable_prefix_caching: bool = True,
                 dynamic_rope_from: int | None = None):
        if num_blocks < 1:
            raise ValueError("the KV cache needs at least one block")
        self.block_size = block_size
        self.blocks = [Block(i) for i in range(num_blocks)]
        self.free_ids: deque[int] = deque(range(num_blocks))
        self.key_to_block: dict[int, int] = {}
        self.prefix_caching = enable_prefix_caching
        self.dynamic_rope_from = dynamic_rope_from  # RopeConfig.dynamic_from of the model's rope

    @property
    def num_blocks(self) -> int:
        return len(self.blocks)

    @property
    def num_free(self) -> int:
        return len(self.free_ids)

    def _key(self, seq: Sequence, i: int, prev: int | None) -> int:
        return hash((prev, tuple(seq.block_tokens(i, self.block_size)), seq.block_extra_key(i, self.block_size),
                     self._rope_key(seq, i)))

    def _rope_key(self, seq: Sequence, i: int) -> int | None:
        """What besides positions decides how block i's keys were rotated: None where every token used the trained
        base (its `Sequence.rope_len` within the trained length); else the prefill length, raised to the block's
        first position + 1 (below that, every token of the block was decoded, each rotated for its own position + 1,
        whatever the prefill length). So past the trained length a block is shared only with a sequence that rotated
        it the same way: a retry of the same prompt, not a longer follow-up."""
        lo, hi = i * self.block_size, (i + 1) * self.block_size
        if self.dynamic_rope_from is None or seq.rope_len(hi - 1) <= self.dynamic_rope_from:
            return None
        return max(seq.prefill_len, lo + 1)

    def _take(self) -> Block:
        block_id = self.free_ids.popleft()
        block = self.blocks[block_id]
        if block.ref_count == 0 and block.key is not None and self.key_to_block.get(block.key) == block_id:
            del self.key_to_block[block.key]  # overwritten from now on: forget what it held
        block.key, block.token_ids = None, ()
        block.ref_count = 1
        return block

    def _register(self, block: Block, key: int, tokens: list[int]) -> None:
        block.key, block.token_ids = key, tuple(tokens)
        self.key_to_block[key] = block.block_id

    def _lookup(self, key: int, tokens: list[int]) -> Block | None:
        block_id = self.key_to_block.get(key)
        if block_id is None:
            return None
        block = self.blocks[block_id]
        return block if block.token_ids == tuple(tokens) else None  # guard against a hash collision

    def can_allocate(self, seq: Sequence) -> bool:
        return self.num_free >= seq.num_blocks(self.block_size)

    def allocate(self, seq: Sequence) -> None:
        """Give a waiting sequence blocks for its whole prompt, reusing cached prefix blocks. The new blocks get
        keys only as the steps that compute them are scheduled (`register_full_blocks`), so a prefix hit never finds
        a block whose KV a later chunk has yet to compute."""
        assert not seq.block_table
        seq.prefill_len = len(seq)
        prev, hit_run = None, self.prefix_caching and seq.caches_prefix
        for i in range(seq.num_blocks(self.block_size)):
            tokens = seq.block_tokens(i, self.block_size)
            cached = None
            if hit_run and len(tokens) == self.block_size:
                prev = self._key(seq, i, prev)
                cached = self._lookup(prev, tokens)
            if cached is None:
                hit_run = False
                block = self._take()
            else:
                if cached.ref_count == 0:
                    self.free_ids.remove(cached.block_id)
                cached.ref_count += 1
                block = cached
                seq.num_cached_tokens += self.block_size
            seq.block_table.append(block.block_id)
        # The last prompt token is always recomputed: its logits start the reply.
        seq.num_cached_tokens = min(seq.num_cached_tokens, len(seq) - 1)
        seq.num_computed_tokens = seq.num_cached_tokens

    def free(self, seq: Sequence) -> None:
        for block_id in reversed(seq.block_table):
            block = self.blocks[block_id]
            block.ref_count -= 1
            if block.ref_count == 0:
                self.free_ids.append(block_id)
        seq.block_table = []
        seq.num_cached_tokens = seq.num_computed_tokens = 0

    def needs_block(self, seq: Sequence, ahead: int = 0) -> bool:
        """Whether the next decode step needs a fresh block: it writes the KV of the newest token (position
        len(seq) - 1), or with ahead=1 of the token still being sampled on the device (position len(seq))."""
        return len(seq) + ahead > len(seq.block_table) * self.block_size

    def can_append(self, seq: Sequence) -> bool:
        """Room for the KV of the token just sampled (it is written in the next decode step)."""
        return self.num_free >= int(self.needs_block(seq))

    def append_slot(self, seq: Sequence) -> None:
        """Before a decode step: make sure the newest token has a slot; register blocks that just filled up."""
        if self.needs_block(seq):
            seq.block_table.append(self._take().block_id)
        self.register_full_block(seq)

    def append_slot_ahead(self, seq: Sequence) -> None:
        """Before a decode step launched ahead of its input token (overlap: that token is still being sampled on the
        device): a slot for position len(seq). The block that token may fill cannot be keyed yet, since keys hash
        token ids; the engine calls `register_full_block` once the token is known."""
        if self.needs_block(seq, ahead=1):
            seq.block_table.append(self._take().block_id)

    def register_full_block(self, seq: Sequence) -> None:
        """If the newest token completes a block, key the block for later prefixes (`register_full_blocks`)."""
        self.register_full_blocks(seq, len(seq) - 1, len(seq))

    def register_full_blocks(self, seq: Sequence, start: int, end: int) -> None:
        """Key the blocks that positions [start, end) complete, for later prefixes. Called once the step that
        computes those positions' KV is scheduled: a keyed block must never lack KV that a later prefix hit would
        read (a sequence admitted later in the same step may hit it: each layer writes the step's KV before it
        attends). Only an unbroken chain of keys from block 0 is extended."""
        if not (self.prefix_caching and seq.caches_prefix):
            return
        for i in range(start // self.block_size, min(end, len(seq)) // self.block_size):
            block = self.blocks[seq.block_table[i]]
            prev = self.blocks[seq.block_table[i - 1]].key if i > 0 else None
            if block.key is None and (i == 0 or prev is not None):
                key = self._key(seq, i, prev)
                if key not in self.key_to_block:
                    self._register(block, key, seq.block_tokens(i, self.block_size))

    def unkey_from(self, seq: Sequence, position: int) -> None:
        """Forget the keys of the sequence's blocks from the one holding `position` on: a step that failed may have
        left their KV unwritten (engine.llm_engine.LLMEngine.recover). Earlier blocks were computed by steps that
        succeeded, or found in the cache."""
        for block_id in seq.block_table[position // self.block_size:]:
            block = self.blocks[block_id]
            if block.key is not None and self.key_to_block.get(block.key) == block_id:
                del self.key_to_block[block.key]
            block.key, block.token_ids = None, ()

    def slot(self, seq: Sequence, position: int) -> int:
        return seq.block_table[position // self.block_size] * self.block_size + position % self.block_size

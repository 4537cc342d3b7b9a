"""Decides what runs in the next step: a batch of prefills, or one decode token for every running sequence.

Pure Python. Admission is by free KV blocks, so a request that cannot fit waits instead of crashing the server;
when decoding runs out of blocks the newest sequence is preempted (its blocks freed, its tokens kept) and
recomputed later, which the prefix cache makes cheap.
"""
from __future__ import annotations

from collections import deque

from engine.block_manager import BlockManager
from engine.sequence import FinishReason, Sequence, Status


class Scheduler:
    def __init__(self, block_manager: BlockManager, max_num_seqs: int, max_num_batched_tokens: int,
                 max_model_len: int):
        self.blocks = block_manager
        self.max_num_seqs = max_num_seqs
        self.max_num_batched_tokens = max_num_batched_tokens
        self.max_model_len = max_model_len
        self.waiting: deque[Sequence] = deque()
        self.running: list[Sequence] = []

    @property
    def max_tokens_per_seq(self) -> int:
        """The longest sequence that can ever run: the model's context, capped by the whole KV cache."""
        return min(self.max_model_len, self.blocks.num_blocks * self.blocks.block_size)

    def add(self, seq: Sequence) -> bool:
        """Queue a sequence; a prompt that can never fit is finished at once with reason CONTEXT."""
        if len(seq) >= self.max_tokens_per_seq:
            seq.finish(FinishReason.CONTEXT)
            return False
        self.waiting.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill)."""
        batch, tokens = [], 0
        while self.waiting and len(self.running) + len(batch) < self.max_num_seqs:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached_tokens
            if batch and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self.blocks.can_allocate(seq):
                break
            self.blocks.allocate(seq)
            tokens += len(seq) - seq.num_cached_tokens
            seq.status = Status.RUNNING
            batch.append(self.waiting.popleft())
        if batch:
            self.running.extend(batch)
            return batch, True

        batch = []
        for seq in list(self.running):
            if seq not in self.running:  # preempted below in this loop
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                batch.append(seq)
        return batch, False

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def finish(self, seq: Sequence, reason: FinishReason) -> None:
        seq.finish(reason)
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.is_finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, FinishReason.ABORT)

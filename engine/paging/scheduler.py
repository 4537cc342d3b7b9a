"""Decides what runs in the next step: a batch of prefills, or one decode token for every running sequence.

Pure Python. Admission is by free KV blocks, so a request that cannot fit waits instead of crashing the server;
when decoding runs out of blocks the newest sequence is preempted (its blocks freed, its tokens kept) and
recomputed later, which the prefix cache makes cheap. `schedule_ahead` picks the decode step that the engine may
launch while the previous one is still on the device (overlap), and says no where the tokens of that one are needed
first: a request to admit, or a preemption to decide.
"""
from __future__ import annotations

from collections import deque

from engine.paging.block_manager import BlockManager
from engine.paging.sequence import EngineError, ErrorCode, FinishReason, Sequence, Status


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
        """Queue a sequence; a prompt that can never fit is finished at once (ERROR, CONTEXT_EXCEEDED)."""
        if len(seq) >= self.max_tokens_per_seq:
            seq.finish(FinishReason.ERROR, EngineError(
                ErrorCode.CONTEXT_EXCEEDED, f"{len(seq)} prompt tokens, at most {self.max_tokens_per_seq - 1}"))
            return False
        self.waiting.append(seq)
        return True

    def has_work(self) -> bool:
        return bool(self.waiting or self.running)

    def limit_reason(self, seq: Sequence, pending: int = 0) -> FinishReason | None:
        """LENGTH or CONTEXT if the sequence, once `pending` more tokens are appended, has reached a limit."""
        if seq.num_output_tokens + pending >= seq.params.max_new_tokens:
            return FinishReason.LENGTH
        if len(seq) + pending >= self.max_tokens_per_seq:
            return FinishReason.CONTEXT
        return None

    def _admissible(self, seq: Sequence, batch: list[Sequence]) -> bool:
        """The head-of-queue test of `schedule`: room for one more sequence, its images encoded, its blocks free.
        A suspect (in a step that failed, engine.llm_engine) is prefilled alone, so it can only fail by itself."""
        return (len(self.running) + len(batch) < self.max_num_seqs and seq.images_ready
                and not (batch and (seq.suspect or batch[0].suspect)) and self.blocks.can_allocate(seq))

    def can_admit(self) -> bool:
        """Whether `schedule` would start a prefill now."""
        return bool(self.waiting) and self._admissible(self.waiting[0], [])

    def schedule(self) -> tuple[list[Sequence], bool]:
        """Returns (sequences, is_prefill)."""
        batch, tokens = [], 0
        while self.waiting:
            seq = self.waiting[0]
            new_tokens = len(seq) - seq.num_cached_tokens
            if batch and tokens + new_tokens > self.max_num_batched_tokens:
                break
            if not self._admissible(seq, batch):
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

    def schedule_ahead(self, in_flight: list[Sequence]) -> list[Sequence]:
        """The next decode step, chosen while the step `in_flight` is still sampling one token for each of its
        sequences; [] when it must wait for those tokens and go through `schedule`.

        The batch is every sequence of `in_flight` that surely still runs once its pending token is appended: not
        finished or aborted, and not reaching max_new_tokens or the context with that token, which is known
        without its value. One that stops on EOS or a stop string anyway has its extra token discarded. The step
        writes each pending token's KV at position len(seq), so a slot there is reserved now. It waits instead when
        a queued request could be admitted (a prefill must not be delayed by more than one step) or when the slots
        do not fit (`schedule` then preempts as usual).
        """
        if self.can_admit():
            return []
        batch = [s for s in in_flight if s.status is Status.RUNNING and self.limit_reason(s, pending=1) is None]
        if sum(self.blocks.needs_block(s, ahead=1) for s in batch) > self.blocks.num_free:
            return []
        for seq in batch:
            self.blocks.append_slot_ahead(seq)
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        seq.status = Status.WAITING
        self.waiting.appendleft(seq)

    def requeue(self, seq: Sequence) -> None:
        """Back to the front of the queue, its blocks freed, to be recomputed (after a failed step)."""
        if seq in self.running:
            self._preempt(seq)

    def finish(self, seq: Sequence, reason: FinishReason, error: EngineError | None = None) -> None:
        seq.finish(reason, error)
        if seq in self.running:
            self.running.remove(seq)
            self.blocks.free(seq)

    def abort(self, seq: Sequence) -> None:
        if seq.is_finished:
            return
        if seq in self.waiting:
            self.waiting.remove(seq)
        self.finish(seq, FinishReason.ABORT)

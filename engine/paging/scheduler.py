"""Decides what runs in the next step: the next token of every decoding sequence, then prompt chunks within a
per-step token budget (chunked prefill).

Pure Python. A step computes at most `max_num_batched_tokens` tokens: first the newest token of each decoding
sequence, then the next chunk of the prompts already being prefilled (oldest first), then new admissions, each as
much of its prompt as the budget has left. So a long prompt is prefilled over several steps and every other chat
still gets a token in each of them: it slows them by a bounded factor instead of freezing them. A sequence samples a
token only in the step whose chunk reaches its end; earlier chunks sample nothing, and a scoring request's chunks never
do (engine.llm_engine: it ends with its prompt).

Admission is by free KV blocks for the whole prompt, allocated at once, so a prefill that has started never waits for
blocks. When decoding runs out of blocks the newest sequence is preempted (its blocks freed, its tokens kept, its
prefill progress dropped) and recomputed later, which the prefix cache makes cheap: the blocks its chunks completed
keep their keys. `schedule_ahead` picks the decode step that the engine may launch while the previous one is still
on the device (overlap), and says no where the tokens of that one are needed first: a request to admit, a prompt
still being prefilled, or a preemption to decide. Execution (which kernels, CUDA graphs) is engine/runtime's.
"""
from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field

from engine.paging.block_manager import BlockManager
from engine.paging.sequence import EngineError, ErrorCode, FinishReason, Sequence, Status


@dataclass(frozen=True)
class Chunk:
    """Positions [start, end) of `seq` whose KV one step computes. `samples`: the chunk reaches the sequence's end,
    so the step samples its next token from the chunk's last row."""

    seq: Sequence
    start: int
    end: int
    samples: bool

    @property
    def scores(self) -> bool:
        """The chunk belongs to a scoring request: the step scores its rows' next tokens instead of sampling."""
        return self.seq.score is not None

    @property
    def num_tokens(self) -> int:
        return self.end - self.start

    @property
    def score_targets(self) -> list[int]:
        """A scoring chunk's targets: the token after each of its rows (none after the sequence's last)."""
        return self.seq.token_ids[self.start + 1:self.end + 1]


@dataclass
class Batch:
    """One step's work: chunks in row order. Empty when nothing can run."""

    chunks: list[Chunk] = field(default_factory=list)

    @property
    def seqs(self) -> list[Sequence]:
        return [c.seq for c in self.chunks]

    @property
    def sampling(self) -> list[Sequence]:
        """The sequences that get a token from this step, in row order."""
        return [c.seq for c in self.chunks if c.samples]

    @property
    def num_tokens(self) -> int:
        return sum(c.num_tokens for c in self.chunks)

    @property
    def is_decode(self) -> bool:
        """Every chunk is one token that samples and is no image placeholder: the step can run as a decode step
        (one token id per sequence: the decode CUDA graphs, and launched ahead under overlap)."""
        return bool(self.chunks) and all(c.samples and c.num_tokens == 1 and not c.seq.in_image(c.start)
                                         for c in self.chunks)


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

    def max_prompt_tokens(self, scoring: bool = False) -> int:
        """The longest prompt that can run: room for one reply token, or for a scoring request (no reply) the
        whole context."""
        return self.max_tokens_per_seq - (not scoring)

    def add(self, seq: Sequence) -> bool:
        """Queue a sequence; a prompt that can never fit is finished at once (ERROR, CONTEXT_EXCEEDED)."""
        limit = self.max_prompt_tokens(seq.score is not None)
        if len(seq) > limit:
            seq.finish(FinishReason.ERROR, EngineError(
                ErrorCode.CONTEXT_EXCEEDED, f"{len(seq)} prompt tokens, at most {limit}"))
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

    def _admissible(self, seq: Sequence) -> bool:
        """The head-of-queue test: room for one more sequence, its images encoded, blocks for its whole prompt."""
        return len(self.running) < self.max_num_seqs and seq.images_ready and self.blocks.can_allocate(seq)

    def can_admit(self) -> bool:
        """Whether `schedule` would start a prefill now."""
        return bool(self.waiting) and self._admissible(self.waiting[0])

    def _admit(self) -> Sequence:
        seq = self.waiting.popleft()
        self.blocks.allocate(seq)
        seq.status = Status.RUNNING
        self.running.append(seq)
        return seq

    def _chunk(self, seq: Sequence, budget: int) -> Chunk:
        """The next `budget` tokens at most of what the sequence has left to compute, counted as computed now."""
        start = seq.num_computed_tokens
        end = min(len(seq), start + budget)
        seq.num_computed_tokens = end
        self.blocks.register_full_blocks(seq, start, end)
        return Chunk(seq, start, end, end == len(seq) and seq.score is None)  # a scoring request never samples

    def _next_prompt(self) -> Sequence | None:
        """Whose prompt chunk comes first: the oldest running sequence still prefilling, else the queue's head if it
        can be admitted."""
        seq = next((s for s in self.running if s.num_uncomputed_tokens > 1), None)
        return seq if seq is not None or not self.can_admit() else self.waiting[0]

    def schedule(self) -> Batch:
        """The next step: one token for every decoding sequence (preempting the newest while blocks run out), then
        prompt chunks in the budget left. A suspect (in a step that failed, engine.llm_engine) is prefilled alone, so
        it can only fail by itself: while its prompt is next in line, its chunks are whole steps."""
        head = self._next_prompt()
        if head is not None and head.suspect:
            if head.status is Status.WAITING:
                self._admit()
            return Batch([self._chunk(head, self.max_num_batched_tokens)])
        batch = Batch()
        self._schedule_decodes(batch)
        budget = self.max_num_batched_tokens - len(batch.chunks)
        for seq in [s for s in self.running if s.num_uncomputed_tokens > 1]:  # prompts under way, oldest first
            if budget <= 0 or seq.suspect:
                return batch
            batch.chunks.append(self._chunk(seq, budget))
            budget -= batch.chunks[-1].num_tokens
        while budget > 0 and self.can_admit() and not self.waiting[0].suspect:
            batch.chunks.append(self._chunk(self._admit(), budget))
            budget -= batch.chunks[-1].num_tokens
        return batch

    def _schedule_decodes(self, batch: Batch) -> None:
        for seq in list(self.running):
            if seq not in self.running or seq.num_uncomputed_tokens != 1:  # preempted below, or prefilling
                continue
            while not self.blocks.can_append(seq):
                victim = self.running[-1]
                self._preempt(victim)
                if victim is seq:
                    break
            else:
                self.blocks.append_slot(seq)
                batch.chunks.append(self._chunk(seq, 1))

    def schedule_ahead(self, in_flight: list[Sequence]) -> Batch:
        """The next decode step, chosen while the step `in_flight` is still sampling one token for each of its
        sequences; empty when it must wait for those tokens and go through `schedule`.

        The batch is every sequence of `in_flight` that surely still runs once its pending token is appended: not
        finished or aborted, and not reaching max_new_tokens or the context with that token, which is known
        without its value. One that stops on EOS or a stop string anyway has its extra token discarded. The step
        writes each pending token's KV at position len(seq), so a slot there is reserved now. It waits instead when
        a queued request could be admitted (a prefill must not be delayed by more than one step), when a running
        sequence has work besides its pending token (a prompt being prefilled), or when the slots do not fit
        (`schedule` then preempts as usual).
        """
        if self.can_admit() or any(s.num_uncomputed_tokens > 0 for s in self.running):
            return Batch()
        seqs = [s for s in in_flight if s.status is Status.RUNNING and self.limit_reason(s, pending=1) is None]
        if sum(self.blocks.needs_block(s, ahead=1) for s in seqs) > self.blocks.num_free:
            return Batch()
        batch = Batch()
        for seq in seqs:
            self.blocks.append_slot_ahead(seq)
            seq.num_computed_tokens += 1  # the pending token, at position len(seq)
            batch.chunks.append(Chunk(seq, len(seq), len(seq) + 1, True))
        return batch

    def _preempt(self, seq: Sequence) -> None:
        self.running.remove(seq)
        self.blocks.free(seq)
        if seq.score is not None:
            seq.score.reset()
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

"""Serving many clients from one engine: one loop thread owns the engine; each request streams its deltas.

Clients call `submit()` from any thread (or event loop) and iterate the returned `RequestStream`, with `for` or
`async for`; closing the stream (or leaving the loop early, or a generator's `finally`) aborts the request, and its
KV blocks are freed at the next step, so Stop, Undo, Retry and a closed tab end the engine's work. All model work
(vision encoding, prefill, decode, graph replays, the caches) happens on the loop thread: submits and aborts travel
to it as commands through a queue. A step that raises puts the requests that were in it back in the queue to be
retried one at a time (engine.llm_engine.LLMEngine.recover), so the request that caused it fails alone, with a typed
error, and the loop keeps serving. `close()` stops the loop and joins its thread.
"""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
import time
from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.paging.sequence import EngineError, FinishReason, ImageSpan, Score, Sequence
from engine.sampling_params import SamplingParams, TokenLogprob

log = logging.getLogger(__name__)


@dataclass
class Delta:
    text: str
    finish_reason: FinishReason | None = None
    error: EngineError | None = None
    logprobs: tuple[TokenLogprob, ...] = ()  # the step's token's, where the request asked (text may lag behind)


@dataclass
class RequestStats:
    prompt_tokens: int = 0
    image_tokens: int = 0
    cached_tokens: int = 0
    generated_tokens: int = 0
    submitted_at: float = field(default_factory=time.perf_counter)
    first_token_at: float | None = None
    finished_at: float | None = None

    @property
    def ttft_s(self) -> float:
        return (self.first_token_at or self.submitted_at) - self.submitted_at

    @property
    def decode_tokens_per_s(self) -> float:
        if self.first_token_at is None or self.finished_at is None or self.generated_tokens < 2:
            return 0.0
        return (self.generated_tokens - 1) / max(self.finished_at - self.first_token_at, 1e-9)


class RequestStream:
    """Iterate (`for` or `async for`) for `Delta`s; the last one carries the finish reason. `close()` aborts.
    `position` is the request's place in the engine's queue while it waits to start (None once it runs)."""

    def __init__(self, server: "EngineServer", seq: Sequence):
        self.server, self.seq = server, seq
        self.queue: queue.Queue[Delta] = queue.Queue()
        self.stats = RequestStats(prompt_tokens=len(seq), image_tokens=seq.image_tokens)
        self.finish_reason: FinishReason | None = None
        self.error: EngineError | None = None
        self._lock = threading.Lock()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._aqueue: asyncio.Queue | None = None

    @property
    def position(self) -> int | None:
        return self.server.positions.get(self.seq.seq_id)

    def deliver(self, delta: Delta) -> None:
        """Called by the loop thread."""
        with self._lock:
            if self._loop is None:
                self.queue.put(delta)
                return
            loop, aqueue = self._loop, self._aqueue
        try:
            loop.call_soon_threadsafe(aqueue.put_nowait, delta)
        except RuntimeError:  # the consumer's event loop is closed: nobody is listening any more
            pass

    def _take(self, delta: Delta) -> Delta:
        if delta.finish_reason is not None:
            self.finish_reason, self.error = delta.finish_reason, delta.error
        return delta

    def get(self, timeout: float | None = None) -> Delta | None:
        """The next delta, or None after `timeout` seconds with none (to show a queue position meanwhile)."""
        try:
            return self._take(self.queue.get(timeout=timeout))
        except queue.Empty:
            return None

    def __iter__(self):
        try:
            while self.finish_reason is None:
                yield self.get()
        finally:
            self.close()

    async def __aiter__(self):
        with self._lock:  # from now on the loop thread hands deltas to this event loop
            self._loop, self._aqueue = asyncio.get_running_loop(), asyncio.Queue()
            while not self.queue.empty():
                self._aqueue.put_nowait(self.queue.get_nowait())
        try:
            while self.finish_reason is None:
                yield self._take(await self._aqueue.get())
        finally:
            self.close()

    def close(self) -> None:
        if self.finish_reason is None:
            self.server.commands.put(Abort(self.seq))


@dataclass(frozen=True)
class Submit:
    stream: RequestStream


@dataclass(frozen=True)
class Abort:
    seq: Sequence


class Stop:
    pass


class EngineServer:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self.commands: queue.Queue[Submit | Abort | Stop] = queue.Queue()
        self.positions: dict[int, int] = {}  # seq_id -> place in the waiting queue (1 = next), published per step
        self._streams: dict[int, RequestStream] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams, images: tuple[ImageSpan, ...] = (),
               score: bool = False) -> RequestStream:
        """Queue a request. `params` was checked when it was made (sampling_params.InvalidParameter). `score`: a
        scoring request (engine.llm_engine): no reply; once it finishes, `stream.seq.score` holds its result."""
        if not self._thread.is_alive():
            raise RuntimeError("the engine is closed")
        stream = RequestStream(self, Sequence(prompt_ids, params, images, Score() if score else None))
        self.commands.put(Submit(stream))
        return stream

    def close(self, timeout: float = 30.0) -> None:
        """Stop the loop after its current step, end every open request (ABORT), and join the thread: nothing of
        the engine runs once this returns, so the interpreter can exit cleanly."""
        if self._thread.is_alive():
            self.commands.put(Stop())
            self._thread.join(timeout)

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_work()
            try:
                while True:
                    command = self.commands.get(block=block)
                    if isinstance(command, Stop):
                        self._shutdown()
                        return
                    self._handle(command)
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_work():
                self._step()

    def _handle(self, command: Submit | Abort) -> None:
        if isinstance(command, Submit):
            stream = command.stream
            seq = self.engine.add_sequence(stream.seq)
            stream.stats.submitted_at = time.perf_counter()
            if seq.is_finished:  # refused: cannot fit, or images on a text-only model
                stream.deliver(Delta("", seq.finish_reason, seq.error))
            else:
                self._streams[seq.seq_id] = stream
                self._publish_positions()
        else:
            stream = self._streams.pop(command.seq.seq_id, None)
            if stream is not None:
                self.engine.abort(command.seq)
                stream.finish_reason = FinishReason.ABORT

    def _shutdown(self) -> None:
        for seq_id, stream in list(self._streams.items()):
            self.engine.abort(stream.seq)
            stream.deliver(Delta("", FinishReason.ABORT))
        self._streams.clear()

    def _publish_positions(self) -> None:
        self.positions = {s.seq_id: i for i, s in enumerate(self.engine.scheduler.waiting, 1)
                          if s.num_output_tokens == 0}

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # noqa: BLE001 -- keep serving; the requests in the step are retried alone
            log.error("engine step failed: %s", type(exc).__name__)  # no user data in logs
            outputs = [(seq, Delta("", seq.finish_reason, seq.error))
                       for seq in self.engine.recover(f"{type(exc).__name__}: {exc}")]
            self._deliver(outputs, time.perf_counter())
            return
        self._deliver([(o.seq, Delta(o.text, o.finish_reason, o.seq.error, (o.logprob,) if o.logprob else ()))
                       for o in outputs], time.perf_counter())
        self._publish_positions()

    def _deliver(self, outputs: list[tuple[Sequence, Delta]], now: float) -> None:
        for seq, delta in outputs:
            stream = self._streams.get(seq.seq_id)
            if stream is None:
                continue
            stats = stream.stats
            if stats.first_token_at is None and seq.num_output_tokens:
                stats.first_token_at = now
                stats.cached_tokens = seq.num_cached_tokens
            stats.generated_tokens = seq.num_output_tokens
            if delta.finish_reason is not None:
                stats.finished_at = now
                del self._streams[seq.seq_id]
            stream.deliver(delta)

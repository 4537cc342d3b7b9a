"""Serving many clients from one engine: a background thread steps the engine; each request streams its deltas.

Clients call `submit()` from any thread and iterate the returned `RequestStream`; closing the stream (or leaving a
`for` loop early, or a generator's `finally`) aborts the request, and its KV blocks are freed at the next step, so
Stop, Undo, Retry and a closed tab end the engine's work. Engine state is touched only on the loop thread: submits
and aborts travel to it through a queue. A step that raises (out of memory, say) ends the requests in flight with
finish reason ERROR and a message, and the loop keeps serving.
"""
from __future__ import annotations

import queue
import threading
import time
from dataclasses import dataclass, field

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.sequence import FinishReason, ImageSpan, Sequence


@dataclass
class Delta:
    text: str
    finish_reason: FinishReason | None = None
    error: str | None = None


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
    """Iterate for `Delta`s; the last one carries the finish reason. `close()` aborts."""

    def __init__(self, server: "EngineServer", seq: Sequence):
        self.server, self.seq = server, seq
        self.queue: queue.Queue[Delta] = queue.Queue()
        self.stats = RequestStats(prompt_tokens=len(seq), image_tokens=seq.image_tokens)
        self.finish_reason: FinishReason | None = None
        self.error: str | None = None

    def __iter__(self):
        try:
            while self.finish_reason is None:
                delta = self.queue.get()
                if delta.finish_reason is not None:
                    self.finish_reason, self.error = delta.finish_reason, delta.error
                yield delta
        finally:
            self.close()

    def close(self) -> None:
        if self.finish_reason is None:
            self.server._commands.put(("abort", self.seq))


class EngineServer:
    def __init__(self, engine: LLMEngine):
        self.engine = engine
        self._commands: queue.Queue = queue.Queue()
        self._streams: dict[int, RequestStream] = {}
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self._thread.start()

    def submit(self, prompt_ids: list[int], params: SamplingParams,
               images: tuple[ImageSpan, ...] = ()) -> RequestStream:
        seq = Sequence(prompt_ids, params, images)
        stream = RequestStream(self, seq)
        self._commands.put(("add", stream))
        return stream

    def _loop(self) -> None:
        while True:
            block = not self.engine.has_work()
            try:
                while True:
                    self._handle(*self._commands.get(block=block))
                    block = False
            except queue.Empty:
                pass
            if self.engine.has_work():
                self._step()

    def _handle(self, kind: str, item) -> None:
        if kind == "add":
            stream: RequestStream = item
            seq = self.engine.add_sequence(stream.seq)
            stream.stats.submitted_at = time.perf_counter()
            if seq.is_finished:  # could never fit
                stream.queue.put(Delta("", seq.finish_reason, "the prompt is longer than the model's context"))
            else:
                self._streams[seq.seq_id] = stream
        elif kind == "abort":
            stream = self._streams.pop(item.seq_id, None)
            if stream is not None:
                self.engine.abort(item)
                stream.finish_reason = FinishReason.ABORT

    def _step(self) -> None:
        try:
            outputs = self.engine.step()
        except Exception as exc:  # keep serving: end what was in flight, with the reason
            message = f"the engine failed on this step ({type(exc).__name__}: {exc})"
            for seq in self.engine.fail_all():
                stream = self._streams.pop(seq.seq_id, None)
                if stream is not None:
                    stream.queue.put(Delta("", FinishReason.ERROR, message))
            return
        now = time.perf_counter()
        for out in outputs:
            stream = self._streams.get(out.seq.seq_id)
            if stream is None:
                continue
            stats = stream.stats
            if stats.first_token_at is None:
                stats.first_token_at = now
                stats.cached_tokens = out.seq.num_cached_tokens
            stats.generated_tokens = out.seq.num_output_tokens
            if out.finish_reason is not None:
                stats.finished_at = now
                del self._streams[out.seq.seq_id]
            stream.queue.put(Delta(out.text, out.finish_reason))

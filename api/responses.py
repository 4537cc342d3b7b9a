"""OpenAI's response shapes, whole (`chat.completion`, `text_completion`) and streamed over SSE.

A stream is `data: {chunk}\\n\\n` lines: for chat, a first chunk per choice with the assistant role, then content
deltas, then a chunk with the finish reason and an empty delta; with `stream_options.include_usage`, every chunk
carries `"usage": null` and a last chunk has the usage and empty `choices` (what vLLM and OpenAI send); then
`data: [DONE]`. An error after the stream started is an `error` event, which the openai client raises.

Errors found before the first token (an image the engine could not read, say) are still plain 400 responses: the
stream's headers are sent only once every choice has produced its first event.

Log-probabilities, where asked, come in each choice (and each streamed chunk, for its tokens): chat's
`{"content": [{"token", "logprob", "bytes", "top_logprobs"}], "refusal": null}`, the completions' legacy
`{"tokens", "token_logprobs", "top_logprobs", "text_offset"}`.
"""
from __future__ import annotations

import json
import time
import uuid
from dataclasses import dataclass, field
from typing import AsyncIterator, Callable

from fastapi.responses import JSONResponse, StreamingResponse

from api.errors import ApiError
from api.runs import Choice, interleaved, run_all, usage
from engine.chat.types import Finished, TextDelta
from engine.sampling_params import TokenLogprob

ErrorOf = Callable[[Choice], ApiError]  # a choice's error ending -> the ApiError to send
Pieces = Callable[[int], tuple[str, bytes]]  # a token id -> its text and bytes (engine.detokenizer.TokenPieces)
LOGPROB_FLOOR = -9999.0  # JSON has no -inf: a token the model rules out shows this (as vLLM does)


def _logprob(value: float) -> float:
    return max(value, LOGPROB_FLOOR)


def chat_logprobs(pieces: Pieces, logprobs: list[TokenLogprob]) -> dict:
    def entry(token: int, value: float) -> dict:
        text, raw = pieces(token)
        return {"token": text, "logprob": _logprob(value), "bytes": list(raw)}

    return {"content": [{**entry(lp.token_id, lp.logprob), "top_logprobs": [entry(t, v) for t, v in lp.top]}
                        for lp in logprobs], "refusal": None}


def legacy_logprobs(pieces: Pieces, logprobs: list[TokenLogprob], offset: int) -> dict:
    """`offset`: where the first of these tokens starts in the completion's text (the lengths of the tokens' own
    texts before it)."""
    tokens, offsets = [], []
    for lp in logprobs:
        text = pieces(lp.token_id)[0]
        tokens.append(text)
        offsets.append(offset)
        offset += len(text)
    tops = []
    for lp in logprobs:  # two alternatives with the same text (parts of characters, say) keep the likelier's value
        top: dict[str, float] = {}
        for token, value in lp.top:
            top.setdefault(pieces(token)[0], _logprob(value))
        tops.append(top)
    return {"tokens": tokens, "token_logprobs": [_logprob(lp.logprob) for lp in logprobs], "top_logprobs": tops,
            "text_offset": offsets}


@dataclass
class Shape:
    model: str
    chat: bool  # chat.completion(.chunk) or text_completion
    pieces: Pieces | None = None  # set where the request asked for log-probabilities
    id: str = field(default_factory=lambda: uuid.uuid4().hex)
    created: int = field(default_factory=lambda: int(time.time()))

    def _head(self, streamed: bool) -> dict:
        prefix, kind = ("chatcmpl-", "chat.completion") if self.chat else ("cmpl-", "text_completion")
        return {"id": prefix + self.id, "object": kind + (".chunk" if streamed and self.chat else ""),
                "created": self.created, "model": self.model}

    def logprobs(self, logprobs: list[TokenLogprob], offset: int = 0) -> dict | None:
        """A choice's (or a chunk's) log-probabilities in this shape; `offset`: where these tokens' text starts
        (the legacy text offsets: the lengths of the choice's tokens' texts sent before). None where the request did
        not ask."""
        if self.pieces is None:
            return None
        if self.chat:
            return chat_logprobs(self.pieces, logprobs)
        return legacy_logprobs(self.pieces, logprobs, offset)

    def chunk(self, index: int, text: str | None, finish_reason: str | None = None, role: bool = False,
              logprobs: dict | None = None) -> dict:
        if self.chat:
            delta = {"role": "assistant", "content": ""} if role else ({} if text is None else {"content": text})
            choice = {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}
        else:
            choice = {"index": index, "text": text or "", "logprobs": logprobs, "finish_reason": finish_reason}
        return {**self._head(True), "choices": [choice]}

    def usage_chunk(self, choices: list[Choice]) -> dict:
        return {**self._head(True), "choices": [], "usage": usage(choices)}

    def result(self, choices: list[Choice]) -> dict:
        out = []
        for c in sorted(choices, key=lambda c: c.index):
            text = "".join(c.text)
            body = {"message": {"role": "assistant", "content": text}} if self.chat else {"text": text}
            out.append({"index": c.index, **body, "logprobs": self.logprobs(c.logprobs),
                        "finish_reason": c.finish_reason})
        return {**self._head(False), "choices": out, "usage": usage(choices)}


def _sse(data: dict | str) -> str:
    text = data if isinstance(data, str) else json.dumps(data, ensure_ascii=False, separators=(",", ":"))
    return f"data: {text}\n\n"


async def whole(shape: Shape, choices: list[Choice], error_of: ErrorOf) -> JSONResponse:
    await run_all(choices)
    for choice in choices:
        if choice.error:
            return error_of(choice).response()
    return JSONResponse(shape.result(choices))


async def streamed(shape: Shape, choices: list[Choice], error_of: ErrorOf, include_usage: bool):
    """A StreamingResponse, or the error response when a choice failed before its first token."""
    events = interleaved(choices)
    head: list[tuple[Choice, TextDelta | Finished]] = []
    waiting = {c.index for c in choices}
    try:
        while waiting:
            choice, event = await events.__anext__()
            if choice.error:
                raise error_of(choice)
            head.append((choice, event))
            waiting.discard(choice.index)
    except StopAsyncIteration:
        pass
    except BaseException as exc:  # an ApiError, or a cancelled request: nothing may keep running
        await events.aclose()
        if isinstance(exc, ApiError):
            return exc.response()
        raise
    body = _body(shape, choices, head, events, error_of, include_usage)
    return StreamingResponse(body, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


async def _body(shape: Shape, choices: list[Choice], head: list, events: AsyncIterator, error_of: ErrorOf,
                include_usage: bool) -> AsyncIterator[str]:
    extra = {"usage": None} if include_usage else {}
    offsets: dict[int, int] = {}
    try:
        if shape.chat:
            for c in sorted(choices, key=lambda c: c.index):
                yield _sse({**shape.chunk(c.index, None, role=True), **extra})
        for choice, event in head:
            yield _sse({**_event_chunk(shape, choice, event, offsets), **extra})
        async for choice, event in events:
            if choice.error:
                yield _sse(error_of(choice).body())
                break
            yield _sse({**_event_chunk(shape, choice, event, offsets), **extra})
        else:
            if include_usage:
                yield _sse(shape.usage_chunk(choices))
        yield _sse("[DONE]")
    finally:
        await events.aclose()


def _event_chunk(shape: Shape, choice: Choice, event: TextDelta | Finished, offsets: dict[int, int]) -> dict:
    """The chunk for one of a choice's events, in the order they are sent; `offsets`: each choice's legacy text
    offset so far (the lengths of its sent tokens' own texts)."""
    if isinstance(event, TextDelta):
        logprobs = None
        if event.logprobs and shape.pieces is not None:
            offset = offsets.get(choice.index, 0)
            logprobs = shape.logprobs(list(event.logprobs), offset)
            if not shape.chat:  # the legacy shape's tokens are these tokens' texts: the next offset follows them
                offsets[choice.index] = offset + sum(map(len, logprobs["tokens"]))
        return shape.chunk(choice.index, event.text, logprobs=logprobs)
    return shape.chunk(choice.index, None if shape.chat else "", choice.finish_reason)

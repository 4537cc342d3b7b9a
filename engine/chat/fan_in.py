"""Many reply streams read as one: `merged({key: ChatModel.astream(...)})` yields `(key, event)` as events arrive.

Each stream is pumped by its own task, all started together, so every request is submitted to the engine before
any is read and they batch (the HTTP API's `n` and prompt lists, the pipeline's batches). Leaving the loop early,
closing the generator or cancelling its reader cancels the tasks, and each stream's `finally` aborts its request.
A stream that raises makes `merged` raise the same exception (after cancelling the others).
"""
from __future__ import annotations

import asyncio
from typing import AsyncIterator, Hashable, TypeVar

K = TypeVar("K", bound=Hashable)
_END = object()


class _Failed:
    def __init__(self, exc: Exception):
        self.exc = exc


async def _pump(key, stream: AsyncIterator, out: asyncio.Queue) -> None:
    try:
        async for event in stream:
            out.put_nowait((key, event))
    except Exception as exc:  # noqa: BLE001 -- handed to the reader, which raises it
        out.put_nowait((key, _Failed(exc)))
    finally:
        await stream.aclose()
        out.put_nowait((key, _END))


async def merged(streams: dict[K, AsyncIterator]) -> AsyncIterator[tuple[K, object]]:
    out: asyncio.Queue = asyncio.Queue()
    tasks = [asyncio.create_task(_pump(key, stream, out)) for key, stream in streams.items()]
    running = len(tasks)
    try:
        while running:
            key, event = await out.get()
            if event is _END:
                running -= 1
                continue
            if isinstance(event, _Failed):
                raise event.exc
            yield key, event
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

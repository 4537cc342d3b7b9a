"""Running a request's choices on the shared engine, and what comes out: whole results or a merged event stream.

A request becomes `Choice`s (one per prompt and `n`), each an `astream` of the one `ChatModel`; they are started
together, as tasks of the event loop, so the engine batches them with each other and with every other client's
requests (the UI's included). `interleaved` merges their events as they come. Closing or cancelling what runs
them aborts every request still in the engine (engine.chat.fan_in).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass, field
from typing import AsyncIterator

from engine.chat.fan_in import merged
from engine.chat.types import Finished, Plan, TextDelta
from engine.sampling_params import TokenLogprob

# Our finish reasons in OpenAI's words: a reply cut by the context is cut by length, as far as a client can tell.
FINISH = {"stop": "stop", "length": "length", "context": "length", "abort": "abort", "error": "error"}


@dataclass
class Choice:
    index: int
    plan: Plan
    events: AsyncIterator[TextDelta | Finished]
    text: list[str] = field(default_factory=list)
    logprobs: list[TokenLogprob] = field(default_factory=list)  # where the request asked
    finished: Finished | None = None

    @property
    def finish_reason(self) -> str:
        return FINISH[self.finished.stats.finish_reason] if self.finished else "abort"

    @property
    def error(self) -> Finished | None:
        return self.finished if self.finished and self.finished.stats.finish_reason == "error" else None


async def interleaved(choices: list[Choice]) -> AsyncIterator[tuple[Choice, TextDelta | Finished]]:
    """Every choice's events as they arrive, each also recorded in its choice. Closing this aborts the rest."""
    by_index = {c.index: c for c in choices}
    async with contextlib.aclosing(merged({c.index: c.events for c in choices})) as stream:
        async for index, event in stream:
            choice = by_index[index]
            if isinstance(event, TextDelta):
                choice.text.append(event.text)
                choice.logprobs.extend(event.logprobs)
            else:
                choice.finished = event
            yield choice, event


async def run_all(choices: list[Choice]) -> None:
    """Run every choice to its end (their `text` and `finished` filled in)."""
    async with contextlib.aclosing(interleaved(choices)) as stream:
        async for _ in stream:
            pass


def usage(choices: list[Choice]) -> dict:
    """Prompt tokens once per prompt (not per choice), as OpenAI counts them."""
    prompts = {id(c.plan): c.plan.prompt_tokens for c in choices}
    prompt = sum(prompts.values())
    completion = sum(c.finished.stats.generated_tokens for c in choices if c.finished)
    return {"prompt_tokens": prompt, "completion_tokens": completion, "total_tokens": prompt + completion}

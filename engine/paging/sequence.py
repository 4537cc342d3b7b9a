"""Per-request state: token ids, where the images sit, which KV blocks hold it, and how it ended.

Pure Python (no torch): the scheduler and block manager work on these objects and test on CPU in milliseconds.
The image embeddings themselves travel as an opaque payload that only the model runner reads.
"""
from __future__ import annotations

import itertools
from dataclasses import dataclass
from enum import Enum
from typing import Any

from engine.sampling_params import SamplingParams


class Status(Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


class FinishReason(str, Enum):
    STOP = "stop"  # end-of-sequence token or a stop string
    LENGTH = "length"  # max_new_tokens reached
    CONTEXT = "context"  # the model's context (or the KV cache) is full
    ABORT = "abort"  # cancelled by the caller
    ERROR = "error"  # see the sequence's `error` for which kind


class ErrorCode(str, Enum):
    """Why a request ended with FinishReason.ERROR (or was refused). The words for users are chosen at the edge
    (the chat UI, the HTTP API), from the code; `detail` in `EngineError` is for logs, never shown to users."""

    CONTEXT_EXCEEDED = "context_exceeded"  # the prompt alone cannot fit the context
    BAD_IMAGE = "bad_image"  # an image could not be encoded
    BAD_DOCUMENT = "bad_document"  # a document could not be read (refused when planning; the engine never sees one)
    INVALID_PARAMETER = "invalid_parameter"  # a sampling parameter out of range
    ENGINE = "engine"  # a step failed and this request was in it


@dataclass(frozen=True)
class EngineError:
    code: ErrorCode
    detail: str = ""
    param: str | None = None  # for INVALID_PARAMETER: which one


@dataclass(eq=False)
class ImageSpan:
    """`length` placeholder positions starting at `offset` hold one image's features; `digest` names its content
    (and how it is read).

    The digest goes into prefix-cache keys, so two different images behind identical placeholder ids never share KV.
    `source` is what the engine's vision stage encodes (opaque here); it sets `embeds`, the (length, hidden) rows the
    model runner splices in, before the request can be admitted.
    """

    offset: int
    length: int
    digest: str
    embeds: Any = None
    source: Any = None


@dataclass
class Score:
    """A scoring request's running total (LMDeploy's get_ppl): the summed next-token cross-entropy of the prompt's
    positions scored so far. Its prompt is prefilled without a reply; each chunk's rows predict the tokens after
    them (the chunk's last row the next chunk's first token), so every token but the first is a target once."""

    total: float = 0.0
    tokens: int = 0

    @property
    def mean(self) -> float:
        """The mean cross-entropy (nats per token); perplexity is its exp."""
        return self.total / self.tokens if self.tokens else float("nan")

    def reset(self) -> None:
        """Its prefill starts over (preempted, or requeued after a failed step): what was scored is scored again."""
        self.total, self.tokens = 0.0, 0


_ids = itertools.count()


class Sequence:
    def __init__(self, prompt_ids: list[int], params: SamplingParams, images: tuple[ImageSpan, ...] = (),
                 score: Score | None = None):
        if not prompt_ids:
            raise ValueError("a prompt needs at least one token")
        if score is not None and (len(prompt_ids) < 2 or images):
            raise ValueError("a scored sequence needs at least two tokens and no images")
        for span in images:
            if span.offset < 0 or span.offset + span.length > len(prompt_ids):
                raise ValueError("an image span lies outside the prompt")
        self.seq_id = next(_ids)
        self.token_ids = list(prompt_ids)
        self.num_prompt_tokens = len(prompt_ids)
        self.params = params
        self.images = images
        self.status = Status.WAITING
        self.block_table: list[int] = []
        self.num_cached_tokens = 0  # prompt tokens whose KV came from the prefix cache
        # Tokens whose KV is computed by the steps scheduled so far (prefix-cache hits included); the scheduler
        # advances it chunk by chunk while the prompt is prefilled, then one token per decode step.
        self.num_computed_tokens = 0
        # Tokens the sequence had when its blocks were allocated (its prompt; after a preemption, prompt and reply so
        # far): one prefill computes them all, so they share one rotary length (`rope_len`).
        self.prefill_len = 0
        self.finish_reason: FinishReason | None = None
        self.error: EngineError | None = None
        self.suspect = 0  # times this request was in a step that failed (engine.llm_engine: isolation)
        # Set for a scoring request: its prompt is scored and it ends there, with no reply and no sampling. It never
        # reads the prefix cache (every position's logits are needed) nor keys blocks in it.
        self.score = score

    def __len__(self) -> int:
        return len(self.token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def output_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def last_token(self) -> int:
        return self.token_ids[-1]

    @property
    def num_uncomputed_tokens(self) -> int:
        """Tokens whose KV no scheduled step computes yet: more than one while the prompt is being prefilled, one
        (the newest) for a decoding sequence, none while a step in flight is sampling its next token."""
        return len(self.token_ids) - self.num_computed_tokens

    @property
    def is_finished(self) -> bool:
        return self.status is Status.FINISHED

    @property
    def images_ready(self) -> bool:
        """Whether every image's features are attached (the vision stage's work is done)."""
        return all(span.embeds is not None for span in self.images)

    @property
    def image_tokens(self) -> int:
        return sum(s.length for s in self.images)

    def in_image(self, position: int) -> bool:
        """Whether `position` is an image placeholder (its input row is a feature row, not a token embedding)."""
        return any(s.offset <= position < s.offset + s.length for s in self.images)

    @property
    def caches_prefix(self) -> bool:
        """Whether its blocks may come from, and go into, the prefix cache: not for a scoring request."""
        return self.score is None

    def num_blocks(self, block_size: int) -> int:
        return (len(self.token_ids) + block_size - 1) // block_size

    def block_tokens(self, i: int, block_size: int) -> list[int]:
        return self.token_ids[i * block_size:(i + 1) * block_size]

    def block_extra_key(self, i: int, block_size: int) -> tuple:
        """What besides token ids decides block i's KV: the images whose placeholders it covers, with offsets."""
        lo, hi = i * block_size, (i + 1) * block_size
        return tuple((s.offset, s.digest) for s in self.images if s.offset < hi and s.offset + s.length > lo)

    def rope_len(self, position: int) -> int:
        """The length that sets the rotary base of the token at `position` under dynamic NTK (transformers' max
        position + 1 of the forward that computes it): the prefill's length for the tokens it computes, position + 1
        for each token decoded after."""
        return max(self.prefill_len, position + 1)

    def append(self, token_id: int) -> None:
        self.token_ids.append(token_id)

    def finish(self, reason: FinishReason, error: EngineError | None = None) -> None:
        self.status = Status.FINISHED
        self.finish_reason = reason
        self.error = error

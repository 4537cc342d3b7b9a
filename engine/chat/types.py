"""The values that cross the line between the chat UI and the model: turns, settings, stream events.

Plain dataclasses with no torch in them (the one import, engine.sampling_params, is plain Python too), so that
`app.py` and the tests can build and read them without loading a model. `engine.chat.chat_model.ChatModel` consumes turns
and settings and yields the events.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace

from engine.sampling_params import InvalidParameter, SamplingParams, TokenLogprob


@dataclass(frozen=True)
class ChatImage:
    """An image as the user sent it: the raw file bytes, decoded (safely) only when the model needs it."""

    data: bytes
    name: str = "image"


@dataclass(frozen=True)
class ChatDocument:
    """A TXT, Markdown or PDF file as the user sent it: the raw bytes, read (safely, documents.intake) only when
    the model needs it."""

    data: bytes
    name: str = "document"


@dataclass(frozen=True)
class ChatTurn:
    role: str  # "user" or "assistant"
    text: str = ""
    images: tuple[ChatImage, ...] = ()
    documents: tuple[ChatDocument, ...] = ()

    def __post_init__(self):
        if self.role not in ("user", "assistant"):
            raise ValueError(f"role must be 'user' or 'assistant', got {self.role!r}")


@dataclass(frozen=True)
class GenerationSettings:
    """A reply's settings; checked on creation with the engine's own checks (sampling_params.InvalidParameter).
    `max_image_tokens` caps what one image may cost (the cheapest reading within it), like Qwen2-VL's max_pixels:
    less detail, a faster reply, more room for the conversation."""

    max_new_tokens: int = 512
    temperature: float = 0.7
    top_p: float = 0.9
    top_k: int = 50
    repetition_penalty: float = 1.1
    presence_penalty: float = 0.0  # OpenAI's additive penalties and logit bias (engine.sampling_params)
    frequency_penalty: float = 0.0
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    max_image_tokens: int | None = None
    logprobs: int | None = None  # each token's log-probability and this many alternatives (SamplingParams)

    def __post_init__(self):
        # the engine's own checks, with their messages; a logit bias is kept as its checked (id, bias) pairs
        object.__setattr__(self, "logit_bias", self.sampling_params().logit_bias)
        if self.max_image_tokens is not None and (isinstance(self.max_image_tokens, bool) or
                                                  not isinstance(self.max_image_tokens, int) or
                                                  self.max_image_tokens < 1):
            raise InvalidParameter("max_image_tokens", "max_image_tokens must be a positive whole number")

    def sampling_params(self, max_new_tokens: int | None = None) -> SamplingParams:
        return SamplingParams(max_new_tokens=max_new_tokens or self.max_new_tokens, temperature=self.temperature,
                              top_p=self.top_p, top_k=self.top_k, repetition_penalty=self.repetition_penalty,
                              presence_penalty=self.presence_penalty, frequency_penalty=self.frequency_penalty,
                              logit_bias=self.logit_bias, seed=self.seed, stop=self.stop, ignore_eos=self.ignore_eos,
                              logprobs=self.logprobs)


# The one home of generation defaults: the chat UI's sliders and handler, and the command line's flags.
CHAT_DEFAULTS = GenerationSettings()
# Answering from a long document: near-greedy, a light repetition penalty (a document's own words must be quotable).
# The numbers InternLM2.5-7B-Chat-1M's guide recommends for chatting over an uploaded PDF, TXT or Markdown file.
LONG_DOCUMENT = replace(CHAT_DEFAULTS, temperature=0.05, repetition_penalty=1.02)
PRESETS = {"Chat": CHAT_DEFAULTS, "Long document": LONG_DOCUMENT}  # the UI's preset menu
CLI_DEFAULTS = GenerationSettings(max_new_tokens=256, temperature=0.0, top_p=1.0, top_k=0, repetition_penalty=1.0)


@dataclass
class Plan:
    """What will be sent to the model for one reply, decided before anything runs.

    `turns` is the conversation as sent; `notices` tells the user, in plain words, every change made to fit it
    (images downscaled or dropped, documents trimmed, old turns dropped) and every image or document that could
    not be used. `error` is set when
    nothing can be run at all (then the UI shows it instead of a reply), and `error_code` says which kind it is
    ("bad_image", "context_exceeded", "invalid_parameter": engine.paging.sequence.ErrorCode's values).
    """

    turns: list[ChatTurn]
    system: str
    prompt_tokens: int = 0
    image_tokens: int = 0
    document_tokens: int = 0
    max_new_tokens: int = 0
    context_len: int = 0
    notices: list[str] = field(default_factory=list)
    error: str | None = None
    error_code: str | None = None
    prepared: object = field(default=None, repr=False)  # the token ids and image spans, for ChatModel.stream


@dataclass(frozen=True)
class TextDelta:
    text: str
    # the tokens' log-probabilities since the last delta, where the settings asked (GenerationSettings.logprobs);
    # a delta may carry them with no text yet (the detokenizer holds back part of a character or a stop string)
    logprobs: tuple[TokenLogprob, ...] = ()


@dataclass(frozen=True)
class Queued:
    """The reply waits for the engine: `position` requests are ahead of it, counting itself (1 = next)."""

    position: int


@dataclass(frozen=True)
class TurnStats:
    prompt_tokens: int
    image_tokens: int
    generated_tokens: int
    ttft_s: float
    decode_tokens_per_s: float
    context_used: int
    context_len: int
    finish_reason: str  # "stop", "length", "context", "abort", "error"
    error_code: str | None = None  # with "error": "context_exceeded", "bad_image", "invalid_parameter", "engine"
    document_tokens: int = 0  # the part of prompt_tokens that the documents' text takes


@dataclass(frozen=True)
class Finished:
    """Last event of a stream. `message` is a user-facing reason whenever finish_reason is not a normal stop."""

    stats: TurnStats
    message: str | None = None

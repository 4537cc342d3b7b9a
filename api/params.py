"""A request body's generation parameters -> `GenerationSettings` per choice, checked, with the API's names.

OpenAI's defaults (temperature 1, top_p 1, no max_tokens: the rest of the context); `top_k`, `repetition_penalty`
and `ignore_eos` are extra body fields, as vLLM and SGLang take them; `presence_penalty`, `frequency_penalty` and
`logit_bias` (token id strings -> bias) are OpenAI's, as are log-probabilities: chat's `logprobs` (a boolean) with
`top_logprobs` (alternatives per token), completions' `logprobs` (the number of alternatives). A parameter this
server cannot honour (tools, a response format, echo) is refused with 400 naming it, never silently ignored. `n` choices
get seeds `seed, seed + 1, ...` when a seed is given, so a seeded request repeats exactly.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from api.errors import ApiError, invalid
from engine.chat.types import GenerationSettings
from engine.sampling_params import LOGPROBS_MAX, SEED_MAX, InvalidParameter, unknown_tokens

MAX_N = 16

# Fields a client may send with these values (OpenAI's defaults): anything else is refused as unsupported.
UNSUPPORTED = {
    "tools": (None, []),
    "functions": (None, []),
    "tool_choice": (None, "none", "auto"),
    "parallel_tool_calls": (None, True, False),
    "response_format": (None, {"type": "text"}),
    "echo": (None, False),
    "suffix": (None, ""),
    "best_of": (None, 1),
    "prediction": (None,),
    "audio": (None,),
    "modalities": (None, ["text"]),
}


@dataclass(frozen=True)
class Params:
    choices: tuple[GenerationSettings, ...]  # one per choice (n)
    max_tokens: int | None  # None: the rest of the context
    max_tokens_name: str  # "max_tokens" or "max_completion_tokens": what the client called it
    stream: bool
    include_usage: bool
    logprobs: int | None  # None: no log-probabilities; else each token's with this many alternatives

    @property
    def n(self) -> int:
        return len(self.choices)


def _refuse_unsupported(body: dict) -> None:
    for name, defaults in UNSUPPORTED.items():
        value = body.get(name)
        # 0 == 0.0 is a default, False == 0 is not
        if not any(value == d and isinstance(value, bool) == isinstance(d, bool) for d in defaults):
            raise ApiError(400, f"{name}={value!r} is not supported by this server.", param=name,
                           code="unsupported_parameter")


def _get(body: dict, name: str, kinds: tuple[type, ...], default: Any) -> Any:
    value = body.get(name, default)
    if value is None:
        return default
    if isinstance(value, bool) and bool not in kinds or not isinstance(value, kinds):
        what = {bool: "a boolean", int: "an integer", float: "a number", str: "a string", list: "a list",
                dict: "an object"}
        raise ApiError(400, f"{name} must be {' or '.join(what[k] for k in kinds)}", param=name,
                       code="invalid_parameter")
    return value


def _max_tokens(body: dict) -> tuple[int | None, str]:
    name = "max_completion_tokens" if body.get("max_completion_tokens") is not None else "max_tokens"
    value = _get(body, name, (int,), None)
    if value is not None and value < 1:
        raise ApiError(400, f"{name} must be at least 1", param=name, code="invalid_parameter")
    return value, name


def _stop(body: dict) -> tuple[str, ...]:
    stop = _get(body, "stop", (str, list), None)
    if stop is None:
        return ()
    stop = [stop] if isinstance(stop, str) else stop
    if not all(isinstance(s, str) and s for s in stop):
        raise ApiError(400, "stop must be a non-empty string or a list of them", param="stop",
                       code="invalid_parameter")
    return tuple(stop)


def _logit_bias(body: dict) -> dict[int, float]:
    """OpenAI's logit_bias: an object whose keys are token ids written as strings; GenerationSettings checks the
    biases, and the route the ids against the model's vocabulary."""
    bias = _get(body, "logit_bias", (dict,), {})
    ids = {}
    for key, value in bias.items():
        if not (isinstance(key, str) and key.isascii() and key.isdigit()):
            raise ApiError(400, f"logit_bias keys must be token ids (whole numbers), not {key!r}",
                           param="logit_bias", code="invalid_parameter")
        ids[int(key)] = value
    return ids


def _logprobs(body: dict, chat: bool) -> int | None:
    """Chat: `logprobs` true, with `top_logprobs` alternatives (0 by default). Completions: `logprobs` is the number
    of alternatives."""
    if chat:
        top = _get(body, "top_logprobs", (int,), None)
        if not _get(body, "logprobs", (bool,), False):
            if top is not None:
                raise ApiError(400, "top_logprobs needs logprobs=true", param="top_logprobs",
                               code="invalid_parameter")
            return None
        name, value = "top_logprobs", top or 0
    else:
        name, value = "logprobs", _get(body, "logprobs", (int,), None)
        if value is None:
            return None
    if not 0 <= value <= LOGPROBS_MAX:
        raise ApiError(400, f"{name} must be between 0 and {LOGPROBS_MAX}", param=name, code="invalid_parameter")
    return value


def _stream(body: dict) -> tuple[bool, bool]:
    stream = _get(body, "stream", (bool,), False)
    options = _get(body, "stream_options", (dict,), None)
    if options is not None and not stream:
        raise ApiError(400, "stream_options is only allowed with stream=true", param="stream_options",
                       code="invalid_parameter")
    include = _get(options or {}, "include_usage", (bool,), False)
    return stream, include


def parse(body: dict, chat: bool = True) -> Params:
    """`chat`: a chat completion's body, else a (legacy) completion's; they differ in `logprobs`."""
    _refuse_unsupported(body)
    max_tokens, max_name = _max_tokens(body)
    n = _get(body, "n", (int,), 1)
    if not 1 <= n <= MAX_N:
        raise ApiError(400, f"n must be between 1 and {MAX_N}", param="n", code="invalid_parameter")
    seed = _get(body, "seed", (int,), None)
    common = dict(max_new_tokens=max_tokens or 1,  # the plan decides the real value (ChatModel.plan, fit=False)
                  temperature=_get(body, "temperature", (int, float), 1.0),
                  top_p=_get(body, "top_p", (int, float), 1.0),
                  top_k=_get(body, "top_k", (int,), 0),
                  repetition_penalty=_get(body, "repetition_penalty", (int, float), 1.0),
                  presence_penalty=_get(body, "presence_penalty", (int, float), 0.0),
                  frequency_penalty=_get(body, "frequency_penalty", (int, float), 0.0),
                  logit_bias=_logit_bias(body), logprobs=_logprobs(body, chat),
                  stop=_stop(body), ignore_eos=_get(body, "ignore_eos", (bool,), False))
    if common["top_k"] == -1:  # vLLM's spelling of "off"
        common["top_k"] = 0
    try:
        choices = tuple(GenerationSettings(**common, seed=None if seed is None else _nth_seed(seed, i))
                        for i in range(n))
    except InvalidParameter as exc:
        raise invalid(exc, {"max_new_tokens": max_name}) from None
    stream, include_usage = _stream(body)
    return Params(choices, max_tokens, max_name, stream, include_usage, common["logprobs"])


def _nth_seed(seed: int, i: int) -> int:
    if not 0 <= seed <= SEED_MAX:
        raise InvalidParameter("seed", f"seed must be between 0 and {SEED_MAX}")
    return (seed + i) % (SEED_MAX + 1)


def check_logit_bias(params: Params, vocab_size: int | None) -> None:
    """400 naming logit_bias when it names a token id the model does not have (`vocab_size` None: not known here,
    e.g. a remote backend, which checks them itself)."""
    if vocab_size is not None and (unknown := unknown_tokens(params.choices[0].logit_bias, vocab_size)) is not None:
        raise ApiError(400, unknown, param="logit_bias", code="invalid_parameter")

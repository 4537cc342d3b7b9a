"""Per-request generation parameters, checked when a request is made: a value out of range is that request's
`InvalidParameter` (naming the parameter), never a failed engine step for everyone."""
from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value
PENALTY_MAX = 2.0  # presence and frequency penalties lie in [-PENALTY_MAX, PENALTY_MAX] (OpenAI's range)
LOGIT_BIAS_MAX = 100.0  # a logit bias lies in [-LOGIT_BIAS_MAX, LOGIT_BIAS_MAX] (OpenAI's range)
LOGPROBS_MAX = 20  # the most alternatives a token's log-probabilities come with (OpenAI's top_logprobs)


class InvalidParameter(ValueError):
    def __init__(self, param: str, message: str):
        super().__init__(message)
        self.param = param


def _number(name: str, value, kind: type) -> None:
    if isinstance(value, bool) or not isinstance(value, (int, float) if kind is float else int):
        raise InvalidParameter(name, f"{name} must be {'a number' if kind is float else 'a whole number'}")
    if kind is float and not math.isfinite(value):
        raise InvalidParameter(name, f"{name} must be a finite number")


@dataclass(frozen=True)
class SamplingParams:
    max_new_tokens: int = 256
    temperature: float = 0.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 means no top-k
    repetition_penalty: float = 1.0
    # OpenAI's additive penalties over the reply's own tokens: a token's logit loses
    # frequency_penalty * (times it was generated) + presence_penalty * (whether it was).
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    # (token id, bias) pairs added to those tokens' logits before any penalty; a mapping is accepted and kept as
    # pairs in id order. Ids are checked against the model's vocabulary where it is known (the engine, the API).
    logit_bias: tuple[tuple[int, float], ...] = ()
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    # None: none. k >= 0: each generated token's log-probability under the model (its own distribution, before any
    # bias, penalty, temperature or cut: vLLM's default), with the k likeliest tokens at that step.
    logprobs: int | None = None

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k"):
            _number(name, getattr(self, name), int)
        for name in ("temperature", "top_p", "repetition_penalty", "presence_penalty", "frequency_penalty"):
            _number(name, getattr(self, name), float)
        if self.max_new_tokens < 1:
            raise InvalidParameter("max_new_tokens", "max_new_tokens must be at least 1")
        if self.temperature < 0:
            raise InvalidParameter("temperature", "temperature must be >= 0")
        if not 0 < self.top_p <= 1:
            raise InvalidParameter("top_p", "top_p must be in (0, 1]")
        if self.top_k < 0:
            raise InvalidParameter("top_k", "top_k must be >= 0")
        if self.repetition_penalty <= 0:
            raise InvalidParameter("repetition_penalty", "repetition_penalty must be > 0")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -PENALTY_MAX <= getattr(self, name) <= PENALTY_MAX:
                raise InvalidParameter(name, f"{name} must be between {-PENALTY_MAX:g} and {PENALTY_MAX:g}")
        object.__setattr__(self, "logit_bias", _logit_bias(self.logit_bias))
        if self.logprobs is not None:
            _number("logprobs", self.logprobs, int)
            if not 0 <= self.logprobs <= LOGPROBS_MAX:
                raise InvalidParameter("logprobs", f"logprobs must be between 0 and {LOGPROBS_MAX}")
        if self.seed is not None:
            _number("seed", self.seed, int)
            if not 0 <= self.seed <= SEED_MAX:
                raise InvalidParameter("seed", f"seed must be between 0 and {SEED_MAX}")
        if isinstance(self.stop, str):
            object.__setattr__(self, "stop", (self.stop,))
        if not all(isinstance(s, str) for s in self.stop):
            raise InvalidParameter("stop", "stop must be a string or a list of strings")
        object.__setattr__(self, "stop", tuple(self.stop))

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


@dataclass(frozen=True)
class TokenLogprob:
    """A generated token's log-probability under the model, with the `SamplingParams.logprobs` likeliest tokens of
    its step as (id, log-probability), likeliest first."""

    token_id: int
    logprob: float
    top: tuple[tuple[int, float], ...] = ()


def _logit_bias(value) -> tuple[tuple[int, float], ...]:
    """A mapping or pairs of (token id, bias) -> pairs in id order; each id a whole number >= 0 named once, each bias
    a finite number within LOGIT_BIAS_MAX."""
    pairs = list(value.items()) if isinstance(value, Mapping) else value
    try:
        pairs = [(token, bias) for token, bias in pairs]
    except (TypeError, ValueError):
        raise InvalidParameter("logit_bias", "logit_bias must map token ids to numbers") from None
    for token, bias in pairs:
        if isinstance(token, bool) or not isinstance(token, int) or token < 0:
            raise InvalidParameter("logit_bias", f"logit_bias: {token!r} is not a token id (a whole number >= 0)")
        _number("logit_bias", bias, float)
        if not -LOGIT_BIAS_MAX <= bias <= LOGIT_BIAS_MAX:
            raise InvalidParameter("logit_bias", f"logit_bias: the bias of token {token} must be between "
                                   f"{-LOGIT_BIAS_MAX:g} and {LOGIT_BIAS_MAX:g}")
    if len({token for token, _ in pairs}) < len(pairs):
        raise InvalidParameter("logit_bias", "logit_bias names a token id twice")
    return tuple(sorted((token, float(bias)) for token, bias in pairs))


def unknown_tokens(logit_bias: tuple[tuple[int, float], ...], vocab_size: int) -> str | None:
    """The words for a logit bias naming ids the model does not have (its vocabulary: 0 .. vocab_size - 1), or None
    where every id is the model's. `logit_bias` as SamplingParams keeps it, in id order."""
    if not logit_bias or logit_bias[-1][0] < vocab_size:
        return None
    ids = [t for t, _ in logit_bias if t >= vocab_size]
    shown = ", ".join(map(str, ids[:5])) + (f" and {len(ids) - 5} more" if len(ids) > 5 else "")
    return f"logit_bias names token ids this model does not have ({shown}); its ids run from 0 to {vocab_size - 1}"

"""Per-request generation parameters, checked when a request is made: a value out of range is that request's
`InvalidParameter` (naming the parameter), never a failed engine step for everyone."""
from __future__ import annotations

import math
from dataclasses import dataclass

SEED_MAX = 2**63 - 1  # torch.Generator.manual_seed takes a signed 64-bit value


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
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False

    def __post_init__(self):
        for name in ("max_new_tokens", "top_k"):
            _number(name, getattr(self, name), int)
        for name in ("temperature", "top_p", "repetition_penalty"):
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

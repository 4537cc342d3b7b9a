"""Incremental detokenization: token ids in, text deltas out, never a broken character, stop strings honoured.

Each step decodes a short window (a few tokens of context plus the new ones) rather than the whole reply, and
withholds text that ends in U+FFFD (an incomplete UTF-8 sequence: half a Chinese character or emoji) until the
next token completes it. Text that could be the start of a stop string is held back until it is known not to be.
"""
from __future__ import annotations

REPLACEMENT = "\ufffd"
CONTEXT_TOKENS = 5  # prompt tokens decoded before the reply so the first word keeps its leading space


class IncrementalDetokenizer:
    def __init__(self, tokenizer, prompt_ids: list[int], stop: tuple[str, ...] = ()):
        self.tokenizer = tokenizer
        self.ids = list(prompt_ids[-CONTEXT_TOKENS:])
        self.prefix_offset = 0
        self.read_offset = len(self.ids)
        self.stop = tuple(s for s in stop if s)
        self.text = ""  # everything decoded so far (after truncation at a stop string)
        self.sent = 0  # characters of `text` already handed out
        self.stopped = False

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=True, clean_up_tokenization_spaces=False)

    def push(self, token_id: int) -> str:
        """Add one generated token; return the text that is now safe to show (possibly empty)."""
        if self.stopped:
            return ""
        self.ids.append(token_id)
        prefix = self._decode(self.ids[self.prefix_offset:self.read_offset])
        full = self._decode(self.ids[self.prefix_offset:])
        if len(full) > len(prefix) and not full.endswith(REPLACEMENT):
            self.text += full[len(prefix):]
            self.prefix_offset, self.read_offset = self.read_offset, len(self.ids)
        return self._release()

    def flush(self) -> str:
        """At the end of the reply: whatever is still held back (a partial stop-string prefix) goes out."""
        if not self.stopped:
            self.sent, out = len(self.text), self.text[self.sent:]
            return out
        return ""

    def _release(self) -> str:
        if self.stop:
            window_start = max(0, self.sent - max(len(s) for s in self.stop))
            hits = [i for i in (self.text.find(s, window_start) for s in self.stop) if i >= 0]
            if hits:
                self.text = self.text[:min(hits)]
                self.stopped = True
                out, self.sent = self.text[self.sent:], len(self.text)
                return out
        end = len(self.text) - self._held_back()
        out = self.text[self.sent:end] if end > self.sent else ""
        self.sent = max(self.sent, end)
        return out

    def _held_back(self) -> int:
        """Length of the longest suffix of `text` that is a proper prefix of a stop string."""
        best = 0
        for s in self.stop:
            for n in range(min(len(s) - 1, len(self.text)), best, -1):
                if self.text.endswith(s[:n]):
                    best = n
                    break
        return best


class NoDetokenizer:
    """For an engine without a tokenizer (benchmarks, token-id clients): tokens in, no text out."""

    stopped = False

    def push(self, token_id: int) -> str:
        return ""

    def flush(self) -> str:
        return ""

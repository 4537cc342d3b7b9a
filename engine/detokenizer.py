"""Incremental detokenization: token ids in, text deltas out, never a broken character, stop strings honoured.

Each step decodes a short window (a few tokens of context plus the new ones) rather than the whole reply, and
withholds text that ends in U+FFFD (an incomplete UTF-8 sequence: half a Chinese character or emoji) until the
next token completes it. Text that could be the start of a stop string is held back until it is known not to be.
"""
from __future__ import annotations

import re

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


def _byte_level_alphabet() -> dict[str, int]:
    """GPT-2's byte-level BPE alphabet: the printable character that stands for each byte in its vocabularies."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("\xa1"), ord("\xac") + 1),
                 *range(ord("\xae"), ord("\xff") + 1)]
    chars, extra = {}, 0
    for b in range(256):
        if b in printable:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


BYTE_LEVEL = _byte_level_alphabet()
BYTE_FALLBACK = re.compile(r"<0x([0-9A-Fa-f]{2})>")  # SentencePiece's piece for one raw byte


class TokenPieces:
    """One token's own text and bytes, as OpenAI's logprobs show them: the text it adds after a plain word (so a
    SentencePiece token keeps its leading space), and its exact bytes, also where it holds part of a character
    (then the text shows U+FFFD and the bytes are read off the vocabulary: a byte-fallback piece or GPT-2's
    byte-level alphabet). Cached per id."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self.anchor = tokenizer.encode("a", add_special_tokens=False)
        self.anchor_text = self._decode(self.anchor)
        self.cache: dict[int, tuple[str, bytes]] = {}

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids, skip_special_tokens=False, clean_up_tokenization_spaces=False)

    def __call__(self, token_id: int) -> tuple[str, bytes]:
        piece = self.cache.get(token_id)
        if piece is None:
            piece = self.cache[token_id] = self._piece(token_id)
        return piece

    def _piece(self, token_id: int) -> tuple[str, bytes]:
        full = self._decode(self.anchor + [token_id])
        text = full[len(self.anchor_text):] if full.startswith(self.anchor_text) else self._decode([token_id])
        if REPLACEMENT not in text:
            return text, text.encode()
        vocab_piece = self.tokenizer.convert_ids_to_tokens(token_id)
        if isinstance(vocab_piece, str):
            if match := BYTE_FALLBACK.fullmatch(vocab_piece):
                return text, bytes([int(match[1], 16)])
            if vocab_piece and all(c in BYTE_LEVEL for c in vocab_piece):
                return text, bytes(BYTE_LEVEL[c] for c in vocab_piece)
        return text, text.encode()

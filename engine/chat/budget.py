"""Fitting a conversation into the model's context before anything runs, and saying what was changed.

Every token is counted exactly before any image is encoded (template, each image's placeholders for the reading it
gets, history, the reply's max new tokens) against the context. When it does not fit, in this order:
1. spend fewer tokens on images: read them on a smaller grid or downscaled (each family lists its readings, most
   detailed first, down to the cheapest), older images first, then the newest;
2. leave out images of older turns, oldest first;
3. leave out the oldest turns, in blocks of about a quarter of the context: the cut then stays where it is for the
   next turns, so their prompts start the same and the prefix cache reuses the KV of everything before;
4. lower max new tokens for this reply;
and if the newest message alone still cannot fit, say so plainly with the numbers. Every change is a notice.
An image's readings are those for all the conversation's images as sent (a family may read an image differently
when a prompt has several); leaving older images out keeps the others' readings, which stay real inputs of the
model, never dearer than before.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.image_inputs import Reading
from engine.prompt import EncodedPrompt, Message, PromptBuilder

MIN_REPLY_TOKENS = 16
DROP_BLOCK_SHARE = 4  # old turns leave in blocks of context_len / DROP_BLOCK_SHARE tokens


@dataclass
class FitImage:
    """An image as the budget sees it: its readings (most tokens first) and which one it gets."""

    name: str
    digest: str
    picture: Any
    readings: list[Reading]
    choice: int = 0
    capped_from: int | None = None  # the reading's tokens before the per-image cap chose a cheaper one

    @property
    def reading(self) -> Reading:
        return self.readings[self.choice]

    def cap(self, max_tokens: int | None) -> None:
        """Take the most detailed reading within `max_tokens` (the cheapest one if none is)."""
        if max_tokens is None or self.reading.tokens <= max_tokens:
            return
        before = self.reading.tokens
        self.choice = next((i for i, r in enumerate(self.readings) if r.tokens <= max_tokens),
                           len(self.readings) - 1)
        if self.reading.tokens < before:  # a model with one reading reads it whatever the cap
            self.capped_from = before


@dataclass
class Item:
    """One turn as the budget sees it."""

    role: str
    text: str
    images: list[FitImage] = field(default_factory=list)


@dataclass
class Fitted:
    items: list[Item]
    prompt: EncodedPrompt | None
    max_new_tokens: int
    notices: list[str]
    error: str | None = None


def _encode(builder: PromptBuilder, system: str, items: list[Item]) -> EncodedPrompt:
    messages = [Message("system", system)] if system.strip() else []
    messages += [Message(it.role, it.text, len(it.images)) for it in items]
    return builder.build(messages, [im.reading.tokens for it in items for im in it.images])


class Fitter:
    def __init__(self, builder: PromptBuilder, system: str, context_len: int, max_new_tokens: int):
        self.builder, self.system, self.context_len = builder, system, context_len
        self.max_new_tokens = max_new_tokens
        self.notices: list[str] = []

    def excess(self, prompt: EncodedPrompt) -> int:
        return len(prompt.ids) + self.max_new_tokens - self.context_len

    def shrink_images(self, items: list[Item], excess: int) -> int:
        """Step 1: cheaper readings, oldest image first, each only as far as needed. Returns the excess left."""
        for image in (im for it in items for im in it.images):
            if excess <= 0:
                break
            if image.choice == len(image.readings) - 1:
                continue
            before = image.reading
            saves = [before.tokens - r.tokens for r in image.readings]
            image.choice = next((i for i, s in enumerate(saves) if s >= excess), len(saves) - 1)
            excess -= saves[image.choice]
            self.notices.append(f"{image.name} was read at {image.reading.label}, {image.reading.tokens:,} tokens "
                                f"instead of {before.tokens:,}, to fit the {self.context_len:,}-token context.")
        return excess

    def drop_turns(self, items: list[Item]) -> list[Item]:
        """Step 3: the smallest block-aligned cut of whole exchanges that fits (see the module docstring)."""
        block = max(self.context_len // DROP_BLOCK_SHARE, 1)
        starts = [i for i in range(1, len(items)) if items[i].role == "user"]  # exchange boundaries
        offsets = {i: len(_encode(self.builder, self.system, items[:i]).ids) for i in starts}
        for edge in range(block, offsets[starts[-1]] + block, block):
            cut = next((i for i in starts if offsets[i] >= edge), starts[-1])
            if self.excess(_encode(self.builder, self.system, items[cut:])) <= 0 or cut == starts[-1]:
                self.notices.append(f"To fit the model's context, the oldest {cut} message(s) of this chat were "
                                    "left out.")
                return items[cut:]
        return items[starts[-1]:]


def fit(builder: PromptBuilder, system: str, items: list[Item], max_new_tokens: int, context_len: int) -> Fitted:
    items = [Item(it.role, it.text, list(it.images)) for it in items]
    fitter = Fitter(builder, system, context_len, max_new_tokens)
    for image in (im for it in items for im in it.images):
        if image.capped_from is not None:
            fitter.notices.append(f"{image.name} was read at {image.reading.label}, {image.reading.tokens:,} "
                                  f"tokens instead of {image.capped_from:,}, as the image token cap in Settings "
                                  "asks.")
    prompt = _encode(builder, system, items)
    if fitter.excess(prompt) > 0:
        fitter.shrink_images(items, fitter.excess(prompt))
        prompt = _encode(builder, system, items)
    dropped = []
    for it in items[:-1]:  # step 2: older turns' images, oldest first
        if fitter.excess(prompt) <= 0:
            break
        if it.images:
            dropped += [im.name for im in it.images]
            it.images = []
            prompt = _encode(builder, system, items)
    if dropped:
        fitter.notices.append(f"To fit the model's context of {context_len:,} tokens, earlier image(s) were left "
                              f"out: {', '.join(dropped)}.")
    if fitter.excess(prompt) > 0 and len(items) > 1:
        items = fitter.drop_turns(items)
        prompt = _encode(builder, system, items)
    if fitter.excess(prompt) > 0:
        room = context_len - len(prompt.ids)
        if room < MIN_REPLY_TOKENS:
            return Fitted(items, None, max_new_tokens, fitter.notices, _too_long(prompt, context_len))
        fitter.notices.append(f"Max new tokens lowered from {max_new_tokens} to {room} so the reply fits the "
                              f"model's context of {context_len:,} tokens.")
        max_new_tokens = room
    return Fitted(items, prompt, max_new_tokens, fitter.notices)


def _too_long(prompt: EncodedPrompt, context_len: int) -> str:
    image_tokens = sum(prompt.image_lengths)
    detail = f" ({image_tokens:,} of them for the image(s))" if image_tokens else ""
    return (f"This message needs {len(prompt.ids):,} tokens{detail}, and the model's context holds "
            f"{context_len:,} including at least {MIN_REPLY_TOKENS} for the reply. "
            + ("Send fewer images at once, or shorten the text." if image_tokens else "Please shorten it."))

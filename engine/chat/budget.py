"""Fitting a conversation into the model's context before anything runs, and saying what was changed.

Every token is counted exactly before any image is encoded (template, each image's placeholders for the reading it
gets, each document's text, history, the reply's max new tokens) against the context. When it does not fit, in
this order:
1. spend fewer tokens on images: read them on a smaller grid or downscaled (each family lists its readings, most
   detailed first, down to the cheapest), older images first, then the newest;
2. leave out images of older turns, oldest first;
3. trim documents (their head and tail kept, the middle left out: engine.chat.document_fit), oldest first, each
   down to no less than a quarter of the context (or its whole length when shorter);
4. leave out the oldest turns, in blocks of about a quarter of the context: the cut then stays where it is for the
   next turns, so their prompts start the same and the prefix cache reuses the KV of everything before;
5. trim the documents left further, oldest first; one that would keep fewer than MIN_DOCUMENT_TOKENS is left out;
6. lower max new tokens for this reply;
and if the newest message alone still cannot fit, say so plainly with the numbers. Every change is a notice.
Documents are trimmed before old turns are left out so that a follow-up question still sees the document it asks
about; the floor in step 3 keeps a long document from pushing out all of the chat before it.
An image's readings are those for all the conversation's images as sent (a family may read an image differently
when a prompt has several); leaving older images out keeps the others' readings, which stay real inputs of the
model, never dearer than before.

`measure` is the strict counterpart, for callers that must never change what they were sent (the HTTP API, the
Python pipeline): the conversation as given, or an error with the numbers.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from engine.chat.document_fit import FitDocument, with_documents
from engine.image_inputs import Reading
from engine.prompt import EncodedPrompt, Message, PromptBuilder

MIN_REPLY_TOKENS = 16
DROP_BLOCK_SHARE = 4  # old turns leave in blocks of context_len / DROP_BLOCK_SHARE tokens
DOCUMENT_FLOOR_SHARE = 4  # step 3 trims a document to no less than context_len / DOCUMENT_FLOOR_SHARE tokens
MIN_DOCUMENT_TOKENS = 32  # step 5: a document cut below this is left out (a scrap misleads more than it helps)
TRIM_ROUNDS = 6  # a cut is re-counted and corrected (engine.chat.budget.Fitter._cut) at most this many times
TRIM_SLACK = 8  # the search for a cut stops when the prompt and reply leave at most this many tokens unused
TRIM_BLOCK_SHARE = 16  # a cut keeps a multiple of context_len / TRIM_BLOCK_SHARE tokens (see Fitter._cut)


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
    documents: list[FitDocument] = field(default_factory=list)


@dataclass
class Fitted:
    items: list[Item]
    prompt: EncodedPrompt | None
    max_new_tokens: int
    notices: list[str]
    error: str | None = None
    document_tokens: int = 0


def _encode(builder: PromptBuilder, system: str, items: list[Item]) -> EncodedPrompt:
    messages = [Message("system", system)] if system.strip() else []
    messages += [Message(it.role, with_documents(it.documents, it.text, builder.tokenizer), len(it.images))
                 for it in items]
    return builder.build(messages, [im.reading.tokens for it in items for im in it.images])


def document_tokens(builder: PromptBuilder, items: list[Item]) -> int:
    """The tokens of the documents' wrapped text as it stands in the prompt."""
    blocks = [doc.render(builder.tokenizer) for it in items for doc in it.documents if doc.kept > 0]
    return sum(len(ids) for ids in builder.tokenizer(blocks, add_special_tokens=False).input_ids) if blocks else 0


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

    def drop_old_images(self, items: list[Item], prompt: EncodedPrompt) -> EncodedPrompt:
        """Step 2: older turns' images, oldest turn first."""
        dropped = []
        for it in items[:-1]:
            if self.excess(prompt) <= 0:
                break
            if it.images:
                dropped += [im.name for im in it.images]
                it.images = []
                prompt = _encode(self.builder, self.system, items)
        if dropped:
            self.notices.append(f"To fit the model's context of {self.context_len:,} tokens, earlier image(s) were "
                                f"left out: {', '.join(dropped)}.")
        return prompt

    def trim_documents(self, items: list[Item], prompt: EncodedPrompt, floor_share: int | None) -> EncodedPrompt:
        """Steps 3 (`floor_share`: none below context_len / floor_share tokens) and 5 (None: down to nothing)."""
        for doc in (d for it in items for d in it.documents):
            floor = 0 if floor_share is None else min(doc.total, self.context_len // floor_share)
            if self.excess(prompt) <= 0:
                break
            if doc.kept > floor:
                prompt = self._cut(items, doc, prompt, floor)
            if floor_share is None and doc.keep is not None and 0 < doc.kept < MIN_DOCUMENT_TOKENS:
                doc.keep = 0
                prompt = _encode(self.builder, self.system, items)
        return prompt

    def _cut(self, items: list[Item], doc: FitDocument, prompt: EncodedPrompt, floor: int) -> EncodedPrompt:
        """Cut `doc` to about the most ids (no fewer than `floor`) with which the prompt fits: first by the excess,
        then corrected both ways within the bounds found, since page markers and token edges move the total too
        (cutting a 30-page PDF to two pages also drops 28 `[Page N]` markers, so the first cut takes too much).
        What is kept is then rounded down to a block of the context: the next turns of the chat take room from
        that slack and the document stays cut where it was, so their prompts start the same and the prefix cache
        reuses the document's KV (as old turns leave in blocks)."""
        fits, too_many = None, doc.kept  # the most ids known to fit, the fewest known not to
        for _ in range(TRIM_ROUNDS):
            excess = self.excess(prompt)
            keep = min(max(doc.kept - excess, floor), too_many - 1)
            if fits is not None:
                keep = max(keep, fits + 1)
            if -TRIM_SLACK <= excess <= 0 or keep >= too_many or keep < floor or keep == doc.kept:
                break
            doc.keep = keep
            prompt = _encode(self.builder, self.system, items)
            if self.excess(prompt) <= 0:
                fits = keep
            else:
                too_many = keep
        if fits is not None:
            block = max(self.context_len // TRIM_BLOCK_SHARE, 1)
            settled = max(floor, fits // block * block)
            if doc.keep != settled:
                doc.keep = settled
                prompt = _encode(self.builder, self.system, items)
        return prompt

    def document_notices(self, items: list[Item]) -> None:
        for doc in (d for it in items for d in it.documents if d.keep is not None and d.kept < d.total):
            self.notices.append(doc.notice(self.context_len) if doc.kept else
                                f"{doc.name} was left out: the model's context of {self.context_len:,} tokens has "
                                "no room for it beside this message.")

    def drop_turns(self, items: list[Item]) -> list[Item]:
        """Step 4: the smallest block-aligned cut of whole exchanges that fits (see the module docstring)."""
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
    for doc in (d for it in items for d in it.documents):
        doc.count(builder.tokenizer)  # once per document: the ids stay with it (engine.chat.document_fit)
    items = [Item(it.role, it.text, list(it.images), [doc.copy() for doc in it.documents]) for it in items]
    fitter = Fitter(builder, system, context_len, max_new_tokens)
    for image in (im for it in items for im in it.images):
        if image.capped_from is not None:
            fitter.notices.append(f"{image.name} was read at {image.reading.label}, {image.reading.tokens:,} "
                                  f"tokens instead of {image.capped_from:,}, as the image token cap in Settings "
                                  "asks.")
    prompt = _encode(builder, system, items)
    if fitter.excess(prompt) > 0 and any(it.images for it in items):
        fitter.shrink_images(items, fitter.excess(prompt))
        prompt = fitter.drop_old_images(items, _encode(builder, system, items))
    if fitter.excess(prompt) > 0:
        prompt = fitter.trim_documents(items, prompt, DOCUMENT_FLOOR_SHARE)
    if fitter.excess(prompt) > 0 and len(items) > 1:
        items = fitter.drop_turns(items)
        prompt = _encode(builder, system, items)
    if fitter.excess(prompt) > 0:
        prompt = fitter.trim_documents(items, prompt, None)
    fitter.document_notices(items)
    if fitter.excess(prompt) > 0:
        room = context_len - len(prompt.ids)
        if room < MIN_REPLY_TOKENS:
            return Fitted(items, None, max_new_tokens, fitter.notices, _too_long(prompt, context_len))
        fitter.notices.append(f"Max new tokens lowered from {max_new_tokens} to {room} so the reply fits the "
                              f"model's context of {context_len:,} tokens.")
        max_new_tokens = room
    return Fitted(items, prompt, max_new_tokens, fitter.notices, document_tokens=document_tokens(builder, items))


def measure(builder: PromptBuilder, system: str, items: list[Item], max_new_tokens: int | None,
            context_len: int) -> Fitted:
    """No fitting: count the prompt as given; `max_new_tokens=None` takes the rest of the context. When prompt and
    reply do not fit, `error` says so with the numbers (prompt tokens, max new tokens, context)."""
    for doc in (d for it in items for d in it.documents):
        doc.count(builder.tokenizer)
    prompt = _encode(builder, system, items)
    room = context_len - len(prompt.ids)
    wanted = room if max_new_tokens is None else max_new_tokens
    if wanted < 1 or wanted > room:
        asked = f"{wanted:,} for the reply" if max_new_tokens is not None else "at least 1 for the reply"
        return Fitted(items, prompt, wanted, [], f"This request needs {len(prompt.ids):,} prompt tokens"
                      f"{_image_share(prompt)} and {asked}, but the model's context holds {context_len:,} tokens.")
    return Fitted(items, prompt, wanted, [], document_tokens=document_tokens(builder, items))


def _image_share(prompt: EncodedPrompt) -> str:
    image_tokens = sum(prompt.image_lengths)
    return f" ({image_tokens:,} of them for the image(s))" if image_tokens else ""


def _too_long(prompt: EncodedPrompt, context_len: int) -> str:
    return (f"This message needs {len(prompt.ids):,} tokens{_image_share(prompt)}, and the model's context holds "
            f"{context_len:,} including at least {MIN_REPLY_TOKENS} for the reply. "
            + ("Send fewer images at once, or shorten the text." if prompt.image_lengths else "Please shorten it."))

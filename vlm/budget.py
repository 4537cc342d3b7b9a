"""Fitting a conversation into the model's context before anything runs, and saying what was changed.

Count every token exactly (template, each image's placeholders, history, the reply's max new tokens) against the
context. When it does not fit: leave out images of older turns first (oldest first), then the oldest turns, then
lower max new tokens for this reply; if the newest message alone still cannot fit, say so plainly. Every change
becomes a notice the user sees. (For checkpoints whose image cost depends on resolution, downscaling older images
would come before leaving them out; every encoder here has a fixed cost per image, so it would not help.)
"""
from __future__ import annotations

from dataclasses import dataclass, field

from engine.prompt import EncodedPrompt, Message, PromptBuilder

MIN_REPLY_TOKENS = 16


@dataclass
class Item:
    """One turn as the budget sees it: its text and its usable images (name, digest, features)."""

    role: str
    text: str
    images: list = field(default_factory=list)  # [(name, digest, feats (T, hidden))]


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
    lengths = [feats.shape[0] for it in items for _, _, feats in it.images]
    return builder.build(messages, lengths)


def fit(builder: PromptBuilder, system: str, items: list[Item], max_new_tokens: int, context_len: int) -> Fitted:
    items = [Item(it.role, it.text, list(it.images)) for it in items]
    notices: list[str] = []
    dropped_images, dropped_turns = [], 0
    while True:
        prompt = _encode(builder, system, items)
        if len(prompt.ids) + max_new_tokens <= context_len:
            break
        older = next((it for it in items[:-1] if it.images), None)
        if older is not None:
            dropped_images += [name for name, _, _ in older.images]
            older.images = []
            continue
        if len(items) > 1:
            # Drop the oldest exchange (a user turn and the reply to it) so roles keep alternating.
            cut = 2 if len(items) > 2 and items[1].role == "assistant" else 1
            items, dropped_turns = items[cut:], dropped_turns + cut
            continue
        room = context_len - len(prompt.ids)
        if room >= MIN_REPLY_TOKENS:
            notices.append(f"Max new tokens lowered from {max_new_tokens} to {room} so the reply fits the "
                           f"model's context of {context_len} tokens.")
            max_new_tokens = room
            break
        image_tokens = sum(f.shape[0] for _, _, f in items[-1].images)
        detail = f" ({image_tokens} of them for the image(s))" if image_tokens else ""
        error = (f"This message needs {len(prompt.ids)} tokens{detail}, and the model's context holds "
                 f"{context_len} including at least {MIN_REPLY_TOKENS} for the reply. "
                 + ("Send fewer images at once, or shorten the text." if image_tokens else "Please shorten it."))
        return Fitted(items, None, max_new_tokens, notices, error)
    if dropped_images:
        notices.insert(0, f"To fit the model's context of {context_len} tokens, earlier image(s) were left out: "
                          f"{', '.join(dropped_images)}.")
    if dropped_turns:
        notices.insert(len(dropped_images) > 0, f"To fit the model's context, the oldest {dropped_turns} "
                                                  "message(s) of this chat were left out.")
    return Fitted(items, prompt, max_new_tokens, notices)

"""Prompt building: the checkpoint's chat template, then each image's placeholder expanded to its exact length.

The template is rendered with one image token per image; after tokenizing, every image token becomes as many
placeholder ids as that image has feature vectors, so prompt length, positions and KV blocks are known before
anything runs. Templates come in two kinds, told apart by rendering a probe once (not by the model's name):
llava-hf templates take structured content ({"type": "image"}, {"type": "text"}); plain LM templates take a string,
into which the image token is written in front of the text.
"""
from __future__ import annotations

from dataclasses import dataclass

from engine.paging.sequence import ImageSpan

PROBE = "q7probe"


@dataclass(frozen=True)
class Message:
    role: str  # "system", "user", "assistant"
    text: str
    num_images: int = 0


@dataclass(frozen=True)
class EncodedPrompt:
    ids: list[int]
    image_offsets: list[int]  # where each image's placeholder run starts, in order
    image_lengths: list[int]

    def spans(self, digests: list[str], embeds: list) -> tuple[ImageSpan, ...]:
        return tuple(ImageSpan(o, n, d, e) for o, n, d, e in
                     zip(self.image_offsets, self.image_lengths, digests, embeds))


class PromptBuilder:
    def __init__(self, tokenizer, template: str | None, image_token: str):
        self.tokenizer = tokenizer
        self.template = template
        self.image_token = image_token
        self.image_token_id = tokenizer.convert_tokens_to_ids(image_token)
        with_special = tokenizer("a").input_ids
        plain = tokenizer("a", add_special_tokens=False).input_ids
        self.bos = with_special[:len(with_special) - len(plain)] if with_special[-len(plain):] == plain else []
        self.structured = template is not None and self._takes_structured_content()

    def _takes_structured_content(self) -> bool:
        probe = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": PROBE}]}]
        try:
            text = self._apply(probe, add_generation_prompt=True)
        except Exception:  # a string-only template may fail on list content
            return False
        return PROBE in text and self.image_token in text

    def _apply(self, messages: list[dict], add_generation_prompt: bool) -> str:
        return self.tokenizer.apply_chat_template(messages, chat_template=self.template, tokenize=False,
                                                  add_generation_prompt=add_generation_prompt)

    def _content(self, m: Message):
        if self.structured:
            return [{"type": "image"}] * m.num_images + ([{"type": "text", "text": m.text}] if m.text else [])
        return f"{self.image_token}\n" * m.num_images + m.text

    def render(self, messages: list[Message], add_generation_prompt: bool = True) -> str:
        if self.template is None:
            raise ValueError("this checkpoint has no chat template; use raw mode and mark images with "
                             f"{self.image_token}")
        return self._apply([{"role": m.role, "content": self._content(m)} for m in messages], add_generation_prompt)

    def encode(self, text: str, image_lengths: list[int]) -> EncodedPrompt:
        """Tokenize a rendered (or raw) prompt and expand its image tokens to `image_lengths`."""
        ids = self.tokenizer(text, add_special_tokens=False).input_ids
        if self.bos and ids[:len(self.bos)] != self.bos:
            ids = self.bos + ids
        found = ids.count(self.image_token_id)
        if found != len(image_lengths):
            raise ValueError(f"the prompt marks {found} image(s) with {self.image_token} but "
                             f"{len(image_lengths)} image(s) were given")
        out, offsets = [], []
        lengths = iter(image_lengths)
        for tok in ids:
            if tok == self.image_token_id:
                offsets.append(len(out))
                out.extend([tok] * next(lengths))
            else:
                out.append(tok)
        return EncodedPrompt(out, offsets, list(image_lengths))

    def build(self, messages: list[Message], image_lengths: list[int]) -> EncodedPrompt:
        return self.encode(self.render(messages), image_lengths)

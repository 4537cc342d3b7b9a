"""Counting a remote model's tokens here, with its own tokenizer and processor, so its chats are fitted exactly.

`LocalCounter.load(source)` loads them with transformers from a checkpoint folder or the local Hub cache (never
the network) and returns None when it cannot: then the remote model counts nothing locally. An image's cost is what
the processor expands its image token to (LLaVA's fixed grid, LLaVA-NeXT's tiles, Qwen2-VL's pixels all come out
right without knowing the family); the prompt is rendered and expanded by the engine's own `PromptBuilder`.
"""
from __future__ import annotations

import logging

from engine.image_inputs import Reading
from engine.prompt import PromptBuilder

log = logging.getLogger(__name__)


class LocalCounter:
    def __init__(self, processor, builder: PromptBuilder, context_len: int):
        self.processor, self.builder, self.context_len = processor, builder, context_len

    @classmethod
    def load(cls, source: str | None) -> "LocalCounter | None":
        if not source:
            return None
        try:
            from transformers import AutoConfig, AutoProcessor

            processor = AutoProcessor.from_pretrained(source, local_files_only=True)
            config = AutoConfig.from_pretrained(source, local_files_only=True)
        except Exception as exc:  # noqa: BLE001 -- not available here: the server counts instead
            log.info("no local tokenizer for %s (%s): the server counts tokens", source, type(exc).__name__)
            return None
        tokenizer = getattr(processor, "tokenizer", None)
        image_token = getattr(processor, "image_token", None)
        template = getattr(processor, "chat_template", None) or getattr(tokenizer, "chat_template", None)
        if tokenizer is None or image_token is None or template is None:
            return None
        text = getattr(config, "text_config", None) or config
        context = getattr(text, "max_position_embeddings", 0) or 0
        return cls(processor, PromptBuilder(tokenizer, template, image_token), context)

    def readings(self, picture) -> list[Reading]:
        """What the processor makes of one image: its count of image tokens."""
        ids = self.processor(text=self.builder.image_token, images=[picture])["input_ids"][0]
        return [Reading(sum(1 for i in ids if i == self.builder.image_token_id), "")]

"""What a loaded model is, for the chat layer: its engine (with the family's image input side) and prompt builder.

A family is one module in engine/families/ plus one line in the registry (`engine.families.FAMILIES`); it names its
checkpoint's key prefixes, builds the engine and its `engine.image_inputs.ImageInputs`, and the prompt builder.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from engine.image_inputs import ImageInputs


@dataclass
class LoadedModel:
    """Everything a chat needs for one checkpoint."""

    name: str
    description: str
    engine: Any  # engine.llm_engine.LLMEngine; its vision stage holds `images`
    prompt: Any  # engine.prompt.PromptBuilder
    model_id: str | None = None  # what `load_model` takes to load it again: "default", a Hub id or a folder

    @property
    def images(self) -> ImageInputs | None:
        """None: a text-only language model."""
        return self.engine.images

"""The glue between engine/ (language model runtime) and vision/ (images): the only package that imports both.

`ChatModel` is what the UI and the CLI use; `vlm.types` holds the values they exchange.
"""
from vlm.chat_model import ChatModel
from vlm.types import ChatImage, ChatTurn, Finished, GenerationSettings, Plan, TextDelta, TurnStats

__all__ = ["ChatModel", "ChatImage", "ChatTurn", "Finished", "GenerationSettings", "Plan", "TextDelta", "TurnStats"]

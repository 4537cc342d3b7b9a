"""The chat layer on top of the engine: conversations in, streamed replies out, every change to fit said in words.

`ChatModel` is what the UI and the CLI use; `engine.chat.types` holds the values they exchange (no torch in them).
"""
from engine.chat.chat_model import ChatModel
from engine.chat.types import (CHAT_DEFAULTS, CLI_DEFAULTS, LONG_DOCUMENT, PRESETS, ChatDocument, ChatImage,
                               ChatTurn, Finished, GenerationSettings, Plan, Queued, TextDelta, TurnStats)

__all__ = ["CHAT_DEFAULTS", "CLI_DEFAULTS", "LONG_DOCUMENT", "PRESETS", "ChatModel", "ChatDocument", "ChatImage",
           "ChatTurn", "Finished", "GenerationSettings", "Plan", "Queued", "TextDelta", "TurnStats"]

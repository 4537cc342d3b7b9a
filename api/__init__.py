"""The OpenAI-compatible HTTP API over the chat layer: `openai_router(...)` for app.py, `python -m api` alone.

Imports flow one way: app.py -> api -> engine (the chat layer and its public pieces) and vision.intake.
"""
from api.media import MediaFetcher
from api.routes import openai_router

__all__ = ["MediaFetcher", "openai_router"]

"""Pieces several families share: building the engine for a checkpoint's language model, and its stop tokens."""
from __future__ import annotations

from engine.checkpoints.reader import Checkpoint
from engine.config import EngineConfig, TextConfig
from engine.llm_engine import LLMEngine
from engine.models import MODELS

# Plain decoder checkpoints keep everything under `model.` and `lm_head.`.
TEXT_PREFIXES = (("lm_head.", "text", "lm_head."), ("model.", "text", "model."))


def _ids(value) -> set[int]:
    """An eos_token_id field: absent, one id, or a list of ids (possibly with nulls)."""
    if value is None:
        return set()
    values = value if isinstance(value, (list, tuple)) else [value]
    return {int(v) for v in values if v is not None}


def eos_token_ids(ck: Checkpoint, text: TextConfig, tokenizer) -> tuple[int, ...]:
    """Every id that ends a reply: generation_config.json's, the text config's, and the tokenizer's eos."""
    eos = _ids(ck.generation_config.get("eos_token_id")) | set(text.eos_token_ids)
    eos |= _ids(getattr(tokenizer, "eos_token_id", None))
    return tuple(sorted(eos))


def build_engine(ck: Checkpoint, text_dict: dict, weights: dict, tokenizer, engine_cfg: EngineConfig) -> LLMEngine:
    """The language model's engine; a family with images then attaches its input side (`attach_images`)."""
    text = TextConfig.from_dict(text_dict, MODELS[text_dict["model_type"]][1])
    return LLMEngine(text, weights, tokenizer, engine_cfg, eos_token_ids(ck, text, tokenizer))

"""Plain Llama / Qwen2 checkpoints (`LlamaForCausalLM`, `Qwen2ForCausalLM`): text only, no image input side."""
from __future__ import annotations

from transformers import AutoTokenizer

from engine.checkpoints.reader import Checkpoint, chat_template
from engine.checkpoints.smollm_gguf import IMAGE_TOKEN
from engine.config import EngineConfig
from engine.families.base import LoadedModel
from engine.families.common import TEXT_PREFIXES, build_engine
from engine.prompt import PromptBuilder


def load(ck: Checkpoint, name: str, engine_cfg: EngineConfig) -> LoadedModel:
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    engine = build_engine(ck, ck.config, ck.parts(TEXT_PREFIXES)["text"], tokenizer, engine_cfg)
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer), IMAGE_TOKEN)
    return LoadedModel(name, f"A text-only language model on {engine_cfg.device}: images are not seen.",
                       engine, prompt)

"""LLaVA-1.5 and llava-interleave (`LlavaForConditionalGeneration`): a CLIP or SigLIP tower, an MLP projector, and
a Llama or Qwen2 language model. Every image is read the same way, at the tower's square size, for a fixed count
of placeholder tokens (576 for CLIP-L/336 with "default" selection, 729 for SigLIP-384 with "full").

The input side: preprocess (on the GPU where there is one: the decoded image's bytes go over, not a CPU-resized
copy), tower at the selected layer(s), projector. On CUDA each image's tower + projector pass replays a CUDA graph
captured for one image; the engine's vision stage calls this on its loop thread only, so the graph's static input
buffer is never shared between threads.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch
from transformers import AutoConfig, AutoTokenizer

from engine.checkpoints.reader import Checkpoint, chat_template
from engine.config import EngineConfig
from engine.families.base import LoadedModel
from engine.image_inputs import ImageInput, ImageInputs, Reading
from engine.families.common import build_engine
from engine.llm_engine import LLMEngine
from engine.prompt import PromptBuilder
from vision.preprocess import ImageProcessor, pil_to_uint8
from vision.projector import MultiModalProjector, ProjectorConfig
from vision.towers import build_vision_tower, load_tower_weights

# transformers 5 writes `model.language_model.` / `model.vision_tower.`; 4.x wrote `language_model.model.` / ...
PREFIXES = (
    ("model.language_model.", "text", "model."),
    ("language_model.model.", "text", "model."),
    ("language_model.lm_head.", "text", "lm_head."),
    ("model.vision_tower.", "vision", ""),
    ("vision_tower.", "vision", ""),
    ("model.multi_modal_projector.", "projector", ""),
    ("multi_modal_projector.", "projector", ""),
    ("lm_head.", "text", "lm_head."),
)


class LlavaImages(ImageInputs):
    """Preprocess -> vision tower (selected layer, strategy) -> multimodal projector, one fixed reading."""

    def __init__(self, processor: ImageProcessor, tower: torch.nn.Module, projector: torch.nn.Module,
                 device: torch.device, dtype: torch.dtype):
        self.processor, self.tower, self.projector = processor, tower, projector
        self.device, self.dtype = torch.device(device), dtype
        self.reading = Reading(tower.num_tokens, "")
        self.forward = self._forward
        if self.device.type == "cuda":
            from vision.graphed import GraphedForward  # imported where used: CPU installs never need it

            self.forward = GraphedForward(self._forward, (1, 3, *processor.output_size()), dtype, self.device)

    def readings(self, size: tuple[int, int]) -> list[Reading]:
        return [self.reading]

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixels))  # (N, 3, H, W) -> (N, T, hidden)

    def pixels(self, images: list[ImageInput]) -> torch.Tensor:
        if self.device.type == "cuda":
            pixels = self.processor.preprocess_uint8([pil_to_uint8(im.picture).to(self.device) for im in images])
        else:
            pixels = self.processor([im.picture for im in images])
        return pixels.to(self.device, self.dtype)  # (N, 3, H, W)

    def _encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        pixels = self.pixels(images)
        if self.device.type == "cuda":  # one graph replay per image
            return [self.forward(pixels[i:i + 1])[0] for i in range(len(images))]
        return list(self.forward(pixels))


def image_processor(ck: Checkpoint) -> dict:
    """Hub checkpoints carry preprocessor_config.json; transformers 5 nests it in processor_config.json."""
    return ck.read("preprocessor_config.json") or ck.read("processor_config.json").get("image_processor", {})


def load_vision(ck: Checkpoint, full, parts: dict, text_hidden: int, device: torch.device, dtype: torch.dtype):
    """The tower and the projector, filled from the checkpoint and moved to `device` / `dtype`."""
    tower = build_vision_tower(full.vision_config.to_dict(), full.vision_feature_layer,
                               full.vision_feature_select_strategy, device, dtype)
    load_tower_weights(tower, parts["vision"])
    projector = MultiModalProjector(ProjectorConfig.from_dict(full.to_dict(), text_hidden))
    projector.load_state_dict(parts["projector"])
    return tower.eval(), projector.to(device=device, dtype=dtype).eval()


@dataclass
class LlavaParts:
    """What every LLaVA-style family loads the same way: the language model's engine, the tower and projector on
    its device and dtype, the prompt builder, and the checkpoint's config (HF defaults filled) and tensors."""

    config: Any  # the transformers config of the checkpoint's architecture
    parts: dict  # checkpoint tensors by part, as the family's PREFIXES split them
    engine: LLMEngine
    tower: torch.nn.Module
    projector: torch.nn.Module
    prompt: PromptBuilder

    @property
    def kind(self) -> str:
        return f"{self.config.vision_config.model_type} + {self.config.text_config.model_type}"


def load_parts(ck: Checkpoint, engine_cfg: EngineConfig, prefixes=PREFIXES) -> LlavaParts:
    """The pieces of `ck`, its tensors split by `prefixes` (the family's PREFIXES); no image input side yet."""
    full = AutoConfig.from_pretrained(ck.path)  # fills the defaults a llava config.json leaves out
    text = full.text_config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    parts = ck.parts(prefixes)
    engine = build_engine(ck, text, parts["text"], tokenizer, engine_cfg)
    tower, projector = load_vision(ck, full, parts, text["hidden_size"], engine.device, engine.dtype)
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer),
                           tokenizer.convert_ids_to_tokens(full.image_token_id))
    return LlavaParts(full, parts, engine, tower, projector, prompt)


def load(ck: Checkpoint, name: str, engine_cfg: EngineConfig) -> LoadedModel:
    m = load_parts(ck, engine_cfg)
    m.engine.attach_images(LlavaImages(ImageProcessor.from_dict(image_processor(ck)), m.tower, m.projector,
                                       m.engine.device, m.engine.dtype))
    return LoadedModel(name, f"LLaVA checkpoint ({m.kind}) on {engine_cfg.device}.", m.engine, m.prompt)

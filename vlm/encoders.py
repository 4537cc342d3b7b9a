"""Image encoders: decoded images in, per-image feature rows in the language model's embedding space out.

Two kinds stand behind one interface: a LLaVA checkpoint's vision tower + projector, and the embedded default's
ImageNet classifier rendered as words through the LLM's own token embeddings. Both are cached by image content
hash, so a retry, an undo or a follow-up question never encodes the same image twice.
"""
from __future__ import annotations

from collections import OrderedDict
from typing import Callable

import torch
from PIL import Image

from vision.preprocess import pil_to_uint8


class FeatureCache:
    """LRU of image digest -> (T, hidden) features."""

    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self.items: OrderedDict[str, torch.Tensor] = OrderedDict()

    def get(self, key: str) -> torch.Tensor | None:
        if key in self.items:
            self.items.move_to_end(key)
        return self.items.get(key)

    def put(self, key: str, value: torch.Tensor) -> None:
        self.items[key] = value
        self.items.move_to_end(key)
        while len(self.items) > self.capacity:
            self.items.popitem(last=False)


class ImageEncoder:
    """Subclasses define `_encode(images) -> list[(T_i, hidden)]`; this class adds the cache."""

    def __init__(self, cache_capacity: int = 64):
        self.cache = FeatureCache(cache_capacity)

    def encode(self, images: list[Image.Image], digests: list[str]) -> list[torch.Tensor]:
        missing = [i for i, d in enumerate(digests) if self.cache.get(d) is None]
        if missing:
            with torch.inference_mode():
                fresh = self._encode([images[i] for i in missing])
            for i, feats in zip(missing, fresh):
                self.cache.put(digests[i], feats)
        return [self.cache.get(d) for d in digests]

    def _encode(self, images: list[Image.Image]) -> list[torch.Tensor]:
        raise NotImplementedError


class LlavaEncoder(ImageEncoder):
    """Preprocess -> vision tower (selected layer, strategy) -> multimodal projector.

    On a GPU, resizing and normalising run there (the decoded image's bytes go over, not a CPU-resized copy), and
    each image's tower + projector pass replays a CUDA graph captured for one image.
    """

    def __init__(self, processor, tower: torch.nn.Module, projector: torch.nn.Module, device, dtype):
        super().__init__()
        self.processor, self.tower, self.projector = processor, tower, projector
        self.device, self.dtype = torch.device(device), dtype
        self.forward = self._forward
        if self.device.type == "cuda":
            from vision.graphed import GraphedForward  # imported where used: CPU installs never need it

            self.forward = GraphedForward(self._forward, (1, 3, *processor.output_size()), dtype, self.device)

    def _forward(self, pixels: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(pixels))  # (N, 3, H, W) -> (N, T, hidden)

    def _encode(self, images):
        if self.device.type == "cuda":
            pixels = self.processor.preprocess_uint8([pil_to_uint8(im).to(self.device) for im in images])
        else:
            pixels = self.processor(images)
        pixels = pixels.to(self.device, self.dtype)  # (N, 3, H, W)
        return [self.forward(pixels[i:i + 1])[0] for i in range(len(images))]


class LabelEncoder(ImageEncoder):
    """The embedded default: ImageNet class probabilities -> a sentence -> the LLM's token embeddings."""

    def __init__(self, classifier, label_projector: Callable, device):
        super().__init__()
        self.classifier, self.labels = classifier, label_projector
        self.device = torch.device(device)

    def _encode(self, images):
        pixels = self.classifier.processor(images).to(self.device)
        return [p.embeds for p in self.labels(self.classifier.classify(pixels))]

"""The contract between a model family's image input side and the engine.

Each family (engine/families/) implements `ImageInputs`: what an image costs in each way the model can read it
(`readings`, from the image's size and the model's config alone, before anything is encoded; `prompt_readings` for
the images of one prompt together, where their number matters), and how images become feature rows (`encode`,
called on the engine loop's thread only, by engine.vision_stage). Token counting, tiling and feature packing of one
family live together in its module.

Not here: decoding uploads (vision.intake, on the caller's thread), scheduling the encoding (engine.vision_stage).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Hashable

import torch


@dataclass(frozen=True)
class Reading:
    """One way to read an image: how many placeholder tokens it costs, and what that means in words.

    `key` tells the family which reading to encode (a grid pinpoint, say); with the image's digest it names the
    features in the feature cache. The first reading a family lists for an image is the model's own, exact one.
    """

    tokens: int
    label: str  # e.g. "672x336", "its 336x336 base tile alone"; "" for a family with one fixed reading
    key: Hashable = None


@dataclass(frozen=True)
class ImageInput:
    """A decoded, validated image on its way to the encoder: what the engine thread needs and nothing else."""

    picture: Any  # a PIL image in RGB
    digest: str  # of the uploaded bytes
    reading: Reading
    name: str = "image"

    @property
    def cache_key(self) -> tuple:
        return self.digest, self.reading.key


class ImageInputs:
    """A family's input side for images. Subclasses set `max_batch` and define `readings` and `_encode`."""

    max_batch: int = 16  # images one encoder call may take (the engine also caps images per step)

    def readings(self, size: tuple[int, int]) -> list[Reading]:
        """Every way to read an image of `size` (width, height), most tokens first; the first is the model's own."""
        raise NotImplementedError

    def prompt_readings(self, sizes: list[tuple[int, int]]) -> list[list[Reading]]:
        """`readings` of each image of one prompt (the whole conversation), in order. What the chat layer calls: a
        family whose model reads an image differently when its prompt holds several (LLaVA-OneVision) overrides it."""
        return [self.readings(size) for size in sizes]

    def encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        """(T_i, hidden) feature rows per image, T_i == images[i].reading.tokens. Engine thread only."""
        with torch.inference_mode():
            feats = self._encode(images)
        for image, f in zip(images, feats):
            if f.shape[0] != image.reading.tokens:
                raise RuntimeError(f"encoder produced {f.shape[0]} rows for a reading of {image.reading.tokens}")
        return feats

    def _encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        raise NotImplementedError

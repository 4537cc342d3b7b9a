"""LLaVA-OneVision (`LlavaOnevisionForConditionalGeneration`: llava-onevision-qwen2 0.5b / 7b): SigLIP-384, a
Qwen2 language model, images read anyres as LLaVA-NeXT's (engine.families.llava_next), with the grid shrunk
bilinearly past `anyres_max_N` tiles (vision.anyres).

What differs from NeXT is how a prompt with several images is read. transformers (image processor and
`get_image_features`, through `batch_num_images`) reads an image on the anyres grid only when it is its prompt's only
image; each image of a multi-image prompt is padded to a square with the mean colour, resized to one tile, and read
as that tile's features plus one `image_newline`: 729 + 1 tokens at 384 px, whatever its size. So the readings of an
image depend on the prompt (`prompt_readings`): alone, NeXT's list (transformers' grid, coarser grids, the base tile
alone); with others, the one square reading (key `SQUARE`). A prompt here is what transformers' chat template gets:
the whole conversation, so a photo sent in a later turn makes earlier ones square too, as it does there.

Not here: video (frames pooled 2x2), which this app does not take.
"""
from __future__ import annotations

import torch

from engine.checkpoints.reader import Checkpoint
from engine.config import EngineConfig
from engine.families.base import LoadedModel
from engine.families.llava_next import AnyresImages, anyres_readings, load_anyres
from engine.image_inputs import ImageInput, Reading
from vision.anyres import AnyresConfig
from vision.preprocess import pad_to_square

SQUARE = "square"  # Reading.key of the multi-image reading


def square_reading(anyres: AnyresConfig) -> Reading:
    s = anyres.tile_size
    return Reading(anyres.base_tokens + 1, f"its {s}x{s} square tile", SQUARE)


def onevision_readings(anyres: AnyresConfig, sizes: list[tuple[int, int]]) -> list[list[Reading]]:
    """The readings of each image of one prompt, sizes (width, height) as PIL gives them."""
    if len(sizes) == 1:
        return [anyres_readings(anyres, sizes[0])]
    return [[square_reading(anyres)] for _ in sizes]


class OnevisionImages(AnyresImages):
    """NeXT's anyres input side, plus the square reading of an image in a multi-image prompt."""

    def prompt_readings(self, sizes: list[tuple[int, int]]) -> list[list[Reading]]:
        return onevision_readings(self.anyres, sizes)

    def pixels(self, image: ImageInput) -> torch.Tensor:
        if image.reading.key != SQUARE:
            return super().pixels(image)
        processor = self.anyres.tile_processor
        fill = [int(m * 255) for m in processor.image_mean or (0, 0, 0)]  # transformers' background colour
        return processor.preprocess_uint8([pad_to_square(self._uint8(image), fill)])  # (1, 3, S, S)

    def pack(self, features: torch.Tensor, image: ImageInput) -> torch.Tensor:
        if image.reading.key != SQUARE:
            return super().pack(features, image)
        return torch.cat([features[0], self.newline[None].to(features)])  # (P * P + 1, hidden)


def load(ck: Checkpoint, name: str, engine_cfg: EngineConfig) -> LoadedModel:
    m = load_anyres(ck, engine_cfg, OnevisionImages)
    return LoadedModel(name, f"LLaVA-OneVision checkpoint ({m.kind}) on {engine_cfg.device}: one image is read on "
                             "a grid of tiles for its size, each of several as one square tile.", m.engine, m.prompt)

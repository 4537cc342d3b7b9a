"""LLaVA-NeXT (`LlavaNextForConditionalGeneration`: llava-v1.6 vicuna and mistral): the LLaVA tower, projector and
language model (engine.families.llava), with images read "anyres": a base tile of the whole image plus a grid of
tiles at a pinpoint resolution, unpadded to the image's aspect, each grid row closed by the `image_newline`
embedding (vision.anyres has the arithmetic, equal to transformers').

Readings of an image, most tokens first: transformers' own (the best-fitting pinpoint), each coarser grid of the
checkpoint's pinpoint list that costs fewer tokens ("672x336", width x height, as one says an image's size), and
the base tile alone ("its 336x336 base tile alone"). Every one is a real model input: the same features transformers
computes when its pinpoint list holds only that pinpoint, or its base tile's. `Reading.key` is the pinpoint
(height, width), None for the base tile alone. The reading of an image does not depend on the other images of its
prompt here (LLaVA-OneVision's does: engine.families.llava_onevision).

Encoding, on the engine loop's thread: every tile of every image of a call goes through the tower and projector
together, then each image's features are packed. On CUDA the pixels are made on the GPU from the decoded image and
the tower runs as CUDA-graph replays of up to `GRAPH_TILES` tiles (one graph per tile count, captured at load):
one CLIP-L tile is ~300 small kernels, so for the usual 1-5 tiles launching them one by one costs as much as
running them. On a CPU, plain passes of up to `CPU_TILES` tiles (a bound on activation memory, not on speed).

Not here: the grid arithmetic (vision.anyres), the tower and projector (vision.vit, vision.projector).
"""
from __future__ import annotations

import torch

from engine.checkpoints.reader import Checkpoint
from engine.config import EngineConfig
from engine.families import llava
from engine.families.base import LoadedModel
from engine.image_inputs import ImageInput, ImageInputs, Reading
from vision.anyres import AnyresConfig
from vision.preprocess import pil_to_uint8

# Checkpoint keys: LLaVA's, plus the newline embedding (`image_newline` in 4.x files, `model.image_newline` in 5.x).
PREFIXES = (("model.image_newline", "newline", "image_newline"),
            ("image_newline", "newline", "image_newline")) + llava.PREFIXES

GRAPH_TILES = 8  # tiles per CUDA-graph replay; 8 SigLIP-so400m tiles (5,832 tokens) already fill an H200
CPU_TILES = 40  # tiles per tower pass on a CPU: one OneVision image at most (37), ~0.5 GB of fp32 activations


def grid_label(pinpoint: tuple[int, int]) -> str:
    height, width = pinpoint
    return f"{width}x{height}"


def anyres_readings(anyres: AnyresConfig, size: tuple[int, int]) -> list[Reading]:
    """The readings of an image of `size` (width, height), as PIL gives it; vision.anyres counts in (h, w)."""
    width, height = size
    s = anyres.tile_size
    return [Reading(r.tokens, f"its {s}x{s} base tile alone" if r.base_only else grid_label(r.pinpoint), r.pinpoint)
            for r in anyres.readings((height, width))]


class AnyresImages(ImageInputs):
    """Tiles -> tower (selected layer, strategy) -> projector -> per image, packed with `image_newline`."""

    def __init__(self, anyres: AnyresConfig, tower: torch.nn.Module, projector: torch.nn.Module,
                 newline: torch.Tensor, device: torch.device, dtype: torch.dtype):
        self.anyres, self.tower, self.projector = anyres, tower, projector
        self.newline = newline  # (hidden,), on device, in dtype
        self.device, self.dtype = torch.device(device), dtype
        self.forward = self._forward
        if self.device.type == "cuda":
            from vision.graphed import GraphedBatches  # imported where used: CPU installs never need it

            s = anyres.tile_size
            self.forward = GraphedBatches(self._forward, (3, s, s), dtype, self.device, GRAPH_TILES)

    def readings(self, size: tuple[int, int]) -> list[Reading]:
        return anyres_readings(self.anyres, size)

    def _forward(self, tiles: torch.Tensor) -> torch.Tensor:
        return self.projector(self.tower(tiles))  # (N, 3, S, S) -> (N, P * P, hidden)

    def _uint8(self, image: ImageInput) -> torch.Tensor:
        return pil_to_uint8(image.picture).to(self.device)  # (3, H, W): the decoded image's bytes go over

    def pixels(self, image: ImageInput) -> torch.Tensor:
        """(n_tiles, 3, S, S) float32 on the device, for the image's reading."""
        key = image.reading.key
        return self.anyres.pixel_values(self._uint8(image), key, base_only=key is None)

    def pack(self, features: torch.Tensor, image: ImageInput) -> torch.Tensor:
        """(n_tiles, P * P, hidden) -> (T, hidden), T = image.reading.tokens."""
        key = image.reading.key
        height, width = image.picture.size[::-1]
        return self.anyres.pack_features(features, (height, width), key, self.newline, base_only=key is None)

    def _encode(self, images: list[ImageInput]) -> list[torch.Tensor]:
        pixels = [self.pixels(im) for im in images]
        tiles = torch.cat(pixels).to(self.dtype)  # (sum of tiles, 3, S, S)
        if self.device.type == "cuda":
            features = self.forward(tiles)
        else:
            features = torch.cat([self.forward(chunk) for chunk in tiles.split(CPU_TILES)])
        return [self.pack(f, im) for f, im in zip(features.split([p.shape[0] for p in pixels]), images)]


def image_newline(m: llava.LlavaParts) -> torch.Tensor:
    """The checkpoint's `image_newline` (hidden,), on the engine's device and dtype."""
    newline = m.parts.get("newline", {}).get("image_newline")
    hidden = m.config.text_config.hidden_size
    if newline is None or tuple(newline.shape) != (hidden,):
        raise ValueError(f"the checkpoint's image_newline must be a ({hidden},) tensor, got "
                         f"{None if newline is None else tuple(newline.shape)}")
    return newline.to(m.engine.device, m.engine.dtype)


def load_anyres(ck: Checkpoint, engine_cfg: EngineConfig, images_cls: type[AnyresImages]) -> llava.LlavaParts:
    """The LLaVA parts, with an anyres image input side (`images_cls`) attached to the engine."""
    m = llava.load_parts(ck, engine_cfg, PREFIXES)
    anyres = AnyresConfig.from_configs(m.config.to_dict(), llava.image_processor(ck))
    m.engine.attach_images(images_cls(anyres, m.tower, m.projector, image_newline(m), m.engine.device,
                                      m.engine.dtype))
    return m


def load(ck: Checkpoint, name: str, engine_cfg: EngineConfig) -> LoadedModel:
    m = load_anyres(ck, engine_cfg, AnyresImages)
    return LoadedModel(name, f"LLaVA-NeXT checkpoint ({m.kind}) on {engine_cfg.device}: images read on a grid of "
                             "tiles for their size.", m.engine, m.prompt)

"""LLaVA-NeXT / LLaVA-OneVision "anyres" image reading: grid choice, token counts, tiles, feature packing.

An image is read as a base tile (the whole image resized to the tower's square input) plus a grid of tiles covering
it at a "pinpoint" resolution from the checkpoint's `image_grid_pinpoints`. After the tower and projector, the
grid's features are reassembled, the rows or columns that only saw padding are cropped off ("unpadding"), OneVision
shrinks the result bilinearly when it exceeds `anyres_max_N` tiles, and an `image_newline` embedding closes each
row. For one image this reproduces transformers 5.x:
- `best_pinpoint`: `select_best_resolution`;
- `num_image_tokens`: what `LlavaNextProcessor` / `LlavaOnevisionProcessor` expand `<image>` into
  (`_get_number_of_features`), which is also the length `pack_features` returns;
- `pixel_values`: `LlavaNextImageProcessor` / `LlavaOnevisionImageProcessor` (torchvision backend, the default):
  equal on CPU; on CUDA within `vision.preprocess.resize_uint8`'s tolerance;
- `pack_features`: `LlavaNextModel` / `LlavaOnevisionModel.pack_image_features`.
Beyond transformers, any other pinpoint of the list (a coarser grid), or the base tile alone (no grid, no newline),
can be asked for, so that an image can be read for fewer tokens when a conversation does not fit; `readings` lists
the distinct options. Token counting is plain integer arithmetic, no tensors.

Not here: the tower and projector (`vision.vit`, `vision.projector`), decoding uploads (`vision.intake`), where the
tokens go in the prompt, OneVision's multi-image and video readings (pad to square, one tile, pooling).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from vision.preprocess import CLIP_MEAN, CLIP_STD, ImageProcessor, resize_uint8
from vision.vit import VisionConfig, num_image_tokens as tower_tokens

Hw = tuple[int, int]  # (height, width)


def _pinpoint_grid(h_max: int, step: int) -> list[list[int]]:
    return [[h, w] for h in range(step, h_max + 1, step) for w in range(step, h_max + 1, step)]  # h-major, as HF


@dataclass(frozen=True)
class AnyresFamily:
    """What differs between the NeXT and OneVision readings, plus the HF defaults for keys a config omits."""

    downsample: bool  # OneVision: shrink the unpadded grid above `vision_aspect_ratio`'s anyres_max_N tiles
    model_defaults: dict  # HF LlavaNextConfig / LlavaOnevisionConfig
    processor_defaults: dict  # HF LlavaNextImageProcessor / LlavaOnevisionImageProcessor class attributes


_PROCESSOR_COMMON = dict(resample=3, do_resize=True, do_rescale=True, rescale_factor=1 / 255, do_normalize=True,
                         image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True)
_NEXT = AnyresFamily(
    downsample=False,
    model_defaults=dict(
        vision_feature_select_strategy="default",
        image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]],
        vision_config=dict(model_type="clip_vision_model", hidden_size=1024, intermediate_size=4096, patch_size=14,
                           image_size=336, num_hidden_layers=24, num_attention_heads=16)),
    processor_defaults=dict(_PROCESSOR_COMMON, size={"shortest_edge": 224}, do_center_crop=True,
                            crop_size={"height": 224, "width": 224},
                            image_grid_pinpoints=[[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]),
)
_ONEVISION = AnyresFamily(
    downsample=True,
    model_defaults=dict(
        vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9",
        image_grid_pinpoints=_pinpoint_grid(2304, 384),
        vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, intermediate_size=4304, patch_size=14,
                           image_size=384, num_hidden_layers=26, num_attention_heads=16)),
    processor_defaults=dict(_PROCESSOR_COMMON, size={"height": 384, "width": 384}, do_center_crop=None,
                            crop_size=None, image_grid_pinpoints=_pinpoint_grid(2304, 384)),
)
# Keyed by preprocessor_config.json's `image_processor_type` (4.x files may name the "Fast" class; same maths).
FAMILIES = {
    "LlavaNextImageProcessor": _NEXT,
    "LlavaNextImageProcessorFast": _NEXT,
    "LlavaOnevisionImageProcessor": _ONEVISION,
    "LlavaOnevisionImageProcessorFast": _ONEVISION,
}


def select_best_resolution(image_hw: Hw, pinpoints: tuple[Hw, ...] | list) -> Hw:
    """HF `select_best_resolution`: the pinpoint keeping most of the image's pixels, then wasting fewest; the
    first in list order on a tie."""
    return min(pinpoints, key=lambda p: _fit_rank(image_hw, p))


def _fit_rank(image_hw: Hw, pinpoint: Hw) -> tuple[int, int]:
    # (-effective, wasted) pixels, with HF's float scale and int truncation; `min` keeps the first of equals.
    h, w = image_hw
    ph, pw = pinpoint
    scale = min(pw / w, ph / h)
    effective = min(int(w * scale) * int(h * scale), w * h)
    return -effective, ph * pw - effective


def fit_size(image_hw: Hw, target_hw: Hw) -> Hw:
    """HF `get_patch_output_size`: the aspect-kept size of the image inside `target_hw`, one side filling it."""
    h, w = image_hw
    th, tw = target_hw
    if tw / w < th / h:
        return min(math.ceil(h * (tw / w)), th), tw
    return th, min(math.ceil(w * (th / h)), tw)


def unpadded_box(image_hw: Hw, grid_hw: Hw) -> tuple[int, int, int, int]:
    """HF `unpad_image` on a (grid_h, grid_w) feature map -> (top, left, height, width) kept.

    The image was fitted into the grid keeping its aspect and centred, so the long-ratio side is full and the other
    is cropped evenly. `round(..., 7)` as HF (#35775): without it float error such as 26.9999999 truncates a row.
    """
    h, w = image_hw
    gh, gw = grid_hw
    if w / h > gw / gh:
        pad = (gh - int(round(h * (gw / w), 7))) // 2
        return pad, 0, gh - 2 * pad, gw
    pad = (gw - int(round(w * (gh / h), 7))) // 2
    return 0, pad, gh, gw - 2 * pad


@dataclass(frozen=True)
class GridLayout:
    """The feature grid of one reading at a pinpoint, in feature cells (P = tile_size // patch_size per tile)."""

    tiles_hw: Hw  # tiles down, across
    box: tuple[int, int, int, int]  # (top, left, height, width) kept by unpadding, of (tiles_h * P, tiles_w * P)
    out_hw: Hw  # after OneVision's downsampling (else the box's height, width); one newline ends each row

    @property
    def tokens(self) -> int:
        h, w = self.out_hw
        return h * (w + 1)


@dataclass(frozen=True)
class Reading:
    """One way to read an image: on the grid of `pinpoint` (height, width), or None for the base tile alone."""

    pinpoint: Hw | None
    tokens: int

    @property
    def base_only(self) -> bool:
        return self.pinpoint is None


def _parse_max_tiles(vision_aspect_ratio: str) -> int:
    prefix = "anyres_max_"
    tail = vision_aspect_ratio[len(prefix):] if vision_aspect_ratio.startswith(prefix) else ""
    if not tail.isdigit() or int(tail) < 1:
        raise ValueError(f"vision_aspect_ratio {vision_aspect_ratio!r} is not of the form 'anyres_max_N', N >= 1")
    return int(tail)


def _hw(size: dict | int) -> Hw:
    return (size, size) if isinstance(size, int) else (size["height"], size["width"])


@dataclass(frozen=True)
class AnyresConfig:
    pinpoints: tuple[Hw, ...]  # image_grid_pinpoints, (height, width), multiples of tile_size
    tile_size: int  # S: the tower's image_size, which is also the processor's tile (crop) size
    patch_size: int  # the tower's; P = S // patch_size feature cells per tile side
    max_tiles: int | None  # OneVision's anyres_max_N; None: no downsampling (NeXT)
    base_hw: Hw  # the whole image is resized to this, then goes through `tile_processor` (HF: `size`)
    resample: int  # PIL id, for the base and the fit-to-pinpoint resizes
    tile_processor: ImageProcessor  # per tile: resize / crop / rescale + normalise, as HF's per-patch loop

    def __post_init__(self):
        if not self.pinpoints:
            raise ValueError("image_grid_pinpoints is empty")
        s = self.tile_size
        if any(h < s or w < s or h % s or w % s for h, w in self.pinpoints):
            raise ValueError(f"image_grid_pinpoints {self.pinpoints} must be positive multiples of the tile size {s}")
        if not 1 <= self.patch_size <= s:
            raise ValueError(f"patch_size {self.patch_size} must be in [1, {s}]")
        if self.tile_processor.output_size() != (s, s):
            raise ValueError(f"the processor makes {self.tile_processor.output_size()} tiles, the tower takes {s}")
        if self.max_tiles is not None and self.max_tiles < 1:
            raise ValueError("max_tiles must be at least 1")

    @classmethod
    def from_configs(cls, model_config: dict, processor_config: dict) -> AnyresConfig:
        """From config.json and preprocessor_config.json dicts. NeXT or OneVision is told by the processor's
        `image_processor_type`; keys either file omits take the HF defaults of that family."""
        family = FAMILIES.get(processor_config.get("image_processor_type"))
        if family is None:
            raise ValueError(f"unknown image_processor_type {processor_config.get('image_processor_type')!r}; "
                             f"known: {sorted(FAMILIES)}")
        m = {**family.model_defaults, **model_config}
        p = {**family.processor_defaults, **processor_config}
        # As HF: a given vision_config takes its model_type's defaults (the family's tower only names the type).
        default_tower = family.model_defaults["vision_config"]
        vision = VisionConfig.from_dict({"model_type": default_tower["model_type"], **m["vision_config"]})
        # The grid is rebuilt from P * P features per tile: "default" must drop a CLS, "full" have none to keep.
        per_tile = tower_tokens(vision, m["vision_feature_select_strategy"])
        grid = vision.image_size // vision.patch_size
        if per_tile != grid * grid:
            raise ValueError(f"vision_feature_select_strategy {m['vision_feature_select_strategy']!r} on "
                             f"{vision.model_type} leaves {per_tile} features per tile, not a {grid}x{grid} grid")
        pinpoints = [tuple(x) for x in m["image_grid_pinpoints"]]
        if "image_grid_pinpoints" in processor_config and [tuple(x) for x in p["image_grid_pinpoints"]] != pinpoints:
            raise ValueError("config.json and preprocessor_config.json disagree on image_grid_pinpoints")
        size = p["size"]
        if isinstance(size, dict) and "longest_edge" in size:
            raise ValueError("size with longest_edge is not supported")
        edge = size if isinstance(size, int) else size.get("shortest_edge")
        # HF: tiles are crop_size.height (whether or not it crops), else size's height or shortest edge.
        tile = _hw(p["crop_size"])[0] if p.get("crop_size") else (edge or _hw(size)[0])
        if tile != vision.image_size:
            raise ValueError(f"processor tiles of {tile} px, but the tower's image_size is {vision.image_size}")
        tile_processor = ImageProcessor(
            shortest_edge=edge if p["do_resize"] else None,
            resize_hw=_hw(size) if p["do_resize"] and edge is None else None,
            crop_hw=_hw(p["crop_size"]) if p["do_center_crop"] else None,
            resample=p["resample"],
            rescale_factor=p["rescale_factor"] if p["do_rescale"] else None,
            image_mean=tuple(p["image_mean"]) if p["do_normalize"] else None,
            image_std=tuple(p["image_std"]) if p["do_normalize"] else None,
            convert_rgb=p["do_convert_rgb"],
        )
        return cls(
            pinpoints=tuple(pinpoints),
            tile_size=vision.image_size,
            patch_size=vision.patch_size,
            max_tiles=_parse_max_tiles(m["vision_aspect_ratio"]) if family.downsample else None,
            base_hw=(edge, edge) if edge is not None else _hw(size),
            resample=p["resample"],
            tile_processor=tile_processor,
        )

    @property
    def grid(self) -> int:
        """P: feature cells per tile side."""
        return self.tile_size // self.patch_size

    @property
    def base_tokens(self) -> int:
        return self.grid * self.grid

    # --- counting (integers only) ---

    def best_pinpoint(self, image_hw: Hw) -> Hw:
        return select_best_resolution(_check_hw(image_hw), self.pinpoints)

    def layout(self, image_hw: Hw, pinpoint: Hw | None = None) -> GridLayout:
        """The grid of `image_hw` read at `pinpoint` (default: the best one)."""
        image_hw = _check_hw(image_hw)
        ph, pw = self._pinpoint(image_hw, pinpoint)
        s, p = self.tile_size, self.grid
        tiles = (ph // s, pw // s)
        box = unpadded_box(image_hw, (tiles[0] * p, tiles[1] * p))
        out = box[2:]
        if self.max_tiles is not None:
            ratio = math.sqrt(out[0] * out[1] / (self.max_tiles * p * p))
            if ratio > 1.1:  # HF's threshold and float floor division
                out = (int(out[0] // ratio), int(out[1] // ratio))
        return GridLayout(tiles, box, out)

    def num_image_tokens(self, image_hw: Hw, pinpoint: Hw | None = None, *, base_only: bool = False) -> int:
        """`<image>` tokens for `image_hw` (height, width) read at `pinpoint` (default: the best, as transformers),
        or as the base tile alone."""
        if base_only:
            _check_hw(image_hw)
            return self.base_tokens
        return self.base_tokens + self.layout(image_hw, pinpoint).tokens

    def readings(self, image_hw: Hw) -> list[Reading]:
        """Every distinct reading, strictly fewer tokens each: transformers' own first, the base tile alone last.

        Pinpoints are walked in transformers' preference order for this image (most image pixels kept, then least
        waste); one is kept only if it costs fewer tokens than every better-fitting one kept before it. An image so
        elongated that unpadding leaves no grid row (a 24-cell tile side, aspect past ~36:1) costs the base tokens
        on any grid: then transformers' reading is the only one, and it is the base tile's features alone."""
        image_hw = _check_hw(image_hw)
        out: list[Reading] = []
        for pinpoint in sorted(self.pinpoints, key=lambda p: _fit_rank(image_hw, p)):  # stable: HF's tie order
            tokens = self.num_image_tokens(image_hw, pinpoint)
            if not out or tokens < out[-1].tokens:
                out.append(Reading(pinpoint, tokens))
        if out[0].tokens <= self.base_tokens:
            return out[:1]
        return [r for r in out if r.tokens > self.base_tokens] + [Reading(None, self.base_tokens)]

    def _pinpoint(self, image_hw: Hw, pinpoint: Hw | None) -> Hw:
        if pinpoint is None:
            return select_best_resolution(image_hw, self.pinpoints)
        pinpoint = tuple(pinpoint)
        if pinpoint not in self.pinpoints:
            raise ValueError(f"pinpoint {pinpoint} is not one of image_grid_pinpoints {self.pinpoints}")
        return pinpoint

    # --- tensors ---

    def pixel_values(self, image: torch.Tensor, pinpoint: Hw | None = None, *,
                     base_only: bool = False) -> torch.Tensor:
        """uint8 (3, H, W) -> float32 (1 + n_tiles, 3, S, S) on the image's device: the base tile, then the tiles
        of the image fitted into `pinpoint` (default: the best) and zero-padded around it, row by row. With
        `base_only`, (1, 3, S, S). transformers' `image_sizes` entry is the image's (H, W)."""
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
        image_hw = _check_hw(tuple(image.shape[-2:]))
        base = resize_uint8(image, self.base_hw, self.resample)  # (3, h, w): HF resizes it, then the tile steps
        if base_only:
            return self.tile_processor.preprocess_uint8([base])  # (1, 3, S, S)
        pinpoint = self._pinpoint(image_hw, pinpoint)
        canvas = pad_centered(resize_uint8(image, fit_size(image_hw, pinpoint), self.resample), pinpoint)
        s = self.tile_size
        tiles = [canvas[:, i:i + s, j:j + s] for i in range(0, pinpoint[0], s) for j in range(0, pinpoint[1], s)]
        return self.tile_processor.preprocess_uint8([base, *tiles])  # (1 + n_tiles, 3, S, S)

    def pack_features(self, features: torch.Tensor, image_hw: Hw, pinpoint: Hw | None = None,
                      newline: torch.Tensor | None = None, *, base_only: bool = False) -> torch.Tensor:
        """Projected features of the base and the tiles, (1 + n_tiles, P * P, C) -> the image's (T, C) sequence,
        T = num_image_tokens(image_hw, pinpoint): base features, then the grid's rows (unpadded, OneVision-shrunk),
        each ended by `newline` (C,). With `base_only`, features (1, P * P, C) -> (P * P, C), no newline."""
        p = self.grid
        if features.ndim != 3 or features.shape[1] != p * p:
            raise ValueError(f"features must be (1 + n_tiles, {p * p}, C), got {tuple(features.shape)}")
        if base_only:
            if features.shape[0] != 1:
                raise ValueError(f"a base-only reading has one tile of features, got {features.shape[0]}")
            return features[0]
        if newline is None or newline.shape != features.shape[-1:]:
            raise ValueError(f"newline must be ({features.shape[-1]},)")
        layout = self.layout(image_hw, pinpoint)
        (th, tw), (top, left, h, w) = layout.tiles_hw, layout.box
        if features.shape[0] != 1 + th * tw:
            raise ValueError(f"{th}x{tw} tiles need {1 + th * tw} feature tiles, got {features.shape[0]}")
        c = features.shape[-1]
        grid = features[1:].view(th, tw, p, p, c).permute(4, 0, 2, 1, 3).contiguous()  # (C, th, P, tw, P)
        grid = grid.view(c, th * p, tw * p)[:, top:top + h, left:left + w]  # (C, h, w)
        if layout.out_hw != (h, w):  # OneVision anyres_max_N
            grid = F.interpolate(grid[None], list(layout.out_hw), mode="bilinear")[0]  # (C, h', w')
        rows = torch.cat([grid, newline.to(grid)[:, None, None].expand(c, grid.shape[1], 1)], dim=-1)  # (C, h', w'+1)
        return torch.cat([features[0], rows.flatten(1).transpose(0, 1)], dim=0)  # (P * P + h' * (w' + 1), C)


def pad_centered(image: torch.Tensor, hw: Hw) -> torch.Tensor:
    """HF `_pad_for_patching`: (3, h, w) -> (3, H, W) with zeros, the image centred (extra pixel right/bottom)."""
    h, w = image.shape[-2:]
    top, left = (hw[0] - h) // 2, (hw[1] - w) // 2
    return F.pad(image, (left, hw[1] - w - left, top, hw[0] - h - top))


def _check_hw(image_hw) -> Hw:
    h, w = (int(x) for x in image_hw)
    if h < 1 or w < 1:
        raise ValueError(f"image size must be positive, got {tuple(image_hw)}")
    return h, w

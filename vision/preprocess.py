"""Image preprocessing: HF preprocessor_config.json -> pixel_values, on CPU or on the GPU.

Reproduces transformers 5.x `CLIPImageProcessor`, `SiglipImageProcessor` and `LlavaImageProcessor`, whose default
backend is torchvision ("fast"): uint8 (3, H, W) -> [pad to square with the mean colour, Llava only] -> antialiased
resize (bicubic or bilinear per `resample`) -> center crop -> fused rescale + normalize in float32.
- CPU (`__call__` on PIL images, or `preprocess_uint8` on CPU tensors) runs exactly HF's torchvision-backend ops:
  equal to float rounding (0.0 measured). Against HF's PIL backend (`CLIPImageProcessorPil`, PIL's fixed-point
  resampler), resized pixels differ by one uint8 step, rarely two when strongly upsampling.
- Other devices (`preprocess_uint8` on CUDA tensors): see `resize_uint8`; within two uint8 steps of the CPU result,
  mean ~0.005 steps, where torchvision's own CUDA resize (HF's on GPU) differs by up to ~13 at sharp edges.
JPEG bytes can be decoded straight to the GPU (`decode_jpeg_to_device`); nvJPEG's chroma upsampling differs from
libjpeg's, so for chroma-subsampled files those pixels are not bit-equal to a PIL decode (see there).

Not here: decoding untrusted uploads safely (`vision.intake`), and timm's own transforms (`vision.timm_tower` turns a
timm data config into an `ImageProcessor`).
"""
from __future__ import annotations

import io
from dataclasses import dataclass

import numpy as np
import torch
from PIL import Image, ImageOps
from torchvision.io import ImageReadMode, decode_jpeg
from torchvision.transforms.v2 import InterpolationMode
from torchvision.transforms.v2 import functional as tvF

# PIL resample ids, as stored in preprocessor_config.json, -> torchvision modes.
RESAMPLE = {2: InterpolationMode.BILINEAR, 3: InterpolationMode.BICUBIC}

CLIP_MEAN, CLIP_STD = (0.48145466, 0.4578275, 0.40821073), (0.26862954, 0.26130258, 0.27577711)
HALF = (0.5, 0.5, 0.5)  # IMAGENET_STANDARD_MEAN / _STD


@dataclass(frozen=True)
class ProcessorKind:
    defaults: dict  # the HF class attributes used when the config omits a key
    square_pad: bool  # `do_pad` pads to a square with the mean colour before resizing (LlavaImageProcessor)


_CLIP_DEFAULTS = dict(do_resize=True, size={"shortest_edge": 224}, resample=3, do_center_crop=True,
                      crop_size={"height": 224, "width": 224}, do_rescale=True, rescale_factor=1 / 255,
                      do_normalize=True, image_mean=CLIP_MEAN, image_std=CLIP_STD, do_convert_rgb=True, do_pad=False)
_SIGLIP_DEFAULTS = dict(_CLIP_DEFAULTS, size={"height": 224, "width": 224}, do_center_crop=False,
                        image_mean=HALF, image_std=HALF)

# Keyed by `image_processor_type` (4.x files may name the "Fast" class; the maths is the same).
PROCESSORS = {
    "CLIPImageProcessor": ProcessorKind(_CLIP_DEFAULTS, square_pad=False),
    "CLIPImageProcessorFast": ProcessorKind(_CLIP_DEFAULTS, square_pad=False),
    "LlavaImageProcessor": ProcessorKind(_CLIP_DEFAULTS, square_pad=True),
    "LlavaImageProcessorFast": ProcessorKind(_CLIP_DEFAULTS, square_pad=True),
    "SiglipImageProcessor": ProcessorKind(_SIGLIP_DEFAULTS, square_pad=False),
    "SiglipImageProcessorFast": ProcessorKind(_SIGLIP_DEFAULTS, square_pad=False),
}


def _hw(size: dict | int) -> tuple[int, int]:
    return (size, size) if isinstance(size, int) else (size["height"], size["width"])


@dataclass(frozen=True)
class ImageProcessor:
    shortest_edge: int | None  # resize so the short side is this (aspect kept), or
    resize_hw: tuple[int, int] | None  # resize to exactly (H, W); both None: no resize
    crop_hw: tuple[int, int] | None  # center crop, None: no crop
    resample: int  # PIL id: 2 bilinear, 3 bicubic
    rescale_factor: float | None  # None: no rescale
    image_mean: tuple[float, float, float] | None  # None: no normalisation
    image_std: tuple[float, float, float] | None
    pad_to_square: bool = False
    convert_rgb: bool = True

    def __post_init__(self):
        if self.shortest_edge is not None and self.resize_hw is not None:
            raise ValueError("resize either by shortest_edge or to (height, width), not both")
        if self.resample not in RESAMPLE:
            raise ValueError(f"unsupported resample {self.resample}; known PIL ids: {sorted(RESAMPLE)}")
        if (self.image_mean is None) != (self.image_std is None):
            raise ValueError("image_mean and image_std go together")
        if self.image_std is not None and (len(self.image_mean) != 3 or len(self.image_std) != 3
                                           or min(self.image_std) <= 0):
            raise ValueError("image_mean/image_std need 3 values, std > 0")
        if self.crop_hw is None and self.resize_hw is None:
            raise ValueError("output size must be fixed: give a center crop or a (height, width) resize")

    @classmethod
    def from_dict(cls, config: dict) -> ImageProcessor:
        """From a preprocessor_config.json dict; missing keys take the defaults of its `image_processor_type`."""
        kind = PROCESSORS.get(config.get("image_processor_type"))
        if kind is None:
            raise ValueError(f"unknown image_processor_type {config.get('image_processor_type')!r}; "
                             f"known: {sorted(PROCESSORS)}")
        c = {**kind.defaults, **config}
        size = c["size"]
        if isinstance(size, dict) and "longest_edge" in size:
            raise ValueError("size with longest_edge is not supported")
        edge = size if isinstance(size, int) else size.get("shortest_edge")  # HF: an int size is a short side
        # Outside Llava, HF's `do_pad` pads a batch to its largest image: a no-op for the fixed-size outputs that
        # __post_init__ requires, so it is not carried.
        return cls(
            shortest_edge=edge if c["do_resize"] else None,
            resize_hw=_hw(size) if c["do_resize"] and edge is None else None,
            crop_hw=_hw(c["crop_size"]) if c["do_center_crop"] else None,
            resample=c["resample"],
            rescale_factor=c["rescale_factor"] if c["do_rescale"] else None,
            image_mean=tuple(c["image_mean"]) if c["do_normalize"] else None,
            image_std=tuple(c["image_std"]) if c["do_normalize"] else None,
            pad_to_square=bool(c["do_pad"]) and kind.square_pad,
            convert_rgb=c["do_convert_rgb"],
        )

    def output_size(self) -> tuple[int, int]:
        return self.crop_hw if self.crop_hw is not None else self.resize_hw

    def __call__(self, images: list[Image.Image]) -> torch.Tensor:
        """PIL images -> (N, 3, H, W) float32 on CPU."""
        return self.preprocess_uint8([pil_to_uint8(im, self.convert_rgb) for im in images])

    def preprocess_uint8(self, images: list[torch.Tensor]) -> torch.Tensor:
        """uint8 (3, H_i, W_i) images, all on one device -> (N, 3, H, W) float32 on that device."""
        return torch.stack([self._one(im) for im in images])

    def _one(self, image: torch.Tensor) -> torch.Tensor:
        if image.dtype != torch.uint8 or image.ndim != 3 or image.shape[0] != 3:
            raise ValueError(f"expected a uint8 (3, H, W) image, got {image.dtype} {tuple(image.shape)}")
        if self.pad_to_square:
            # HF: background_color = tuple(int(x * 255) for x in image_mean)
            image = pad_to_square(image, [int(m * 255) for m in self.image_mean or (0, 0, 0)])
        if self.shortest_edge is not None:
            image = resize_uint8(image, _shortest_edge_size(image.shape[-2:], self.shortest_edge), self.resample)
        elif self.resize_hw is not None:
            image = resize_uint8(image, self.resize_hw, self.resample)
        if self.crop_hw is not None:
            image = center_crop(image, self.crop_hw)
        return self._normalize(image)

    def _normalize(self, image: torch.Tensor) -> torch.Tensor:
        x = image.to(torch.float32)
        if self.image_mean is None:
            return x * self.rescale_factor if self.rescale_factor is not None else x
        # HF fuses rescale into mean/std (mean/scale, std/scale, in float32): same arithmetic, same rounding.
        scale = 1.0 / self.rescale_factor if self.rescale_factor is not None else 1.0
        mean = torch.tensor(self.image_mean, device=x.device) * scale
        std = torch.tensor(self.image_std, device=x.device) * scale
        return (x - mean[:, None, None]) / std[:, None, None]  # (3, H, W)


def _shortest_edge_size(hw: tuple[int, int], edge: int) -> list[int]:
    # HF get_resize_output_image_size(default_to_square=False): long side = int(edge * long / short).
    h, w = hw
    short, long = (w, h) if w <= h else (h, w)
    new_long = int(edge * long / short)
    return [new_long, edge] if w <= h else [edge, new_long]


def resize_uint8(image: torch.Tensor, hw: tuple[int, int] | list[int], resample: int) -> torch.Tensor:
    """Antialiased uint8 (3, H, W) -> uint8 (3, h, w).

    On CPU this is torchvision's native uint8 kernel, i.e. what HF runs (and a port of PIL's resampler). That kernel
    is separable and rounds to uint8 between its horizontal and vertical passes, which clips bicubic overshoot at
    sharp edges; torchvision's float path (its only one on CUDA) does not, and lands up to ~13 levels away there.
    Elsewhere we therefore run the same two passes in float with the same rounding, which stays within a level or
    two of the CPU result.
    """
    mode = RESAMPLE[resample]
    if image.device.type == "cpu":
        return tvF.resize(image, list(hw), interpolation=mode, antialias=True)
    h, w = hw
    x = image[None].to(torch.float32)  # (1, 3, H, W)
    for size in ((x.shape[-2], w), (h, w)):  # horizontal pass, then vertical, as PIL and the uint8 kernel do
        if tuple(x.shape[-2:]) != size:
            x = torch.nn.functional.interpolate(x, size=size, mode=mode.value, align_corners=False, antialias=True)
            x = x.round_().clamp_(0, 255)
    return x[0].to(torch.uint8)


def pad_to_square(image: torch.Tensor, fill: list[int]) -> torch.Tensor:
    """(3, H, W) -> (3, S, S), S = max(H, W), the image centred (extra pixel right/bottom) on `fill`."""
    h, w = image.shape[-2:]
    if h == w:
        return image
    s = max(h, w)
    top, left = (s - h) // 2, (s - w) // 2
    out = torch.tensor(fill, dtype=image.dtype, device=image.device)[:, None, None].repeat(1, s, s)
    out[:, top:top + h, left:left + w] = image
    return out


def center_crop(image: torch.Tensor, hw: tuple[int, int]) -> torch.Tensor:
    """HF's torchvision-backend center crop: zero-pad first when the crop is larger than the image."""
    ch, cw = hw
    h, w = image.shape[-2:]
    if ch > h or cw > w:
        pad_l, pad_t = max(cw - w, 0) // 2, max(ch - h, 0) // 2
        image = torch.nn.functional.pad(image, (pad_l, max(cw - w, 0) - pad_l, pad_t, max(ch - h, 0) - pad_t))
        h, w = image.shape[-2:]
    top, left = int((h - ch) / 2.0), int((w - cw) / 2.0)
    return image[:, top:top + ch, left:left + cw]


def pil_to_uint8(image: Image.Image, convert_rgb: bool = True) -> torch.Tensor:
    """PIL -> uint8 (3, H, W); transparency is composited onto white, as HF's convert_to_rgb does."""
    if convert_rgb:
        if "A" in image.getbands() or image.info.get("transparency") is not None:
            rgba = image.convert("RGBA")
            image = Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba)
        image = image.convert("RGB")
    elif image.mode != "RGB":
        raise ValueError(f"image mode {image.mode} is not RGB and convert_rgb is off")
    return torch.from_numpy(np.array(image)).permute(2, 0, 1).contiguous()  # (3, H, W)


# EXIF orientation (tag 0x0112) -> the tensor op equal to PIL's `ImageOps.exif_transpose` on (3, H, W).
_ORIENT = {
    2: lambda x: x.flip(-1),
    3: lambda x: x.flip(-2, -1),
    4: lambda x: x.flip(-2),
    5: lambda x: x.transpose(-2, -1),
    6: lambda x: torch.rot90(x, -1, (-2, -1)),
    7: lambda x: x.transpose(-2, -1).flip(-2, -1),
    8: lambda x: torch.rot90(x, 1, (-2, -1)),
}


def decode_jpeg_to_device(data: bytes, device: torch.device | str, use_nvjpeg: bool = True) -> torch.Tensor:
    """Encoded image bytes -> uint8 (3, H, W) on `device`, upright.

    JPEG is decoded by torchvision (nvJPEG when `device` is CUDA and `use_nvjpeg`); other formats, and JPEGs it
    cannot decode (CMYK on nvJPEG, say), go through PIL with transparency put on white. EXIF orientation is applied
    on both paths, as `vision.intake.load_image` does, so both give the pixels the user saw. The CPU decode equals
    PIL's. nvJPEG equals it for 4:4:4 JPEGs, but upsamples subsampled chroma (4:2:0, most camera files) its own
    way: single pixels at colour edges differ by up to ~30 levels, mean 0.2-0.8 on photos. Pass
    `use_nvjpeg=False` where PIL parity matters more than decode speed. No size limits are enforced here: pass
    bytes that `vision.intake` has vetted.
    """
    device = torch.device(device)
    with Image.open(io.BytesIO(data)) as image:  # lazy: reads the header only, unless we fall back below
        orientation = image.getexif().get(0x0112, 1)
        if data[:3] == b"\xff\xd8\xff":  # the JPEG SOI marker: decided by content, not by file name
            raw = torch.frombuffer(bytearray(data), dtype=torch.uint8)
            try:
                on = device if device.type == "cuda" and use_nvjpeg else torch.device("cpu")
                pixels = decode_jpeg(raw, mode=ImageReadMode.RGB, device=on)
                return _ORIENT.get(orientation, lambda x: x)(pixels).to(device).contiguous()
            except RuntimeError:
                pass  # fall through to PIL, which reads more JPEG variants
        return pil_to_uint8(ImageOps.exif_transpose(image)).to(device)

"""Safe image intake: untrusted upload bytes -> a decoded RGB `PIL.Image`, or an `ImageError` a user can act on.

Every image that reaches the model passes through `load_image`. It caps the byte size, sniffs the format from
the content (never the file name), allows only JPEG/PNG/WebP/GIF/BMP/TIFF, reads the pixel count from the
header before anything is decoded (decompression-bomb defence), applies EXIF orientation and flattens every
colour mode (CMYK, alpha, palette, 16-bit, float) to 8-bit RGB on white. Animated files give their first frame.

PIL's process-wide switches (`ImageFile.LOAD_TRUNCATED_IMAGES`, `Image.MAX_IMAGE_PIXELS`, warning filters) are
read, never set: limits travel in an explicit `IntakeLimits`.

Not here: resizing or normalising for a particular vision tower (the model's processor does that), caches
(callers key them with `image_digest`), fetching URLs or reading paths a user named.
"""
from __future__ import annotations

import hashlib
import io
import math
import os
import re
import struct
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageOps

# The only PIL openers ever tried. JPEG's opener also yields MPO (multi-picture JPEG from phone cameras);
# like every animated file, it is decoded as its first picture.
_PIL_FORMATS = ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")
_ACCEPTED = "JPEG, PNG, WebP, GIF, BMP or TIFF"

# (offset, signature, format). Names what PIL was not allowed to open, and tells a damaged JPEG from a non-image.
_SIGNATURES = (
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"GIF8", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WEBP"),
    (8, b"heic", "HEIC"), (8, b"heix", "HEIC"), (8, b"mif1", "HEIC"), (8, b"msf1", "HEIC"),
    (8, b"avif", "AVIF"), (8, b"avis", "AVIF"),
    (0, b"%PDF", "PDF"),
    (0, b"8BPS", "PSD"),
    (0, b"\x00\x00\x01\x00", "ICO"),
    (0, b"\xff\x0a", "JPEG XL"), (4, b"JXL ", "JPEG XL"),
    (0, b"\xff\x4f\xff\x51", "JPEG 2000"), (4, b"jP  ", "JPEG 2000"),
)

# What PIL raises on damaged input, from parsing headers through decoding pixels.
_DECODE_ERRORS = (OSError, SyntaxError, ValueError, EOFError, IndexError, struct.error)

_ALPHA_MODES = ("RGBA", "RGBa", "LA", "La", "PA")


@dataclass(frozen=True)
class IntakeLimits:
    """Per-upload caps. `max_pixels` may not exceed PIL's `Image.MAX_IMAGE_PIXELS`: PIL's own bomb check runs
    first (inside `Image.open`) and would refuse what these limits allow."""

    max_bytes: int = 20 * 2**20
    max_pixels: int = 40_000_000
    max_side: int = 16384

    def __post_init__(self) -> None:
        for field in ("max_bytes", "max_pixels", "max_side"):
            value = getattr(self, field)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"IntakeLimits.{field} must be a positive int, got {value!r}")
        if Image.MAX_IMAGE_PIXELS is not None and self.max_pixels > Image.MAX_IMAGE_PIXELS:
            raise ValueError(
                f"IntakeLimits.max_pixels={self.max_pixels} exceeds PIL's Image.MAX_IMAGE_PIXELS="
                f"{Image.MAX_IMAGE_PIXELS}; PIL would refuse such images before these limits are checked"
            )


class ImageError(ValueError):
    """An upload we will not use. The message is meant for the end user: it names the file, the problem and
    what to do about it."""


def load_image(data: bytes, name: str = "image", limits: IntakeLimits = IntakeLimits()) -> Image.Image:
    """Decode an uploaded image to a fully loaded RGB image detached from any file. Raises only `ImageError`."""
    label = _display_name(name)
    if not data:
        raise ImageError(f"{label} is empty (0 bytes). Please upload the image again.")
    if len(data) > limits.max_bytes:
        raise ImageError(
            f"{label} is {_megabytes(len(data))}; the limit is {_megabytes(limits.max_bytes)}. "
            "Please upload a smaller or more compressed image."
        )
    try:
        with Image.open(io.BytesIO(data), formats=_PIL_FORMATS) as im:  # lazy: reads the header only
            _check_dimensions(im.size, limits, label)
            im.load()
            ImageOps.exif_transpose(im, in_place=True)
            return _to_rgb(im, label)
    except ImageError:
        raise
    except Image.UnidentifiedImageError as err:
        raise _unreadable(data, label) from err
    except (Image.DecompressionBombError, Image.DecompressionBombWarning) as err:
        # PIL refused in Image.open before we could see the size; it only does so above 2 * MAX_IMAGE_PIXELS
        # (or above MAX_IMAGE_PIXELS when the app runs with warnings as errors).
        raise ImageError(
            f"{label} claims to be far larger than {limits.max_pixels:,} pixels, the most we accept. "
            "Please upload a smaller image."
        ) from err
    except _DECODE_ERRORS as err:
        raise _corrupt(label) from err


def load_image_file(path: str | os.PathLike[str], limits: IntakeLimits = IntakeLimits()) -> Image.Image:
    """`load_image` for a file on disk (e.g. an upload's temp file); the size is checked before reading."""
    label = _display_name(os.fspath(path))
    try:
        size = os.stat(path).st_size
        if size > limits.max_bytes:
            raise ImageError(
                f"{label} is {_megabytes(size)}; the limit is {_megabytes(limits.max_bytes)}. "
                "Please upload a smaller or more compressed image."
            )
        with open(path, "rb") as f:
            data = f.read(limits.max_bytes + 1)  # +1: a file that grew after stat() still trips the byte cap
    except OSError as err:
        raise ImageError(f"{label} could not be read ({err.strerror or err}). Please upload it again.") from err
    return load_image(data, label, limits)


def image_digest(data: bytes) -> str:
    """Content key for image caches: SHA-256 hex of the raw upload bytes."""
    return hashlib.sha256(data).hexdigest()


def resize_to_fit(image: Image.Image, max_pixels: int) -> Image.Image:
    """Downscale, keeping the aspect ratio, so that width * height <= max_pixels. Small images come back as is."""
    if max_pixels < 1:
        raise ValueError(f"max_pixels must be >= 1, got {max_pixels}")
    width, height = image.size
    if width * height <= max_pixels:
        return image
    scale = math.sqrt(max_pixels / (width * height))
    # The min()s keep the bound exact when a very thin image has a side clamped to 1.
    new_width = max(1, min(math.floor(width * scale), max_pixels))
    new_height = max(1, min(math.floor(height * scale), max_pixels // new_width))
    return image.resize((new_width, new_height), Image.Resampling.LANCZOS, reducing_gap=3.0)


def _check_dimensions(size: tuple[int, int], limits: IntakeLimits, label: str) -> None:
    width, height = size
    max_pixels = limits.max_pixels
    if Image.MAX_IMAGE_PIXELS is not None:  # PIL warns above its own cap; refuse instead of warning
        max_pixels = min(max_pixels, Image.MAX_IMAGE_PIXELS)
    if width * height > max_pixels or max(width, height) > limits.max_side:
        raise ImageError(
            f"{label} is {width} x {height} = {width * height:,} pixels; the limit is {max_pixels:,} pixels "
            f"and {limits.max_side} pixels per side. Please upload a smaller image."
        )


def _to_rgb(im: Image.Image, label: str) -> Image.Image:
    if im.mode == "F" or im.mode.startswith("I"):  # "I", "I;16", "I;16B", ...: PIL's convert() would clip
        return Image.fromarray(_to_uint8(np.asarray(im), im.mode)).convert("RGB")
    if im.mode in _ALPHA_MODES or "transparency" in im.info:  # palette/gray/RGB with a transparent entry too
        # Flatten on white, not black: transparent logos and screenshots are drawn for a light page.
        rgba = im.convert("RGBA")
        return Image.alpha_composite(Image.new("RGBA", rgba.size, (255, 255, 255, 255)), rgba).convert("RGB")
    try:
        return im.convert("RGB")  # CMYK (Adobe-inverted handled by the JPEG plugin), P, L, 1, YCbCr, ...
    except ValueError as err:
        raise ImageError(
            f"{label} uses a colour mode we cannot convert ({im.mode}). Please re-save it as an RGB JPEG or PNG."
        ) from err


def _to_uint8(pixels: np.ndarray, mode: str) -> np.ndarray:
    values = np.nan_to_num(pixels.astype(np.float32))
    if mode.startswith("I;16"):
        values = values / 257.0  # full 16-bit scale: 65535 -> 255, 32768 -> 128; no clipping at 255
    elif mode == "F" and values.size and 0.0 <= values.min() and values.max() <= 1.0:
        values = values * 255.0  # float images in [0, 1]
    elif values.size and values.max() > values.min():
        low, high = values.min(), values.max()  # no known full scale (32-bit int, unbounded float): stretch
        values = (values - low) * (255.0 / (high - low))
    return np.clip(np.rint(values), 0, 255).astype(np.uint8)


def _unreadable(data: bytes, label: str) -> ImageError:
    found = _sniff(data)
    if found in _PIL_FORMATS:  # right signature, but PIL could not parse the header
        return _corrupt(label)
    if found is not None:
        return ImageError(
            f"{label} is not an image format we can read ({found}). Please upload a {_ACCEPTED} image."
        )
    return ImageError(f"{label} is not an image we can read. Please upload a {_ACCEPTED} image.")


def _corrupt(label: str) -> ImageError:
    return ImageError(
        f"{label} could not be decoded: the file is truncated or corrupt. "
        "Please upload it again, or re-save it as JPEG or PNG."
    )


def _sniff(data: bytes) -> str | None:
    for offset, signature, fmt in _SIGNATURES:
        if data[offset:offset + len(signature)] == signature:
            return fmt
    if b"<svg" in data[:2048].lower():
        return "SVG"
    return None


def _display_name(name: str) -> str:
    # Browsers may send "C:\fakepath\x.jpg"; control characters and very long names do not belong in a message.
    base = re.split(r"[\\/]", name)[-1]
    base = "".join(ch for ch in base if ch.isprintable()).strip()
    if len(base) > 80:
        base = base[:60] + "..." + base[-17:]
    return base or "image"


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"

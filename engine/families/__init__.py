"""Model families, keyed by config.json's `architectures[0]`: one module each, one line each in `FAMILIES`.

`load_model(model)` finds the checkpoint (a local folder or a Hub id, with the embedded offline default when no
model is named and the Hub cannot be reached), picks its family and returns a `LoadedModel`: the engine with the
family's image input side attached, and the prompt builder.
"""
from __future__ import annotations

from dataclasses import replace

import torch

from engine.checkpoints.reader import Checkpoint, ModelUnavailable
from engine.config import EngineConfig
from engine.families import embedded, llava, llava_next, llava_onevision, text_only
from engine.families.base import LoadedModel

DEFAULT = "default"  # the embedded offline model
HUB_DEFAULT = "llava-hf/llava-onevision-qwen2-0.5b-ov-hf"  # the README says why

FAMILIES = {
    "LlavaForConditionalGeneration": llava.load,
    "LlavaNextForConditionalGeneration": llava_next.load,
    "LlavaOnevisionForConditionalGeneration": llava_onevision.load,
    "LlamaForCausalLM": text_only.load,
    "Qwen2ForCausalLM": text_only.load,
}

DTYPES = ("auto", "float32", "bfloat16", "float16")


def engine_config(device: str | None = None, dtype: str = "auto", **engine_kw) -> EngineConfig:
    """The device (CUDA when present) and the dtype policy. `auto`: bf16 on CUDA; on a CPU by measurement, once per
    process (engine/quant/policy.py): bf16 where its prefill matmul is clearly faster (AMX, AVX512-BF16), else fp32
    prefill with bf16 weight copies for decode steps where those are faster; and `quantize="auto"`, so the embedded
    default keeps its GGUF's 4-bit blocks where the int4 kernel beats the dense decode. `float32`: fp32 everywhere
    and no quantization unless asked, so greedy text equals transformers' fp32 for as long as its logits have no
    near-tie."""
    if dtype not in DTYPES:
        raise ValueError(f"dtype must be one of {', '.join(DTYPES)}, got {dtype!r}")
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    cuda = device.startswith("cuda")
    if dtype == "auto":
        engine_kw.setdefault("quantize", "auto")
        if cuda:
            dtype = "bfloat16"
        else:
            from engine.quant.policy import cpu_policy

            policy = cpu_policy()
            dtype = policy.dtype
            if policy.decode_weight_dtype is not None:
                engine_kw.setdefault("decode_weight_dtype", policy.decode_weight_dtype)
    return EngineConfig(device=device, dtype=dtype, **engine_kw)


def load_model(model: str | None, device: str | None = None, dtype: str = "auto", **engine_kw) -> LoadedModel:
    """`None`: the Hub default where the Hub answers, else the embedded default. `"default"`: the embedded one."""
    cfg = engine_config(device, dtype, **engine_kw)
    if model == DEFAULT:
        return replace(embedded.load(cfg), model_id=DEFAULT)
    try:
        ck = Checkpoint.load(model or HUB_DEFAULT)
    except ModelUnavailable:
        if model is None:
            return replace(embedded.load(cfg), model_id=DEFAULT)
        raise
    if ck.architecture not in FAMILIES:
        raise ModelUnavailable(f"{model}: architecture {ck.architecture} is not supported "
                               f"(supported: {', '.join(FAMILIES)})")
    return replace(FAMILIES[ck.architecture](ck, model or HUB_DEFAULT, cfg), model_id=model or HUB_DEFAULT)


__all__ = ["DEFAULT", "DTYPES", "FAMILIES", "HUB_DEFAULT", "LoadedModel", "engine_config", "load_model"]

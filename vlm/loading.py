"""Pairs a language model from engine/ with an image encoder from vision/: the one place that knows both.

`load_bundle(model)` returns everything a chat needs for one checkpoint: the engine, the prompt builder, the image
encoder and a description. Kinds of checkpoint are a plain dict keyed by `config.architectures[0]`.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers import AutoConfig, AutoTokenizer

from engine.checkpoint import Checkpoint, ModelUnavailable, chat_template
from engine.config import EngineConfig, TextConfig
from engine.default_lm import IMAGE_TOKEN, default_lm_checkpoint
from engine.llm_engine import LLMEngine
from engine.models import MODELS
from engine.prompt import PromptBuilder
from vision.preprocess import ImageProcessor
from vision.projector import LabelProjector, MultiModalProjector, ProjectorConfig
from vision.timm_tower import load_efficientnet_lite0
from vision.towers import build_vision_tower, load_tower_weights
from vlm.encoders import ImageEncoder, LabelEncoder, LlavaEncoder

DEFAULT = "default"  # the embedded offline model
HUB_DEFAULT = "llava-hf/llava-interleave-qwen-0.5b-hf"  # chosen in the README: smallest real llava-hf checkpoint


@dataclass
class Bundle:
    name: str
    description: str
    engine: LLMEngine
    prompt: PromptBuilder
    encoder: ImageEncoder | None  # None: a text-only language model


def pick_device(device: str | None) -> tuple[str, str]:
    """(device, dtype): bf16 on CUDA; fp32 on CPU, where bf16 matmuls run 4-6x slower without AVX512-BF16."""
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    return device, ("bfloat16" if device.startswith("cuda") else "float32")


def _engine(ck: Checkpoint, text: dict, tokenizer, device: str, dtype: str, **engine_kw) -> LLMEngine:
    cfg = TextConfig.from_dict(text, MODELS[text["model_type"]][1])
    eos = ck.generation_config.get("eos_token_id", ())
    eos = set(eos if isinstance(eos, list) else [eos]) | set(cfg.eos_token_ids)
    if tokenizer.eos_token_id is not None:
        eos.add(tokenizer.eos_token_id)
    return LLMEngine(cfg, ck.parts["text"], tokenizer, EngineConfig(device=device, dtype=dtype, **engine_kw),
                     tuple(sorted(e for e in eos if e is not None)))


def _load_llava(ck: Checkpoint, name: str, device: str, dtype: str, **engine_kw) -> Bundle:
    full = AutoConfig.from_pretrained(ck.path)  # fills the defaults a llava config.json leaves out
    text, vision = full.text_config.to_dict(), full.vision_config.to_dict()
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    engine = _engine(ck, text, tokenizer, device, dtype, **engine_kw)
    torch_dtype = engine.dtype
    tower = build_vision_tower(vision, full.vision_feature_layer, full.vision_feature_select_strategy, device,
                               torch_dtype)
    load_tower_weights(tower, ck.parts["vision"])
    projector = MultiModalProjector(ProjectorConfig.from_dict(full.to_dict(), text["hidden_size"]))
    projector.load_state_dict(ck.parts["projector"])
    projector = projector.to(device=device, dtype=torch_dtype).eval()
    # Hub checkpoints carry preprocessor_config.json; transformers 5 nests it in processor_config.json.
    processor = ImageProcessor.from_dict(ck.read("preprocessor_config.json")
                                         or ck.read("processor_config.json").get("image_processor", {}))
    image_token = tokenizer.convert_ids_to_tokens(full.image_token_id)
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer), image_token)
    encoder = LlavaEncoder(processor, tower.eval(), projector, device, torch_dtype)
    return Bundle(name, f"LLaVA checkpoint ({vision['model_type']} + {text['model_type']}) on {device}.",
                  engine, prompt, encoder)


def _load_text_only(ck: Checkpoint, name: str, device: str, dtype: str, **engine_kw) -> Bundle:
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    engine = _engine(ck, ck.config, tokenizer, device, dtype, **engine_kw)
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer), IMAGE_TOKEN)
    return Bundle(name, f"A text-only language model on {device}: images are not seen.", engine, prompt, None)


def load_default(device: str, dtype: str, **engine_kw) -> Bundle:
    ck = Checkpoint.load(default_lm_checkpoint())
    tokenizer = AutoTokenizer.from_pretrained(ck.path)
    engine = _engine(ck, ck.config, tokenizer, device, dtype, **engine_kw)
    classifier = load_efficientnet_lite0(device, torch.float32)
    labels = LabelProjector(classifier.class_names, lambda text: tokenizer(text, add_special_tokens=False).input_ids,
                            engine.embed_tokens, device=device)
    prompt = PromptBuilder(tokenizer, chat_template(ck.path, tokenizer), IMAGE_TOKEN)
    name = "embedded default (SmolLM2-135M-Instruct + EfficientNet-Lite0 labels)"
    description = (
        f"Runs offline on {device} with no download. It is not a trained vision-language model: "
        "an ImageNet classifier names what it sees (top labels with confidences) and those words are placed in "
        "the image's positions of the prompt, through the same path a LLaVA projector uses. Good for trying the "
        "app; for real image understanding start it with `--model llava-hf/llava-interleave-qwen-0.5b-hf`.")
    return Bundle(name, description, engine, prompt, LabelEncoder(classifier, labels, device))


ARCHITECTURES = {
    "LlavaForConditionalGeneration": _load_llava,
    "LlamaForCausalLM": _load_text_only,
    "Qwen2ForCausalLM": _load_text_only,
}


def load_bundle(model: str | None, device: str | None = None, dtype: str | None = None, **engine_kw) -> Bundle:
    """`None`: the Hub default where the Hub answers, else the embedded default. `"default"`: the embedded one."""
    device, default_dtype = pick_device(device)
    dtype = dtype or default_dtype
    if not device.startswith("cuda") and dtype == "float32":
        # Measured on a 2-core CPU (bench/cpu_lm.py): bf16 weights for decode, fp32 for prefill, is the fastest.
        engine_kw.setdefault("decode_weight_dtype", "bfloat16")
    if model == DEFAULT:
        return load_default(device, dtype, **engine_kw)
    try:
        ck = Checkpoint.load(model or HUB_DEFAULT)
    except ModelUnavailable:
        if model is None:
            return load_default(device, dtype, **engine_kw)
        raise
    arch = (ck.config.get("architectures") or ["?"])[0]
    if arch not in ARCHITECTURES:
        raise ModelUnavailable(f"{model}: architecture {arch} is not supported "
                               f"(supported: {', '.join(ARCHITECTURES)})")
    return ARCHITECTURES[arch](ck, model or HUB_DEFAULT, device, dtype, **engine_kw)

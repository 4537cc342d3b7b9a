"""Tiny random llava-hf checkpoints that the tests build and save themselves (no network).

LLaVA (`make_tiny_llava`): Llama + CLIP (LLaVA-1.5 layout and template) and Qwen2 + SigLIP (llava-interleave
layout, ChatML template). LLaVA-NeXT (`make_tiny_llava_next`): Llama or Mistral + CLIP, the v1.6 pinpoints scaled to
the tiny tile. LLaVA-OneVision (`make_tiny_llava_onevision`): Qwen2 + SigLIP, a 6x6-tile pinpoint grid, anyres_max_9.
Each is saved with `save_pretrained` together with a byte-level BPE tokenizer trained here (so Chinese and emoji
round-trip) and its processor, exactly as a Hub checkpoint is laid out.
"""
from __future__ import annotations

from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

LLAVA15_TEMPLATE = (
    "{% for message in messages %}{% if message['role'] != 'system' %}{{ message['role'].upper() + ': '}}{% endif %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'image') %}{{ '<image>\n' }}{% endfor %}"
    "{% for content in message['content'] | selectattr('type', 'equalto', 'text') %}"
    "{{ content['text'] + ' '}}{% endfor %}{% endfor %}{% if add_generation_prompt %}{{ 'ASSISTANT:' }}{% endif %}"
)
CHATML_TEMPLATE = (
    "{% for message in messages %}{{'<|im_start|>' + message['role'] + '\n'}}"
    "{% if message['content'] is string %}{{ message['content'] }}{% else %}"
    "{% for content in message['content'] %}{% if content['type'] == 'image' %}{{ '<image>' }}"
    "{% elif content['type'] == 'text' %}{{ content['text'] }}{% endif %}{% endfor %}{% endif %}"
    "{{'<|im_end|>\n'}}{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "What animal is in this picture? The cat sits on the mat.",
    "USER: ASSISTANT: system user assistant Describe the image in detail.",
    "你好，世界。这是一只猫。 Emoji: 🐱🐶🎉 café naïve",
    "The quick brown fox jumps over the lazy dog 0123456789.",
]


def build_tokenizer(chatml: bool):
    from transformers import PreTrainedTokenizerFast

    specials = ["<unk>", "<s>", "</s>", "<pad>", "<image>"] + (["<|im_start|>", "<|im_end|>"] if chatml else [])
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS * 4, trainer)
    if chatml:  # Qwen2-like: no BOS, <|im_end|> ends a turn
        return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                                       eos_token="<|im_end|>", extra_special_tokens={"image_token": "<image>"})
    from tokenizers import processors

    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", tok.token_to_id("<s>"))])
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>", bos_token="<s>",
                                   eos_token="</s>", extra_special_tokens={"image_token": "<image>"})


def make_tiny_lm(folder: Path, max_positions: int = 256):
    """A 2-layer Llama with the byte-level test tokenizer, saved and loaded back: (TextConfig, weights, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.checkpoints.reader import Checkpoint
    from engine.config import TextConfig
    from engine.families.common import TEXT_PREFIXES

    tok = build_tokenizer(chatml=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    ck = Checkpoint.load(folder)
    return TextConfig.from_dict(ck.config), ck.parts(TEXT_PREFIXES)["text"], tok


def make_tiny_rope_lm(folder: Path, rope_parameters: dict, context: int = 64, seed: int = 0) -> Path:
    """A 2-layer random Llama of `context` trained positions with the given `rope_parameters` (transformers 5's
    spelling; save_pretrained writes it so), 256 token ids, no tokenizer and no EOS: for parity past that length."""
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                      rope_parameters=dict(rope_parameters), bos_token_id=None, eos_token_id=None, pad_token_id=None)
    model = _random_model(LlamaForCausalLM, cfg, seed)
    model.save_pretrained(folder)
    return folder


def make_tiny_llava(folder: Path, family: str, seed: int = 0, context: int = 512) -> Path:
    """family: "llama-clip" or "qwen2-siglip"; `context`: the LM's max_position_embeddings. Returns the checkpoint
    folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlavaConfig, LlavaForConditionalGeneration,
                              LlavaProcessor, SiglipImageProcessor, SiglipVisionConfig)

    chatml = family == "qwen2-siglip"
    tokenizer = build_tokenizer(chatml)
    text = _text_config("qwen2" if chatml else "llama", tokenizer, context)
    if chatml:
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=24, patch_size=6)
        processor_image = SiglipImageProcessor(size={"height": 24, "width": 24})
        layer, strategy, template, extra = -1, "full", CHATML_TEMPLATE, 0
    else:
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=30, patch_size=6, projection_dim=32)
        processor_image = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        layer, strategy, template, extra = -2, "default", LLAVA15_TEMPLATE, 1
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    model = _random_model(LlavaForConditionalGeneration, config, seed)
    processor = LlavaProcessor(image_processor=processor_image, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=strategy, chat_template=template,
                               num_additional_image_tokens=extra)
    return _save(model, processor, tokenizer, folder)


def _random_model(model_cls, config, seed: int):
    torch.manual_seed(seed)
    model = model_cls(config).eval()
    with torch.no_grad():  # random init puts tiny values everywhere; widen them so logits are well separated
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    return model


def _text_config(kind: str, tokenizer, context: int):
    from transformers import LlamaConfig, MistralConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=context,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if kind == "qwen2":
        return Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
    if kind == "mistral":  # llava-v1.6-mistral: sliding_window null
        return MistralConfig(**common, bos_token_id=tokenizer.bos_token_id, sliding_window=None)
    return LlamaConfig(**common, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)


def _save(model, processor, tokenizer, folder: Path) -> Path:
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


NEXT_PINPOINTS = ((1, 2), (2, 1), (2, 2), (3, 1), (1, 3))  # llava-v1.6's, in tiles (336 px each there)


def make_tiny_llava_next(folder: Path, lm: str = "llama", tile: int = 30, patch: int = 6, context: int = 512,
                         seed: int = 0) -> Path:
    """LLaVA-NeXT (llava-v1.6 layout): `lm` "llama" (vicuna) or "mistral", CLIP `tile` px / `patch`, the v1.6
    pinpoints in tiles of `tile`, the language model's context `context`."""
    from transformers import (CLIPVisionConfig, LlavaNextConfig, LlavaNextForConditionalGeneration,
                              LlavaNextImageProcessor, LlavaNextProcessor)

    tokenizer = build_tokenizer(chatml=False)
    pinpoints = [[h * tile, w * tile] for h, w in NEXT_PINPOINTS]
    vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                              image_size=tile, patch_size=patch, projection_dim=32)
    config = LlavaNextConfig(text_config=_text_config(lm, tokenizer, context), vision_config=vision,
                             image_token_id=tokenizer.convert_tokens_to_ids("<image>"), image_grid_pinpoints=pinpoints,
                             vision_feature_layer=-2, vision_feature_select_strategy="default")
    model = _random_model(LlavaNextForConditionalGeneration, config, seed)
    image_processor = LlavaNextImageProcessor(size={"shortest_edge": tile}, crop_size={"height": tile, "width": tile},
                                              image_grid_pinpoints=pinpoints)
    processor = LlavaNextProcessor(image_processor=image_processor, tokenizer=tokenizer, patch_size=patch,
                                   vision_feature_select_strategy="default", chat_template=LLAVA15_TEMPLATE,
                                   num_additional_image_tokens=1)
    return _save(model, processor, tokenizer, folder)


def make_tiny_llava_onevision(folder: Path, tile: int = 24, patch: int = 6, max_tiles: int = 6,
                              seed: int = 0) -> Path:
    """LLaVA-OneVision (llava-onevision-qwen2 layout): Qwen2 + SigLIP `tile` px / `patch`, pinpoints every
    (h, w) of 1..`max_tiles` tiles (the real grid is 6x6 of 384 px), anyres_max_9, ChatML."""
    from transformers import (LlavaOnevisionConfig, LlavaOnevisionForConditionalGeneration,
                              LlavaOnevisionImageProcessor, LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor,
                              SiglipVisionConfig)

    tokenizer = build_tokenizer(chatml=True)
    pinpoints = [[h * tile, w * tile] for h in range(1, max_tiles + 1) for w in range(1, max_tiles + 1)]
    vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                image_size=tile, patch_size=patch, vision_use_head=False)
    config = LlavaOnevisionConfig(text_config=_text_config("qwen2", tokenizer, 512), vision_config=vision,
                                  image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                                  image_grid_pinpoints=pinpoints, vision_aspect_ratio="anyres_max_9",
                                  vision_feature_layer=-1, vision_feature_select_strategy="full")
    model = _random_model(LlavaOnevisionForConditionalGeneration, config, seed)
    size = {"height": tile, "width": tile}
    image_processor = LlavaOnevisionImageProcessor(size=size, image_grid_pinpoints=pinpoints,
                                                   image_mean=[0.5] * 3, image_std=[0.5] * 3)
    processor = LlavaOnevisionProcessor(image_processor=image_processor, tokenizer=tokenizer,
                                        video_processor=LlavaOnevisionVideoProcessor(size=size),
                                        num_image_tokens=(tile // patch) ** 2, vision_feature_select_strategy="full",
                                        vision_aspect_ratio="anyres_max_9", chat_template=CHATML_TEMPLATE)
    return _save(model, processor, tokenizer, folder)


def random_png(height: int = 37, width: int = 53, seed: int = 1) -> bytes:
    """An odd-sized random RGB image as PNG bytes (the parity tests' picture)."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
    return buf.getvalue()

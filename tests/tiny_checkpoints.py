"""Tiny random llava-hf checkpoints that the tests build and save themselves (no network).

Two families, as the engine supports: Llama + CLIP (LLaVA-1.5 layout and template) and Qwen2 + SigLIP
(llava-interleave layout, ChatML template). Each is saved with `save_pretrained` together with a byte-level BPE
tokenizer trained here (so Chinese and emoji round-trip) and a LlavaProcessor, exactly as a Hub checkpoint is laid out.
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


def make_tiny_lm(folder: Path):
    """A 2-layer Llama with the byte-level test tokenizer, saved and loaded back: (TextConfig, weights, tokenizer)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    from engine.checkpoints.reader import Checkpoint
    from engine.config import TextConfig
    from engine.families.common import TEXT_PREFIXES

    tok = build_tokenizer(chatml=False)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                      eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    torch.manual_seed(0)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    ck = Checkpoint.load(folder)
    return TextConfig.from_dict(ck.config), ck.parts(TEXT_PREFIXES)["text"], tok


def make_tiny_llava(folder: Path, family: str, seed: int = 0) -> Path:
    """family: "llama-clip" or "qwen2-siglip". Returns the checkpoint folder."""
    from transformers import (CLIPImageProcessor, CLIPVisionConfig, LlamaConfig, LlavaConfig,
                              LlavaForConditionalGeneration, LlavaProcessor, Qwen2Config, SiglipImageProcessor,
                              SiglipVisionConfig)

    chatml = family == "qwen2-siglip"
    tokenizer = build_tokenizer(chatml)
    vocab = len(tokenizer)
    common = dict(vocab_size=vocab, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    if chatml:
        text = Qwen2Config(**common, rope_theta=1000000.0, tie_word_embeddings=True)
        vision = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                    image_size=24, patch_size=6)
        processor_image = SiglipImageProcessor(size={"height": 24, "width": 24})
        layer, strategy, template, extra = -1, "full", CHATML_TEMPLATE, 0
    else:
        text = LlamaConfig(**common, bos_token_id=tokenizer.bos_token_id, tie_word_embeddings=False)
        vision = CLIPVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                                  image_size=30, patch_size=6, projection_dim=32)
        processor_image = CLIPImageProcessor(size={"shortest_edge": 30}, crop_size={"height": 30, "width": 30})
        layer, strategy, template, extra = -2, "default", LLAVA15_TEMPLATE, 1
    config = LlavaConfig(text_config=text, vision_config=vision, image_token_id=tokenizer.convert_tokens_to_ids("<image>"),
                         vision_feature_layer=layer, vision_feature_select_strategy=strategy)
    torch.manual_seed(seed)
    model = LlavaForConditionalGeneration(config).eval()
    with torch.no_grad():  # random init puts tiny values everywhere; widen them so logits are well separated
        for p in model.parameters():
            if p.ndim >= 2:
                p.normal_(0, 0.08)
    processor = LlavaProcessor(image_processor=processor_image, tokenizer=tokenizer, patch_size=vision.patch_size,
                               vision_feature_select_strategy=strategy, chat_template=template,
                               num_additional_image_tokens=extra)
    model.generation_config.eos_token_id = tokenizer.eos_token_id
    model.save_pretrained(folder)
    processor.save_pretrained(folder)
    return folder


def random_png(height: int = 37, width: int = 53, seed: int = 1) -> bytes:
    """An odd-sized random RGB image as PNG bytes (the parity tests' picture)."""
    import io

    from PIL import Image

    g = torch.Generator().manual_seed(seed)
    buf = io.BytesIO()
    Image.fromarray((torch.rand(height, width, 3, generator=g) * 255).to(torch.uint8).numpy()).save(buf, "PNG")
    return buf.getvalue()

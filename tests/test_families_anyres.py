"""LLaVA-NeXT and LLaVA-OneVision on our model code against transformers, on tiny random checkpoints in fp32.

The standard of tests/test_engine_parity.py, for one and two images per prompt and images of several shapes: prompt
ids equal to the processor's (transformers' chat template given the images, as `apply_chat_template` passes them),
prefill logits within 1e-4 of the HF forward, 48 greedy tokens equal to HF `generate`. Then: every cheaper reading
is a real model input (its features equal HF's with the pinpoint list narrowed to it); image token counts equal the
processors' on the real-size configs; a photo too big for a 2,048-token context is fitted (CLI and chat layer);
the per-image cap; a sliding window caps the context. GPU tests compare CUDA with the CPU path.
"""
import dataclasses
import io
import os
import subprocess
import sys
from functools import partial
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from engine.chat import ChatImage, ChatModel, ChatTurn, GenerationSettings
from engine.chat.types import Finished, TextDelta
from engine.config import TextConfig
from engine.families import load_model
from engine.families.llava_next import GRAPH_TILES, AnyresImages
from engine.families.llava_onevision import SQUARE, OnevisionImages
from engine.image_inputs import ImageInput
from engine.sampling_params import SamplingParams
from tests.anyres_specs import SPECS, count_tokenizer, hf_processor
from tests.test_engine_parity import RecordingSampler, run_prefill_logits
from tests.tiny_checkpoints import make_tiny_llava_next, make_tiny_llava_onevision, random_png
from vision.anyres import AnyresConfig

pytestmark = pytest.mark.usefixtures("one_thread")  # tiny tensors: see tests/conftest.py

BUILDERS = {
    "next": make_tiny_llava_next,
    "next-mistral": partial(make_tiny_llava_next, lm="mistral"),
    "onevision": make_tiny_llava_onevision,
}
QUESTION = "What animal is in this picture?"
# The images of one prompt, (height, width): wide, tall, and two of different shapes.
CASES = {"wide": [(37, 131)], "tall": [(97, 25)], "two": [(37, 53), (90, 31)]}


@pytest.fixture(scope="module", params=sorted(BUILDERS))
def family(request, tmp_path_factory):
    """(name, checkpoint folder, our model, HF model, HF processor) of one tiny checkpoint."""
    from transformers import AutoModelForImageTextToText, AutoProcessor

    folder = BUILDERS[request.param](tmp_path_factory.mktemp(request.param))
    ours = load_model(str(folder), "cpu", "float32", enable_prefix_caching=False)
    hf = AutoModelForImageTextToText.from_pretrained(folder, dtype=torch.float32).eval()
    hf.generation_config.eos_token_id = None  # compare full 48-token runs
    return request.param, folder, ours, hf, AutoProcessor.from_pretrained(folder)


def pngs(case: str) -> list[bytes]:
    return [random_png(h, w, seed=i) for i, (h, w) in enumerate(CASES[case])]


def pil(data: bytes) -> Image.Image:
    return Image.open(io.BytesIO(data)).convert("RGB")


def hf_inputs(processor, turns: list[tuple[str, str, list[bytes]]]):
    """transformers' own path: the chat template given the images, which it passes on per conversation."""
    conversation = [{"role": role, "content": [{"type": "image", "image": pil(p)} for p in images] +
                     [{"type": "text", "text": text}]} for role, text, images in turns]
    return processor.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True, return_dict=True,
                                         return_tensors="pt")


def our_prepared(bundle, turns: list[tuple[str, str, list[bytes]]]):
    chat = [ChatTurn(role, text, tuple(ChatImage(p, f"{role}{i}.png") for i, p in enumerate(images)))
            for role, text, images in turns]
    plan = ChatModel(bundle).plan("", chat, 48)
    assert plan.error is None and not plan.notices, (plan.error, plan.notices)
    return plan.prepared


@pytest.mark.parametrize("case", sorted(CASES))
def test_prompt_ids_match_processor(family, case):
    _, _, ours, _, processor = family
    turns = [("user", QUESTION, pngs(case))]
    ids, spans = our_prepared(ours, turns)
    assert ids == hf_inputs(processor, turns)["input_ids"][0].tolist()
    assert len(spans) == len(CASES[case])


def test_images_of_earlier_turns_count(family):
    """Two turns with an image each are a two-image prompt (OneVision then reads both as square tiles)."""
    name, _, ours, _, processor = family
    a, b = pngs("two")
    turns = [("user", QUESTION, [a]), ("assistant", "A cat.", []), ("user", "And this one?", [b])]
    ids, spans = our_prepared(ours, turns)
    assert ids == hf_inputs(processor, turns)["input_ids"][0].tolist()
    assert all((s.source.reading.key == SQUARE) == (name == "onevision") for s in spans)


@pytest.mark.parametrize("case", sorted(CASES))
def test_prefill_logits_match(family, case):
    _, _, ours, hf, processor = family
    turns = [("user", QUESTION, pngs(case))]
    mine = run_prefill_logits(ours.engine, *our_prepared(ours, turns))
    with torch.no_grad():
        theirs = hf(**hf_inputs(processor, turns)).logits[0].float()
    assert mine.shape == theirs.shape
    assert (mine - theirs).abs().max().item() < 1e-4


@pytest.mark.parametrize("case", sorted(CASES))
def test_greedy_48_tokens_match(family, case):
    _, _, ours, hf, processor = family
    turns = [("user", QUESTION, pngs(case))]
    ids, spans = our_prepared(ours, turns)
    mine = ours.engine.generate([ids], SamplingParams(max_new_tokens=48, ignore_eos=True), [spans])[0]
    inputs = hf_inputs(processor, turns)
    with torch.no_grad():
        out = hf.generate(**inputs, max_new_tokens=48, do_sample=False)
    assert len(mine.token_ids) == 48
    assert mine.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()


# --- cheaper readings are real model inputs ---

def hf_features(hf, processor, images: list[Image.Image], pinpoint=None) -> list[torch.Tensor]:
    """HF's packed features of the images of one prompt; with `pinpoint`, its pinpoint list narrowed to that one."""
    config, image_processor = hf.model.config, processor.image_processor
    saved = config.image_grid_pinpoints, image_processor.image_grid_pinpoints
    if pinpoint is not None:
        config.image_grid_pinpoints = image_processor.image_grid_pinpoints = [list(pinpoint)]
    try:
        px = image_processor([images], return_tensors="pt")
        extra = {"batch_num_images": px["batch_num_images"]} if "batch_num_images" in px else {}
        with torch.no_grad():
            return list(hf.model.get_image_features(px["pixel_values"], px["image_sizes"], **extra).pooler_output)
    finally:
        config.image_grid_pinpoints, image_processor.image_grid_pinpoints = saved


READING_SIZES = [(47, 131), (131, 47), (90, 61), (150, 150), (61, 200)]  # (height, width)


def test_every_reading_equals_hf_features(family):
    """Each grid reading: HF with only that pinpoint. The base tile alone: the first P * P rows of HF's own reading
    (its base tile's features). OneVision's square reading: HF's for an image of a two-image prompt."""
    name, _, ours, hf, processor = family
    images, anyres = ours.images, ours.images.anyres
    checked = 0
    for hw in READING_SIZES:
        picture = pil(random_png(*hw, seed=5))
        own = hf_features(hf, processor, [picture])[0]
        for reading in images.readings(picture.size):
            mine = images.encode([ImageInput(picture, "d", reading)])[0]
            if reading.key is None:
                theirs = own[:anyres.base_tokens]
            else:
                theirs = hf_features(hf, processor, [picture], reading.key)[0]
            assert mine.shape == theirs.shape == (reading.tokens, hf.config.text_config.hidden_size)
            assert torch.allclose(mine, theirs, atol=1e-5, rtol=0), (hw, reading)
            checked += 1
    assert checked > 2 * len(READING_SIZES)
    if name == "onevision":
        pictures = [pil(p) for p in pngs("two")]
        readings = images.prompt_readings([p.size for p in pictures])
        mine = images.encode([ImageInput(p, str(i), r[0]) for i, (p, r) in enumerate(zip(pictures, readings))])
        for m, t, r in zip(mine, hf_features(hf, processor, pictures), readings):
            assert len(r) == 1 and r[0].key == SQUARE
            assert m.shape == t.shape and torch.allclose(m, t, atol=1e-5, rtol=0)


# --- counts on the real-size configs ---

# (width, height), as PIL gives sizes: tiny, square, very wide, very tall, a photo, an odd one
COUNT_SIZES = [(7, 5), (640, 640), (3000, 200), (120, 1900), (1920, 1080), (1024, 899)]
COUNT_PAIRS = [((7, 5), (1920, 1080)), ((3000, 200), (120, 1900)), ((640, 640), (1024, 899))]


def hf_counts(processor, sizes) -> list[int]:
    """The `<image>` runs of one prompt holding blank images of `sizes`, passed as one prompt's images."""
    text = " ".join(["look <image>"] * len(sizes))
    ids = processor(images=[[Image.new("RGB", s) for s in sizes]], text=text)["input_ids"][0]
    runs, run = [], 0
    for tok in list(ids) + [-1]:
        if tok == processor.image_token_id:
            run += 1
        elif run:
            runs, run = runs + [run], 0
    return runs


def real_size_images(name: str) -> AnyresImages:
    """The family's input side on a real-size config: readings need no weights."""
    anyres = AnyresConfig.from_configs(SPECS[name].model, SPECS[name].preprocessor)
    cls = OnevisionImages if name == "onevision" else AnyresImages
    return cls(anyres, None, None, None, torch.device("cpu"), torch.float32)


@pytest.mark.parametrize("name", ["next", "onevision"])
def test_counts_equal_processor_on_real_configs(name):
    images, processor = real_size_images(name), hf_processor(name, count_tokenizer())
    for size in COUNT_SIZES:
        assert images.prompt_readings([size])[0][0].tokens == hf_counts(processor, [size])[0], size
    for pair in COUNT_PAIRS:
        assert [r[0].tokens for r in images.prompt_readings(list(pair))] == hf_counts(processor, pair), pair
    if name == "onevision":
        assert images.prompt_readings([(1920, 1080)])[0][0].tokens == 7269
        assert [r[0].tokens for r in images.prompt_readings([(1920, 1080)] * 2)] == [730, 730]


def test_reading_labels_and_keys():
    images = real_size_images("next")
    readings = images.readings((640, 640))
    assert [(r.tokens, r.label, r.key) for r in readings] == [
        (2928, "672x672", (672, 672)), (1176, "672x336", (336, 672)), (576, "its 336x336 base tile alone", None)]
    assert real_size_images("onevision").prompt_readings([(5, 5), (5, 5)])[0][0].label == "its 384x384 square tile"


# --- fitting a big photo into a small context ---

def photo_jpeg(path: Path, width=1920, height=1080) -> Path:
    yy, xx = np.mgrid[0:height, 0:width]
    rng = np.random.default_rng(0)
    img = np.stack([xx * 255 // width, yy * 255 // height, (xx + yy) * 127 // (width + height)], -1)
    img = np.clip(img + rng.integers(-20, 20, img.shape), 0, 255).astype(np.uint8)
    Image.fromarray(img).save(path, "JPEG", quality=90)
    return path


@pytest.fixture(scope="module")
def small_context(tmp_path_factory):
    """A NeXT checkpoint with a 2,048-token context whose grid counts as llava-v1.6's (24x24 features per tile):
    a 1920x1080 photo costs 1,948 tokens, more than fits beside 512 new tokens."""
    folder = tmp_path_factory.mktemp("small_context")
    return make_tiny_llava_next(folder / "model", tile=48, patch=2, context=2048), photo_jpeg(folder / "photo.jpg")


PHOTO_NOTE = "photo.jpg was read at 48x96, 926 tokens instead of 1,948, to fit the 2,048-token context."


@pytest.mark.slow
def test_big_photo_fits_through_the_cli(small_context):
    folder, photo = small_context
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1")
    run = subprocess.run([sys.executable, "-m", "engine", "--model", str(folder), "--image", str(photo), "--prompt",
                          "Describe this photo.", "--max-new-tokens", "512", "--temperature", "0", "--stats"],
                         capture_output=True, text=True, env=env, cwd=Path(__file__).parents[1], timeout=300)
    assert run.returncode == 0, run.stderr
    assert run.stdout.strip()
    assert f"note: {PHOTO_NOTE}" in run.stderr
    assert "image tokens: 926" in run.stderr


@pytest.mark.slow
def test_big_photo_fits_through_the_chat_layer(small_context):
    folder, photo = small_context
    model = ChatModel(load_model(str(folder), "cpu", "float32"))
    try:
        turn = ChatTurn("user", "Describe this photo.", (ChatImage(photo.read_bytes(), "photo.jpg"),))
        plan = model.plan("", [turn], 512)
        assert plan.error is None and plan.notices == [PHOTO_NOTE]
        assert plan.image_tokens == 926 and plan.max_new_tokens == 512
        assert plan.prompt_tokens + 512 <= 2048 == plan.context_len
        events = list(model.stream(plan, GenerationSettings(max_new_tokens=512, temperature=0.0)))
    finally:
        model.close()
    text = "".join(e.text for e in events if isinstance(e, TextDelta))
    assert text.strip() and isinstance(events[-1], Finished) and events[-1].stats.finish_reason != "error"


def test_per_image_cap_takes_the_most_detailed_reading_within_it(tmp_path):
    ours = load_model(str(make_tiny_llava_next(tmp_path)), "cpu", "float32")
    data = random_png(47, 131, seed=3)
    readings = ours.images.readings(pil(data).size)
    assert len(readings) >= 3
    model = ChatModel(ours)
    turns = [ChatTurn("user", QUESTION, (ChatImage(data, "wide.png"),))]
    for cap, want in [(readings[1].tokens, readings[1]), (readings[1].tokens - 1, readings[2]),
                      (1, readings[-1]), (readings[0].tokens, readings[0])]:
        plan = model.plan("", turns, 16, max_image_tokens=cap)
        assert plan.error is None and plan.image_tokens == want.tokens
        assert plan.prepared[1][0].source.reading == want
        capped = [n for n in plan.notices if "image token cap" in n]
        assert capped == ([] if want == readings[0] else
                          [f"wide.png was read at {want.label}, {want.tokens:,} tokens instead of "
                           f"{readings[0].tokens:,}, as the image token cap in Settings asks."])


# --- Mistral's sliding window ---

def test_sliding_window_caps_the_context():
    base = dict(model_type="mistral", vocab_size=10, hidden_size=8, intermediate_size=16, num_hidden_layers=1,
                num_attention_heads=2, max_position_embeddings=32768)
    assert TextConfig.from_dict({**base, "sliding_window": None}).max_position_embeddings == 32768
    assert TextConfig.from_dict({**base, "sliding_window": 4096}).max_position_embeddings == 4096
    assert TextConfig.from_dict({**base, "sliding_window": 65536}).max_position_embeddings == 32768
    qwen2 = {**base, "model_type": "qwen2", "sliding_window": 4096}  # Qwen2 reads it only when asked to
    assert TextConfig.from_dict({**qwen2, "use_sliding_window": False}).max_position_embeddings == 32768
    assert TextConfig.from_dict({**qwen2, "use_sliding_window": True}).max_position_embeddings == 4096


# --- GPU against CPU (run on a CUDA machine) ---

def features_on(device: str, folder, turns):
    bundle = load_model(str(folder), device, "float32")
    ids, spans = our_prepared(bundle, turns)
    feats = bundle.images.encode([s.source for s in spans])
    return ids, tuple(dataclasses.replace(s, embeds=f) for s, f in zip(spans, feats))


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_image_features_close_to_cpu(family, case):
    """GPU preprocessing (resizes within 2/255 of the CPU's) and the CUDA-graphed tower, in fp32."""
    _, folder, _, _, _ = family
    turns = [("user", QUESTION, pngs(case))]
    _, cpu = features_on("cpu", folder, turns)
    _, gpu = features_on("cuda", folder, turns)
    for c, g in zip(cpu, gpu):
        assert g.embeds.is_cuda and g.embeds.shape == c.embeds.shape
        assert ((g.embeds.float().cpu() - c.embeds).norm() / c.embeds.norm()).item() < 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("case", sorted(CASES))
def test_gpu_greedy_tokens_match_cpu(family, case):
    """48 greedy tokens on the GPU (fp32, Triton kernels, CUDA graphs) from the CPU's prompt and features: each
    the CPU's argmax wherever the CPU's top two logits are further apart than the tolerance (1e-4 of their range)."""
    _, folder, ours, _, _ = family
    ids, spans = features_on("cpu", folder, [("user", QUESTION, pngs(case))])
    bundle = load_model(str(folder), "cuda", "float32")
    recorder = RecordingSampler(bundle.engine.runner.sampler)
    bundle.engine.runner.sampler = recorder
    gpu_spans = tuple(dataclasses.replace(s, embeds=s.embeds.cuda()) for s in spans)
    tokens = bundle.engine.generate([ids], SamplingParams(max_new_tokens=48, ignore_eos=True), [gpu_spans])[0].token_ids
    gpu = torch.stack(recorder.seen).float().cpu()
    cpu = run_prefill_logits(ours.engine, ids + tokens[:-1], spans)[len(ids) - 1:]
    tol = 1e-4 * (cpu.max() - cpu.min()).item()
    assert (gpu - cpu).abs().max().item() <= tol
    top2 = cpu.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol
    assert clear.any() and (cpu.argmax(-1) == torch.tensor(tokens))[clear].all()


@pytest.mark.gpu
def test_gpu_graphed_tiles_equal_eager(family):
    """Tile counts in an order unlike the captures' (the graphs share one memory pool), outputs checked only after
    all ran: each equal to eager passes over the same chunks of `GRAPH_TILES`."""
    _, folder, _, _, _ = family
    images = load_model(str(folder), "cuda", "float32").images
    s = images.anyres.tile_size
    g = torch.Generator(device="cuda").manual_seed(0)
    inputs = [torch.randn(n, 3, s, s, device="cuda", generator=g) for n in (5, 1, 19, 8, 3, 2, 16, 7)]
    with torch.inference_mode():
        got = [images.forward(x) for x in inputs]
        want = [torch.cat([images._forward(c) for c in x.split(GRAPH_TILES)]) for x in inputs]
    for a, b in zip(got, want):
        assert a.shape == b.shape and torch.allclose(a, b, atol=1e-5, rtol=1e-5)


@pytest.mark.slow
def test_big_photo_fits_through_the_app(small_context, tmp_path):
    """The seed's scenario through the launched app's /chat, as the page sends it: a notice saying how the photo
    was fitted, then a non-empty answer, and a stats line; never an empty reply."""
    from gradio_client import Client, handle_file

    from tests.browser.app_server import running_app

    folder, photo = small_context
    with running_app(tmp_path, "--model", str(folder), "--device", "cpu", "--dtype", "float32") as server:
        client = Client(server.url, verbose=False, download_files=False)
        job = client.submit({"text": "Describe this photo.", "files": [handle_file(str(photo))]},
                            512, 0.0, 1.0, 0, 1.0, "", -1, 0, api_name="/chat")
        messages = job.result(timeout=600)[0]
    notes = [m["content"] for m in messages if (m.get("metadata") or {}).get("title", "").startswith("ℹ️")]
    answer = "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))
    assert any(PHOTO_NOTE in note for note in notes), messages
    assert answer.strip(), messages
    assert any("926 image tokens" in (m.get("metadata") or {}).get("title", "") for m in messages)

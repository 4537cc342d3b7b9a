"""The embedded offline default: real trained weights (SmolLM2-135M-Instruct + EfficientNet-Lite0), no network."""
import io
import subprocess
import sys
from pathlib import Path

import pytest
from PIL import Image

from engine.chat import ChatImage, ChatModel, ChatTurn, Finished, GenerationSettings, TextDelta

pytestmark = pytest.mark.slow
QUESTION = "What animal is in this picture?"


@pytest.fixture(scope="module")
def cat_png() -> bytes:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, "PNG")
    return buf.getvalue()


@pytest.fixture(scope="module")
def model():
    return ChatModel.load("default", "cpu")


def reply(model, turns, settings=GenerationSettings(temperature=0, max_new_tokens=48)):
    plan = model.plan("", turns, settings.max_new_tokens)
    events = list(model.stream(plan, settings))
    assert isinstance(events[-1], Finished)
    return plan, "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def test_default_answers_the_cat_question(model, cat_png):
    assert model.model_id == "default"  # what `load` takes to load it again (an API alias)
    plan, text, done = reply(model, [ChatTurn("user", QUESTION, (ChatImage(cat_png, "chelsea.png"),))])
    assert plan.error is None and plan.image_tokens > 0
    assert "cat" in text.lower()
    assert done.stats.finish_reason == "stop" and done.stats.generated_tokens > 0


def test_follow_up_reuses_the_image_features_and_prefix(model, cat_png):
    first = ChatTurn("user", QUESTION, (ChatImage(cat_png, "chelsea.png"),))
    _, text, _ = reply(model, [first])
    cache = model.loaded.engine.vision.cache
    encoded = len(cache)
    plan, _, done = reply(model, [first, ChatTurn("assistant", text), ChatTurn("user", "Is it a pet?")])
    assert len(cache) == encoded  # no re-encode
    assert done.stats.finish_reason in ("stop", "length")


def test_bad_image_is_not_answered_as_if_seen_and_the_model_keeps_serving(model, cat_png):
    plan = model.plan("", [ChatTurn("user", "what is this?", (ChatImage(b"not an image at all", "bad.png"),))], 16)
    assert plan.prepared is None and "bad.png" in plan.error and "not sent to the model" in plan.error
    two = (ChatImage(b"not an image at all", "bad.png"), ChatImage(cat_png, "chelsea.png"))
    plan = model.plan("", [ChatTurn("user", "what is this?", two)], 16)
    assert plan.error is None and any("bad.png" in n for n in plan.notices) and plan.image_tokens > 0
    plan = model.plan("", [ChatTurn("user", "", (ChatImage(cat_png[:200], "cut.png"),))], 16)
    assert plan.error and "cut.png" in plan.error
    _, text, _ = reply(model, [ChatTurn("user", QUESTION, (ChatImage(cat_png, "chelsea.png"),))])
    assert "cat" in text.lower()


def test_cli_streams_only_the_reply_to_stdout(tmp_path, cat_png):
    image = tmp_path / "chelsea.png"
    image.write_bytes(cat_png)
    root = Path(__file__).resolve().parents[1]
    out = subprocess.run([sys.executable, "-m", "engine", "--model", "default", "--device", "cpu", "--image",
                          str(image), "--prompt", QUESTION, "--stats", "--max-new-tokens", "40"],
                         capture_output=True, text=True, cwd=root, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "cat" in out.stdout.lower()
    assert "TTFT" not in out.stdout and "TTFT" in out.stderr and "image tokens: " in out.stderr


def test_converted_checkpoint_is_plain_safetensors():
    from engine.checkpoints.reader import Checkpoint
    from engine.checkpoints.smollm_gguf import IMAGE_TOKEN, default_lm_checkpoint
    from engine.families.common import TEXT_PREFIXES

    path = default_lm_checkpoint()  # converted already by the fixtures above
    ck = Checkpoint.load(path)
    parts = ck.parts(TEXT_PREFIXES)
    assert set(parts) == {"text"} and len(parts["text"]) == 272  # tied lm_head not stored twice
    assert "quantization_config" not in ck.config
    assert IMAGE_TOKEN in (path / "tokenizer.json").read_text()

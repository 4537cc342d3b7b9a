"""Fitting a conversation into the context before running: older images, then old turns, then max new tokens."""
import pytest

from tests.tiny_checkpoints import make_tiny_llava, random_png
from engine.chat import ChatImage, ChatModel, ChatTurn
from engine.families import load_model

IMAGE_TOKENS = 25  # the tiny Llama+CLIP checkpoint: (30 / 6)^2 patches, CLS dropped


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("budget"), "llama-clip")


def model(folder, context):
    return ChatModel(load_model(str(folder), "cpu", max_model_len=context))


def image(seed, name):
    return (ChatImage(random_png(seed=seed), name),)


def chat(rounds):
    turns = []
    for i in range(rounds):
        turns += [ChatTurn("user", f"Question {i} about the cat.", image(i, f"photo{i}.png")),
                  ChatTurn("assistant", f"Answer {i} about the cat.")]
    return turns + [ChatTurn("user", "And now?", image(99, "new.png"))]


def test_everything_fits_unchanged(folder):
    plan = model(folder, 512).plan("", chat(2), 32)
    assert plan.error is None and plan.notices == []
    assert plan.image_tokens == 3 * IMAGE_TOKENS
    assert plan.prompt_tokens + plan.max_new_tokens <= plan.context_len


def test_older_images_leave_first_then_old_turns(folder):
    full = model(folder, 512).plan("", chat(2), 32)
    tight = model(folder, full.prompt_tokens + 32 - IMAGE_TOKENS)  # one image too many
    plan = tight.plan("", chat(2), 32)
    assert plan.error is None
    assert plan.image_tokens == 2 * IMAGE_TOKENS  # the oldest image went, the newest stayed
    assert any("photo0.png" in n for n in plan.notices) and not any("new.png" in n for n in plan.notices)
    assert plan.prompt_tokens + 32 <= plan.context_len
    tighter = model(folder, full.prompt_tokens + 32 - 2 * IMAGE_TOKENS - 4)  # images alone no longer suffice
    plan = tighter.plan("", chat(2), 32)
    assert plan.error is None and plan.image_tokens == IMAGE_TOKENS
    assert any("oldest" in n and "left out" in n for n in plan.notices)


def test_max_new_tokens_lowered_when_only_the_new_message_is_left(folder):
    alone = model(folder, 512).plan("", chat(0), 32)
    small = model(folder, alone.prompt_tokens + 20)
    plan = small.plan("", chat(0), 200)
    assert plan.error is None and plan.max_new_tokens == 20
    assert any("Max new tokens lowered from 200 to 20" in n for n in plan.notices)


def test_a_message_that_can_never_fit_says_so(folder):
    alone = model(folder, 512).plan("", chat(0), 32)
    plan = model(folder, alone.prompt_tokens).plan("", chat(0), 32)
    assert plan.prepared is None
    assert f"needs {alone.prompt_tokens} tokens ({IMAGE_TOKENS} of them for the image(s))" in plan.error

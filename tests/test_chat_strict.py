"""The chat layer's strict mode (`plan(..., fit=False)`, what the API and the pipeline use) and `astream`."""
import asyncio

import pytest

from engine.chat import ChatImage, ChatModel, ChatTurn, Finished, GenerationSettings, TextDelta
from engine.families import load_model
from tests.tiny_checkpoints import make_tiny_llava, random_png

IMAGE_TOKENS = 25


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    folder = make_tiny_llava(tmp_path_factory.mktemp("strict"), "llama-clip")
    m = ChatModel(load_model(str(folder), "cpu", "float32", max_model_len=256))
    yield m
    m.close()


def chat(rounds):
    turns = []
    for i in range(rounds):
        turns += [ChatTurn("user", f"Question {i} about the cat.", (ChatImage(random_png(seed=i), f"p{i}.png"),)),
                  ChatTurn("assistant", f"Answer {i} about the cat.")]
    return turns + [ChatTurn("user", "And now?", (ChatImage(random_png(seed=99), "new.png"),))]


def test_strict_refuses_with_the_numbers_where_fitting_would_change_the_chat(model):
    fitted = model.plan("", chat(6), 32)
    assert fitted.error is None and fitted.notices  # the UI's plan left things out and said so
    strict = model.plan("", chat(6), 32, fit=False)
    assert strict.error_code == "context_exceeded" and strict.prepared is None and not strict.notices
    assert strict.prompt_tokens > 256 - 32 and strict.image_tokens == 7 * IMAGE_TOKENS
    assert f"{strict.prompt_tokens:,} prompt tokens" in strict.error and "256" in strict.error


def test_strict_takes_the_rest_of_the_context_when_max_tokens_is_not_given(model):
    plan = model.plan("", chat(1), None, fit=False)
    assert plan.error is None and plan.prompt_tokens + plan.max_new_tokens == 256
    plan = model.plan("", chat(1), 256 - plan.prompt_tokens + 1, fit=False)
    assert plan.error_code == "context_exceeded"


def test_strict_refuses_an_unreadable_image_in_any_turn(model):
    turns = chat(1)
    turns[0] = ChatTurn("user", "old", (ChatImage(b"not an image", "old.png"),))
    assert model.plan("", turns, 16).error is None  # the UI leaves an old broken image out
    plan = model.plan("", turns, 16, fit=False)
    assert plan.error_code == "bad_image" and "old.png" in plan.error


def test_refusals_carry_a_code(model):
    assert model.plan("", [ChatTurn("assistant", "hi")], 8).error_code == "invalid_parameter"
    assert model.plan("", [ChatTurn("user", "  ")], 8).error_code == "invalid_parameter"
    plan = model.plan("", [ChatTurn("user", "?", (ChatImage(b"xx", "x.png"),))], 8)
    assert plan.error_code == "bad_image"


def test_astream_gives_the_same_reply_as_stream(model):
    settings = GenerationSettings(max_new_tokens=12, temperature=0.0, ignore_eos=True)
    plan = model.plan("", chat(1), 12, fit=False)
    events = list(model.stream(plan, settings))

    async def collect():
        return [e async for e in model.astream(plan, settings)]

    async_events = asyncio.run(collect())
    text = lambda evs: "".join(e.text for e in evs if isinstance(e, TextDelta))  # noqa: E731
    assert text(async_events) == text(events) and text(events)
    assert isinstance(async_events[-1], Finished) and async_events[-1].stats.generated_tokens == 12


def test_astream_of_a_refused_plan_finishes_with_its_code(model):
    plan = model.plan("", chat(6), 32, fit=False)

    async def collect():
        return [e async for e in model.astream(plan, GenerationSettings())]

    (done,) = asyncio.run(collect())
    assert done.stats.finish_reason == "error" and done.stats.error_code == "context_exceeded"

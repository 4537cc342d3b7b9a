"""RemoteChatModel's side of the protocol against scripted HTTP answers (httpx.MockTransport): what it sends, how
it reads streams from other servers, and every refusal in plain words. No server, no model."""
import json

import httpx
import pytest

from engine.chat import ChatImage, ChatTurn, Finished, GenerationSettings, TextDelta
from engine.chat.remote import RemoteChatModel, api_base
from tests.tiny_checkpoints import random_png


def sse(*chunks) -> bytes:
    return b"".join(b"data: " + (c if isinstance(c, bytes) else json.dumps(c).encode()) + b"\n\n" for c in chunks)


def delta(text=None, finish=None):
    return {"choices": [{"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish}]}


@pytest.fixture
def remote():
    model = RemoteChatModel("http://127.0.0.1:9", model="served")  # nothing listens: no /v1/models, no counting
    yield model
    model.close()


def answer(remote, response: httpx.Response | None = None, stream: bytes = b"", settings=GenerationSettings()):
    sent = []

    def handler(request: httpx.Request) -> httpx.Response:
        sent.append(json.loads(request.content))
        return response or httpx.Response(200, content=stream, headers={"content-type": "text/event-stream"})

    remote.client = httpx.Client(transport=httpx.MockTransport(handler))
    turns = [ChatTurn("user", "What is it?", (ChatImage(random_png(), "p.png"),))]
    events = list(remote.stream(remote.plan("Be brief.", turns, 32), settings))
    assert isinstance(events[-1], Finished)
    return sent[0], "".join(e.text for e in events if isinstance(e, TextDelta)), events[-1]


def test_base_url_is_normalised():
    assert api_base("http://h:8000") == api_base("http://h:8000/v1/") == "http://h:8000/v1"


def test_request_carries_the_conversation_and_only_the_settings_that_differ_from_defaults(remote):
    settings = GenerationSettings(max_new_tokens=32, temperature=0.5, top_k=0, repetition_penalty=1.0, seed=3,
                                  stop=("END",))
    body, _, _ = answer(remote, stream=sse(delta("Hi", "stop"), b"[DONE]"), settings=settings)
    assert body["model"] == "served" and body["stream"] and body["stream_options"] == {"include_usage": True}
    assert (body["max_tokens"], body["temperature"], body["seed"], body["stop"]) == (32, 0.5, 3, ["END"])
    assert not {"top_k", "repetition_penalty", "presence_penalty", "frequency_penalty", "logit_bias"} & set(body)
    system, user = body["messages"]
    assert system == {"role": "system", "content": "Be brief."}
    assert user["content"][0]["image_url"]["url"].startswith("data:image/png;base64,")
    assert user["content"][1] == {"type": "text", "text": "What is it?"}


def test_openai_penalties_and_logit_bias_are_passed_on(remote):
    settings = GenerationSettings(presence_penalty=0.5, frequency_penalty=-1.0, logit_bias={42: -100, 7: 2})
    body, _, _ = answer(remote, stream=sse(delta("Hi", "stop"), b"[DONE]"), settings=settings)
    assert (body["presence_penalty"], body["frequency_penalty"]) == (0.5, -1.0)
    assert body["logit_bias"] == {"7": 2.0, "42": -100.0}


def test_a_stream_with_usage_gives_text_and_stats(remote):
    stream = sse(delta("The "), delta("cat."), delta(finish="stop"),
                 {"choices": [], "usage": {"prompt_tokens": 40, "completion_tokens": 3, "total_tokens": 43}},
                 b"[DONE]")
    _, text, done = answer(remote, stream=stream)
    assert text == "The cat." and done.message is None
    assert (done.stats.finish_reason, done.stats.prompt_tokens, done.stats.generated_tokens) == ("stop", 40, 3)


def test_length_is_reported_with_words(remote):
    _, _, done = answer(remote, stream=sse(delta("a"), delta("b", "length"), b"[DONE]"))
    assert done.stats.finish_reason == "length" and "max new tokens" in done.message


@pytest.mark.parametrize("status, error, code, words", [
    (400, {"message": "This model's maximum context length is 4096 tokens. However, ...", "code": None},
     "context_exceeded", "no longer fits"),
    (400, {"message": "image 1 could not be decoded", "code": "bad_image"}, "bad_image", "could not use an image"),
    (400, {"message": "top_p must be in (0, 1]", "param": "top_p"}, "invalid_parameter", "refused this message"),
    (401, {"message": "Incorrect API key provided."}, "engine", "API key"),
    (503, {"message": "overloaded"}, "engine", "you can retry"),
])
def test_refusals_become_plain_words(remote, status, error, code, words):
    _, text, done = answer(remote, httpx.Response(status, json={"error": error}))
    assert text == "" and done.stats.finish_reason == "error" and done.stats.error_code == code
    assert words in done.message and error["message"] in done.message


def test_an_error_event_mid_stream_ends_the_reply_as_an_error(remote):
    _, text, done = answer(remote, stream=sse(delta("par"), {"error": {"message": "engine step failed"}}))
    assert text == "par" and done.stats.error_code == "engine" and "engine step failed" in done.message


def test_a_stream_that_ends_without_a_reason_is_an_error_not_a_stop(remote):
    _, text, done = answer(remote, stream=sse(delta("half an ans")))
    assert text == "half an ans" and done.stats.finish_reason == "error" and "without saying why" in done.message


def test_an_unreadable_image_is_refused_before_sending(remote):
    plan = remote.plan("", [ChatTurn("user", "?", (ChatImage(b"junk", "junk.png"),))], 8)
    assert plan.error_code == "bad_image" and "junk.png" in plan.error

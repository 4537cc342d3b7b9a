"""The API router served in this process (uvicorn on 127.0.0.1, a tiny random llava) so the engine can be watched:
API and UI requests share one engine and are batched together, `n` choices batch, and a client that goes away has
its request aborted in the engine."""
import contextlib
import json
import threading
import time

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from api import openai_router
from engine.chat import ChatImage, ChatModel, ChatTurn, Finished, GenerationSettings
from engine.families import load_model
from tests.browser.app_server import free_port
from tests.tiny_checkpoints import make_tiny_llava, random_png

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture(scope="module")
def model(tmp_path_factory):
    # a long context, so the abort tests' replies (LONG tokens) are still running when their clients go
    folder = make_tiny_llava(tmp_path_factory.mktemp("inprocess"), "qwen2-siglip", context=4096)
    m = ChatModel(load_model(str(folder), "cpu", "float32"))
    yield m
    m.close()


@pytest.fixture(scope="module")
def url(model):
    app = FastAPI()
    app.include_router(openai_router(model, "tiny"))
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=free_port(), log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.02)
    yield f"http://127.0.0.1:{server.config.port}/v1"
    server.should_exit = True
    thread.join(10)


@pytest.fixture
def batch_sizes(model, monkeypatch):
    """Records how many sequences each engine step ran."""
    sizes, runner = [], model.loaded.engine.runner
    launch = runner.launch

    def recording(batch, *args, **kw):
        sizes.append(len(batch.seqs))
        return launch(batch, *args, **kw)

    monkeypatch.setattr(runner, "launch", recording)
    return sizes


def idle(model, timeout=10.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not model.server._streams and not model.loaded.engine.has_work():
            return True
        time.sleep(0.02)
    return False


LONG = 4000  # new tokens of the replies whose clients go mid-reply (seconds of work even for the tiny model)


def body(max_tokens=40, **kw):
    return {"model": "tiny", "messages": [{"role": "user", "content": "Describe the cat."}],
            "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True, **kw}


def test_n_choices_run_in_one_batch(url, model, batch_sizes):
    reply = httpx.post(f"{url}/chat/completions", json=body(16, n=3, temperature=1.0, seed=1), timeout=60).json()
    assert [c["index"] for c in reply["choices"]] == [0, 1, 2]
    assert reply["usage"]["completion_tokens"] == 48
    assert max(batch_sizes) == 3


def test_api_and_ui_requests_share_the_engine_and_batch(url, model, batch_sizes):
    turn = ChatTurn("user", "What is this?", (ChatImage(random_png(), "p.png"),))
    plan = model.plan("", [turn], 300)
    ui_events, started = [], threading.Event()

    def ui_chat():  # what app.py's handler does on a Gradio thread
        for event in model.stream(plan, GenerationSettings(max_new_tokens=300, temperature=0, ignore_eos=True)):
            ui_events.append(event)
            started.set()

    ui = threading.Thread(target=ui_chat)
    ui.start()
    assert started.wait(30)
    reply = httpx.post(f"{url}/chat/completions", json=body(20), timeout=60).json()
    ui.join(60)
    assert reply["choices"][0]["finish_reason"] == "length" and isinstance(ui_events[-1], Finished)
    assert ui_events[-1].stats.generated_tokens == 300
    assert max(batch_sizes) == 2  # the UI's reply and the API's decoded in the same steps


def test_closing_a_stream_aborts_its_request(url, model):
    with httpx.Client(timeout=60) as client:
        with client.stream("POST", f"{url}/chat/completions", json=body(LONG, stream=True)) as response:
            assert response.status_code == 200
            for line in response.iter_lines():
                if line.startswith("data: {") and (json.loads(line[6:])["choices"][0]["delta"].get("content")):
                    break
            assert model.server._streams  # running
        # the response is closed here, mid-reply
    assert idle(model), "the engine kept generating for a client that had gone"


def test_a_non_streamed_request_is_aborted_when_its_client_goes(url, model):
    with contextlib.suppress(httpx.ReadTimeout):
        httpx.post(f"{url}/chat/completions", json=body(LONG), timeout=httpx.Timeout(60, read=0.5))
    assert idle(model), "the engine kept generating for a client that had gone"


def test_body_and_json_errors(url):
    assert httpx.post(f"{url}/chat/completions", content=b"{not json", timeout=10).status_code == 400
    reply = httpx.post(f"{url}/chat/completions", json=[1, 2], timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["type"] == "invalid_request_error"
    reply = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": [[1, 2, 3]]}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["param"] == "prompt"
    assert httpx.get(f"{url}/models", timeout=10).json()["data"][0]["max_model_len"] > 0


def test_image_urls_per_request_are_capped(url):
    parts = [{"type": "image_url", "image_url": {"url": f"https://example.com/{i}.png"}} for i in range(9)]
    reply = httpx.post(f"{url}/chat/completions", json={"model": "tiny", "messages": [
        {"role": "user", "content": parts + [{"type": "text", "text": "?"}]}]}, timeout=10)
    assert reply.status_code == 400 and reply.json()["error"]["code"] == "too_many_image_urls"


class TokenSpy:
    """Wraps the engine's sampler and keeps the tokens of the first row of each step (one request at a time)."""

    def __init__(self, inner):
        self.inner, self.tokens = inner, []

    def __call__(self, logits, seqs, pending=None):
        tokens = self.inner(logits, seqs, pending)
        self.tokens.append(int(tokens[0]))
        return tokens

    def release(self, seq):
        self.inner.release(seq)


def test_logit_bias_steers_the_tokens(url, model, monkeypatch):
    """A token at +100 is all a greedy reply says; the plain reply's first token at -100 is never said first; the
    penalties stop a greedy reply from repeating its tokens (the tiny random model repeats itself without)."""
    spy = TokenSpy(model.loaded.engine.runner.sampler)
    monkeypatch.setattr(model.loaded.engine.runner, "sampler", spy)

    def reply(**kw) -> list[int]:
        spy.tokens.clear()
        r = httpx.post(f"{url}/chat/completions", json=body(max_tokens=12, **kw), timeout=60)
        assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 12, r.text
        return list(spy.tokens)

    plain = reply()
    favoured = 1 + max(plain)
    assert reply(logit_bias={str(favoured): 100}) == [favoured] * 12
    banned = reply(logit_bias={str(plain[0]): -100})
    assert banned[0] != plain[0] and plain[0] not in banned
    repeats = lambda ids: len(ids) - len(set(ids))
    assert repeats(reply(frequency_penalty=2.0, presence_penalty=2.0)) < repeats(plain), plain


def test_logprobs_in_chat_whole_and_streamed(url, model, monkeypatch):
    """Chat's logprobs: one entry per generated token (the engine's tokens, their own text and bytes), the greedy
    token the likeliest of its alternatives, the same entries whole and streamed."""
    spy = TokenSpy(model.loaded.engine.runner.sampler)
    monkeypatch.setattr(model.loaded.engine.runner, "sampler", spy)
    pieces = model.token_pieces
    whole = httpx.post(f"{url}/chat/completions", json=body(max_tokens=10, logprobs=True, top_logprobs=3),
                       timeout=60).json()["choices"][0]
    content = whole["logprobs"]["content"]
    assert [e["token"] for e in content] == [pieces(t)[0] for t in spy.tokens] and len(content) == 10
    for entry in content:
        assert entry["bytes"] == list(pieces(spy.tokens[content.index(entry)])[1])
        top = entry["top_logprobs"]
        assert len(top) == 3 and [t["logprob"] for t in top] == sorted((t["logprob"] for t in top), reverse=True)
        assert top[0]["token"] == entry["token"] and top[0]["logprob"] == entry["logprob"] <= 0  # greedy
    assert whole["logprobs"]["refusal"] is None
    streamed = []
    with httpx.stream("POST", f"{url}/chat/completions", timeout=60,
                      json=body(max_tokens=10, logprobs=True, top_logprobs=3, stream=True)) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                choice = json.loads(line[6:])["choices"][0]
                streamed += (choice["logprobs"] or {}).get("content", [])
    # the same entries; values within rounding (the second request may read the first's prompt from the cache)
    assert [(e["token"], e["bytes"]) for e in streamed] == [(e["token"], e["bytes"]) for e in content]
    assert all(abs(a["logprob"] - b["logprob"]) < 1e-4 for a, b in zip(streamed, content))
    plain = httpx.post(f"{url}/chat/completions", json=body(max_tokens=3), timeout=60).json()["choices"][0]
    assert plain["logprobs"] is None


def test_logprobs_in_completions(url):
    """The legacy shape: tokens, their log-probabilities, the alternatives as {text: logprob}, and text offsets."""
    r = httpx.post(f"{url}/completions", json={"model": "tiny", "prompt": "A cat", "max_tokens": 8, "logprobs": 2,
                                              "temperature": 0, "ignore_eos": True}, timeout=60)
    lp = r.json()["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == 8
    assert lp["text_offset"] == [sum(len(t) for t in lp["tokens"][:i]) for i in range(8)]
    for token, value, top in zip(lp["tokens"], lp["token_logprobs"], lp["top_logprobs"]):
        assert 1 <= len(top) <= 2 and max(top.values()) == value and top.get(token, value) == value
    streamed = []
    with httpx.stream("POST", f"{url}/completions", timeout=60, json={
            "model": "tiny", "prompt": "A cat", "max_tokens": 8, "logprobs": 2, "temperature": 0,
            "ignore_eos": True, "stream": True}) as r:
        for line in r.iter_lines():
            if line.startswith("data: {"):
                streamed.append(json.loads(line[6:])["choices"][0]["logprobs"])
    merged = {k: sum((s[k] for s in streamed if s), []) for k in lp}
    assert (merged["tokens"], merged["text_offset"]) == (lp["tokens"], lp["text_offset"])
    assert all(abs(a - b) < 1e-4 for a, b in zip(merged["token_logprobs"], lp["token_logprobs"]))

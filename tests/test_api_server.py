"""The OpenAI-compatible API over real HTTP with the official `openai` client, against launched `python -m api`
servers: a tiny random llava checkpoint, and the embedded default (real weights: it must see the cat)."""
import asyncio
import base64
import io
import random
import re

import httpx
import openai
import pytest
from PIL import Image

from tests.api_server import running_api
from tests.tiny_checkpoints import make_tiny_llava

pytestmark = pytest.mark.slow
KEY = "sk-test-key"


@pytest.fixture(scope="module", params=["tiny", "default"])
def server(request, tmp_path_factory):
    """(kind, base URL, served name). Both require the API key; the tiny one lets 'localhost' image URLs through
    the allow-list (and so shows that the address check still refuses them)."""
    logs = tmp_path_factory.mktemp("api_logs")
    if request.param == "tiny":
        folder = make_tiny_llava(tmp_path_factory.mktemp("api_tiny"), "llama-clip")
        flags = ("--served-model-name", "tiny", "--allowed-media-domains", "localhost")
        model, name = str(folder), "tiny"
    else:
        # fp32: these tests compare greedy replies computed in different batch shapes and with different cached
        # prefixes; bf16 (auto's pick on CPUs with bf16 matrix units) rounds those differently in the last bits, and
        # a near-tie then changes the text (the README's "What a fixed Seed repeats")
        flags, model, name = ("--dtype", "float32"), "default", "default"
    with running_api(model, logs, "--api-key", KEY, *flags) as url:
        yield request.param, url, name


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server[1], api_key=KEY, max_retries=0, timeout=300)


def cat_uri(fmt="PNG") -> str:
    from skimage import data

    buf = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buf, fmt)
    return f"data:image/{fmt.lower()};base64," + base64.b64encode(buf.getvalue()).decode()


def ask(text, *images):
    parts = [{"type": "image_url", "image_url": {"url": u}} for u in images] + [{"type": "text", "text": text}]
    return [{"role": "user", "content": parts}]


QUESTION = "What animal is in this picture?"


def test_models_lists_the_served_model(server, client):
    kind, _, name = server
    models = client.models.list().data
    assert [m.id for m in models] == [name] and models[0].max_model_len > 0


def test_chat_about_a_photo(server, client):
    kind, _, name = server
    reply = client.chat.completions.create(model=name, messages=ask(QUESTION, cat_uri()), max_tokens=40,
                                           temperature=0)
    text = reply.choices[0].message.content
    assert reply.object == "chat.completion" and reply.choices[0].finish_reason in ("stop", "length") and text
    usage = reply.usage
    assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens and usage.completion_tokens > 0
    if kind == "default":
        assert "cat" in text.lower(), text


def test_streamed_chat_ends_with_usage(server, client):
    kind, _, name = server
    chunks = list(client.chat.completions.create(model=name, messages=ask(QUESTION, cat_uri("JPEG")),
                                                 max_tokens=40, temperature=0, stream=True,
                                                 stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert all(c.usage is None for c in chunks[:-1]) and chunks[-2].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks[:-1])
    assert len(chunks) > 4 and text
    if kind == "default":
        assert "cat" in text.lower(), text


def test_n_choices(server, client):
    kind, _, name = server
    reply = client.chat.completions.create(model=name, messages=ask("Tell me a story."), max_tokens=12, n=2,
                                           seed=7, temperature=1.0, extra_body={"ignore_eos": True})
    assert [c.index for c in reply.choices] == [0, 1] and reply.usage.completion_tokens == 24
    if kind == "tiny":  # random weights, sampled: two seeds give two different answers
        assert reply.choices[0].message.content != reply.choices[1].message.content


def test_seed_repeats_exactly(server, client):
    kind, _, name = server
    texts = [client.chat.completions.create(model=name, messages=ask("Name some animals."), max_tokens=16,
                                            seed=1234, temperature=1.0, top_p=0.95,
                                            extra_body={"top_k": 40, "repetition_penalty": 1.1}
                                            ).choices[0].message.content for _ in range(2)]
    assert texts[0] == texts[1] and texts[0]


def test_stop_strings_end_the_reply_before_them(server, client):
    kind, _, name = server
    kw = dict(model=name, messages=ask("Count from one to twenty in words."), max_tokens=24, temperature=0,
              extra_body={"ignore_eos": True})
    full = client.chat.completions.create(**kw).choices[0].message.content
    at = next((k for k in range(2, len(full) - 1) if full[k:k + 2].isalnum() and full.find(full[k:k + 2]) == k),
              None)
    assert at is not None, full
    reply = client.chat.completions.create(**kw, stop=["\u2603never", full[at:at + 2]])
    assert reply.choices[0].message.content == full[:at] and reply.choices[0].finish_reason == "stop"


def test_completions_take_a_prompt_list(server, client):
    kind, _, name = server
    reply = client.completions.create(model=name, prompt=["The cat", "Once upon a time"], max_tokens=6, n=2,
                                      temperature=0, extra_body={"ignore_eos": True})
    assert reply.object == "text_completion" and [c.index for c in reply.choices] == [0, 1, 2, 3]
    assert reply.choices[0].text == reply.choices[1].text and reply.usage.completion_tokens == 24
    chunks = list(client.completions.create(model=name, prompt="The cat", max_tokens=6, stream=True,
                                            stream_options={"include_usage": True}, temperature=0,
                                            extra_body={"ignore_eos": True}))
    assert "".join(c.choices[0].text for c in chunks[:-1]) == reply.choices[0].text
    assert chunks[-1].usage.completion_tokens == 6


def bad_request(call) -> dict:
    with pytest.raises(openai.BadRequestError) as info:
        call()
    assert info.value.status_code == 400
    return info.value.body


@pytest.mark.parametrize("image", ["random", "truncated"])
def test_unreadable_image_is_400_and_the_server_goes_on(server, client, image):
    kind, _, name = server
    if image == "random":
        data = random.Random(0).randbytes(3000)
    else:
        raw = base64.b64decode(cat_uri("JPEG").split(",", 1)[1])
        data = raw[:len(raw) // 2]
    uri = "data:image/jpeg;base64," + base64.b64encode(data).decode()
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask(QUESTION, uri),
                                                              max_tokens=8))
    assert body["code"] == "bad_image" and "image 1" in body["message"]
    assert client.chat.completions.create(model=name, messages=ask("Hi"), max_tokens=4).choices[0].finish_reason


def test_over_long_request_is_400_with_the_numbers(server, client):
    kind, _, name = server
    context = client.models.list().data[0].max_model_len
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask("Hi"),
                                                              max_tokens=context + 1))
    assert body["code"] == "context_length_exceeded" and f"maximum context length is {context} tokens" in \
        body["message"] and f"{context + 1} in the completion" in body["message"]
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask("cat " * (context + 10)),
                                                              max_tokens=8))
    assert body["code"] == "context_length_exceeded" and str(context) in body["message"]
    prompt_tokens = int(re.search(r"messages resulted in (\d+) tokens", body["message"]).group(1))
    assert prompt_tokens > context


def test_invalid_parameter_names_it(server, client):
    kind, _, name = server
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask("Hi"), top_p=3))
    assert body["param"] == "top_p"
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask("Hi"), presence_penalty=3))
    assert body["param"] == "presence_penalty" and "between -2 and 2" in body["message"]
    body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask("Hi"),
                                                              response_format={"type": "json_object"}))
    assert body["param"] == "response_format" and body["code"] == "unsupported_parameter"


def test_logit_bias_and_penalties_are_taken(server, client):
    """OpenAI's penalties and logit_bias go through the official client (what they do to the tokens:
    tests/test_api_inprocess.py, tests/test_engine_parity.py); an id the model does not have is a 400 naming it."""
    kind, _, name = server
    kw = dict(model=name, messages=ask("Name some animals."), max_tokens=6, temperature=0,
              extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kw, presence_penalty=1.5, frequency_penalty=2.0,
                                           logit_bias={str(i): -100 for i in range(40, 400, 7)})
    assert reply.choices[0].message.content and reply.usage.completion_tokens == 6
    streamed = client.chat.completions.create(**kw, stream=True, presence_penalty=1.5, frequency_penalty=2.0,
                                              logit_bias={str(i): -100 for i in range(40, 400, 7)})
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == reply.choices[0].message.content
    body = bad_request(lambda: client.chat.completions.create(**kw, logit_bias={"999999999": 5}))
    assert body["param"] == "logit_bias" and "999999999" in body["message"]
    body = bad_request(lambda: client.completions.create(model=name, prompt="Hi", logit_bias={"7": 500}))
    assert body["param"] == "logit_bias" and "between -100 and 100" in body["message"]


def test_logprobs_through_the_official_client(server, client):
    """The openai client parses chat's and the completions' log-probabilities, whole and streamed; the bytes of a
    reply's tokens make up its text."""
    kind, _, name = server
    kw = dict(model=name, messages=ask("Name some animals."), max_tokens=8, temperature=0,
              extra_body={"ignore_eos": True})
    reply = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2).choices[0]
    content = reply.logprobs.content
    assert len(content) == 8 and all(len(e.top_logprobs) == 2 and e.logprob <= 0 for e in content)
    assert all(e.top_logprobs[0].logprob == e.logprob for e in content)  # greedy: the likeliest (or tied with it)
    if kind == "default":  # real text: the tokens' bytes are the reply
        assert bytes(b for e in content for b in e.bytes).decode() == reply.message.content
    chunks = client.chat.completions.create(**kw, logprobs=True, top_logprobs=2, stream=True)
    streamed = [e for c in chunks if c.choices and c.choices[0].logprobs for e in c.choices[0].logprobs.content]
    # the same tokens; the values within rounding (the second request reads the first's prompt from the cache)
    assert [e.token for e in streamed] == [e.token for e in content]
    assert all(abs(a.logprob - b.logprob) < 1e-3 for a, b in zip(streamed, content))
    done = client.completions.create(model=name, prompt="The animals are", max_tokens=5, logprobs=3, temperature=0)
    lp = done.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == done.choices[0].text or kind == "tiny"


def test_key_and_model_are_checked(server):
    kind, url, name = server
    with pytest.raises(openai.AuthenticationError):
        openai.OpenAI(base_url=url, api_key="sk-wrong", max_retries=0).models.list()
    reply = httpx.post(f"{url}/chat/completions", json={"model": name, "messages": ask("Hi")}, timeout=30)
    assert reply.status_code == 401 and reply.json()["error"]["code"] == "invalid_api_key"
    with pytest.raises(openai.NotFoundError) as info:
        openai.OpenAI(base_url=url, api_key=KEY, max_retries=0).chat.completions.create(
            model="gpt-4o", messages=ask("Hi"), max_tokens=4)
    assert info.value.body["code"] == "model_not_found"


def test_image_urls_outside_the_allow_list_or_to_loopback_are_refused(server, client):
    kind, _, name = server
    for url in ("http://example.com/cat.png", "http://localhost:9/cat.png", "file:///etc/passwd"):
        body = bad_request(lambda: client.chat.completions.create(model=name, messages=ask(QUESTION, url),
                                                                  max_tokens=4))
        assert body["code"] == "image_url_not_allowed", body


def test_eight_concurrent_streams_all_complete(server):
    kind, url, name = server
    aclient = openai.AsyncOpenAI(base_url=url, api_key=KEY, max_retries=0, timeout=600)
    image = cat_uri("JPEG")

    async def one(i):
        stream = await aclient.chat.completions.create(
            model=name, messages=ask(f"{QUESTION} ({i})", image), max_tokens=12, temperature=0.7, seed=i,
            stream=True, stream_options={"include_usage": True})
        chunks = [c async for c in stream]
        return chunks

    async def all_of_them():
        try:
            return await asyncio.gather(*(one(i) for i in range(8)))
        finally:
            await aclient.close()

    for chunks in asyncio.run(all_of_them()):
        assert chunks[-1].usage.completion_tokens > 0
        assert chunks[-2].choices[0].finish_reason in ("stop", "length")

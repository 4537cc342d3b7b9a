"""RemoteChatModel (engine/chat/remote.py) chatting end to end over real HTTP with a launched `python -m api`
(a tiny random llava), compared with the same checkpoint loaded here."""
import pytest

from engine.chat import ChatImage, ChatModel, ChatTurn, Finished, GenerationSettings, TextDelta
from engine.chat.remote import BackendError, RemoteChatModel
from engine.families import load_model
from tests.api_server import running_api
from tests.browser.app_server import free_port
from tests.tiny_checkpoints import make_tiny_llava, random_png

pytestmark = pytest.mark.slow
KEY = "sk-remote"
GREEDY = GenerationSettings(max_new_tokens=20, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("remote_tiny"), "llama-clip")


@pytest.fixture(scope="module")
def url(folder, tmp_path_factory):
    with running_api(str(folder), tmp_path_factory.mktemp("remote_logs"), "--api-key", KEY,
                     "--served-model-name", "tiny", "--dtype", "float32") as base:
        yield base


@pytest.fixture(scope="module")
def local(folder):
    model = ChatModel(load_model(str(folder), "cpu", "float32"))
    yield model
    model.close()


@pytest.fixture
def remote(url, folder):
    model = RemoteChatModel(url, api_key=KEY, tokenizer=str(folder))
    yield model
    model.close()


def run(model, plan, settings=GREEDY):
    events = list(model.stream(plan, settings))
    assert isinstance(events[-1], Finished) and all(isinstance(e, TextDelta) for e in events[:-1])
    return "".join(e.text for e in events[:-1]), events[-1]


def photo_turn(text="What is in this picture?", seed=1):
    return ChatTurn("user", text, (ChatImage(random_png(seed=seed), f"photo{seed}.png"),))


def test_remote_counts_like_the_local_model_and_streams_the_same_reply(remote, local):
    assert remote.model == "tiny" and remote.context_len == local.context_len and remote.counter is not None
    turns = [photo_turn()]
    plan, here = remote.plan("", turns, 20), local.plan("", turns, 20)
    assert (plan.prompt_tokens, plan.image_tokens, plan.error) == (here.prompt_tokens, here.image_tokens, None)
    text, done = run(remote, plan)
    local_text, local_done = run(local, here)
    assert text == local_text and text
    stats = done.stats
    assert (stats.finish_reason, stats.generated_tokens, stats.prompt_tokens) == ("length", 20, here.prompt_tokens)
    assert stats.ttft_s > 0 and "max new tokens" in done.message


def test_remote_fits_a_long_chat_like_the_local_model(remote, local):
    turns = []
    for i in range(8):
        turns += [photo_turn(f"Question {i} about the picture.", seed=i), ChatTurn("assistant", f"Answer {i}.")]
    turns.append(photo_turn("And this one?", seed=99))
    plan, here = remote.plan("", turns, 64), local.plan("", turns, 64)
    assert plan.notices == here.notices and plan.notices  # older images / turns left out, in words
    assert plan.prompt_tokens == here.prompt_tokens <= remote.context_len - 64
    text, done = run(remote, plan, GenerationSettings(max_new_tokens=64, temperature=0.0))
    assert done.stats.finish_reason in ("stop", "length") and done.stats.error_code is None


def test_a_follow_up_with_history_streams(remote):
    first = photo_turn()
    text, _ = run(remote, remote.plan("", [first], 20))
    plan = remote.plan("Be brief.", [first, ChatTurn("assistant", text), ChatTurn("user", "And the colours?")], 12)
    assert plan.error is None and plan.prepared[0] == {"role": "system", "content": "Be brief."}
    _, done = run(remote, plan, GenerationSettings(max_new_tokens=12, temperature=0.7, seed=3))
    assert done.stats.generated_tokens > 0


def test_without_a_local_tokenizer_the_servers_refusal_is_plain_words(url):
    remote = RemoteChatModel(url, api_key=KEY)  # "tiny" is not a folder or a cached Hub id: nothing counts here
    try:
        assert remote.counter is None and remote.context_len == 512
        plan = remote.plan("", [ChatTurn("user", "cat " * 600)], 16)
        assert plan.error is None and plan.prompt_tokens == 0
        text, done = run(remote, plan)
        assert text == "" and done.stats.finish_reason == "error"
        assert done.stats.error_code == "context_exceeded" and "no longer fits" in done.message
        assert "512" in done.message  # the server's numbers, passed on
        text, done = run(remote, remote.plan("", [photo_turn()], 8))
        assert done.stats.finish_reason == "length" and text
    finally:
        remote.close()


def test_unreadable_images_are_caught_here_before_sending(remote):
    plan = remote.plan("", [ChatTurn("user", "what?", (ChatImage(b"not an image", "bad.png"),))], 8)
    assert plan.error_code == "bad_image" and "bad.png" in plan.error and plan.prepared is None


def test_stop_closes_the_stream_and_the_server_goes_on(remote):
    events = remote.stream(remote.plan("", [photo_turn()], 400), GenerationSettings(max_new_tokens=400,
                                                                                    temperature=0, ignore_eos=True))
    assert isinstance(next(events), TextDelta)
    events.close()  # what the UI's Stop does
    text, done = run(remote, remote.plan("", [photo_turn()], 8))
    assert done.stats.finish_reason == "length"


def test_wrong_key_and_unreachable_server_are_said_in_words(url):
    with pytest.raises(BackendError, match="refused the API key"):
        RemoteChatModel(url, api_key="sk-wrong", model="tiny")
    dead = f"http://127.0.0.1:{free_port()}"
    with pytest.raises(BackendError, match="--backend-model"):
        RemoteChatModel(dead)
    gone = RemoteChatModel(dead, model="tiny")
    try:
        _, done = run(gone, gone.plan("", [ChatTurn("user", "Hi")], 8))
        assert done.stats.error_code == "engine" and "could not be reached" in done.message
    finally:
        gone.close()

"""End to end through the API: the real app.py (embedded default model, offline) driven by gradio_client.

Retry, undo, edit and clear are Chatbot UI events that Gradio does not expose as API endpoints (view_api lists
only `/chat`), so they are covered in tests/test_app_browser.py.
"""
import json
import random
import time
import urllib.request

import pytest
from gradio_client import Client, handle_file

from tests.browser.app_server import running_app, save_cat_png, save_truncated_jpeg

pytestmark = pytest.mark.slow

REPLY_TIMEOUT_S = 300
GREEDY = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
          "system_prompt": "", "seed": -1}  # in /chat's order
CHAT_PARAMETERS = ["message", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                   "system_prompt", "seed"]


@pytest.fixture(scope="module")
def app_url(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app_logs")) as url:
        yield url


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    bad = folder / "bad.png"
    bad.write_bytes(random.Random(0).randbytes(4096))
    return {
        "cat": save_cat_png(folder / "chelsea.png"),
        "bad": bad,
        "truncated": save_truncated_jpeg(folder / "truncated.jpg"),
    }


def _client(url):
    return Client(url, verbose=False, download_files=False)


def submit(client, text, *paths):
    message = {"text": text, "files": [handle_file(str(p)) for p in paths]}
    return client.submit(message, *GREEDY.values(), api_name="/chat")


def ask(client, text, *paths):
    """Sends one message to /chat; returns every streamed (reply, meter) update, the last one complete."""
    return wait(submit(client, text, *paths))


def wait(job):
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"no complete reply within {REPLY_TIMEOUT_S} s")
        time.sleep(0.05)
    job.result()  # raises if the server reported an error
    return job.outputs()


def answer_of(reply):
    return "".join(m["content"] for m in reply if not (m.get("metadata") or {}).get("title"))


def side_notes(reply):
    """Notices, errors and the stats line: the titled messages, as 'title: content'."""
    return [f"{m['metadata']['title']}: {m['content']}" for m in reply if (m.get("metadata") or {}).get("title")]


def stats_of(reply):
    lines = [n for n in side_notes(reply) if "image tokens" in n and "tokens/s" in n]
    assert lines, f"no stats line in {side_notes(reply)}"
    return lines[-1]


def context_used(reply):
    # "... · context 812 / 2048"
    return int(stats_of(reply).split("context ")[-1].split("/")[0])


def test_chat_endpoint_signature(app_url):
    api = _client(app_url).view_api(print_info=False, return_format="dict")
    chat = api["named_endpoints"]["/chat"]
    assert [p["parameter_name"] for p in chat["parameters"]] == CHAT_PARAMETERS
    assert len(chat["returns"]) == 2  # the reply messages, and the context meter


def test_cat_photo_streams_an_answer_with_stats(app_url, images):
    client = _client(app_url)
    updates = ask(client, "What animal is in this picture?", images["cat"])
    assert len(updates) > 1, "the reply arrived in one piece, not streamed"
    reply, meter = updates[-1]
    answer = answer_of(reply)
    assert "cat" in answer.lower(), (answer, side_notes(reply))
    stats = stats_of(reply)
    assert "prompt tokens" in stats and "first token" in stats and "context" in stats
    assert int(stats.split(" image tokens")[0].split()[-1]) > 0, stats
    assert "Context" in meter and "/" in meter

    # The conversation lives in the client's session: a follow-up is answered with the photo still in context.
    follow_up, _ = ask(client, "Describe its fur in a few words.")[-1]
    assert answer_of(follow_up).strip(), side_notes(follow_up)
    assert context_used(follow_up) > context_used(reply)


@pytest.mark.parametrize("kind, name", [("bad", "bad.png"), ("truncated", "truncated.jpg")])
def test_broken_image_gets_a_clear_message_and_the_server_keeps_serving(app_url, images, kind, name):
    client = _client(app_url)
    updates = ask(client, "What is in this picture?", images[kind])
    reply, _ = updates[-1]
    notes = " ".join(side_notes(reply))
    assert name in notes, f"the reply does not name {name}: {reply}"
    assert "Error" != notes.strip()

    reply, _ = ask(client, "What animal is in this picture?", images["cat"])[-1]
    assert "cat" in answer_of(reply).lower(), (answer_of(reply), side_notes(reply))
    stats_of(reply)


def test_two_chats_at_once_both_get_answers(app_url, images):
    jobs = [submit(_client(app_url), "What animal is in this picture?", images["cat"]),
            submit(_client(app_url), "Name three colours.")]
    for job in jobs:
        reply, _ = wait(job)[-1]
        assert answer_of(reply).strip(), side_notes(reply)
        stats_of(reply)


def test_server_config_is_safe(app_url):
    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=10).read())
    assert config["analytics_enabled"] is False
    assert 0 < config["max_file_size"] <= 100 * 2**20  # uploads are capped (Gradio's default is no cap)
    assert config["show_error"] is False

"""`python app.py` serves the UI and the OpenAI-compatible API on one port, over one engine; and the UI started with
`--backend` chats through a second launched instance of ours, over real HTTP (openai and gradio_client clients)."""
import base64

import openai
import pytest
from gradio_client import Client, handle_file

from tests.api_server import running_api
from tests.browser.app_server import running_app, save_cat_png

pytestmark = pytest.mark.slow
QUESTION = "What animal is in this picture?"


@pytest.fixture(scope="module")
def cat(tmp_path_factory):
    return save_cat_png(tmp_path_factory.mktemp("images") / "chelsea.png")


def answer(url, cat):
    client = Client(url, verbose=False, download_files=False)
    job = client.submit({"text": QUESTION, "files": [handle_file(str(cat))]}, 48, 0.0, 0.9, 50, 1.1, "", -1, 0,
                        api_name="/chat")
    reply = None
    for reply, _meter in job:
        pass
    messages = reply or job.result()[0]
    return "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title")), messages


def test_ui_and_api_on_one_port(tmp_path_factory, cat):
    with running_app(tmp_path_factory.mktemp("logs"), "--model", "default") as server:
        client = openai.OpenAI(base_url=f"{server.url.rstrip('/')}/v1", api_key="unused")
        assert [m.id for m in client.models.list().data] == ["default"]
        image = "data:image/png;base64," + base64.b64encode(cat.read_bytes()).decode()
        messages = [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                                 {"type": "text", "text": QUESTION}]}]
        reply = client.chat.completions.create(model="default", messages=messages, max_tokens=48, temperature=0)
        assert "cat" in reply.choices[0].message.content.lower()
        assert reply.usage.prompt_tokens > 0 and reply.choices[0].finish_reason in ("stop", "length")
        text, _ = answer(server.url, cat)  # the page's /chat on the same server and engine
        assert "cat" in text.lower()


def test_ui_in_front_of_a_remote_backend(tmp_path_factory, cat):
    logs = tmp_path_factory.mktemp("logs")
    with running_api("default", logs) as backend, running_app(logs, "--backend", backend) as ui:
        text, messages = answer(ui.url, cat)
        assert "cat" in text.lower()
        assert any("📊" in ((m.get("metadata") or {}).get("title") or "") for m in messages)  # the stats line

"""Fast tests of app.py's own logic (history -> turns, how a reply is rendered, cancellation), no model loaded.

A scripted stand-in replaces `vlm.ChatModel` for these tests only; the end-to-end tests in test_app_client.py and
test_app_browser.py run the real model.
"""
import importlib
import sys
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import vlm
from engine.chat.types import ChatImage, ChatTurn, Finished, Plan, TextDelta, TurnStats


def _stats(generated=3, reason="stop"):
    return TurnStats(prompt_tokens=40, image_tokens=30, generated_tokens=generated, ttft_s=0.25,
                     decode_tokens_per_s=12.5, context_used=40 + generated, context_len=2048, finish_reason=reason)


@dataclass
class ScriptedModel:
    """Plays back a fixed plan and event list, and records what the UI asked for."""

    notices: list = field(default_factory=list)
    error: str | None = None
    events: list = field(default_factory=lambda: [TextDelta("A "), TextDelta("cat"), TextDelta("."),
                                                   Finished(_stats())])
    plan_raises: Exception | None = None
    name: str = "scripted"
    description: str = "A scripted stand-in for tests."
    context_len: int = 2048
    intake_limits: object = field(default_factory=lambda: SimpleNamespace(max_bytes=20 * 2**20, max_pixels=40_000_000))
    planned: list = field(default_factory=list)
    closed: int = 0

    @classmethod
    def load(cls, model=None, device=None):
        return cls()

    def plan(self, system, turns, max_new_tokens):
        if self.plan_raises:
            raise self.plan_raises
        self.planned.append((system, list(turns), max_new_tokens))
        return Plan(turns=list(turns), system=system, prompt_tokens=40, image_tokens=30, max_new_tokens=max_new_tokens,
                    context_len=self.context_len, notices=list(self.notices), error=self.error)

    def stream(self, plan, settings):
        try:
            yield from self.events
        finally:
            self.closed += 1


@pytest.fixture(scope="module")
def app():
    saved = getattr(vlm, "ChatModel", None)
    vlm.ChatModel = ScriptedModel
    sys.modules.pop("app", None)
    argv, sys.argv = sys.argv, ["app.py"]
    try:
        module = importlib.import_module("app")
    finally:
        sys.argv = argv
        if saved is None:
            del vlm.ChatModel
        else:
            vlm.ChatModel = saved
    yield module
    sys.modules.pop("app", None)


@pytest.fixture
def model(app, monkeypatch):
    scripted = ScriptedModel()
    monkeypatch.setattr(app, "MODEL", scripted)
    return scripted


def _run(app, message, history=(), **settings):
    return list(app.respond(message, list(history), **settings))


def _answer(messages):
    return "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))


def _titles(messages):
    return [m["metadata"]["title"] for m in messages if (m.get("metadata") or {}).get("title")]


def test_history_to_turns_reads_files_and_skips_side_notes(app, tmp_path):
    cat = tmp_path / "cat.png"
    cat.write_bytes(b"png-bytes")
    history = [  # the shape Gradio's Chatbot hands over: normalized content lists, stats as titled messages
        {"role": "user", "content": [{"type": "file", "file": {"path": str(cat), "orig_name": "cat.png"}}]},
        {"role": "user", "content": [{"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": [{"type": "text", "text": "A cat."}]},
        {"role": "assistant", "content": [], "metadata": {"title": "📊 stats"}},
    ]
    notes = []
    turns = app.history_to_turns(history, {"text": "Its colour?", "files": []}, notes)
    assert turns == [
        ChatTurn("user", "What is this?", (ChatImage(b"png-bytes", "cat.png"),)),
        ChatTurn("assistant", "A cat."),
        ChatTurn("user", "Its colour?"),
    ]
    assert notes == []


def test_unanswered_turn_is_dropped_and_trailing_user_message_joins_the_new_one(app, tmp_path):
    img = tmp_path / "dog.jpg"
    img.write_bytes(b"jpg")
    history = [
        {"role": "user", "content": "first try"},  # its reply was an error: not sent again
        {"role": "assistant", "content": "", "metadata": {"title": "⚠️ Could not answer"}},
        {"role": "user", "content": [{"path": str(img)}]},  # an edited message: its image stays in history
    ]
    turns = app.history_to_turns(history, "edited question", [])
    assert turns == [ChatTurn("user", "edited question", (ChatImage(b"jpg", "dog.jpg"),))]


def test_retried_message_with_file_dicts_and_missing_upload(app, tmp_path):
    notes = []
    message = {"text": "again", "files": [{"path": str(tmp_path / "gone.png"), "orig_name": "gone.png"}]}
    turns = app.history_to_turns([], message, notes)
    assert turns == [ChatTurn("user", "again")]
    assert len(notes) == 1 and "gone.png" in notes[0]


def test_reply_streams_then_ends_with_stats_and_meter(app, model, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"x")
    updates = _run(app, {"text": "What animal?", "files": [str(img)]}, temperature=0, top_k=0, seed=3)
    final, meter = updates[-1]
    assert _answer(final) == "A cat."
    assert any("30 image tokens" in t and "context 43 / 2048" in t for t in _titles(final))
    assert "43 / 2048" in meter
    assert model.closed == 1
    _system, turns, max_new = model.planned[0]
    assert turns[-1].images == (ChatImage(b"x", "cat.png"),) and max_new == 512


def test_stream_updates_are_throttled(app, model, monkeypatch):
    model.events = [TextDelta("x")] * 500 + [Finished(_stats(500))]
    updates = _run(app, "hi")
    assert len(updates) < 20
    assert _answer(updates[-1][0]) == "x" * 500


def test_notices_come_before_the_answer_and_errors_replace_it(app, model):
    model.notices = ["bad.png could not be read and was left out."]
    first, _ = _run(app, "hi")[0]
    assert first[0]["metadata"]["title"].endswith("Note") and "bad.png" in first[0]["content"]
    model.error = "The image is too large for this model's context."
    reply, _ = _run(app, "hi")[-1]
    assert "too large" in reply[-1]["content"] and _answer(reply) == ""


@pytest.mark.parametrize("events, expected", [
    ([Finished(_stats(0), "The prompt fills the whole context.")], "The prompt fills the whole context."),
    ([Finished(_stats(0))], "Nothing was generated"),
    ([], "ended without a reason"),
])
def test_an_empty_reply_always_says_why(app, model, events, expected):
    model.events = events
    reply, _ = _run(app, "hi")[-1]
    text = " ".join(m["content"] + m.get("metadata", {}).get("title", "") for m in reply)
    assert expected in text


def test_length_finish_is_explained_under_the_answer(app, model):
    model.events = [TextDelta("A long"), Finished(_stats(2, "length"))]
    reply, _ = _run(app, "hi")[-1]
    assert _answer(reply) == "A long"
    assert "max new tokens" in reply[-1]["content"]


def test_closing_the_reply_aborts_the_model_stream(app, model):
    model.events = [TextDelta("a")] * 10 + [Finished(_stats(10))]
    gen = app.respond("hi", [])
    next(gen)
    gen.close()  # what Gradio does on Stop / Undo / Retry / a closed tab
    assert model.closed == 1


def test_failures_become_a_message_not_an_exception(app, model):
    model.plan_raises = RuntimeError("CUDA out of memory")
    reply, _ = _run(app, "hi")[-1]
    assert "CUDA out of memory" in reply[-1]["content"]
    reply, _ = _run(app, "hi", temperature=-1)[-1]
    assert "temperature" in reply[-1]["content"]


def test_empty_message_asks_for_input(app, model):
    reply, _ = _run(app, {"text": "  ", "files": []})[-1]
    assert "Type a question" in reply[-1]["content"]
    assert model.planned == []


def test_chat_api_takes_message_then_sliders_in_ui_order(app):
    info = app.demo.get_api_info()
    params = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert params == ["message", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                      "system_prompt", "seed"]


def test_page_and_api_chats_share_one_concurrency_limit(app):
    chat_fns = [fn for fn in app.demo.fns.values() if fn.concurrency_limit == app.CONCURRENT_CHATS]
    assert len(chat_fns) >= 2 and {fn.concurrency_id for fn in chat_fns} == {"chat"}
    assert any(fn.api_name == "chat" for fn in chat_fns)

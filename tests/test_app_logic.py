"""Fast tests of app.py's own logic (history -> turns, how a reply is rendered, settings, the queue position,
cancellation), with no model loaded: `build_demo` gets a scripted stand-in for `engine.chat.ChatModel`, and the
tests drive the chat handler that the built page calls. The end-to-end tests in test_app_client.py and
test_app_browser.py run the real model.
"""
from dataclasses import dataclass, field
from types import SimpleNamespace

import pytest

import app
from engine.chat.types import ChatDocument, ChatImage, ChatTurn, Finished, Plan, Queued, TextDelta, TurnStats
from engine.sampling_params import SEED_MAX

CHAT_PARAMETERS = ["message", "max_new_tokens", "temperature", "top_p", "top_k", "repetition_penalty",
                   "system_prompt", "seed", "max_image_tokens"]


def _stats(generated=3, reason="stop", image_tokens=30, document_tokens=0):
    return TurnStats(prompt_tokens=40, image_tokens=image_tokens, generated_tokens=generated, ttft_s=0.25,
                     decode_tokens_per_s=12.5, context_used=40 + generated, context_len=2048, finish_reason=reason,
                     document_tokens=document_tokens)


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
    capacity: int = 3
    intake_limits: object = field(default_factory=lambda: SimpleNamespace(max_bytes=20 * 2**20, max_pixels=40_000_000))
    document_limits: object = field(default_factory=lambda: SimpleNamespace(max_bytes=20 * 2**20, max_pages=500))
    planned: list = field(default_factory=list)
    settings: list = field(default_factory=list)
    closed: int = 0

    def plan(self, system, turns, max_new_tokens, max_image_tokens=None):
        if self.plan_raises:
            raise self.plan_raises
        self.planned.append((system, list(turns), max_new_tokens, max_image_tokens))
        return Plan(turns=list(turns), system=system, prompt_tokens=40, image_tokens=30, max_new_tokens=max_new_tokens,
                    context_len=self.context_len, notices=list(self.notices), error=self.error)

    def stream(self, plan, settings):
        self.settings.append(settings)
        try:
            yield from self.events
        finally:
            self.closed += 1


def chat_fns(demo):
    return [fn for fn in demo.fns.values() if fn.concurrency_id == app.CHAT_CONCURRENCY_ID]


def handler_of(demo):
    """The chat function the built page calls (ChatInterface wraps it for each trigger and for /chat)."""
    (api,) = [fn for fn in demo.fns.values() if fn.api_name == "chat"]
    return api.fn.__wrapped__


@pytest.fixture
def model():
    return ScriptedModel()


@pytest.fixture
def respond(model):
    return handler_of(app.build_demo(model))


def _run(respond, message, history=(), **settings):
    return list(respond(message, list(history), **settings))


def _answer(messages):
    return "".join(m["content"] for m in messages if not (m.get("metadata") or {}).get("title"))


def _titles(messages):
    return [m["metadata"]["title"] for m in messages if (m.get("metadata") or {}).get("title")]


def _all_text(messages):
    return " ".join(m["content"] + (m.get("metadata") or {}).get("title", "") for m in messages)


def test_history_to_turns_reads_files_and_skips_side_notes(tmp_path):
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


def test_unanswered_turn_is_dropped_and_trailing_user_message_joins_the_new_one(tmp_path):
    img = tmp_path / "dog.jpg"
    img.write_bytes(b"jpg")
    history = [
        {"role": "user", "content": "first try"},  # its reply was an error: not sent again
        {"role": "assistant", "content": "", "metadata": {"title": "⚠️ Could not answer"}},
        {"role": "user", "content": [{"path": str(img)}]},  # an edited message: its image stays in history
    ]
    turns = app.history_to_turns(history, "edited question", [])
    assert turns == [ChatTurn("user", "edited question", (ChatImage(b"jpg", "dog.jpg"),))]


def test_retried_message_with_file_dicts_and_missing_upload(tmp_path):
    notes = []
    message = {"text": "again", "files": [{"path": str(tmp_path / "gone.png"), "orig_name": "gone.png"}]}
    turns = app.history_to_turns([], message, notes)
    assert turns == [ChatTurn("user", "again")]
    assert len(notes) == 1 and "gone.png" in notes[0]


def test_reply_streams_then_ends_with_stats_and_a_meter_that_shows_image_tokens(respond, model, tmp_path):
    img = tmp_path / "cat.png"
    img.write_bytes(b"x")
    updates = _run(respond, {"text": "What animal?", "files": [str(img)]}, temperature=0, top_k=0, seed=3)
    final, meter = updates[-1]
    assert _answer(final) == "A cat."
    assert any("30 image tokens" in t and "context 43 / 2048" in t for t in _titles(final))
    assert "43 / 2048 tokens" in meter and "30 of them for images" in meter
    assert model.closed == 1
    _system, turns, max_new, cap = model.planned[0]
    assert turns[-1].images == (ChatImage(b"x", "cat.png"),) and max_new == 512 and cap is None
    assert model.settings[0].seed == 3 and model.settings[0].temperature == 0


def test_documents_and_images_are_told_apart_by_content_or_name(tmp_path):
    files = {"report.pdf": b"%PDF-1.7 ...", "notes.md": b"# Notes", "scan.png": b"%PDF-1.4 a pdf named .png",
             "cat.png": b"png-bytes"}
    for name, data in files.items():
        (tmp_path / name).write_bytes(data)
    message = {"text": "Compare them.", "files": [str(tmp_path / name) for name in files]}
    (turn,) = app.history_to_turns([], message, [])
    assert turn.images == (ChatImage(b"png-bytes", "cat.png"),)
    assert turn.documents == (ChatDocument(b"%PDF-1.7 ...", "report.pdf"), ChatDocument(b"# Notes", "notes.md"),
                              ChatDocument(b"%PDF-1.4 a pdf named .png", "scan.png"))


def test_a_document_alone_is_sent_and_the_meter_counts_its_tokens(respond, model, tmp_path):
    doc = tmp_path / "notes.txt"
    doc.write_bytes(b"The secret code is 4817.")
    model.events = [TextDelta("4817."), Finished(_stats(image_tokens=0, document_tokens=25))]
    final, meter = _run(respond, {"text": "", "files": [str(doc)]})[-1]
    assert _answer(final) == "4817."
    assert "no images · 25 for documents" in meter
    assert any(t.startswith("📊 0 image tokens · 25 document tokens · 40 prompt tokens") for t in _titles(final))
    assert model.planned[0][1][-1].documents == (ChatDocument(b"The secret code is 4817.", "notes.txt"),)


def test_the_upload_takes_documents_and_the_long_document_preset_sets_two_sliders(model):
    demo = app.build_demo(model)
    (box,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "chat-input"]
    assert {".txt", ".md", ".pdf"} <= set(box.file_types) and "image" in box.file_types
    (menu,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "preset"]
    assert menu.value == "Chat"
    (change,) = [fn for fn in demo.fns.values() if fn.fn is app.preset_values]
    assert [t.elem_id for t in change.outputs] == ["setting-temperature", "setting-repetition_penalty"]
    assert app.preset_values("Long document") == (0.05, 1.02)
    assert app.preset_values("Chat") == (app.CHAT_DEFAULTS.temperature, app.CHAT_DEFAULTS.repetition_penalty)
    assert "documents (up to 20 MB and 500 pages" in app.header_markdown(model)


def test_meter_says_when_no_images_are_in_context(respond, model):
    model.events = [TextDelta("Hi."), Finished(_stats(image_tokens=0))]
    _, meter = _run(respond, "hi")[-1]
    assert "no images" in meter


def test_handler_defaults_and_sliders_come_from_chat_defaults(respond, model):
    _run(respond, "hi")  # no settings passed: the handler's own defaults
    defaults = app.CHAT_DEFAULTS
    assert model.settings[0] == defaults
    sliders = {c.label: c.value for c in app.settings_inputs()}
    assert sliders["Max new tokens"] == defaults.max_new_tokens and sliders["Temperature"] == defaults.temperature
    assert sliders["Top-p"] == defaults.top_p and sliders["Top-k"] == defaults.top_k
    assert sliders["Repetition penalty"] == defaults.repetition_penalty
    assert sliders["Seed"] == -1 and sliders["Max tokens per image"] == 0


@pytest.mark.parametrize("box, expected", [(0, None), (None, None), ("", None), (64, 64), (64.0, 64)])
def test_max_tokens_per_image_reaches_the_plan_and_the_settings(respond, model, box, expected):
    reply, _ = _run(respond, "hi", max_image_tokens=box)[-1]
    assert _answer(reply) == "A cat."
    assert model.planned[0][3] == expected and model.settings[0].max_image_tokens == expected


def test_seed_box_shows_the_engines_maximum_and_hands_every_value_to_the_handler():
    seed = next(c for c in app.settings_inputs() if c.label == "Seed")
    assert seed.get_config()["maximum"] == SEED_MAX and seed.get_config()["minimum"] == -1
    assert seed.preprocess(1e20) == 1e20  # gr.Number would raise its own error here, before the handler runs
    assert not (app.Path(app.__file__).with_suffix(".pyi")).exists()  # no Component subclass: Gradio writes none


@pytest.mark.parametrize("settings, rule", [
    ({"seed": 1e20}, "Seed must be a whole number from 0 to"),
    ({"seed": SEED_MAX + 1}, "Seed must be a whole number from 0 to"),
    ({"seed": -2}, "Seed must be a whole number"),
    ({"seed": 2.5}, "Seed must be a whole number"),
    ({"seed": "abc"}, "Seed must be a whole number"),
    ({"max_image_tokens": -5}, "Max tokens per image must be"),
    ({"max_image_tokens": float("nan")}, "Max tokens per image must be"),
    ({"temperature": -1}, "Temperature must be"),
    ({"top_p": 0}, "Top-p must be"),
])
def test_an_invalid_setting_gets_a_sentence_and_reaches_no_model(respond, model, settings, rule):
    updates = _run(respond, "hi", **settings)
    reply, meter = updates[-1]
    assert _titles(reply) == ["⚠️ Check the settings"]
    assert reply[-1]["content"].startswith(rule) and "Settings" in reply[-1]["content"]
    assert "Error" not in _all_text(reply) and "must be between" not in _all_text(reply)  # no exception text
    assert model.planned == [] and model.settings == []


def test_seed_minus_one_or_empty_is_random_and_the_maximum_is_accepted(respond, model):
    for seed in (-1, None, SEED_MAX, 0):
        _run(respond, "hi", seed=seed)
    assert [s.seed for s in model.settings] == [None, None, SEED_MAX, 0]


def test_queue_position_shows_while_waiting_and_the_answer_replaces_it(respond, model):
    model.events = [Queued(3), Queued(2), Queued(1), TextDelta("A cat."), Finished(_stats())]
    updates = [reply for reply, _ in _run(respond, "hi")]
    waiting = [r for r in updates if "⏳ Waiting for the model" in _titles(r)]
    assert [r[-1]["content"] for r in waiting] == [
        "Your reply is number 3 in line (2 ahead of it); it starts as soon as the model has room.",
        "Your reply is number 2 in line (1 ahead of it); it starts as soon as the model has room.",
        "Your reply is next in line; it starts as soon as the model has room.",
    ]
    after = updates[len(waiting):]
    assert after and all("⏳ Waiting for the model" not in _titles(r) for r in after)
    assert _answer(updates[-1]) == "A cat."


def test_a_reply_that_ends_while_queued_drops_the_queue_note(respond, model):
    model.events = [Queued(2), Finished(_stats(0, "abort"), "Stopped.")]
    reply, _ = _run(respond, "hi")[-1]
    assert "⏳ Waiting for the model" not in _titles(reply) and "Stopped." in _all_text(reply)


def test_stream_updates_are_throttled(respond, model):
    model.events = [TextDelta("x")] * 500 + [Finished(_stats(500))]
    updates = _run(respond, "hi")
    assert len(updates) < 20
    assert _answer(updates[-1][0]) == "x" * 500


def test_notices_come_before_the_answer_and_errors_replace_it(respond, model):
    model.notices = ["bad.png could not be read and was left out."]
    first, _ = _run(respond, "hi")[0]
    assert first[0]["metadata"]["title"].endswith("Note") and "bad.png" in first[0]["content"]
    model.error = "The image is too large for this model's context."
    reply, _ = _run(respond, "hi")[-1]
    assert "too large" in reply[-1]["content"] and _answer(reply) == ""


@pytest.mark.parametrize("events, expected", [
    ([Finished(_stats(0), "The prompt fills the whole context.")], "The prompt fills the whole context."),
    ([Finished(_stats(0))], "without any text"),
    ([], "ended without a reason"),
])
def test_an_empty_reply_always_says_why(respond, model, events, expected):
    model.events = events
    reply, _ = _run(respond, "hi")[-1]
    assert expected in _all_text(reply)


def test_length_finish_is_explained_under_the_answer(respond, model):
    model.events = [TextDelta("A long"), Finished(_stats(2, "length"), "The reply reached the max new tokens limit.")]
    reply, _ = _run(respond, "hi")[-1]
    assert _answer(reply) == "A long"
    assert "max new tokens" in reply[-1]["content"]


def test_closing_the_reply_aborts_the_model_stream(respond, model):
    model.events = [TextDelta("a")] * 10 + [Finished(_stats(10))]
    gen = respond("hi", [])
    next(gen)
    gen.close()  # what Gradio does on Stop / Undo / Retry / a closed tab
    assert model.closed == 1


def test_an_unexpected_failure_is_a_plain_sentence_and_keeps_the_answer(respond, model, caplog):
    model.plan_raises = RuntimeError("CUDA out of memory while reading 'my secret question'")
    reply, _ = _run(respond, "my secret question")[-1]
    assert _titles(reply) == ["⚠️ Something went wrong"]
    assert "The chat is kept" in reply[-1]["content"]
    assert "CUDA" not in _all_text(reply) and "secret" not in _all_text(reply)
    assert "secret" not in caplog.text and "RuntimeError" in caplog.text

    def broken_stream(plan, settings):
        yield TextDelta("Half an ans")
        raise ValueError("engine exploded")
    model.plan_raises, model.stream = None, broken_stream
    reply, _ = _run(respond, "hi")[-1]
    assert _answer(reply) == "Half an ans" and "exploded" not in _all_text(reply)


def test_empty_message_asks_for_input(respond, model):
    reply, _ = _run(respond, {"text": "  ", "files": []})[-1]
    assert "Type a question" in reply[-1]["content"]
    assert model.planned == []


def test_each_page_answers_with_its_own_model():
    first, second = ScriptedModel(), ScriptedModel(events=[TextDelta("A dog."), Finished(_stats())])
    demos = app.build_demo(first), app.build_demo(second)
    assert _answer(_run(handler_of(demos[1]), "hi")[-1][0]) == "A dog."
    assert _answer(_run(handler_of(demos[0]), "hi")[-1][0]) == "A cat."
    assert len(first.planned) == len(second.planned) == 1


def test_chat_api_takes_message_then_settings_in_ui_order(model):
    info = app.build_demo(model).get_api_info()
    params = [p["parameter_name"] for p in info["named_endpoints"]["/chat"]["parameters"]]
    assert params == CHAT_PARAMETERS


def test_page_and_api_chats_share_one_limit_from_the_models_capacity():
    demo = app.build_demo(ScriptedModel(capacity=7))
    fns = chat_fns(demo)
    assert any(fn.api_name == "chat" for fn in fns) and len(fns) >= 3  # /chat, submit, retry, edit, ...
    assert {fn.concurrency_limit for fn in fns} == {7}
    others = [fn for fn in demo.fns.values() if fn not in fns]
    assert all(fn.concurrency_limit != 7 for fn in others)


def test_importing_app_loads_no_model():
    assert not hasattr(app, "demo") and not hasattr(app, "MODEL")


def test_command_line_flags():
    args = app.parse_args(["--model", "default", "--device", "cpu", "--dtype", "float32", "--port", "7861"])
    assert (args.model, args.device, args.dtype, args.port, args.share, args.host) == (
        "default", "cpu", "float32", 7861, False, None)
    assert app.parse_args([]).dtype == "auto"
    with pytest.raises(SystemExit):
        app.parse_args(["--dtype", "int8"])

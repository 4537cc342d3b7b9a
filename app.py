"""The chat UI: drop in photos or documents (TXT, Markdown, PDF), talk about them, watch the reply stream in, with
per-reply stats.

This file is UI only. `build_demo(model)` builds the page around a loaded `engine.chat.ChatModel` (the handlers are
closures over it; nothing here is module-level state), turns Gradio's chat history into chat turns, asks the model
for a plan and a stream of events, and renders them. It does NOT load weights, decode images, count tokens or
schedule anything: that is `engine.chat` (and, below it, the engine, `vision/` and `documents/`). Importing this
file loads no model; `main()` does, from the command line:

    python app.py [--model M] [--device D] [--dtype ...] [--quantize ...] [--kv-cache-dtype int8] [--session-len N]
                  [--rope-scaling-factor F] [--host H] [--port P] [--share]   (`--help` lists all)

Gradio's own ChatInterface supplies retry, undo, edit, copy, clear, stop and the streaming `/chat` API endpoint.

`/chat` API (gradio_client): `client.submit(message, max_new_tokens, temperature, top_p, top_k, repetition_penalty,
system_prompt, seed, max_image_tokens, api_name="/chat")` where `message = {"text": str, "files":
[handle_file(path), ...]}` (images, and .txt, .md or .pdf documents). It streams `(reply, context_meter)`: `reply`
is a list of assistant messages (`{"role", "content", "metadata"}`); the answer is the message without a
`metadata.title`, notices, errors, the queue position and the stats line are messages with one. Calls from one
client share a conversation (Gradio keeps it per session).
"""
from __future__ import annotations

import argparse
import logging
import signal
import sys
import time
import traceback
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import gradio as gr

from documents.intake import SUFFIXES, is_document
from engine.chat import (CHAT_DEFAULTS, PRESETS, ChatDocument, ChatImage, ChatModel, ChatTurn, Finished,
                         GenerationSettings, Queued, TextDelta)
from engine.options import add_model_args, model_kwargs
from engine.sampling_params import SEED_MAX, InvalidParameter

log = logging.getLogger("app")

STREAM_INTERVAL_S = 0.05  # resend the growing reply at most every 50 ms: each update resends it whole (gradio#4092)
QUEUE_MAX = 64  # beyond this, new requests are refused at once ("queue full") rather than waiting for minutes
CACHE_CLEANUP = (600, 3600)  # every 10 min, delete uploads older than 1 h (Gradio's cache is readable by URL)
CHAT_CONCURRENCY_ID = "chat"  # chats from the page (submit, retry, edit) and from /chat share one limit
SPARE_THREADS = 8  # worker threads beyond the chats' own (each streaming chat holds one while it waits)

# The sentence a user reads when a setting cannot be used, by GenerationSettings field (InvalidParameter.param).
SETTING_RULES = {
    "max_new_tokens": "Max new tokens must be a whole number, 1 or more.",
    "temperature": "Temperature must be a number, 0 or more (0 = greedy).",
    "top_p": "Top-p must be a number above 0 and at most 1.",
    "top_k": "Top-k must be a whole number, 0 or more (0 = off).",
    "repetition_penalty": "Repetition penalty must be a number above 0.",
    "seed": f"Seed must be a whole number from 0 to {SEED_MAX}, or -1 for a random seed.",
    "max_image_tokens": "Max tokens per image must be a whole number, 0 or more (0 = the model's own reading).",
}


# ---------------------------------------------------------------------------------------------------------------
# Gradio history -> chat turns
# ---------------------------------------------------------------------------------------------------------------


def _content_items(content: Any) -> list[Any]:
    """Flattens one message's content (a string, a file dict, a component, or a list of those) into items."""
    if isinstance(content, (list, tuple)):
        return [item for part in content for item in _content_items(part)]
    if isinstance(content, gr.components.Component):
        return _content_items(content.value)
    return [] if content is None else [content]


def _file_of(item: Any) -> tuple[str, str] | None:
    """(server path, original name) when `item` names a file, else None."""
    if isinstance(item, dict) and item.get("type") == "file":
        item = item.get("file") or {}
    elif isinstance(item, dict) and item.get("type") == "component":
        item = item.get("value") or {}
    if isinstance(item, dict) and item.get("path"):
        path = str(item["path"])
        return path, str(item.get("orig_name") or Path(path).name)
    if hasattr(item, "path") and getattr(item, "path", None):  # a FileData model
        path = str(item.path)
        return path, str(getattr(item, "orig_name", None) or Path(path).name)
    return None


def _text_of(item: Any) -> str:
    if isinstance(item, str):
        return item
    if isinstance(item, dict) and item.get("type") == "text":
        return str(item.get("text") or "")
    return ""


def _read_upload(path: str, name: str, notes: list[str]) -> ChatImage | ChatDocument | None:
    """An uploaded file as the model's input: a document (by its content or its name, documents.intake) or an
    image; None when it is gone."""
    try:
        data = Path(path).read_bytes()
    except OSError:
        notes.append(
            f"The file **{name}** is no longer on the server (uploads are kept for about an hour), "
            "so it was left out. Send it again if the answer needs it."
        )
        return None
    return ChatDocument(data=data, name=name) if is_document(name, data) else ChatImage(data=data, name=name)


def _user_turn(texts: list[str], files: list[tuple[str, str]], notes: list[str]) -> ChatTurn:
    uploads = [upload for path, name in files if (upload := _read_upload(path, name, notes)) is not None]
    return ChatTurn(role="user", text="\n".join(t for t in texts if t.strip()),
                    images=tuple(u for u in uploads if isinstance(u, ChatImage)),
                    documents=tuple(u for u in uploads if isinstance(u, ChatDocument)))


def _is_side_note(message: dict) -> bool:
    """Notices, errors and stats are shown in the chat as titled messages; they are never sent to the model."""
    metadata = message.get("metadata") or {}
    return bool(metadata.get("title"))


def history_to_turns(history: list[dict], message: dict | str | None, notes: list[str]) -> list[ChatTurn]:
    """The conversation the model should see: earlier answered exchanges, then the new user message.

    A user message that got no answer (its reply was an error, or it was stopped at once) is left out, except
    when it directly precedes the new message: then it is part of it (that is how an edited message arrives).
    """
    groups: list[dict] = []  # runs of one role's messages: {"role", "texts", "files", "answer": has model text}
    for msg in history or []:
        role = msg.get("role")
        if role not in ("user", "assistant"):
            continue
        if not groups or groups[-1]["role"] != role:
            groups.append({"role": role, "texts": [], "files": [], "answer": False})
        group = groups[-1]
        if role == "assistant" and _is_side_note(msg):
            continue
        for item in _content_items(msg.get("content")):
            if (file := _file_of(item)) is not None:
                group["files"].append(file)
            elif text := _text_of(item):
                group["texts"].append(text)
                group["answer"] = role == "assistant"

    pending_texts: list[str] = []
    pending_files: list[tuple[str, str]] = []
    if groups and groups[-1]["role"] == "user":
        trailing = groups.pop()
        pending_texts, pending_files = trailing["texts"], trailing["files"]

    turns: list[ChatTurn] = []
    for user, reply in pairwise(groups):  # roles alternate: same-role neighbours were merged above
        if user["role"] == "user" and reply["answer"]:
            turns.append(_user_turn(user["texts"], user["files"], notes))
            turns.append(ChatTurn(role="assistant", text="".join(reply["texts"])))

    if isinstance(message, str):  # an edited message arrives as plain text
        message = {"text": message, "files": []}
    message = message or {}
    for item in message.get("files") or []:  # upload paths, or file dicts when a message is retried
        if (file := _file_of({"path": item} if isinstance(item, (str, Path)) else item)) is not None:
            pending_files.append(file)
    turns.append(_user_turn(pending_texts + [message.get("text") or ""], pending_files, notes))
    return turns


# ---------------------------------------------------------------------------------------------------------------
# Rendering the reply
# ---------------------------------------------------------------------------------------------------------------


def _side_note(title: str, content: str = "") -> dict:
    return {"role": "assistant", "content": content, "metadata": {"title": title}}


def stats_line(stats) -> str:
    documents = f"{stats.document_tokens} document tokens · " if stats.document_tokens else ""
    return (
        f"📊 {stats.image_tokens} image tokens · {documents}{stats.prompt_tokens} prompt tokens · "
        f"{stats.generated_tokens} generated · first token {stats.ttft_s:.2f} s · "
        f"{stats.decode_tokens_per_s:.1f} tokens/s · context {stats.context_used} / {stats.context_len}"
    )


def context_meter(stats) -> str:
    """The context after the last reply: a bar, the total, and the parts of it that the images and documents
    take."""
    if stats.context_len <= 0:
        return ""
    share = min(1.0, stats.context_used / stats.context_len)
    filled = round(share * 20)
    images = f"{stats.image_tokens} of them for images" if stats.image_tokens else "no images"
    documents = f" · {stats.document_tokens} for documents" if stats.document_tokens else ""
    return (f"**Context** `{'█' * filled}{'░' * (20 - filled)}` {stats.context_used} / {stats.context_len} tokens "
            f"({share:.0%}) after the last reply · {images}{documents}")


def queue_words(position: int) -> str:
    """`Queued.position` counts the reply itself: 1 = next."""
    if position <= 1:
        return "Your reply is next in line; it starts as soon as the model has room."
    return (f"Your reply is number {position} in line ({position - 1} ahead of it); it starts as soon as the "
            "model has room.")


@dataclass
class Reply:
    """One assistant reply as it grows: notices first (seen before the answer), the queue position while it waits,
    the answer, then stats or errors."""

    notes: list[str] = field(default_factory=list)
    waiting: str | None = None
    answer: str = ""

    def messages(self, *tail: dict) -> list[dict]:
        out = []
        if self.notes:
            out.append(_side_note("ℹ️ Note", "\n".join(f"- {n}" for n in self.notes)))
        if self.waiting:
            out.append(_side_note("⏳ Waiting for the model", self.waiting))
        if self.answer:
            out.append({"role": "assistant", "content": self.answer})
        return out + list(tail)


def finish_notes(finished: Finished, answer: str) -> list[dict]:
    """The stats line, with the model's reason for any ending but a normal stop (ChatModel words every one)."""
    stats, reason = finished.stats, finished.message
    if not answer.strip():
        why = reason or "The model ended its reply without any text."
        return [_side_note("⚠️ No answer", why), _side_note(stats_line(stats))]
    return [_side_note(stats_line(stats), f"⚠️ {reason}" if reason else "")]


# ---------------------------------------------------------------------------------------------------------------
# The chat handler
# ---------------------------------------------------------------------------------------------------------------


def _number(name: str, value: Any, whole: bool) -> int | float | None:
    """A setting as it arrives (an int, a float, None for an emptied box, anything at all from the API) -> a
    number, or None when empty; InvalidParameter (named for the setting) when it is not one."""
    if value is None or value == "":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise InvalidParameter(name, f"{name} is not a number")
    if whole:
        if isinstance(value, float) and not value.is_integer():  # NaN and infinities too
            raise InvalidParameter(name, f"{name} is not a whole number")
        return int(value)
    return float(value)


def read_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                  max_image_tokens) -> GenerationSettings:
    """The reply's settings from the UI's values; raises InvalidParameter for any value that cannot be used.
    Seed -1 or empty: random. Max tokens per image 0 or empty: the model's own reading."""
    d = CHAT_DEFAULTS
    seed = _number("seed", seed, whole=True)
    cap = _number("max_image_tokens", max_image_tokens, whole=True)

    def given(name, value, whole):
        number = _number(name, value, whole)
        return getattr(d, name) if number is None else number

    return GenerationSettings(
        max_new_tokens=given("max_new_tokens", max_new_tokens, True),
        temperature=given("temperature", temperature, False),
        top_p=given("top_p", top_p, False),
        top_k=given("top_k", top_k, True),
        repetition_penalty=given("repetition_penalty", repetition_penalty, False),
        seed=None if seed in (None, -1) else seed,
        max_image_tokens=None if cap in (None, 0) else cap,
    )


def chat_handler(model) -> Callable[..., Iterator[tuple[list[dict], Any]]]:
    """The chat function for `model`: Gradio calls it with the message, the history and the Settings' values."""

    def respond(
        message: dict | str,
        history: list[dict],
        max_new_tokens: int = CHAT_DEFAULTS.max_new_tokens,
        temperature: float = CHAT_DEFAULTS.temperature,
        top_p: float = CHAT_DEFAULTS.top_p,
        top_k: int = CHAT_DEFAULTS.top_k,
        repetition_penalty: float = CHAT_DEFAULTS.repetition_penalty,
        system_prompt: str = "",
        seed: int = -1,
        max_image_tokens: int = 0,
    ) -> Iterator[tuple[list[dict], Any]]:
        """Answers one chat message about the images in it and earlier in the chat; streams the reply."""
        reply = Reply()
        try:
            settings = read_settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed,
                                     max_image_tokens)
        except InvalidParameter as exc:  # this user's setting; nothing was sent to the engine
            rule = SETTING_RULES.get(exc.param, "A setting is out of range.")
            fix = _side_note("⚠️ Check the settings", f"{rule} Change it under Settings and send again; "
                                                      "the chat is kept.")
            yield reply.messages(fix), gr.skip()
            return
        try:
            yield from _answer(model, message, history, str(system_prompt or ""), settings, reply)
        except Exception as exc:  # noqa: BLE001 -- any failure becomes a chat message; history and server stay up
            where = traceback.extract_tb(exc.__traceback__)[-1]
            # One line: the error's type and where it was raised, never its message (it may quote the user's input).
            log.error("chat handler failed: %s at %s:%d", type(exc).__name__, Path(where.filename).name, where.lineno)
            failure = _side_note("⚠️ Something went wrong",
                                 "The server could not answer this message. The chat is kept; you can retry.")
            yield reply.messages(failure), gr.skip()

    return respond


def _answer(model, message, history, system: str, settings: GenerationSettings,
            reply: Reply) -> Iterator[tuple[list[dict], Any]]:
    turns = history_to_turns(history, message, reply.notes)
    if not turns[-1].text.strip() and not turns[-1].images and not turns[-1].documents:
        nothing = _side_note("✍️ Nothing to answer", "Type a question or attach an image or a document.")
        yield reply.messages(nothing), gr.skip()
        return
    plan = model.plan(system, turns, settings.max_new_tokens, settings.max_image_tokens)
    reply.notes += plan.notices
    if plan.error:
        yield reply.messages(_side_note("⚠️ Could not answer", plan.error)), gr.skip()
        return
    if reply.notes:
        yield reply.messages(), gr.skip()
    yield from _stream_answer(model, plan, settings, reply)


def _stream_answer(model, plan, settings: GenerationSettings, reply: Reply) -> Iterator[tuple[list[dict], Any]]:
    finished: Finished | None = None
    last_sent = 0.0
    events = model.stream(plan, settings)
    try:  # a Stop, Undo, Retry or closed tab closes this generator; `finally` then aborts the engine's work
        for event in events:
            if isinstance(event, Queued):
                reply.waiting = queue_words(event.position)
                yield reply.messages(), gr.skip()
            elif isinstance(event, TextDelta):
                reply.waiting = None
                reply.answer += event.text
                now = time.monotonic()
                if reply.answer and now - last_sent >= STREAM_INTERVAL_S:
                    last_sent = now
                    yield reply.messages(), gr.skip()
            elif isinstance(event, Finished):
                finished = event
    finally:
        events.close()
    reply.waiting = None
    if finished is None:
        yield reply.messages(_side_note("⚠️ The reply ended without a reason from the model")), gr.skip()
        return
    yield reply.messages(*finish_notes(finished, reply.answer)), context_meter(finished.stats)


def _on_gpu(fn):
    """On Hugging Face ZeroGPU Spaces, a GPU is attached only while a `@spaces.GPU` function runs."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------


def setting_box(value: int, label: str, info: str, minimum: int, maximum: int | None = None) -> gr.Number:
    """Gradio's Number box, its bounds shown in the page and the API docs, whose values all reach the chat handler:
    `gr.Number.preprocess` refuses one out of range with a bare error and no reply, while the handler answers it in
    the chat with a sentence (read_settings, SETTING_RULES). Set on the instance: a subclass would do the same,
    but Gradio writes a .pyi stub beside the file of every Component subclass as it is defined."""
    box = gr.Number(value, label=label, info=info, precision=0, minimum=minimum, maximum=maximum, render=False)
    box.preprocess = lambda payload: payload
    return box


def header_markdown(model) -> str:
    limits, docs = model.intake_limits, model.document_limits
    return (
        f"## 🖼️ Chat about your photos\n"
        f"**Model:** {model.name} · context {model.context_len} tokens · {model.capacity} replies at a time\n\n"
        f"{model.description}\n\n"
        f"<small>Drop, paste or attach images (up to {limits.max_bytes / 2**20:.0f} MB and "
        f"{limits.max_pixels / 1e6:.0f} megapixels each; several per message), or TXT, Markdown and PDF documents "
        f"(up to {docs.max_bytes / 2**20:.0f} MB and {docs.max_pages} pages; a PDF's text layer is read). "
        "Images and messages are not logged; uploads are deleted after about an hour.</small>"
    )


def settings_inputs() -> list[gr.components.Component]:
    """Unrendered, so that ChatInterface puts them in its Settings accordion under the chat; their order is the
    order of `respond`'s parameters and of /chat's arguments."""
    d = CHAT_DEFAULTS
    return [
        gr.Slider(1, 4096, value=d.max_new_tokens, step=1, label="Max new tokens", render=False),
        gr.Slider(0.0, 2.0, value=d.temperature, step=0.01, label="Temperature", elem_id="setting-temperature",
                  info="0 = greedy (always the likeliest token)", render=False),
        gr.Slider(0.05, 1.0, value=d.top_p, step=0.05, label="Top-p", render=False),
        gr.Slider(0, 200, value=d.top_k, step=1, label="Top-k", info="0 = off", render=False),
        gr.Slider(1.0, 2.0, value=d.repetition_penalty, step=0.01, label="Repetition penalty",
                  elem_id="setting-repetition_penalty", render=False),
        gr.Textbox("", label="System prompt", lines=2, placeholder="Optional, e.g. 'Answer in one sentence.'",
                   render=False),
        setting_box(-1, "Seed", minimum=-1, maximum=SEED_MAX,
                    info="-1 = random. A fixed seed repeats the reply's random draws; its words repeat when it is "
                         "computed the same way too: alone on the server, with the same part of the prompt cached"),
        setting_box(0, "Max tokens per image", minimum=0,
                    info="0 or empty = the model's own reading. Lower: a cheaper, less detailed reading of each "
                         "image where the model has one, leaving more room for the conversation"),
    ]


def preset_values(name: str) -> tuple[float, float]:
    """The (temperature, repetition penalty) a preset sets (engine.chat.types.PRESETS); the other settings stay."""
    preset = PRESETS[name]
    return preset.temperature, preset.repetition_penalty


def preset_menu(inputs: list[gr.components.Component]) -> None:
    """Renders the preset menu, which sets the Temperature and Repetition penalty sliders among `inputs`."""
    long = PRESETS["Long document"]
    menu = gr.Dropdown(list(PRESETS), value="Chat", label="Preset", elem_id="preset", interactive=True,
                       info=f"Long document: temperature {long.temperature}, repetition penalty "
                            f"{long.repetition_penalty}, for answers taken from an attached document")
    sliders = [next(c for c in inputs if c.elem_id == f"setting-{name}") for name in
               ("temperature", "repetition_penalty")]
    menu.change(preset_values, menu, sliders, api_visibility="undocumented", queue=False)


def build_demo(model) -> gr.Blocks:
    """The page for `model` (a ChatModel or anything with its interface); `model.capacity` replies run at once,
    more wait in Gradio's queue, and within that the engine's own queue shows its positions in the chat."""
    with gr.Blocks(title="Chat about your photos", analytics_enabled=False, fill_height=True,
                   delete_cache=CACHE_CLEANUP) as blocks:
        gr.Markdown(header_markdown(model))
        meter = gr.Markdown("", label="Context", elem_id="context-meter", render=False)
        chatbot = gr.Chatbot(elem_id="chatbot", label="Chat", editable="user", buttons=["copy", "copy_all"],
                             placeholder="Drop a photo below and ask about it.", height=520, scale=1)
        textbox = gr.MultimodalTextbox(
            elem_id="chat-input", file_types=["image", *SUFFIXES], file_count="multiple", sources=["upload"],
            placeholder="Ask about an image or a document: drop, paste or attach photos, TXT, Markdown or PDF "
                        "files, then press Enter…",
            autofocus=True, submit_btn=True, stop_btn=True)
        inputs = settings_inputs()
        chat = gr.ChatInterface(
            _on_gpu(chat_handler(model)),
            multimodal=True,
            chatbot=chatbot,
            textbox=textbox,
            additional_inputs=inputs,
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[meter],
            editable=True,
            concurrency_limit=model.capacity,
            api_name="chat",
            api_description="Answer a message (text + image or document files) in this session's conversation; "
                            "streams the reply.",
            analytics_enabled=False,
            fill_height=True,
        )
        meter.render()
        preset_menu(inputs)
        chat.chatbot.clear(lambda: "", None, meter, api_visibility="undocumented", queue=False)
    for block_fn in blocks.fns.values():  # ChatInterface registers one handler per trigger, each wrapping chat.fn
        if getattr(block_fn.fn, "__wrapped__", None) is chat.fn:
            block_fn.concurrency_id = CHAT_CONCURRENCY_ID
    blocks.queue(max_size=QUEUE_MAX)
    return blocks


# ---------------------------------------------------------------------------------------------------------------
# Gradio's own logs
# ---------------------------------------------------------------------------------------------------------------


class _OneLineTracebacks:
    """Stands in for the `traceback` module inside gradio's request paths (gradio 6.31: queueing.py and routes.py
    call `traceback.print_exc()` when a request fails or is refused). A full traceback's last line is the error's
    message, which quotes the request ("Received inputs: [{'text': ..." for a call with too few values, the value
    itself for one a component refuses); this writes one line naming the error's type instead."""

    def __getattr__(self, name: str):
        return getattr(traceback, name)

    @staticmethod
    def print_exc(*_args, **_kwargs) -> None:
        exc = sys.exc_info()[1]
        logging.getLogger("gradio").warning("a request was refused or failed (%s); its inputs are not logged",
                                            type(exc).__name__)


def keep_user_data_out_of_gradio_logs() -> None:
    """Gradio prints tracebacks of failed requests straight to stderr, not through `logging`: swap the module it
    prints them with in the two files that do it for requests."""
    from gradio import queueing, routes

    for module in (queueing, routes):
        module.traceback = _OneLineTracebacks()


# ---------------------------------------------------------------------------------------------------------------
# Command line
# ---------------------------------------------------------------------------------------------------------------


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat about images with a small vision-language model; the same "
                                                 "port serves an OpenAI-compatible API under /v1.")
    parser.add_argument("--model", default=None, help="model id or path (default: LLaVA if the Hub is reachable, "
                        "else the embedded offline model; 'default' forces the embedded one); with --backend, a "
                        "local copy of the served checkpoint, for exact fitting")
    add_model_args(parser.add_argument_group("model loading"))
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    api = parser.add_argument_group("OpenAI-compatible API (under /v1, beside the UI)")
    api.add_argument("--headless", action="store_true", help="serve the API alone, no UI")
    api.add_argument("--no-api", action="store_true", help="serve the UI alone")
    api.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    api.add_argument("--served-model-name", default=None, help="the name API clients send as `model`")
    api.add_argument("--allowed-media-domains", nargs="*", default=[],
                     help="hosts whose http(s) image URLs the API may fetch (data: URIs are always accepted)")
    remote = parser.add_argument_group("remote backend (the UI in front of any OpenAI-compatible server)")
    remote.add_argument("--backend", default=None, help="answer through this server, e.g. http://router:8000/v1")
    remote.add_argument("--backend-api-key", default=None)
    remote.add_argument("--backend-model", default=None, help="the model name to ask the backend for")
    args = parser.parse_args(argv)
    if args.backend and args.headless:
        parser.error("--headless serves a local model's API; with --backend there is nothing to serve")
    return args


def load(args: argparse.Namespace):
    """The model the page (and the API) talk to: a local engine, or a remote OpenAI-compatible server."""
    if args.backend:
        from engine.chat.remote import RemoteChatModel

        return RemoteChatModel(args.backend, args.backend_api_key, args.backend_model, tokenizer=args.model)
    return ChatModel.load(args.model, **model_kwargs(args))


def api_routes(model, args: argparse.Namespace) -> list:
    """The /v1 routes over the same model as the page, so API and UI requests are batched together."""
    from api import openai_router

    name = args.served_model_name or args.model or model.name
    aliases = [a for a in (args.model, model.model_id, model.name) if a and a != name]
    return openai_router(model, name, args.api_key, args.allowed_media_domains, aliases).routes


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup checks, one line per request
    keep_user_data_out_of_gradio_logs()
    signal.signal(signal.SIGTERM, signal.default_int_handler)  # `kill` stops like Ctrl-C: the engine is closed
    model = load(args)
    serve_api = not (args.no_api or args.backend)
    try:
        if args.headless:
            import uvicorn
            from fastapi import FastAPI

            uvicorn.run(FastAPI(routes=api_routes(model, args)), host=args.host or "127.0.0.1",
                        port=args.port or 7860, log_level="warning", access_log=False)
            return
        build_demo(model).launch(
            server_name=args.host,
            server_port=args.port,
            share=args.share,
            max_file_size=model.intake_limits.max_bytes,
            max_threads=max(40, model.capacity + SPARE_THREADS),
            show_error=False,
            run_history=False,  # Gradio 6 records each run for a history page by default
            app_kwargs={"routes": api_routes(model, args)} if serve_api else None,
        )
    finally:
        model.close()

if __name__ == "__main__":
    main()

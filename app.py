"""The chat UI: drop in photos, talk about them, watch the reply stream in, with per-reply stats.

This file is UI only. It turns Gradio's chat history into `vlm` turns, asks `vlm.ChatModel` for a plan and a
stream of events, and renders them. It does NOT load weights itself, decode images, count tokens or schedule
anything: that is `vlm` (and, below it, `engine/` and `vision/`, which this file never imports).

Gradio's own ChatInterface supplies retry, undo, edit, copy, clear, stop and the streaming `/chat` API endpoint.

    python app.py [--model M] [--device D] [--host H] [--port P] [--share]

`/chat` API (gradio_client): `client.submit(message, max_new_tokens, temperature, top_p, top_k,
repetition_penalty, system_prompt, seed, api_name="/chat")` where `message = {"text": str, "files":
[handle_file(path), ...]}`. It streams `(reply, context_meter)`: `reply` is a list of assistant messages
(`{"role", "content", "metadata"}`); the answer is the message without a `metadata.title`, notices, errors and the
stats line are messages with one. Calls from one client share a conversation (Gradio keeps it per session).
"""
from __future__ import annotations

import argparse
import logging
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from itertools import pairwise
from pathlib import Path
from typing import Any

import gradio as gr

from engine.chat import ChatModel
from engine.chat.types import ChatImage, ChatTurn, Finished, GenerationSettings, TextDelta

log = logging.getLogger("app")

STREAM_INTERVAL_S = 0.05  # resend the growing reply at most every 50 ms: each update resends it whole (gradio#4092)
CONCURRENT_CHATS = 4  # the engine batches requests; more than one chat at a time is the point of it
QUEUE_MAX = 64  # beyond this, new requests are refused at once ("queue full") rather than waiting for minutes
CACHE_CLEANUP = (600, 3600)  # every 10 min, delete uploads older than 1 h (Gradio's cache is readable by URL)

FINISH_WORDS = {  # used only when the model gives no Finished.message of its own
    "length": "Stopped at the max new tokens limit; raise it under Settings for a longer answer.",
    "context": "Stopped because the conversation filled the model's context. Clear the chat or send fewer images.",
    "abort": "Stopped before the answer was complete.",
    "error": "The model failed while answering.",
}


# ---------------------------------------------------------------------------------------------------------------
# Gradio history -> vlm turns
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


def _read_image(path: str, name: str, notes: list[str]) -> ChatImage | None:
    try:
        return ChatImage(data=Path(path).read_bytes(), name=name)
    except OSError:
        notes.append(
            f"The image **{name}** is no longer on the server (uploads are kept for about an hour), "
            "so it was left out. Send it again if the answer needs it."
        )
        return None


def _user_turn(texts: list[str], files: list[tuple[str, str]], notes: list[str]) -> ChatTurn:
    images = tuple(img for path, name in files if (img := _read_image(path, name, notes)) is not None)
    return ChatTurn(role="user", text="\n".join(t for t in texts if t.strip()), images=images)


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
    return (
        f"📊 {stats.image_tokens} image tokens · {stats.prompt_tokens} prompt tokens · "
        f"{stats.generated_tokens} generated · first token {stats.ttft_s:.2f} s · "
        f"{stats.decode_tokens_per_s:.1f} tokens/s · context {stats.context_used} / {stats.context_len}"
    )


def context_meter(used: int, limit: int, when: str) -> str:
    if limit <= 0:
        return ""
    share = min(1.0, used / limit)
    filled = round(share * 20)
    return f"**Context** `{'█' * filled}{'░' * (20 - filled)}` {used} / {limit} tokens ({share:.0%}) {when}"


@dataclass
class Reply:
    """One assistant reply as it grows: notices first (seen before the answer), the answer, then stats or errors."""

    notes: list[str] = field(default_factory=list)
    answer: str = ""

    def messages(self, *tail: dict) -> list[dict]:
        out = []
        if self.notes:
            out.append(_side_note("ℹ️ Note", "\n".join(f"- {n}" for n in self.notes)))
        if self.answer:
            out.append({"role": "assistant", "content": self.answer})
        return out + list(tail)


def finish_notes(finished: Finished, answer: str) -> list[dict]:
    stats = finished.stats
    reason = finished.message
    if not reason and stats.finish_reason != "stop":
        reason = FINISH_WORDS.get(stats.finish_reason, f"Stopped ({stats.finish_reason}).")
    if not answer.strip():
        why = reason or "the model ended its reply before writing anything."
        return [_side_note("⚠️ No answer", f"Nothing was generated: {why}"), _side_note(stats_line(stats))]
    return [_side_note(stats_line(stats), f"⚠️ {reason}" if reason else "")]


# ---------------------------------------------------------------------------------------------------------------
# The chat handler
# ---------------------------------------------------------------------------------------------------------------


def _settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed) -> GenerationSettings:
    return GenerationSettings(
        max_new_tokens=int(max_new_tokens),
        temperature=float(temperature),
        top_p=float(top_p),
        top_k=int(top_k),
        repetition_penalty=float(repetition_penalty),
        seed=None if seed is None or int(seed) < 0 else int(seed),
    )


def respond(
    message: dict | str,
    history: list[dict],
    max_new_tokens: int = 512,
    temperature: float = 0.7,
    top_p: float = 0.9,
    top_k: int = 50,
    repetition_penalty: float = 1.1,
    system_prompt: str = "",
    seed: int = -1,
) -> Iterator[tuple[list[dict], Any]]:
    """Answers one chat message about the images in it and earlier in the chat; streams the reply."""
    reply = Reply()
    try:
        settings = _settings(max_new_tokens, temperature, top_p, top_k, repetition_penalty, seed)
        turns = history_to_turns(history, message, reply.notes)
        if not turns[-1].text.strip() and not turns[-1].images:
            nothing = _side_note("✍️ Nothing to answer", "Type a question or attach an image.")
            yield reply.messages(nothing), gr.skip()
            return
        plan = MODEL.plan(system_prompt or "", turns, settings.max_new_tokens)
        reply.notes += plan.notices
        if plan.error:
            yield reply.messages(_side_note("⚠️ Could not answer", plan.error)), gr.skip()
            return
        if reply.notes:
            yield reply.messages(), gr.skip()
        yield from _stream_answer(plan, settings, reply)
    except Exception as exc:  # noqa: BLE001 -- any failure becomes a chat message; history and server stay up
        log.error("chat handler failed: %s", type(exc).__name__)  # never the user's text or images
        detail = str(exc).strip() or type(exc).__name__
        failure = _side_note("⚠️ Something went wrong", f"{detail}\n\nThe chat is kept; you can retry.")
        yield reply.messages(failure), gr.skip()


def _stream_answer(plan, settings: GenerationSettings, reply: Reply) -> Iterator[tuple[list[dict], Any]]:
    finished: Finished | None = None
    last_sent = 0.0
    events = MODEL.stream(plan, settings)
    try:  # a Stop, Undo, Retry or closed tab closes this generator; `finally` then aborts the engine's work
        for event in events:
            if isinstance(event, TextDelta):
                reply.answer += event.text
                now = time.monotonic()
                if reply.answer and now - last_sent >= STREAM_INTERVAL_S:
                    last_sent = now
                    yield reply.messages(), gr.skip()
            elif isinstance(event, Finished):
                finished = event
    finally:
        events.close()
    if finished is None:
        yield reply.messages(_side_note("⚠️ The reply ended without a reason from the model")), gr.skip()
        return
    stats = finished.stats
    meter = context_meter(stats.context_used, stats.context_len, "after the last reply")
    yield reply.messages(*finish_notes(finished, reply.answer)), meter


def _on_gpu(fn):
    """On Hugging Face ZeroGPU Spaces, a GPU is attached only while a `@spaces.GPU` function runs."""
    try:
        import spaces
    except ImportError:
        return fn
    return spaces.GPU(duration=120)(fn)


chat_fn = _on_gpu(respond)


# ---------------------------------------------------------------------------------------------------------------
# Layout
# ---------------------------------------------------------------------------------------------------------------


def header_markdown(model) -> str:
    limits = model.intake_limits
    return (
        f"## 🖼️ Chat about your photos\n"
        f"**Model:** {model.name} · context {model.context_len} tokens\n\n"
        f"{model.description}\n\n"
        f"<small>Drop, paste or attach images (up to {limits.max_bytes / 2**20:.0f} MB and "
        f"{limits.max_pixels / 1e6:.0f} megapixels each; several per message). "
        "Images and messages are not logged; uploads are deleted after about an hour.</small>"
    )


def build_demo(model) -> gr.Blocks:
    with gr.Blocks(title="Chat about your photos", analytics_enabled=False, fill_height=True,
                   delete_cache=CACHE_CLEANUP) as blocks:
        gr.Markdown(header_markdown(model))
        meter = gr.Markdown("", label="Context", elem_id="context-meter", render=False)
        chatbot = gr.Chatbot(
            elem_id="chatbot",
            label="Chat",
            editable="user",
            buttons=["copy", "copy_all"],
            placeholder="Drop a photo below and ask about it.",
            height=520,
            scale=1,
        )
        textbox = gr.MultimodalTextbox(
            elem_id="chat-input",
            file_types=["image"],
            file_count="multiple",
            sources=["upload"],
            placeholder="Ask about an image: drop, paste or attach photos, then press Enter…",
            autofocus=True,
            submit_btn=True,
            stop_btn=True,
        )
        settings = [  # unrendered, so that ChatInterface puts them in its Settings accordion under the chat
            gr.Slider(1, 4096, value=512, step=1, label="Max new tokens", render=False),
            gr.Slider(0.0, 2.0, value=0.7, step=0.05, label="Temperature",
                      info="0 = greedy (always the likeliest token)", render=False),
            gr.Slider(0.05, 1.0, value=0.9, step=0.05, label="Top-p", render=False),
            gr.Slider(0, 200, value=50, step=1, label="Top-k", info="0 = off", render=False),
            gr.Slider(1.0, 2.0, value=1.1, step=0.05, label="Repetition penalty", render=False),
            gr.Textbox("", label="System prompt", lines=2, placeholder="Optional, e.g. 'Answer in one sentence.'",
                       render=False),
            gr.Number(-1, label="Seed", precision=0, minimum=-1,
                      info="-1 = random; any other value repeats a reply exactly", render=False),
        ]
        chat = gr.ChatInterface(
            chat_fn,
            multimodal=True,
            chatbot=chatbot,
            textbox=textbox,
            additional_inputs=settings,
            additional_inputs_accordion=gr.Accordion("Settings", open=False, render=False),
            additional_outputs=[meter],
            editable=True,
            concurrency_limit=CONCURRENT_CHATS,
            api_name="chat",
            api_description="Answer a message (text + image files) in this session's conversation; streams the reply.",
            analytics_enabled=False,
            fill_height=True,
        )
        meter.render()
        chat.chatbot.clear(lambda: "", None, meter, api_visibility="undocumented", queue=False)
    for block_fn in blocks.fns.values():  # chats from the page and from /chat share one limit, not one each
        if block_fn.concurrency_limit == CONCURRENT_CHATS:
            block_fn.concurrency_id = "chat"
    blocks.queue(max_size=QUEUE_MAX)
    return blocks


def parse_args(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="Chat about images with a small vision-language model.")
    parser.add_argument("--model", default=None, help="model id or path (default: LLaVA if the Hub is reachable, "
                        "else the embedded offline model)")
    parser.add_argument("--device", default=None, help="cuda, cpu, ... (default: the best available)")
    parser.add_argument("--host", default=None, help="address to listen on (default: Gradio's, 127.0.0.1 locally)")
    parser.add_argument("--port", type=int, default=None, help="port (default: Gradio's, 7860)")
    parser.add_argument("--share", action="store_true", help="also open a public *.gradio.live link (off by default)")
    return parser.parse_args(argv)


if gr.NO_RELOAD:  # `gradio app.py` re-runs this file on edits; load the model only once
    ARGS = parse_args(sys.argv[1:] if __name__ == "__main__" else [])
    MODEL = ChatModel.load(ARGS.model, ARGS.device)

demo = build_demo(MODEL)

if __name__ == "__main__":
    logging.basicConfig(level=logging.INFO)
    logging.getLogger("httpx").setLevel(logging.WARNING)  # Gradio's own startup checks, one line per request
    demo.launch(
        server_name=ARGS.host,
        server_port=ARGS.port,
        share=ARGS.share,
        max_file_size=MODEL.intake_limits.max_bytes,
        show_error=False,
    )

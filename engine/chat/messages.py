"""OpenAI-style messages -> a system prompt and `ChatTurn`s: the one parser behind the HTTP API and the pipeline.

A message is {"role", "content"}; content is a string or a list of parts: {"type": "text", "text"}, {"type":
"image_url", "image_url": {"url"}} (or the URL as a plain string), {"type": "image", "image"} (the pipeline's: a
path, a PIL image, bytes or a data URI), and OpenAI's file part {"type": "file", "file": {"file_data":
"data:application/pdf;base64,...", "filename": "report.pdf"}} for a TXT, Markdown or PDF document (inline only:
there is no Files API to take a `file_id`), which becomes a `ChatDocument` that the chat layer reads
(documents.intake) like an upload in the UI. System and developer messages are joined into the system prompt;
consecutive messages of one role become one turn (texts joined by a blank line, images in order), since chat
templates expect the roles to alternate. Within a turn the images and documents come before its text, as the UI
sends them.

Where an image's bytes come from is the caller's `load(source, position)`: the API decodes data URIs and fetches
allowed URLs, the pipeline reads paths and PIL images. This module touches neither the network nor the disk.
Malformed input raises `InvalidParameter("messages", ...)`; an unusable data URI raises `ImageError` (for an
image) or `DocumentError` (for a file).
"""
from __future__ import annotations

import binascii
import urllib.parse
from typing import Any, Callable

from documents.intake import SUFFIXES, DocumentError, DocumentLimits
from engine.chat.types import ChatDocument, ChatImage, ChatTurn
from engine.sampling_params import InvalidParameter
from vision.intake import ImageError

ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
IMAGE_PARTS = {"image_url": "image_url", "image": "image"}  # part type -> the key that holds the image

Loader = Callable[[Any, int], ChatImage]
# A file part named without a known suffix is read by its data URI's media type.
MEDIA_SUFFIXES = {"application/pdf": ".pdf", "text/plain": ".txt", "text/markdown": ".md", "text/x-markdown": ".md"}


def _bad(message: str) -> InvalidParameter:
    return InvalidParameter("messages", message)


def _parts(message: Any, i: int) -> tuple[str, list]:
    if not isinstance(message, dict):
        raise _bad(f"messages[{i}] must be an object with 'role' and 'content'")
    role = message.get("role")
    if role not in ROLES:
        raise _bad(f"messages[{i}]: role {role!r} is not supported (use system, developer, user or assistant)")
    content = message.get("content")
    if content is None and role == "assistant":
        content = ""
    if isinstance(content, str):
        return ROLES[role], [{"type": "text", "text": content}]
    if not isinstance(content, list):
        raise _bad(f"messages[{i}].content must be a string or a list of content parts")
    return ROLES[role], content


def _image_source(part: dict, where: str) -> Any:
    value = part.get(IMAGE_PARTS[part["type"]])
    if isinstance(value, dict):
        value = value.get("url")
    if value is None or value == "":
        raise _bad(f"{where}: the image part has no image")
    return value


def _document(part: dict, where: str) -> ChatDocument:
    file = part.get("file")
    if not isinstance(file, dict):
        raise _bad(f"{where}.file must be an object with 'file_data' (a data: URI) and 'filename'")
    data, name = file.get("file_data"), file.get("filename")
    if data is None and file.get("file_id") is not None:
        raise _bad(f"{where}: file_id is not supported (this server keeps no files); send the file inline as "
                   "file.file_data, a data: URI")
    if not is_data_uri(data):
        raise _bad(f"{where}.file.file_data must be a data: URI (data:application/pdf;base64,...)")
    name = name if isinstance(name, str) and name.strip() else "document"
    media_type = data[5:].split(",", 1)[0].split(";", 1)[0].strip().lower()
    if "." + name.rsplit(".", 1)[-1].lower() not in SUFFIXES and media_type in MEDIA_SUFFIXES:
        name += MEDIA_SUFFIXES[media_type]
    return ChatDocument(decode_data_uri(data, DocumentLimits().max_bytes, name, DocumentError, "file"), name)


def _split(part: Any, where: str) -> tuple[str | None, Any]:
    """(text, None), or (None, an image source or a ChatDocument)."""
    if not isinstance(part, dict) or not isinstance(part.get("type"), str):
        raise _bad(f"{where} must be an object with a 'type'")
    kind = part["type"]
    if kind == "text":
        if not isinstance(part.get("text"), str):
            raise _bad(f"{where}.text must be a string")
        return part["text"], None
    if kind in IMAGE_PARTS:
        return None, _image_source(part, where)
    if kind == "file":
        return None, _document(part, where)
    raise _bad(f"{where}: content parts of type {kind!r} are not supported (use text, image_url or file)")


def image_sources(messages: Any) -> list[Any]:
    """Every image source in the messages, in order (what `load` will be asked for, by position)."""
    return [source for _, _, source in _walk(messages) if source is not None and not isinstance(source, ChatDocument)]


def _walk(messages: Any):
    if not isinstance(messages, list) or not messages:
        raise _bad("messages must be a non-empty list")
    for i, message in enumerate(messages):
        role, parts = _parts(message, i)
        for j, part in enumerate(parts):
            text, source = _split(part, f"messages[{i}].content[{j}]")
            if source is not None and role != "user":
                raise _bad(f"messages[{i}]: images and files are read in user messages only")
            yield role, text, source


def to_turns(messages: Any, load: Loader) -> tuple[str, list[ChatTurn]]:
    """(system prompt, turns). `load(source, position)` makes each image's ChatImage, position counting from 0."""
    system: list[str] = []
    groups: list[tuple[str, list[str], list[ChatImage], list[ChatDocument]]] = []
    position = 0
    for role, text, source in _walk(messages):
        if role == "system":
            system.append(text or "")
            continue
        if not groups or groups[-1][0] != role:
            groups.append((role, [], [], []))
        if source is None:
            groups[-1][1].append(text)
        elif isinstance(source, ChatDocument):
            groups[-1][3].append(source)
        else:
            groups[-1][2].append(load(source, position))
            position += 1
    turns = [ChatTurn(role, "\n\n".join(t for t in texts if t), tuple(images), tuple(documents))
             for role, texts, images, documents in groups]
    return "\n\n".join(s for s in system if s), turns


def is_data_uri(source: Any) -> bool:
    return isinstance(source, str) and source[:5].lower() == "data:"


def decode_data_uri(uri: str, max_bytes: int, name: str = "image", error: type[ValueError] = ImageError,
                    kind: str = "image") -> bytes:
    """The bytes of a `data:[<type>][;base64],<data>` URI, refused before decoding when over `max_bytes`; the
    `error` raised names the `kind` of thing it should hold."""
    header, comma, payload = uri[5:].partition(",")
    if not comma:
        example = "data:image/png;base64,..." if kind == "image" else "data:application/pdf;base64,..."
        raise error(f"{name} is not a valid data: URI (expected {example}).")
    base64 = header.lower().endswith(";base64")
    estimate = len(payload) * 3 // 4 if base64 else len(payload) // 3  # a lower bound of the decoded size
    if estimate > max_bytes:
        raise error(f"{name} is larger than {max_bytes / 2**20:.1f} MB, the limit. Please send a smaller "
                    f"{'or more compressed image' if kind == 'image' else kind}.")
    try:
        data = binascii.a2b_base64(payload) if base64 else urllib.parse.unquote_to_bytes(payload)
    except (binascii.Error, ValueError) as exc:
        raise error(f"{name}: the data: URI's base64 could not be decoded ({exc}).") from exc
    if len(data) > max_bytes:
        raise error(f"{name} is {len(data) / 2**20:.1f} MB; the limit is {max_bytes / 2**20:.1f} MB.")
    return data

"""Documents through the OpenAI-compatible API: the `file` content part (inline `file_data`) is parsed into a
ChatDocument and read by the chat layer like an upload in the UI; the API's strict mode refuses what it cannot
read or fit, with a 400 and a code."""
import base64

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from api import openai_router
from documents.intake import DocumentError
from engine.chat import ChatModel
from engine.chat.messages import image_sources, to_turns
from engine.chat.types import ChatDocument
from engine.families import load_model
from engine.sampling_params import InvalidParameter
from tests.make_pdfs import make_pdf, report_pages
from tests.tiny_checkpoints import make_tiny_llava

FACT = "The secret code is 4817."


def file_part(data: bytes, filename="report.pdf", media_type="application/pdf"):
    uri = f"data:{media_type};base64,{base64.b64encode(data).decode()}"
    return {"type": "file", "file": {"file_data": uri, **({"filename": filename} if filename else {})}}


def test_file_parts_become_documents_of_their_turn():
    pdf = make_pdf(["One page."])
    messages = [{"role": "user", "content": [file_part(pdf), {"type": "text", "text": "Summarise."},
                                             file_part(b"# Notes", None, "text/markdown")]}]
    system, (turn,) = to_turns(messages, lambda source, i: pytest.fail("no image to load"))
    assert system == "" and turn.text == "Summarise." and turn.images == ()
    assert turn.documents == (ChatDocument(pdf, "report.pdf"), ChatDocument(b"# Notes", "document.md"))
    assert image_sources(messages) == []


@pytest.mark.parametrize("part, error, words", [
    ({"type": "file", "file": {"file_id": "file-abc"}}, InvalidParameter, "file_id is not supported"),
    ({"type": "file", "file": "x"}, InvalidParameter, "file must be an object"),
    ({"type": "file", "file": {"file_data": "https://example.com/x.pdf"}}, InvalidParameter, "must be a data: URI"),
    ({"type": "file", "file": {"file_data": "data:application/pdf;base64,abc", "filename": "x.pdf"}},
     DocumentError, "x.pdf: the data: URI's base64 could not be decoded"),
])
def test_unusable_file_parts_name_the_problem(part, error, words):
    with pytest.raises(error, match=words):
        to_turns([{"role": "user", "content": [part]}], lambda source, i: None)


def test_files_are_read_in_user_messages_only():
    with pytest.raises(InvalidParameter, match="images and files are read in user messages only"):
        to_turns([{"role": "assistant", "content": [file_part(b"x", "a.txt", "text/plain")]}], lambda s, i: None)


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    folder = make_tiny_llava(tmp_path_factory.mktemp("api-documents"), "llama-clip", context=4096)
    model = ChatModel(load_model(str(folder), "cpu", max_model_len=2048))
    app = FastAPI()
    app.include_router(openai_router(model, "tiny"))
    with TestClient(app) as client:
        yield client
    model.close()


def ask(client, *parts, max_tokens=4):
    content = [*parts, {"type": "text", "text": "What is the secret code?"}]
    return client.post("/v1/chat/completions", json={"model": "tiny", "max_tokens": max_tokens, "temperature": 0,
                                                     "messages": [{"role": "user", "content": content}]})


def test_a_pdf_part_is_read_into_the_prompt(client):
    plain = ask(client).json()["usage"]["prompt_tokens"]
    reply = ask(client, file_part(make_pdf(report_pages(2, FACT))))
    assert reply.status_code == 200, reply.text
    assert reply.json()["usage"]["prompt_tokens"] > plain + 200


def test_unreadable_or_oversized_documents_are_refused_with_a_code(client):
    broken = ask(client, file_part(b"%PDF-1.7\nnothing", "broken.pdf"))
    assert broken.status_code == 400
    error = broken.json()["error"]
    assert error["code"] == "bad_document" and error["message"].startswith("broken.pdf could not be read as a PDF")
    too_long = ask(client, file_part(make_pdf(report_pages(20, FACT))))  # the API never trims: it says so
    assert too_long.status_code == 400 and too_long.json()["error"]["code"] == "context_length_exceeded"

"""A PDF through the chat handler of the built page and a real engine (a tiny random checkpoint, CPU): the file the
test makes is read, its last page's fact reaches the prompt the engine runs, and the reply streams with the
document counted in the stats and the context meter. The launched app is driven the same way over HTTP in
tests/test_app_client.py."""
import pytest

import app
from engine.chat import ChatModel
from engine.families import load_model
from tests.make_pdfs import make_pdf, report_pages
from tests.tiny_checkpoints import make_tiny_llava

FACT = "The secret code is 4817."


@pytest.fixture(scope="module")
def chat_model(tmp_path_factory):
    folder = make_tiny_llava(tmp_path_factory.mktemp("app-documents"), "llama-clip", context=4096)
    model = ChatModel(load_model(str(folder), "cpu", max_model_len=768))
    yield model
    model.close()


@pytest.fixture
def prompts(chat_model, monkeypatch):
    """The prompt text of every request the engine is given."""
    seen, submit = [], chat_model.server.submit

    def spy(ids, params, images=()):
        seen.append(chat_model.loaded.prompt.tokenizer.decode(ids))
        return submit(ids, params, images)

    monkeypatch.setattr(chat_model.server, "submit", spy)
    return seen


def test_a_pdf_is_read_trimmed_and_its_last_page_reaches_the_model(chat_model, prompts, tmp_path):
    pdf = tmp_path / "harbour report.pdf"
    pdf.write_bytes(make_pdf(report_pages(12, FACT)))
    respond = app.chat_handler(chat_model)
    updates = list(respond({"text": "What is the secret code?", "files": [str(pdf)]}, [], max_new_tokens=8,
                           temperature=0.0))
    final, meter = updates[-1]
    notes = " ".join(m["content"] for m in final if m.get("metadata"))
    assert "harbour report.pdf: kept " in notes and "pages 1 and 12 of 12) to fit the 768-token context" in notes
    (prompt,) = prompts
    assert FACT in prompt and "[Page 12" in prompt and prompt.rstrip().endswith("What is the secret code? ASSISTANT:")
    stats = next(m["metadata"]["title"] for m in final if "tokens/s" in (m.get("metadata") or {}).get("title", ""))
    document_tokens = int(stats.split(" document tokens")[0].split()[-1])
    assert document_tokens > 768 // 4 and f"{document_tokens} for documents" in meter


def test_the_handler_keeps_serving_after_a_broken_pdf(chat_model, prompts, tmp_path):
    broken = tmp_path / "broken.pdf"
    broken.write_bytes(b"%PDF-1.7\nnot a pdf at all")
    respond = app.chat_handler(chat_model)
    final, _ = list(respond({"text": "Summarise it.", "files": [str(broken)]}, [], max_new_tokens=4))[-1]
    assert [m["metadata"]["title"] for m in final] == ["⚠️ Could not answer"]
    assert final[0]["content"].startswith("None of the documents in this message could be read")
    assert "broken.pdf could not be read as a PDF" in final[0]["content"] and prompts == []
    good = tmp_path / "notes.md"
    good.write_text("# Notes\n\n" + FACT)
    final, meter = list(respond({"text": "What is the code?", "files": [str(good)]}, [], max_new_tokens=4))[-1]
    assert FACT in prompts[-1] and "for documents" in meter

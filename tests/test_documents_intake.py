"""Document intake (documents/intake.py): TXT, Markdown and PDF uploads in, page texts or a sentence out."""
import pytest

from documents.intake import Document, DocumentError, DocumentLimits, is_document, load_document
from tests.make_pdfs import encrypted_pdf, image_only_pdf, make_pdf


def test_utf8_text_and_markdown_are_read_as_one_page():
    doc = load_document("Grüße, 世界 🐱\r\nline two\x07".encode(), "notes.txt")
    assert doc == Document("notes.txt", "text", ("Grüße, 世界 🐱\nline two",), doc.digest)
    md = load_document(b"# Title\n\n- item *one*\n", "README.md")
    assert md.kind == "markdown" and md.pages == ("# Title\n\n- item *one*\n",) and md.note is None
    assert not md.paged


def test_byte_order_marks_are_honoured():
    assert load_document("\ufeffcafé".encode("utf-8"), "a.txt").pages == ("café",)
    assert load_document("\ufeffcafé".encode("utf-16-le"), "a.txt").pages == ("café",)


def test_text_that_is_not_utf8_is_read_as_windows_1252_with_a_note():
    doc = load_document("Prix : 12 € — déjà vu".encode("cp1252"), "prices.txt")
    assert doc.pages == ("Prix : 12 € — déjà vu",)
    assert "prices.txt is not UTF-8; it was read as Windows-1252" in doc.note


@pytest.mark.parametrize("data, name, words", [
    (b"", "empty.txt", r"empty.txt is empty \(0 bytes\)"),
    (b"  \n\t\n", "blank.md", "blank.md holds no text"),
    (b"\x00\x01binary\x00", "data.txt", "data.txt does not look like a text file"),
    (b"hello", "photo.docx", "photo.docx is not a document we can read"),
])
def test_unusable_text_files_get_a_sentence(data, name, words):
    with pytest.raises(DocumentError, match=words):
        load_document(data, name)


def test_size_and_length_limits():
    with pytest.raises(DocumentError, match=r"big.txt is 0.0 MB; the limit is 0.0 MB"):
        load_document(b"x" * 2048, "big.txt", DocumentLimits(max_bytes=1024))
    with pytest.raises(DocumentError, match="more than 100 characters"):
        load_document(b"y" * 101, "long.md", DocumentLimits(max_chars=100))
    with pytest.raises(DocumentError, match="long.pdf holds more than 100 characters"):
        load_document(make_pdf(["z " * 60, "z " * 60]), "long.pdf", DocumentLimits(max_chars=100))
    with pytest.raises(DocumentError, match="many.pdf has 3 pages; the limit is 2"):
        load_document(make_pdf(["a", "b", "c"]), "many.pdf", DocumentLimits(max_pages=2))
    with pytest.raises(ValueError):
        DocumentLimits(max_pages=0)


def test_a_multi_page_pdf_keeps_its_pages_in_order():
    doc = load_document(make_pdf(["First page.", "Second page.", "The secret code is 4817."]), "report.pdf")
    assert doc.kind == "pdf" and doc.paged and len(doc.pages) == 3
    assert [p.strip() for p in doc.pages] == ["First page.", "Second page.", "The secret code is 4817."]


def test_a_pdf_is_known_by_its_content_not_its_name():
    data = make_pdf(["Hello from a PDF."])
    assert is_document("scan.png", data) and is_document("notes.TXT") and not is_document("cat.jpg", b"\xff\xd8")
    assert load_document(data, "renamed.txt").pages == ("Hello from a PDF.",)


@pytest.mark.parametrize("make, words", [
    (lambda: make_pdf(["x"])[:400], "broken.pdf could not be read as a PDF: the file is damaged"),
    (lambda: b"%PDF-1.7\n" + bytes(range(256)) * 8, "broken.pdf could not be read as a PDF"),
    (lambda: encrypted_pdf(["Locked text."], "secret"), "broken.pdf is password-protected"),
    (image_only_pdf, "broken.pdf has no text layer"),
])
def test_unusable_pdfs_get_a_sentence_without_the_parsers_words(make, words):
    with pytest.raises(DocumentError) as caught:
        load_document(make(), "C:\\fakepath\\broken.pdf")
    message = str(caught.value)
    assert message.startswith(words), message
    assert "Error" not in message and "pypdf" not in message and "fakepath" not in message


def test_a_pdf_locked_with_an_empty_password_opens():
    assert load_document(encrypted_pdf(["Open text."], ""), "open.pdf").pages == ("Open text.",)


def test_pdf_reading_stops_at_its_time_budget():
    with pytest.raises(DocumentError, match="slow.pdf took too long to read"):
        load_document(make_pdf(["a", "b"]), "slow.pdf", DocumentLimits(pdf_seconds=1e-9))

"""Safe document intake: untrusted upload bytes -> a `Document` (its pages' text), or a `DocumentError` a user can
act on.

Every document that reaches a model passes through `load_document`. It caps the byte size before reading anything,
tells a PDF from a text file by its content (`%PDF-` in the first KiB), and otherwise by the name's suffix:
- TXT and Markdown are decoded as UTF-8 (a UTF-8 or UTF-16 byte-order mark is honoured); a file that is not valid
  UTF-8 is read as Windows-1252 (Western European), with a note saying so, and one with NUL bytes is refused as
  not text. Markdown is kept as written: the model reads the markup.
- PDF: the text layer of each page, through pypdf, within a page-count cap and a time budget (checked between
  pages; pypdf's own caps bound what one stream may inflate to). Password-protected, image-only (scanned) and
  damaged files are refused in plain words, never with the parser's exception text.
Control characters other than tab and newline are dropped, line ends become `\n`, and the whole text is capped in
characters (what the tokenizer will be asked to read).

Not here: counting tokens, trimming to fit a context, or wrapping the text into a prompt (engine.chat does that),
OCR, or reading paths a user named.
"""
from __future__ import annotations

import codecs
import hashlib
import io
import re
import time
from dataclasses import dataclass

SUFFIXES = {".txt": "text", ".text": "text", ".md": "markdown", ".markdown": "markdown", ".pdf": "pdf"}
ACCEPTED = "TXT, Markdown (.md) or PDF"
_PDF_MAGIC = b"%PDF-"
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class DocumentLimits:
    """Per-upload caps. `max_chars` bounds the text after extraction (a 20 MB PDF can hold far more text than any
    context); `pdf_seconds` bounds text extraction, checked between pages."""

    max_bytes: int = 20 * 2**20
    max_pages: int = 500
    max_chars: int = 2_000_000
    pdf_seconds: float = 30.0

    def __post_init__(self) -> None:
        for name in ("max_bytes", "max_pages", "max_chars"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"DocumentLimits.{name} must be a positive int, got {value!r}")
        if not self.pdf_seconds > 0:
            raise ValueError(f"DocumentLimits.pdf_seconds must be positive, got {self.pdf_seconds!r}")


class DocumentError(ValueError):
    """A document we will not use. The message is for the end user: it names the file, the problem and what to
    do about it."""


@dataclass(frozen=True)
class Document:
    """A document's text. `pages` holds one string per PDF page (page 1 first), or the whole text of a TXT or
    Markdown file as its one page. `note` says, in words, anything the reader should know (how it was decoded)."""

    name: str
    kind: str  # "text", "markdown" or "pdf"
    pages: tuple[str, ...]
    digest: str
    note: str | None = None

    @property
    def paged(self) -> bool:
        return self.kind == "pdf"


def is_document(name: str, data: bytes = b"") -> bool:
    """Whether an upload goes to `load_document` (by content for PDFs, else by the name's suffix)."""
    return data[:1024].lstrip().startswith(_PDF_MAGIC) or _suffix(name) in SUFFIXES


def load_document(data: bytes, name: str = "document", limits: DocumentLimits = DocumentLimits()) -> Document:
    """Raises only `DocumentError`."""
    label = display_name(name)
    if not data:
        raise DocumentError(f"{label} is empty (0 bytes). Please upload it again.")
    if len(data) > limits.max_bytes:
        raise DocumentError(f"{label} is {_megabytes(len(data))}; the limit is {_megabytes(limits.max_bytes)}. "
                            "Please send a smaller file, or the part of it that matters.")
    digest = hashlib.sha256(data).hexdigest()
    if data[:1024].lstrip().startswith(_PDF_MAGIC):
        pages = _pdf_pages(data, label, limits)
        if not any(page.strip() for page in pages):
            raise DocumentError(f"{label} has no text layer (its pages look like scanned images), so there is "
                                "nothing to read. Send a PDF with selectable text, or photos of the pages.")
        return Document(label, "pdf", _capped(pages, label, limits), digest)
    kind = SUFFIXES.get(_suffix(name))
    if kind is None or kind == "pdf":
        raise DocumentError(f"{label} is not a document we can read. Please send a {ACCEPTED} file.")
    text, note = _decode_text(data, label)
    if not text.strip():
        raise DocumentError(f"{label} holds no text (only blank space). Please check that it is the right file.")
    return Document(label, kind, _capped((text,), label, limits), digest, note)


def _decode_text(data: bytes, label: str) -> tuple[str, str | None]:
    for bom, codec in ((codecs.BOM_UTF8, "utf-8"), (codecs.BOM_UTF16_LE, "utf-16-le"),
                       (codecs.BOM_UTF16_BE, "utf-16-be")):
        if data.startswith(bom):
            try:
                return _clean(data[len(bom):].decode(codec)), None
            except UnicodeDecodeError:
                raise DocumentError(f"{label} could not be decoded as {codec.upper()} although it says it is. "
                                    "Please save it again as UTF-8.") from None
    if b"\x00" in data:
        raise DocumentError(f"{label} does not look like a text file (it holds binary data). Please send a "
                            f"{ACCEPTED} file.")
    try:
        return _clean(data.decode("utf-8")), None
    except UnicodeDecodeError:
        pass
    # Windows-1252 leaves five bytes undefined; `replace` shows them as U+FFFD rather than refusing the file.
    return (_clean(data.decode("cp1252", errors="replace")),
            f"{label} is not UTF-8; it was read as Windows-1252 (Western European), so some characters may be "
            "wrong. Save it as UTF-8 if they matter.")


def _clean(text: str) -> str:
    return _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n"))


def _capped(pages: tuple[str, ...], label: str, limits: DocumentLimits) -> tuple[str, ...]:
    if sum(len(page) for page in pages) > limits.max_chars:
        raise DocumentError(f"{label} holds more than {limits.max_chars:,} characters of text, the limit. Please "
                            "send the part that matters.")
    return pages


def _pdf_pages(data: bytes, label: str, limits: DocumentLimits) -> tuple[str, ...]:
    from pypdf import PdfReader  # imported where used: only PDFs need it
    from pypdf.errors import FileNotDecryptedError

    deadline = time.monotonic() + limits.pdf_seconds
    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not _opens_without_password(reader):
            raise _locked(label)
        count = len(reader.pages)
        if count > limits.max_pages:
            raise DocumentError(f"{label} has {count:,} pages; the limit is {limits.max_pages:,}. Please send the "
                                "pages that matter.")
        pages, chars = [], 0
        for page in reader.pages:
            if time.monotonic() > deadline:
                raise DocumentError(f"{label} took too long to read ({len(pages)} of {count} pages in "
                                    f"{limits.pdf_seconds:.0f} s). Please send the pages that matter.")
            pages.append(_clean(page.extract_text() or ""))
            chars += len(pages[-1])
            if chars > limits.max_chars:
                break  # _capped refuses it with the limit in words
        return tuple(pages)
    except DocumentError:
        raise
    except FileNotDecryptedError:
        raise _locked(label) from None
    except Exception:  # noqa: BLE001 -- pypdf raises many types on damaged files; none of their text is shown
        raise DocumentError(f"{label} could not be read as a PDF: the file is damaged or not really a PDF. Please "
                            "export it again, or send it as text.") from None


def _locked(label: str) -> DocumentError:
    return DocumentError(f"{label} is password-protected, so its text cannot be read. Please send a copy without "
                         "a password.")


def _opens_without_password(reader) -> bool:
    """Many PDFs are encrypted with an empty user password (only to set permissions): those open as they are."""
    try:
        return bool(reader.decrypt(""))
    except Exception:  # noqa: BLE001 -- an unsupported cipher (AES without `cryptography`) counts as locked
        return False


def display_name(name: str) -> str:
    """The file's base name, printable and at most 80 characters (browsers may send C:\\fakepath\\...)."""
    base = "".join(ch for ch in re.split(r"[\\/]", name)[-1] if ch.isprintable()).strip()
    return (base[:60] + "..." + base[-17:] if len(base) > 80 else base) or "document"


def _suffix(name: str) -> str:
    base = display_name(name).lower()
    return base[base.rfind("."):] if "." in base else ""


def _megabytes(n: int) -> str:
    return f"{n / 2**20:.1f} MB"

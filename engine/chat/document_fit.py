"""Documents inside a prompt: how their text is wrapped into the user's message, counted, and trimmed to fit.

A document rides in its user turn as a block in front of the turn's text:

    <document name="report.pdf" pages="12">
    [Page 1]
    ...
    </document>

with a `[Page N]` marker before each PDF page, so the model can say where it read something. Its tokens are
counted with the checkpoint's own tokenizer, page by page, before anything runs. The tokenizer's added tokens
(`<image>`, `<|im_end|>`, `</s>`, ...) are matched in any text it reads, so a document that spells one would place
an image, end the turn or start another role; their spellings in a document (and its name) are broken with a zero
width space first, which reads the same.

Trimming rule, when the conversation does not fit with a document whole: keep its head and its tail, half of the
kept tokens each, and leave out the middle, marked `[... pages 5-10 left out to fit the context ...]`. The tail is
kept because questions often concern the end (conclusions, the last figures); the head because it says what the
document is. Pages are cut at token boundaries, so a page at either edge may be kept in part. The order of
trimming against images and old turns is engine.chat.budget's (see its docstring).

`DocumentShelf` keeps the last few documents read and counted, by content, so that a follow-up question does not
re-read a long PDF (seconds for a few hundred pages) and re-count its tokens.

Not here: reading files (documents/ does that) or deciding how much to keep (engine.chat.budget).
"""
from __future__ import annotations

import dataclasses
import hashlib
import threading
from collections import OrderedDict
from dataclasses import dataclass, field

from documents.intake import DocumentError, DocumentLimits, load_document

GAP = "[... {what} left out to fit the context ...]"
ZERO_WIDTH_SPACE = "\u200b"


def defused(text: str, tokenizer) -> str:
    """`text` with the spelling of each of the tokenizer's added tokens broken (see the module docstring). With no
    tokenizer (a remote server's, unknown here) the text is as it was."""
    for token in tokenizer.get_added_vocab() if tokenizer is not None else ():
        # Markup tokens have no spaces; some tokenizers add runs of spaces or newlines, which are left alone.
        if len(token) > 1 and not any(ch.isspace() for ch in token) and token in text:
            text = text.replace(token, token[0] + ZERO_WIDTH_SPACE + token[1:])
    return text


@dataclass
class FitDocument:
    """A document as the budget sees it: its pages' text, their token ids once counted, and how many of those
    ids are kept (None: all)."""

    name: str
    pages: tuple[str, ...]
    paged: bool  # PDF pages (marked `[Page N]`), or one text
    ids: list[list[int]] = field(default_factory=list, repr=False)
    keep: int | None = None
    note: str | None = None  # what the reader should know (how the file was decoded), from documents.intake

    def copy(self) -> "FitDocument":
        return dataclasses.replace(self, ids=self.ids)

    def count(self, tokenizer) -> None:
        """Token ids of each page's text, once (the tokenizer is the checkpoint's); its added tokens defused."""
        if not self.ids and self.pages:
            self.pages = tuple(defused(page, tokenizer) for page in self.pages)
            self.ids = [list(ids) for ids in tokenizer(list(self.pages), add_special_tokens=False).input_ids]

    @property
    def total(self) -> int:
        return sum(len(ids) for ids in self.ids)

    @property
    def kept(self) -> int:
        return self.total if self.keep is None else min(self.keep, self.total)

    def spans(self) -> list[tuple[int, int, int]]:
        """(page index, start, end) of the kept ids of each page that keeps any: the first `head` ids of the
        document and its last `tail` ids."""
        kept = self.kept
        head, tail = (kept + 1) // 2, kept // 2
        out, offset, total = [], 0, self.total
        for index, ids in enumerate(self.ids):
            start, end = offset, offset + len(ids)
            cut_head = min(end, head) - start  # ids of this page within the head
            cut_tail = end - max(start, total - tail)  # within the tail
            if cut_head >= len(ids) or cut_tail >= len(ids) or cut_head + cut_tail >= len(ids):
                out.append((index, 0, len(ids)))
            else:
                out += [(index, 0, cut_head)] if cut_head > 0 else []
                out += [(index, len(ids) - cut_tail, len(ids))] if cut_tail > 0 else []
            offset = end
        return [span for span in out if span[2] > span[1]]

    def kept_pages(self) -> list[int]:
        """1-based numbers of the pages of which anything is kept."""
        return sorted({index + 1 for index, _, _ in self.spans()})

    def render(self, tokenizer) -> str:
        """The wrapped text as it goes into the prompt."""
        pages = f' pages="{len(self.pages)}"' if self.paged else ""
        name = defused(self.name.replace('"', "'"), tokenizer)  # a " in the name would end the attribute
        parts = [f'<document name="{name}"{pages}>']
        if self.keep is None or self.kept >= self.total:
            parts += [self._page(i, text) for i, text in enumerate(self.pages)]
        else:
            previous = None
            for index, start, end in self.spans():
                if previous is not None and (index, start) != previous:
                    parts.append(self._gap(previous, (index, start)))
                text = tokenizer.decode(self.ids[index][start:end])
                parts.append(self._page(index, text, start > 0))
                previous = (index, end) if end < len(self.ids[index]) else (index + 1, 0)
        return "\n".join(parts + ["</document>"])

    def _page(self, index: int, text: str, continued: bool = False) -> str:
        if not self.paged:
            return text
        return f"[Page {index + 1}{', end' if continued else ''}]\n{text}"

    def _gap(self, after: tuple[int, int], before: tuple[int, int]) -> str:
        """The marker between the kept head (ending at `after`) and tail (starting at `before`): (page, offset)."""
        if not self.paged:
            return GAP.format(what=f"{self.total - self.kept:,} tokens")
        first, last = after[0] + (2 if after[1] else 1), before[0]  # 1-based, the pages left out whole
        if first > last:
            return GAP.format(what=f"part of page {after[0] + 1 if after[1] else before[0] + 1}")
        return GAP.format(what=f"page {first}" if first == last else f"pages {first}-{last}")

    def notice(self, context_len: int) -> str:
        pages = f" ({_ranges(self.kept_pages())} of {len(self.pages)})" if self.paged else ""
        return (f"{self.name}: kept {self.kept:,} of {self.total:,} tokens{pages} to fit the {context_len:,}-token "
                "context: its beginning and its end, the middle left out.")


def _ranges(numbers: list[int]) -> str:
    """[1, 2, 3, 4, 11, 12] -> 'pages 1-4 and 11-12'."""
    runs: list[list[int]] = []
    for n in numbers:
        if runs and n == runs[-1][-1] + 1:
            runs[-1].append(n)
        else:
            runs.append([n])
    words = [f"{r[0]}-{r[-1]}" if len(r) > 1 else f"{r[0]}" for r in runs]
    label = "page" if len(numbers) == 1 else "pages"
    return f"{label} {', '.join(words[:-1])} and {words[-1]}" if len(words) > 1 else f"{label} {words[0]}"


class DocumentShelf:
    """The last `size` documents read (or refused), keyed by content, name and limits. Thread-safe: chats plan on
    several threads; a document being read by two at once is read twice, and either result kept."""

    def __init__(self, size: int = 8):
        self.size = size
        self._lock = threading.Lock()
        self._read: OrderedDict[tuple, FitDocument | DocumentError] = OrderedDict()

    def get(self, data: bytes, name: str, limits: DocumentLimits) -> FitDocument:
        """The document (its token ids are kept once counted), or the DocumentError it raised when read."""
        key = (hashlib.sha256(data).hexdigest(), name, limits)
        with self._lock:
            found = self._read.get(key)
            if found is not None:
                self._read.move_to_end(key)
        if found is None:
            try:
                doc = load_document(data, name, limits)
                found = FitDocument(doc.name, doc.pages, doc.paged, note=doc.note)
            except DocumentError as exc:
                found = exc
            with self._lock:
                self._read[key] = found
                while len(self._read) > self.size:
                    self._read.popitem(last=False)
        if isinstance(found, DocumentError):
            raise found
        return found


def with_documents(documents: list[FitDocument], text: str, tokenizer) -> str:
    """A user turn's text with its documents in front."""
    blocks = [doc.render(tokenizer) for doc in documents if doc.kept > 0 or doc.keep is None]
    return "\n\n".join(blocks + ([text] if text else []))

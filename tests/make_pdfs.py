"""PDFs the document tests make themselves (fpdf2 writes them, pypdf encrypts one): no files checked in."""
from __future__ import annotations

import io


def make_pdf(pages: list[str]) -> bytes:
    """One page per string, in Helvetica (Latin-1 text only), wrapped to the page."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.set_font("Helvetica", size=11)
    for text in pages:
        pdf.add_page()
        pdf.multi_cell(0, 6, text)
    return bytes(pdf.output())


def image_only_pdf() -> bytes:
    """A page with a drawing and no text layer, as a scan looks to a text extractor."""
    from fpdf import FPDF

    pdf = FPDF()
    pdf.add_page()
    pdf.rect(20, 20, 120, 80, style="F")
    return bytes(pdf.output())


def encrypted_pdf(pages: list[str], user_password: str) -> bytes:
    """RC4-128 (pypdf writes it without the `cryptography` package)."""
    from pypdf import PdfReader, PdfWriter

    writer = PdfWriter(clone_from=PdfReader(io.BytesIO(make_pdf(pages))))
    writer.encrypt(user_password=user_password, owner_password="owner", algorithm="RC4-128")
    out = io.BytesIO()
    writer.write(out)
    return out.getvalue()


def report_pages(count: int, fact: str, filler: int = 12) -> list[str]:
    """`count` pages of filler about lighthouses, `fact` on a line of its own at the end of the last one."""
    pages = [f"Page {i} of the harbour report. " + "The lighthouse keeper logged the weather and the ships. " * filler
             for i in range(1, count + 1)]
    pages[-1] += "\n" + fact
    return pages

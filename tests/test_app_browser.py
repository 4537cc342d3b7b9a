"""End to end in a real browser: headless Chromium (Debian's /usr/bin/chromium) driven by Playwright.

Uploads the cat photo into the multimodal textbox, asks about it, watches the answer stream in and the stats line
appear, then uses Gradio's own Retry, Undo and Clear buttons. Leaves a screenshot in artifacts/browser_chat.png.
Install the browser and the driver with .ci/install_browser.sh (never `playwright install`: no downloads here).
"""
import time
from pathlib import Path

import pytest

from tests.browser.app_server import REPO, running_app, save_cat_png
from tests.make_pdfs import make_pdf, report_pages

pytestmark = pytest.mark.slow

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_FLAGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                  "--disable-background-networking", "--disable-component-update", "--disable-sync"]
ARTIFACTS = REPO / "artifacts"
QUESTION = "What animal is in this picture?"
REPLY_TIMEOUT_MS = 300_000

BOT = "#chatbot [data-testid='bot']"
TITLED = "#chatbot .bot-row .thought-group"  # notices, errors and the stats line: titled messages in the reply
STATS = TITLED + " .title"


@pytest.fixture(scope="module")
def browser():
    if not Path(CHROMIUM).exists():
        pytest.skip(f"{CHROMIUM} is missing; run .ci/install_browser.sh")
    sync_api = pytest.importorskip("playwright.sync_api", reason="playwright is missing; run .ci/install_browser.sh")
    with sync_api.sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_FLAGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def app_url(tmp_path_factory, browser):
    with running_app(tmp_path_factory.mktemp("app_logs")) as server:
        yield server.url


@pytest.fixture
def page(browser, app_url):
    context = browser.new_context(viewport={"width": 1280, "height": 1200})
    page = context.new_page()
    page.goto(app_url)
    page.wait_for_selector("#chat-input textarea")
    yield page
    context.close()


def answer_text(page) -> str:
    """The streamed answer: the bot bubbles' text without the titled notes (stats, notices)."""
    return page.evaluate(
        """() => [...document.querySelectorAll("#chatbot [data-testid='bot']")]
                 .filter(el => !el.querySelector('.thought-group'))
                 .map(el => el.innerText).join('\\n')"""
    )


def chat_text(page) -> str:
    """Everything the chat shows, user and bot bubbles in order: what a failing test reports."""
    return page.locator("#chatbot").inner_text()


def stats_lines(page) -> list[str]:
    return [t for t in page.locator(STATS).all_inner_texts() if "tokens/s" in t]


def wait_until_idle(page):
    """Gradio re-enables the textbox, with its Submit button back in place of Stop, once a reply is done."""
    page.wait_for_selector("#chat-input button.submit-button", timeout=REPLY_TIMEOUT_MS)
    page.wait_for_selector("#chat-input textarea:not([disabled])", timeout=30_000)


def wait_for_streamed_answer(page) -> list[int]:
    """Polls the answer while it streams; returns the lengths seen, ending once the stats line shows."""
    lengths = []
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while not stats_lines(page):
        assert time.monotonic() < deadline, "no stats line: the reply never finished"
        text = answer_text(page).strip()
        if text and (not lengths or len(text) != lengths[-1]):
            lengths.append(len(text))
        time.sleep(0.02)
    wait_until_idle(page)
    return lengths


def open_settings(page):
    page.locator("button.label-wrap", has_text="Settings").first.click()  # the accordion, not the footer link


def set_box(page, box, value: str, commit: str):
    """Types `value` into a settings box and commits it (`commit`: the key that does, Enter or Tab).

    The accordion mounts its boxes as it opens, and a fill that lands while they mount is reset to the default
    (seen in CI on a loaded 2-core runner, for the sliders and the Seed box): type again until the value holds."""
    box.wait_for(state="visible")
    for _ in range(5):
        box.fill(value)
        box.press(commit)
        page.wait_for_timeout(200)
        if box.input_value() == value:
            break
    assert box.input_value() == value


def set_greedy(page):
    """Temperature 0 in the Settings accordion, as a user would set it: the answer must not depend on sampling luck."""
    open_settings(page)
    set_box(page, page.get_by_label("number input for Temperature"), "0", "Enter")


def test_chat_about_a_photo_then_retry_undo_and_clear(page, tmp_path):
    header = page.locator("h2", has_text="Chat about your photos")
    assert header.is_visible()
    assert "Model:" in page.inner_text("body")
    set_greedy(page)

    page.set_input_files("#chat-input input[type=file]", str(save_cat_png(tmp_path / "chelsea.png")))
    page.wait_for_selector("#chat-input img")  # the upload's thumbnail in the textbox
    page.fill("#chat-input textarea", QUESTION)
    page.press("#chat-input textarea", "Enter")

    page.wait_for_selector("#chatbot [data-testid='user'] img")  # the photo is in the chat
    lengths = wait_for_streamed_answer(page)
    assert len(lengths) >= 2 and lengths[-1] > lengths[0], f"the answer did not grow while streaming: {lengths}"
    first_answer = answer_text(page)
    assert "cat" in first_answer.lower(), first_answer
    stats = stats_lines(page)[-1]
    assert "image tokens" in stats and "first token" in stats and "context" in stats, stats
    assert "Context" in page.inner_text("#context-meter")

    # Retry: Gradio removes the answer and streams a new one for the same message.
    page.locator("#chatbot button[aria-label='Retry']").last.click()
    page.wait_for_function(f"() => !document.querySelector('{TITLED}')", timeout=REPLY_TIMEOUT_MS)
    wait_for_streamed_answer(page)
    assert "cat" in answer_text(page).lower(), answer_text(page)
    assert page.locator("#chatbot [data-testid='user'] img").count() == 1  # the same message, not a second one
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser_chat.png"), full_page=True)

    # Undo: the exchange leaves the chat and the message returns to the textbox for editing.
    page.locator("#chatbot button[aria-label='Undo']").last.click()
    page.wait_for_function("() => !document.querySelector(\"#chatbot [data-testid='bot']\")", timeout=30_000)
    assert page.locator("#chatbot [data-testid='user']").count() == 0
    assert page.input_value("#chat-input textarea") == QUESTION

    # Send it again, then Clear (the chatbot's trash button) empties the chat and the context meter.
    page.press("#chat-input textarea", "Enter")
    wait_for_streamed_answer(page)
    page.locator("#chatbot button[aria-label='Clear']").click()
    page.wait_for_function("() => !document.querySelector(\"#chatbot [data-testid='user']\")", timeout=30_000)
    page.wait_for_function("() => !document.querySelector('#context-meter').innerText.includes('tokens')",
                           timeout=30_000)


def test_stop_ends_the_reply_and_the_chat_goes_on(page):
    page.fill("#chat-input textarea", "Write a long story about a lighthouse keeper and the sea.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function(f"() => document.querySelector(\"{BOT}\")?.innerText.trim().length > 0",
                           timeout=REPLY_TIMEOUT_MS)
    page.locator("#chat-input button.stop-button").click()
    wait_until_idle(page)
    stopped_at = answer_text(page)
    time.sleep(2.0)
    assert answer_text(page) == stopped_at, "text kept arriving after Stop"
    assert stopped_at.strip(), "the partial answer was removed"

    page.fill("#chat-input textarea", "Say hello in one word.")
    page.press("#chat-input textarea", "Enter")
    page.wait_for_function("() => document.querySelectorAll(\"#chatbot [data-testid='user']\").length == 2",
                           timeout=30_000)
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while not stats_lines(page):
        assert time.monotonic() < deadline, "no reply after Stop: the server stopped serving"
        time.sleep(0.1)



def test_an_invalid_seed_is_answered_in_the_chat_and_a_valid_one_works(page):
    open_settings(page)
    seed = page.get_by_role("spinbutton", name="Seed", exact=True)
    # Past the box's maximum (the engine's SEED_MAX): the page sends it, the chat answers it. Tab commits the box's
    # change before the message goes.
    set_box(page, seed, "1e20", "Tab")
    page.fill("#chat-input textarea", "Say hello in one word.")
    page.press("#chat-input textarea", "Enter")
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while not page.locator(f"{STATS}:has-text('Check the settings')").count():
        assert time.monotonic() < deadline, f"no settings note; the chat shows: {chat_text(page)!r}"
        time.sleep(0.1)
    note = page.locator(TITLED).last.inner_text()
    assert "Seed must be a whole number from 0 to" in note and "Error" not in page.inner_text("body"), note
    wait_until_idle(page)

    seed.fill("42")
    page.fill("#chat-input textarea", "Say hello in one word.")
    page.press("#chat-input textarea", "Enter")
    deadline = time.monotonic() + REPLY_TIMEOUT_MS / 1000
    while not stats_lines(page):
        assert time.monotonic() < deadline, "no reply once the seed was valid"
        time.sleep(0.1)
    assert page.locator("#chatbot [data-testid='user']").count() == 2  # the chat was kept


def test_a_pdf_with_the_long_document_preset(page, tmp_path):
    """The preset menu sets the two sliders; a PDF made here goes in through the textbox's file input; the stats line
    counts the document and the embedded default reads the fact on its last page. Leaves a screenshot in
    artifacts/browser_document.png."""
    open_settings(page)
    temperature = page.get_by_label("number input for Temperature")
    penalty = page.get_by_label("number input for Repetition penalty")
    temperature.wait_for(state="visible")
    page.locator("#preset input").click()
    page.get_by_role("option", name="Long document").click()
    page.wait_for_function("() => document.querySelector(\"[aria-label='number input for Temperature']\")"
                           ".value === '0.05'", timeout=30_000)
    assert penalty.input_value() == "1.02"

    pdf = tmp_path / "harbour_report.pdf"
    pdf.write_bytes(make_pdf(report_pages(6, "The secret code is 4817.")))
    page.set_input_files("#chat-input input[type=file]", str(pdf))
    page.wait_for_selector("#chat-input [aria-label='File thumbnail']")  # a file icon: Gradio shows no name
    page.fill("#chat-input textarea", "What is the secret code?")
    page.press("#chat-input textarea", "Enter")
    wait_for_streamed_answer(page)
    assert "document tokens" in stats_lines(page)[-1], stats_lines(page)
    assert "for documents" in page.inner_text("#context-meter")
    assert "4817" in answer_text(page), answer_text(page)
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "browser_document.png"), full_page=True)


def test_the_plain_apps_api_answers_to_default(app_url):
    """`python app.py` with no --model serves the embedded default (no Hub here); the API knows it by its served
    name and by "default", the name `--model` takes for it."""
    openai = pytest.importorskip("openai")
    client = openai.OpenAI(base_url=f"{app_url.rstrip('/')}/v1", api_key="unused", max_retries=0, timeout=120)
    served = client.models.list().data[0].id
    for name in (served, "default"):
        reply = client.chat.completions.create(model=name, messages=[{"role": "user", "content": "Hi"}],
                                               max_tokens=2, temperature=0)
        assert reply.usage.completion_tokens >= 1

"""End to end through the API: the real `python app.py` (embedded default model, offline) driven over HTTP by
gradio_client, and its log read back.

Retry, undo, edit and clear are Chatbot UI events that Gradio does not expose as API endpoints (view_api lists
only `/chat`), so they are covered in tests/test_app_browser.py.
"""
import json
import random
import re
import subprocess
import sys
import time
import urllib.request

import httpx
import pytest
from gradio_client import Client, handle_file

from engine.chat.types import LONG_DOCUMENT
from tests.browser.app_server import REPO, running_app, save_cat_png, save_truncated_jpeg
from tests.make_pdfs import make_pdf, report_pages

pytestmark = pytest.mark.slow

REPLY_TIMEOUT_S = 300
GREEDY = {"max_new_tokens": 64, "temperature": 0.0, "top_p": 0.9, "top_k": 50, "repetition_penalty": 1.1,
          "system_prompt": "", "seed": -1, "max_image_tokens": 0}  # in /chat's order
CHAT_PARAMETERS = ["message", *GREEDY]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    with running_app(tmp_path_factory.mktemp("app_logs")) as running:
        yield running


@pytest.fixture(scope="module")
def app_url(server):
    return server.url


@pytest.fixture(scope="module")
def images(tmp_path_factory):
    folder = tmp_path_factory.mktemp("images")
    bad = folder / "bad.png"
    bad.write_bytes(random.Random(0).randbytes(4096))
    cat = save_cat_png(folder / "chelsea.png")
    from PIL import Image
    Image.open(cat).save(folder / "cat.jpg", format="JPEG", quality=90)
    return {
        "cat": cat,
        "cat_jpeg": folder / "cat.jpg",
        "bad": bad,
        "truncated": save_truncated_jpeg(folder / "truncated.jpg"),
    }


def _client(url):
    return Client(url, verbose=False, download_files=False)


def submit(client, text, *paths, **settings):
    message = {"text": text, "files": [handle_file(str(p)) for p in paths]}
    return client.submit(message, *{**GREEDY, **settings}.values(), api_name="/chat")


def ask(client, text, *paths, **settings):
    """Sends one message to /chat; returns every streamed (reply, meter) update, the last one complete."""
    return wait(submit(client, text, *paths, **settings))


def wait(job):
    deadline = time.monotonic() + REPLY_TIMEOUT_S
    while not job.done():
        if time.monotonic() > deadline:
            job.cancel()
            pytest.fail(f"no complete reply within {REPLY_TIMEOUT_S} s")
        time.sleep(0.05)
    job.result()  # raises if the server reported an error
    return job.outputs()


def answer_of(reply):
    return "".join(m["content"] for m in reply if not (m.get("metadata") or {}).get("title"))


def side_notes(reply):
    """Notices, errors and the stats line: the titled messages, as 'title: content'."""
    return [f"{m['metadata']['title']}: {m['content']}" for m in reply if (m.get("metadata") or {}).get("title")]


def stats_of(reply):
    lines = [n for n in side_notes(reply) if "image tokens" in n and "tokens/s" in n]
    assert lines, f"no stats line in {side_notes(reply)}"
    return lines[-1]


def context_used(reply):
    # "... · context 812 / 2048"
    return int(stats_of(reply).split("context ")[-1].split("/")[0])


def image_tokens(reply):
    return int(stats_of(reply).split(" image tokens")[0].split()[-1])


def test_chat_endpoint_signature(app_url):
    api = _client(app_url).view_api(print_info=False, return_format="dict")
    chat = api["named_endpoints"]["/chat"]
    assert [p["parameter_name"] for p in chat["parameters"]] == CHAT_PARAMETERS
    assert len(chat["returns"]) == 2  # the reply messages, and the context meter


def test_cat_photo_streams_an_answer_with_stats(app_url, images):
    client = _client(app_url)
    updates = ask(client, "What animal is in this picture?", images["cat"])
    assert len(updates) > 1, "the reply arrived in one piece, not streamed"
    reply, meter = updates[-1]
    answer = answer_of(reply)
    assert "cat" in answer.lower(), (answer, side_notes(reply))
    stats = stats_of(reply)
    assert "prompt tokens" in stats and "first token" in stats and "context" in stats
    assert image_tokens(reply) > 0, stats
    assert "Context" in meter and f"{image_tokens(reply)} of them for images" in meter, meter

    # The conversation lives in the client's session: a follow-up is answered with the photo still in context.
    follow_up, _ = ask(client, "Describe its fur in a few words.")[-1]
    assert answer_of(follow_up).strip(), side_notes(follow_up)
    assert context_used(follow_up) > context_used(reply)


@pytest.mark.parametrize("kind, name", [("bad", "bad.png"), ("truncated", "truncated.jpg")])
def test_broken_image_gets_a_clear_message_and_the_server_keeps_serving(app_url, images, kind, name):
    client = _client(app_url)
    updates = ask(client, "What is in this picture?", images[kind])
    reply, _ = updates[-1]
    notes = " ".join(side_notes(reply))
    assert name in notes, f"the reply does not name {name}: {reply}"
    assert "Error" != notes.strip()

    reply, _ = ask(client, "What animal is in this picture?", images["cat"])[-1]
    assert "cat" in answer_of(reply).lower(), (answer_of(reply), side_notes(reply))
    stats_of(reply)


def test_two_chats_at_once_both_get_answers(app_url, images):
    jobs = [submit(_client(app_url), "What animal is in this picture?", images["cat"]),
            submit(_client(app_url), "Name three colours.")]
    for job in jobs:
        reply, _ = wait(job)[-1]
        assert answer_of(reply).strip(), side_notes(reply)
        stats_of(reply)


def test_an_invalid_seed_gets_a_sentence_while_other_chats_finish(app_url, images):
    long = {"max_new_tokens": 96, "repetition_penalty": 1.3}
    others = [submit(_client(app_url), "What animal is in this picture?", images["cat"], **long),
              submit(_client(app_url), "Write a long story about a lighthouse keeper and the sea.", **long)]
    time.sleep(1.0)  # both are in the engine by now
    bad = submit(_client(app_url), "Hello there.", seed=1e20)
    reply, _ = wait(bad)[-1]
    assert [m["metadata"]["title"] for m in reply] == ["⚠️ Check the settings"], reply
    assert reply[0]["content"].startswith("Seed must be a whole number from 0 to 9223372036854775807")
    assert not all(job.done() for job in others), "the other chats should still be streaming"
    for job in others:
        reply, _ = wait(job)[-1]
        assert answer_of(reply).strip(), side_notes(reply)
        (note,) = side_notes(reply)  # the stats line alone: a normal end, or the length limit it was given
        assert note == stats_of(reply) and note.endswith((": ", "max new tokens limit (96). Raise the limit in the "
                                                          "settings, or ask the model to continue.")), note


def test_a_fixed_seed_repeats_a_reply_computed_the_same_way(app_url):
    """What the README promises: the same seeded message, sent alone, gives the same words once its prompt is
    cached alike (from the second time on; the first may read a prefix another chat computed) and another seed
    gives other words."""
    sampled = {"temperature": 1.0, "top_p": 1.0, "top_k": 0, "max_new_tokens": 32, "seed": 1234}
    replies = [answer_of(ask(_client(app_url), "Tell me a fun fact.", **sampled)[-1][0]) for _ in range(3)]
    other = answer_of(ask(_client(app_url), "Tell me a fun fact.", **{**sampled, "seed": 4321})[-1][0])
    assert replies[1].strip() and replies[1] == replies[2], replies
    assert other != replies[1]


def test_max_tokens_per_image_is_taken(app_url, images):
    """The embedded model has one reading per image, so a cap below it cannot lower the cost: it is taken,
    the image is still read (its one reading is the cheapest), and the reply comes back as usual."""
    full, _ = ask(_client(app_url), "What animal is in this picture?", images["cat"])[-1]
    capped, _ = ask(_client(app_url), "What animal is in this picture?", images["cat"], max_image_tokens=8)[-1]
    assert image_tokens(capped) == image_tokens(full) > 8
    assert answer_of(capped).strip(), side_notes(capped)
    bad, _ = ask(_client(app_url), "What animal is in this picture?", images["cat"], max_image_tokens=-3)[-1]
    assert bad[-1]["content"].startswith("Max tokens per image must be a whole number"), bad


@pytest.fixture(scope="module")
def short_context_url(tmp_path_factory):
    """The app with a 2,048-token session, so that a 20-page PDF must be trimmed to fit."""
    with running_app(tmp_path_factory.mktemp("app_logs_documents"), "--session-len", "2048") as running:
        yield running.url


def test_a_pdf_is_trimmed_to_fit_and_the_fact_on_its_last_page_is_answered(short_context_url, tmp_path):
    """The issue's scenario: a PDF made here, whose last page states a fact, asked about with the Long document
    preset's settings. The embedded default's real weights answer it (greedy-like; tried at 3, 12, 20 and 40
    pages)."""
    pdf = tmp_path / "harbour_report.pdf"
    pdf.write_bytes(make_pdf(report_pages(20, "The secret code is 4817.")))
    updates = ask(_client(short_context_url), "What is the secret code?", pdf, seed=1,
                  temperature=LONG_DOCUMENT.temperature, repetition_penalty=LONG_DOCUMENT.repetition_penalty)
    assert len(updates) > 1, "the reply arrived in one piece, not streamed"
    reply, meter = updates[-1]
    notes = " ".join(side_notes(reply))
    assert re.search(r"harbour_report.pdf: kept [\d,]+ of [\d,]+ tokens \(pages 1-\d+ and \d+-20 of 20\) to fit the "
                     r"2,048-token context", notes), notes
    documents = int(stats_of(reply).split(" document tokens")[0].split()[-1])
    assert 2048 // 4 < documents < context_used(reply) <= 2048
    assert f"{documents} for documents" in meter, meter
    assert "4817" in answer_of(reply), (answer_of(reply), notes)


def test_server_config_is_safe(app_url):
    config = json.loads(urllib.request.urlopen(app_url + "config", timeout=10).read())
    assert config["analytics_enabled"] is False
    assert 0 < config["max_file_size"] <= 100 * 2**20  # uploads are capped (Gradio's default is no cap)
    assert config["show_error"] is False
    assert config["run_history"] is False


def _call(app_url, data):
    """A raw call of /chat over Gradio's HTTP API, as any script could send it; returns the streamed events."""
    request = urllib.request.Request(app_url + "gradio_api/call/chat", data=json.dumps({"data": data}).encode(),
                                     headers={"Content-Type": "application/json"})
    event_id = json.loads(urllib.request.urlopen(request, timeout=30).read())["event_id"]
    with urllib.request.urlopen(f"{app_url}gradio_api/call/chat/{event_id}", timeout=REPLY_TIMEOUT_S) as response:
        return response.read().decode()


def test_malformed_and_refused_requests_log_one_line_and_no_user_data(server, images):
    secret = "my-private-question-%d" % random.Random().randrange(10**9)
    before = server.log()
    malformed = _call(server.url, [{"text": secret + " A", "files": []}])  # too few values
    assert "event: error" in malformed and secret not in malformed
    refused = _call(server.url, [{"text": secret + " B", "files": []}, 64, 5.0, 0.9, 50, 1.1, "", -1, 0])
    assert "greater than maximum" in refused  # Gradio's own refusal of an out-of-range slider, to this caller
    not_a_message = _call(server.url, [secret + " C", 64, 0.0, 0.9, 50, 1.1, "", -1, 0])
    assert "event: error" in not_a_message
    too_big = httpx.post(server.url + "gradio_api/upload", timeout=60,
                         files={"files": (secret + ".png", b"\x89PNG" + bytes(21 * 2**20))})
    assert too_big.status_code == 413  # over the app's 20 MB cap, refused before it is stored
    answered, _ = ask(_client(server.url), secret + " D: what animal is this?", images["cat"])[-1]
    stats_of(answered)
    time.sleep(0.5)

    log = server.log()[len(before):]
    assert secret not in log and "chelsea" not in log, log
    assert "Traceback" not in server.log(), server.log()
    refusals = [line for line in log.splitlines() if "a request was refused or failed" in line]
    assert len(refusals) == 3, log
    assert all("its inputs are not logged" in line for line in refusals)
    assert "What animal is in this picture" not in server.log()  # nor any earlier test's question


def test_readme_example_runs_against_the_app(server, images):
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Using it from code", 1)[1].split("\n## ", 1)[0]
    code = re.search(r"```python\n(.*?)```", section, re.S).group(1)
    assert 'Client("http://127.0.0.1:7860/")' in code and '"cat.jpg"' in code
    code = code.replace("http://127.0.0.1:7860/", server.url).replace('"cat.jpg"', repr(str(images["cat_jpeg"])))
    run = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=REPLY_TIMEOUT_S)
    assert run.returncode == 0, run.stderr[-3000:]
    answer, stats = run.stdout.rstrip("\n").rsplit("\n", 1)
    assert answer.strip() and "image tokens" in stats and "tokens/s" in stats, run.stdout

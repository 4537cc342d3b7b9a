"""Runs the real `python app.py` on a free localhost port for the end-to-end tests, and makes their test images.

Shared by tests/test_app_client.py and tests/test_app_browser.py. The server loads the embedded default model
offline (its first load converts a GGUF, so starting can take a minute); its log (stdout and stderr) goes to a
file that tests read, and whose tail is shown when the server fails to come up.
"""
from __future__ import annotations

import contextlib
import io
import os
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 600


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _log_tail(path: Path, chars: int = 4000) -> str:
    return path.read_text(errors="replace")[-chars:] if path.exists() else "(no log)"


@dataclass(frozen=True)
class Server:
    url: str
    log_path: Path  # the app's stdout and stderr together

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")


@contextlib.contextmanager
def running_app(log_dir: Path, *args: str):
    """Starts `python app.py *args`, waits until it serves its page, yields a `Server`, and always stops it
    afterwards (SIGTERM: the app closes its engine and exits)."""
    port = free_port()
    log_path = log_dir / f"app_{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", GRADIO_ANALYTICS_ENABLED="False",
               PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "app.py", "--port", str(port), "--host", "127.0.0.1", *args],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/"
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None:
                raise RuntimeError(f"app.py exited with {proc.returncode}:\n{_log_tail(log_path)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"app.py did not answer within {START_TIMEOUT_S} s:\n{_log_tail(log_path)}")
            try:
                with urllib.request.urlopen(url + "config", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                pass
            time.sleep(1)
        yield Server(url, log_path)
    finally:
        stop(proc)


def stop(proc: subprocess.Popen) -> None:
    """Terminate a launched server, and kill it if it has not gone within 30 s."""
    proc.terminate()
    try:
        proc.wait(timeout=30)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait(timeout=30)


def save_cat_png(path: Path) -> Path:
    """skimage's `chelsea` photo of a tabby cat, as a PNG file."""
    from PIL import Image
    from skimage import data

    Image.fromarray(data.chelsea()).save(path, format="PNG")
    return path


def save_truncated_jpeg(path: Path) -> Path:
    """The cat as a JPEG cut off halfway through its data, as a broken upload would leave it."""
    from PIL import Image
    from skimage import data

    buffer = io.BytesIO()
    Image.fromarray(data.chelsea()).save(buffer, format="JPEG", quality=90)
    path.write_bytes(buffer.getvalue()[: len(buffer.getvalue()) // 2])
    return path

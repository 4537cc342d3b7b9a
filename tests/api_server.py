"""Runs `python -m api` on a free 127.0.0.1 port for the tests that talk to a launched server over real HTTP
(tests/test_api_server.py, tests/test_remote_backend.py)."""
from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
import urllib.error
import urllib.request
from pathlib import Path

from tests.browser.app_server import REPO, free_port, stop

START_TIMEOUT_S = 600


@contextlib.contextmanager
def running_api(model: str, log_dir: Path, *flags: str):
    """Starts the headless API server on `model` (CPU), waits for /health, yields its base URL (.../v1), and
    always stops it afterwards; the log's tail is shown when it fails to come up."""
    port = free_port()
    log_path = log_dir / f"api_{port}.log"
    env = dict(os.environ, HF_HUB_OFFLINE="1", TRANSFORMERS_OFFLINE="1", PYTHONUNBUFFERED="1")
    with open(log_path, "wb") as log:
        proc = subprocess.Popen([sys.executable, "-m", "api", "--model", model, "--device", "cpu", "--host",
                                 "127.0.0.1", "--port", str(port), *flags],
                                cwd=REPO, env=env, stdout=log, stderr=subprocess.STDOUT)
    try:
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"python -m api did not come up:\n{log_path.read_text(errors='replace')[-4000:]}")
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5) as response:
                    if response.status == 200:
                        break
            except (urllib.error.URLError, ConnectionError, TimeoutError):
                time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)

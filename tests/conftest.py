"""Shared test setup: no network, a device fixture, skip rules for GPU-only tests, and the tiny language model."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton decides at its first import whether kernels run in its interpreter; torch's compiler (pulled in by
    # transformers) imports it early, so this must be set before any test module loads.
    os.environ.setdefault("TRITON_INTERPRET", "1")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="module")
def one_thread():
    """For modules of tiny-tensor tests: intra-op threads only add contention (100x slower on a busy 2-core
    runner). Restored after the module."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


@pytest.fixture
def poison_empty(monkeypatch):
    """torch.empty / empty_like hand out NaN-filled tensors, so anything a kernel launcher leaves unwritten shows up."""
    empty, empty_like = torch.empty, torch.empty_like

    def nan(t):
        return t.fill_(float("nan")) if t.is_floating_point() else t

    monkeypatch.setattr(torch, "empty", lambda *a, **k: nan(empty(*a, **k)))
    monkeypatch.setattr(torch, "empty_like", lambda *a, **k: nan(empty_like(*a, **k)))


@pytest.fixture(scope="session")
def tiny_lm(tmp_path_factory):
    """A 2-layer random Llama saved and loaded back (tests/tiny_checkpoints.make_tiny_lm): (TextConfig, weights,
    tokenizer). Modules that define their own `tiny_lm` shadow this one."""
    from tests.tiny_checkpoints import make_tiny_lm

    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


@pytest.fixture
def record_steps():
    """`steps = record_steps(engine)` wraps the engine runner's `launch`; each launched step's chunks are appended
    to `steps` as (seq, start, end)."""

    def wrap(engine) -> list:
        steps, launch = [], engine.runner.launch

        def spy(batch, after=None):
            steps.append([(c.seq, c.start, c.end) for c in batch.chunks])
            return launch(batch, after)

        engine.runner.launch = spy
        return steps

    return wrap

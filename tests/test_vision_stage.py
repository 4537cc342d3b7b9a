"""The engine's vision stage and feature cache, with a fake image input side (no model): batching across
requests, the per-step cap, pinning (a message with more images than the cache holds), one bad image failing only
its own request, and the asyncio form of a request stream."""
import asyncio

import pytest
import torch

from engine.image_inputs import ImageInput, ImageInputs, Reading
from engine.paging.sequence import ImageSpan, Sequence
from engine.sampling_params import SamplingParams
from engine.vision_stage import FeatureCache, VisionStage

TOKENS = 3


class FakeImages(ImageInputs):
    """Each image's features are its number repeated; 'bad' pictures raise. Records every encode call."""

    max_batch = 4

    def __init__(self):
        self.calls: list[list[int]] = []

    def readings(self, size):
        return [Reading(TOKENS, "")]

    def _encode(self, images):
        self.calls.append([im.picture for im in images])
        if any(im.picture == "bad" for im in images):
            raise ValueError("cannot decode")
        return [torch.full((TOKENS, 2), float(im.picture)) for im in images]


def request(pictures) -> Sequence:
    spans = tuple(ImageSpan(i * TOKENS, TOKENS, f"d{p}", source=ImageInput(p, f"d{p}", Reading(TOKENS, "")))
                  for i, p in enumerate(pictures))
    return Sequence([0] * (TOKENS * len(pictures) + 1), SamplingParams(), spans)


def test_a_message_with_more_images_than_the_cache_holds():
    images = FakeImages()
    stage = VisionStage(images, max_images_per_step=8, cache_capacity=64)
    seq = request(list(range(65)))
    stage.admit(seq)
    steps = 0
    while not seq.images_ready:
        assert stage.run([seq]) == []
        steps += 1
    assert steps == 9  # 65 images at 8 per step
    assert max(len(c) for c in images.calls) <= FakeImages.max_batch
    assert [int(span.embeds[0, 0]) for span in seq.images] == list(range(65))
    assert len(stage.cache) == 65  # pinned: nothing evicted while the request lives
    stage.release(seq)
    assert len(stage.cache) == 64  # unpinned: back within capacity, least recently used gone


def test_batched_across_requests_and_cached():
    images = FakeImages()
    stage = VisionStage(images, max_images_per_step=8)
    a, b = request([1, 2]), request([2, 3])
    for s in (a, b):
        stage.admit(s)
    assert stage.run([a, b]) == []
    assert images.calls == [[1, 2, 3]]  # one batch, the shared image once
    c = request([3, 1])
    stage.admit(c)
    assert c.images_ready and images.calls == [[1, 2, 3]]  # a retry or follow-up encodes nothing


def test_one_bad_image_fails_only_its_request():
    stage = VisionStage(FakeImages(), max_images_per_step=8)
    good, bad = request([1, 2]), request(["bad", 4])
    for s in (good, bad):
        stage.admit(s)
    failed = stage.run([good, bad])
    assert [s for s, _ in failed] == [bad] and isinstance(failed[0][1], ValueError)
    assert good.images_ready


def test_cache_evicts_only_unpinned_entries():
    cache = FeatureCache(capacity=1)
    cache.pin("a")
    cache.put("a", torch.zeros(1))
    cache.put("b", torch.zeros(1))
    assert cache.get("a") is not None and cache.get("b") is None
    cache.unpin("a")
    cache.put("c", torch.ones(1))
    assert cache.get("a") is None and cache.get("c") is not None


def test_request_stream_async_iteration(tmp_path):
    from engine.config import EngineConfig
    from engine.llm_engine import LLMEngine
    from engine.serving import EngineServer
    from tests.tiny_checkpoints import make_tiny_lm

    cfg, weights, tok = make_tiny_lm(tmp_path)
    server = EngineServer(LLMEngine(cfg, weights, tok, EngineConfig(max_model_len=64)))
    params = SamplingParams(max_new_tokens=6, ignore_eos=True)
    try:
        sync = [d.text for d in server.submit([1, 5, 9], params)]

        async def collect():
            return [d async for d in server.submit([1, 5, 9], params)]

        deltas = asyncio.run(collect())
        assert [d.text for d in deltas] == sync and deltas[-1].finish_reason.value == "length"
    finally:
        server.close()
    assert not server._thread.is_alive()
    with pytest.raises(RuntimeError):
        server.submit([1], params)

"""Image encoding as a stage of the engine loop: batched across requests, capped per step, cached by content.

Requests arrive with decoded images and the reading each will get (`ImageInput`); their placeholder counts are
already in the prompt. Before a step is scheduled, `VisionStage.run` encodes the images of waiting requests, oldest
request first, at most `max_images` per step, in batches the family's encoder takes at once, and attaches the
feature rows to the request's image spans. Only then can the scheduler admit the request. Everything here runs on
the engine loop's thread: the vision tower, its CUDA graphs and the cache are never touched from anywhere else.

`FeatureCache` keeps features by (image digest, reading), so a retry, an undo or a follow-up about the same photo
encodes nothing. An entry that a live request holds is pinned and never evicted, however many images one message
carries; only unpinned entries beyond `capacity` go, least recently used first.
"""
from __future__ import annotations

import threading
from collections import OrderedDict

import torch

from engine.image_inputs import ImageInput, ImageInputs
from engine.paging.sequence import Sequence


class FeatureCache:
    def __init__(self, capacity: int = 64):
        self.capacity = capacity
        self._items: OrderedDict[tuple, torch.Tensor] = OrderedDict()
        self._pins: dict[tuple, int] = {}
        self._lock = threading.Lock()  # the loop is the only writer; the lock keeps readers (stats, tests) safe

    def __len__(self) -> int:
        return len(self._items)

    def get(self, key: tuple) -> torch.Tensor | None:
        with self._lock:
            if key in self._items:
                self._items.move_to_end(key)
            return self._items.get(key)

    def put(self, key: tuple, value: torch.Tensor) -> None:
        with self._lock:
            self._items[key] = value
            self._items.move_to_end(key)
            self._evict()

    def pin(self, key: tuple) -> None:
        with self._lock:
            self._pins[key] = self._pins.get(key, 0) + 1

    def unpin(self, key: tuple) -> None:
        with self._lock:
            left = self._pins.get(key, 0) - 1
            if left > 0:
                self._pins[key] = left
            else:
                self._pins.pop(key, None)
            self._evict()

    def pinned(self, key: tuple) -> bool:
        return key in self._pins

    def _evict(self) -> None:
        excess = len(self._items) - self.capacity
        for key in [k for k in self._items if k not in self._pins][:max(excess, 0)]:
            del self._items[key]


class VisionStage:
    def __init__(self, images: ImageInputs, max_images_per_step: int, cache_capacity: int = 64):
        self.images = images
        self.max_images = max_images_per_step
        self.cache = FeatureCache(cache_capacity)
        self._pinned: dict[int, list[tuple]] = {}  # seq_id -> the cache keys it pinned

    def admit(self, seq: Sequence) -> None:
        """A new request: pin what it will need, attach what is already cached."""
        keys = [span.source.cache_key for span in seq.images
                if span.embeds is None]  # features handed in directly (tests, benchmarks) are used as they are
        for key in keys:
            self.cache.pin(key)
        for span in seq.images:
            if span.embeds is None:
                span.embeds = self.cache.get(span.source.cache_key)
        self._pinned[seq.seq_id] = keys

    def release(self, seq: Sequence) -> None:
        """A request finished or aborted: its features may be evicted from now on."""
        for key in self._pinned.pop(seq.seq_id, []):
            self.cache.unpin(key)

    def run(self, waiting: list[Sequence]) -> list[tuple[Sequence, Exception]]:
        """Encode the missing images of `waiting`, oldest first, up to the per-step cap. Returns the requests whose
        images failed to encode, with the error; the caller finishes those, the others go on."""
        todo: list[tuple[Sequence, int]] = []
        for seq in waiting:
            for i, span in enumerate(seq.images):
                if span.embeds is None and len(todo) < self.max_images:
                    todo.append((seq, i))
            if len(todo) >= self.max_images:
                break
        failed: dict[int, tuple[Sequence, Exception]] = {}
        unique: dict[tuple, ImageInput] = {}
        for seq, i in todo:
            unique.setdefault(seq.images[i].source.cache_key, seq.images[i].source)
        jobs = [img for img in unique.values() if self.cache.get(img.cache_key) is None]
        step = max(1, self.images.max_batch)
        bad: dict[tuple, Exception] = {}
        for lo in range(0, len(jobs), step):
            self._encode(jobs[lo:lo + step], bad)
        for seq, i in todo:
            key = seq.images[i].source.cache_key
            if key in bad:
                failed.setdefault(seq.seq_id, (seq, bad[key]))
        for seq, i in todo:
            if seq.seq_id not in failed:
                seq.images[i].embeds = self.cache.get(seq.images[i].source.cache_key)
        return list(failed.values())

    def _encode(self, batch: list[ImageInput], bad: dict[tuple, Exception]) -> None:
        """Encode a batch into the cache; if it fails, each image alone, so one bad image fails only itself."""
        try:
            feats = self.images.encode(batch)
        except Exception as exc:  # noqa: BLE001 -- one bad image must not fail other requests
            if len(batch) == 1:
                bad[batch[0].cache_key] = exc
                return
            for img in batch:
                self._encode([img], bad)
            return
        for img, f in zip(batch, feats):
            self.cache.put(img.cache_key, f)

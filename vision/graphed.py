"""Replaying a vision forward (tower + projector) under a CUDA graph for a fixed input shape.

One image through CLIP-L/336 is ~250 small kernels; launched one by one from Python they take longer than the GPU
needs to run them. Captured once per input shape, a replay launches them all at once. Inputs are copied into a
static buffer; the output is cloned out of the graph's static buffer, since the next replay overwrites it. Shapes
that were not captured run eagerly.

`GraphedBatches` serves a varying number of independent rows (the tiles of anyres images): chunks of at most
`max_rows` rows, each chunk replaying the graph captured for its row count.
"""
from __future__ import annotations

import contextlib
import gc
from typing import Callable

import torch


@contextlib.contextmanager
def collector_paused():
    """Python's cyclic garbage collector held off for CUDA-graph captures. A dead engine's graphs (objects in a
    reference cycle) destroyed by the collector in the middle of a capture make an illegal CUDA call there, which
    invalidates the capture: so the dead cycles go first, then the collector waits until the capture ends. Nested
    uses leave it to the outermost."""
    if not gc.isenabled():
        yield
        return
    gc.collect()
    gc.disable()
    try:
        yield
    finally:
        gc.enable()


class GraphedForward:
    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, pool=None):
        self.fn = fn
        self.shape = tuple(shape)
        self.static_in = torch.zeros(self.shape, dtype=dtype, device=device)
        with torch.inference_mode():
            stream = torch.cuda.Stream(device)
            stream.wait_stream(torch.cuda.current_stream(device))
            with torch.cuda.stream(stream):  # warm-up off the default stream, as torch.cuda.graphs advises
                fn(self.static_in)
            torch.cuda.current_stream(device).wait_stream(stream)
            self.graph = torch.cuda.CUDAGraph()
            with collector_paused(), torch.cuda.graph(self.graph, pool=pool):
                self.static_out = fn(self.static_in)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape) != self.shape:
            return self.fn(x)
        self.static_in.copy_(x)
        self.graph.replay()
        return self.static_out.clone()


class GraphedBatches:
    """`fn` over (N, *row_shape) inputs whose rows do not interact (a vision tower over tiles), as CUDA-graph
    replays of at most `max_rows` rows each: one graph per row count 1..max_rows, all captured here, at load, so
    that serving never stops for a capture (which synchronizes the device).

    The graphs share one memory pool: they are replayed one after another on one stream, and each one's output is
    cloned out before the next runs, so their intermediates may share memory. Call from one thread only (the engine
    loop), as for `GraphedForward`.
    """

    def __init__(self, fn: Callable[[torch.Tensor], torch.Tensor], row_shape: tuple[int, ...], dtype: torch.dtype,
                 device: torch.device, max_rows: int = 8):
        if max_rows < 1:
            raise ValueError("max_rows must be at least 1")
        self.fn, self.row_shape, self.max_rows = fn, tuple(row_shape), max_rows
        pool = torch.cuda.graph_pool_handle()
        with collector_paused():
            self.graphs = {n: GraphedForward(fn, (n, *self.row_shape), dtype, device, pool)
                           for n in range(1, max_rows + 1)}

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if tuple(x.shape[1:]) != self.row_shape:
            return self.fn(x)
        outs = [self.graphs[chunk.shape[0]](chunk) for chunk in x.split(self.max_rows)]
        return outs[0] if len(outs) == 1 else torch.cat(outs)

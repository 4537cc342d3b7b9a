"""The CPU's `auto` policy: which dtype and which decode kernels, chosen by timing this machine once per process.

CPUs differ by 4-6x on the same question: where bf16 has matrix units (AMX, AVX512-BF16) a bf16 matmul of prefill
size beats fp32 several times over; elsewhere it runs several times slower (ANCHORS.md, "Speed"). So nothing here is
a constant: `cpu_policy` times a prefill-sized matmul (128 x 576 x 1536, SmolLM2's MLP) in bf16 and fp32, and a
decode-sized product (one row through 1536 x 3072, larger than a core's L2) in fp32, bf16 and PyTorch's int4 kernel,
taking the best of a few runs of each. On one thread: the question is what each core's units do, and a multi-threaded
timing on a shared machine measures the other processes instead (every kernel's barrier waits for a preempted
thread: on a busy 2-core box all five came out at ~7.6 ms with 2 threads, 0.3-1.6 ms with one). About 0.1 s, once.

  - `dtype`: bf16 when its prefill matmul is clearly faster (x1.3), else fp32.
  - `decode_weight_dtype`: with fp32, a bf16 copy of each weight for decode steps when its GEMV is faster.
  - `int8_act_decode`: whether kernels/cpu_qgemv.c (GGUF-grouped weights times int8 activations on AVX512-VNNI,
    llama.cpp's scheme; timed only where it was built) beats PyTorch's int4 kernel; GGUF blocks, and 4- and 8-bit
    weights put in their groups, then run on it (engine/quant/install.py; aten's int8 kernel is slower still).
  - `int4_decode`: whether the faster of those two beats that dense decode GEMV; the embedded default then keeps its
    GGUF's 4-bit blocks (engine/families/embedded.py).
"""
from __future__ import annotations

import functools
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from kernels.cpu_qgemv import pack_q8
from kernels.quant_weight import QuantWeight, pack_int4

MARGIN = 1.3  # bf16 activations cost some accuracy: taken only for a clear gain


@dataclass(frozen=True)
class CpuPolicy:
    dtype: str  # "bfloat16" or "float32"
    decode_weight_dtype: str | None  # "bfloat16" or None
    int4_decode: bool
    int8_act_decode: bool
    timings_ms: tuple[tuple[str, float], ...]  # what was measured, for logs and the bench

    def describe(self) -> str:
        return ", ".join(f"{name} {ms:.3f} ms" for name, ms in self.timings_ms)


def _best_ms(fn, reps: int = 5, inner: int = 3) -> float:
    fn()  # warm-up: oneDNN picks and caches its kernels on the first call
    best = float("inf")
    for _ in range(reps):
        t = time.perf_counter()
        for _ in range(inner):
            fn()
        best = min(best, (time.perf_counter() - t) / inner)
    return best * 1e3


@functools.cache
def cpu_policy() -> CpuPolicy:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return _measure()
    finally:
        torch.set_num_threads(threads)


def _measure() -> CpuPolicy:
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(128, 576, generator=gen)
    w = torch.randn(1536, 576, generator=gen)
    xb, wb = x.bfloat16(), w.bfloat16()
    with torch.inference_mode():
        prefill32 = _best_ms(lambda: F.linear(x, w))
        prefill16 = _best_ms(lambda: F.linear(xb, wb))
        v = torch.randn(1, 1536, generator=gen)
        big = torch.randn(3072, 1536, generator=gen) / 40
        big16 = big.bfloat16()
        decode32 = _best_ms(lambda: F.linear(v, big), inner=10)
        decode16 = _best_ms(lambda: F.linear(v.bfloat16(), big16), inner=10)
        q = torch.randint(0, 16, (3072, 1536), dtype=torch.int32, generator=gen)
        packed = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q, 1)
        sz = torch.rand(1536 // 32, 3072, 2, generator=gen).bfloat16()
        decode4 = _best_ms(lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(v.bfloat16(), packed, 32, sz), inner=10)
        q8 = pack_q8(QuantWeight(pack_int4(q.to(torch.uint8)), sz[..., 0].t().half(), sz[..., 1].t().half(), 4, 32))
        decode_q8 = float("inf") if q8 is None else _best_ms(lambda: q8.linear(v.bfloat16()), inner=10)
    bf16 = prefill16 * MARGIN < prefill32
    dense_decode = decode16 if bf16 or decode16 < decode32 else decode32
    timings = (("prefill fp32", prefill32), ("prefill bf16", prefill16), ("decode fp32", decode32),
               ("decode bf16", decode16), ("decode int4", decode4))
    return CpuPolicy(
        dtype="bfloat16" if bf16 else "float32",
        decode_weight_dtype="bfloat16" if not bf16 and decode16 < decode32 else None,
        int4_decode=min(decode4, decode_q8) < dense_decode,
        int8_act_decode=decode_q8 < decode4,
        timings_ms=timings + ((("decode q4 x int8 (C)", decode_q8),) if q8 is not None else ()),
    )

"""Tile sweep of the quantized projections on the GPU (Llama-2-7B shapes), to set kernels/quant_gemv.py's
GEMV_TILES and kernels/quant_matmul.py's GEMM_TILES / WIDE_N by measurement.

    python -m bench.quant_sweep [--json OUT.json]
    python -m bench.quant_sweep --attention    # kernels/paged_decode.py's DECODE_TILES instead

Per projection and scheme (w4a16 groups of 128, w8a16 per channel): the one-row GEMV per (BLOCK_N, BLOCK_K, warps,
stages) with the packed bytes it streams per second, beside gemv.py's bf16 GEMV; the fused GEMM per tile, K split and
register cap at M = 16, 32, 64 beside bf16 cuBLAS (addmm, the residual in its epilogue as ours has it). Every
config's output is checked against the twin (max error relative to the largest output, flagged past 2e-2).

--attention: decode attention on an int8 KV cache per (keys a step, warps, stages) beside the bf16 cache's, at
batch 1 / 8 / 32 and 512-8,192-token contexts (32 heads of 128, pages of 16 in shuffled order, caches past the L2),
each config's output checked against the twin.

Timing: `bench.gpu.graph_timed`, i.e. 200 calls in one CUDA graph, round robin over copies of the weight that
together outgrow the L2 cache (as a decode step's layers do). Timing one call with events, as this file did before
2026-12-01, measures mostly the host's launch (~50 us) for kernels of 5-60 us. A projection timed alone, back to
back with itself, still does not predict the decode step: a K-split GEMV 10% faster here ran the w4a16 batch-1 step
4% slower (bench/results/gpu_quant_h200.txt, 2026-12-02), so a tile or layout this picks is kept only after the
engine's own rows (`python -m bench.gpu_quant`) confirm it.
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.gpu import graph_timed
from bench.gpu_quant import SHAPES
from engine.quant.rtn import quantize_rtn
from kernels.gemv import linear_add_triton
from kernels.kv_int8 import quantize_kv
from kernels.paged_decode import DECODE_TILES, paged_decode_attention_torch, paged_decode_tiled
from kernels.quant_gemv import _quant_gemv
from kernels.quant_matmul import quant_matmul_triton
from kernels.quant_weight import quant_linear_torch

GEMV_CONFIGS = {4: [(bn, bk, w, s) for bn, bk in ((4, 2048), (8, 1024), (8, 2048), (8, 4096), (16, 1024), (16, 2048))
                    for w in (4, 8) for s in (1, 3)],
                8: [(bn, bk, w, s) for bn, bk in ((8, 512), (8, 1024), (8, 2048), (16, 512), (16, 1024))
                    for w in (4, 8) for s in (1, 3)]}
# kernels.quant_matmul.GemmTiles fields in order; maxnreg None: the compiler's register count
GEMM_CONFIGS = {M: sorted({(min(M, bm), bn, 128, w, s, split, False, None) for bm in (16, 32, 64) for bn in (16, 32, 64)
                           for w, s in ((4, 3), (4, 4)) for split in (1, 2, 4, 8)}
                          | {(min(M, bm), bn, 128, w, s, split, True, reg) for bm in (16, 32, 64)
                             for bn, w in ((64, 4), (128, 4), (128, 8)) for s in (3, 4) for split in (1, 2, 3, 4, 8)
                             for reg in (None, 96) if reg is None or bn == 64}, key=lambda t: (t[:7], t[7] or 0))
                for M in (16, 32, 64)}
L2_BUST_BYTES = 400e6  # several times an H200's 50 MB L2


def _err(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def _copies(nbytes: int) -> int:
    return max(2, int(L2_BUST_BYTES // nbytes) + 1)


def _best(rows: list[tuple], show: int = 4) -> str:
    rows.sort(key=lambda r: r[0])
    return "; ".join(f"{cfg} {us:.1f}{' (ERR %.1e)' % e if e > 2e-2 else ''}" for us, cfg, e in rows[:show])


def sweep() -> dict:
    out = {"gemv": [], "gemm": []}
    for (name, (N, K)), scheme in itertools.product(SHAPES.items(), ("w4a16", "w8a16")):
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5
        qw = quantize_rtn(w, scheme)
        qws = [qw] + [quantize_rtn(w, scheme) for _ in range(_copies(qw.nbytes()) - 1)]
        dense = [w] + [w.clone() for _ in range(_copies(w.numel() * 2) - 1)]
        x1 = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        res1 = torch.randn(1, N, dtype=torch.bfloat16, device="cuda")
        ref1 = quant_linear_torch(x1, qw) + res1
        bf16_us = graph_timed([lambda d=d: linear_add_triton(x1, d, None, res1) for d in dense])
        rows = []
        for tiles in GEMV_CONFIGS[qw.bits]:
            try:
                err = _err(_quant_gemv(x1, qw, None, res1, tiles=tiles), ref1)
                us = graph_timed([lambda q=q: _quant_gemv(x1, q, None, res1, tiles=tiles) for q in qws])
            except Exception as exc:  # a config the compiler refuses: noted, not fatal
                print(f"gemv {name} {scheme} {tiles}: {type(exc).__name__}", flush=True)
                continue
            rows.append((us, tiles, err))
            out["gemv"].append({"shape": name, "scheme": scheme, "tiles": tiles, "us": us, "err": err,
                                "GBps": qw.nbytes() / us / 1e3, "bf16_us": bf16_us})
        best_us = min(r[0] for r in rows)
        print(f"GEMV {name:<13}{scheme}: {_best(rows)}\n    best {qw.nbytes() / best_us / 1e3:.0f} GB/s; bf16 GEMV "
              f"{bf16_us:.1f} us ({N * K * 2 / bf16_us / 1e3:.0f} GB/s)", flush=True)
        for M in (16, 32, 64):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            res = torch.randn(M, N, dtype=torch.bfloat16, device="cuda")
            ref = quant_linear_torch(x, qw) + res
            cublas_us = graph_timed([lambda d=d: torch.addmm(res, x, d.t()) for d in dense])
            rows = []
            for tiles in GEMM_CONFIGS[M]:
                try:
                    err = _err(quant_matmul_triton(x, qw, None, res, tiles=tiles), ref)
                    us = graph_timed([lambda q=q: quant_matmul_triton(x, q, None, res, tiles=tiles) for q in qws])
                except Exception as exc:
                    print(f"gemm {name} {scheme} M={M} {tiles}: {type(exc).__name__}", flush=True)
                    continue
                rows.append((us, tiles, err))
                out["gemm"].append({"shape": name, "scheme": scheme, "M": M, "tiles": tiles, "us": us, "err": err,
                                    "bf16_cublas_us": cublas_us})
            best_us = min(r[0] for r in rows)
            print(f"GEMM {name:<13}{scheme} M={M:<3}: {_best(rows)}\n    best {cublas_us / best_us:.2f}x bf16 cuBLAS "
                  f"({cublas_us:.1f} us)", flush=True)
        del qws, dense
    return out


ATTENTION_CONFIGS = [(16, 1, 2), (32, 2, 2), (64, 2, 2), (64, 4, 2), (64, 4, 3), (128, 4, 2), (128, 8, 2)]


def _paged_caches(B: int, Hk: int, ctx: int, D: int, page: int, copies: int):
    """bf16 and int8 caches holding `copies` sets of B sequences of ctx keys, each set with its own shuffled pages."""
    per = -(-ctx // page)
    blocks = B * per * copies
    k = torch.randn(blocks, page, Hk, D, dtype=torch.bfloat16, device="cuda")
    v = torch.randn_like(k)
    (kq, ksz), (vq, vsz) = (quantize_kv(c.view(-1, Hk, D)) for c in (k, v))
    int8 = (kq.view(k.shape), vq.view(k.shape), ksz.view(blocks, page, Hk, 2), vsz.view(blocks, page, Hk, 2))
    order = torch.randperm(blocks, device="cuda").to(torch.int32)
    tables = [order[c * B * per:(c + 1) * B * per].view(B, per).contiguous() for c in range(copies)]
    return (k, v), int8, tables


def attention_sweep() -> dict:
    out = []
    D, H, page = 128, 32, 16
    for B, Hk, ctx in ((32, 32, 2048), (8, 32, 2048), (1, 32, 2048), (1, 32, 8192), (32, 32, 512), (32, 8, 2048)):
        kv_bytes = B * ctx * Hk * D * 2  # int8 K and V
        copies = max(1, int(L2_BUST_BYTES // kv_bytes) + 1)
        (k, v), (kq, vq, ksz, vsz), tables = _paged_caches(B, Hk, ctx, D, page, copies)
        lens = torch.full((B,), ctx, dtype=torch.int32, device="cuda")
        q = torch.randn(B, H, D, dtype=torch.bfloat16, device="cuda")
        scale = D ** -0.5
        ref = paged_decode_attention_torch(q, kq, vq, tables[0], lens, scale, ksz, vsz)
        bf16_us = graph_timed([lambda t=t: paged_decode_tiled(q, k, v, t, lens, scale) for t in tables],
                              calls=100)
        rows = []
        for tiles in ATTENTION_CONFIGS:
            try:
                err = _err(paged_decode_tiled(q, kq, vq, tables[0], lens, scale, ksz, vsz, tiles=tiles), ref)
                us = graph_timed([lambda t=t: paged_decode_tiled(q, kq, vq, t, lens, scale, ksz, vsz, tiles=tiles)
                                  for t in tables], calls=100)
            except Exception as exc:
                print(f"attention B={B} Hk={Hk} {tiles}: {type(exc).__name__}", flush=True)
                continue
            rows.append((us, tiles, err))
            out.append({"B": B, "Hk": Hk, "ctx": ctx, "tiles": tiles, "us": us, "err": err, "bf16_us": bf16_us})
        print(f"decode attention B={B} Hk={Hk} ctx={ctx}, int8: {_best(rows)}\n    bf16 cache {bf16_us:.1f} us "
              f"({DECODE_TILES['float']}), int8 best {min(r[0] for r in rows) / bf16_us:.2f}x its time", flush=True)
        del k, v, kq, vq, ksz, vsz
        torch.cuda.empty_cache()
    return {"attention": out}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    ap.add_argument("--attention", action="store_true", help="sweep the int8-KV decode attention's tiles instead")
    args = ap.parse_args()
    res = attention_sweep() if args.attention else sweep()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

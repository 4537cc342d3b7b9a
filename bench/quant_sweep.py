"""Tile sweep of the quantized projections on the GPU (Llama-2-7B shapes), to set kernels/quant_gemv.py's
GEMV_TILES and kernels/quant_matmul.py's GEMM_TILES / WIDE_N by measurement.

    python -m bench.quant_sweep [--json OUT.json]

Per projection and scheme (w4a16 groups of 128, w8a16 per channel): the one-row GEMV per (BLOCK_N, BLOCK_K, warps,
stages) with the packed bytes it streams per second, beside gemv.py's bf16 GEMV; the fused GEMM per tile and K split at
M = 16, 32, 64 beside bf16 cuBLAS (addmm, the residual in its epilogue as ours has it). Every config's output is checked
against the twin (max error relative to the largest output, flagged past 2e-2).

Timing: `bench.gpu.graph_timed`, i.e. 200 calls in one CUDA graph, round robin over copies of the weight that
together outgrow the L2 cache (as a decode step's layers do). Timing one call with events, as this file did before
2026-12-01, measures mostly the host's launch (~50 us) for kernels of 5-60 us.
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
from kernels.quant_gemv import _PRO_NONE, _quant_gemv
from kernels.quant_matmul import quant_matmul_triton
from kernels.quant_weight import quant_linear_torch

GEMV_CONFIGS = {4: [(bn, bk, w, s) for bn, bk in ((4, 2048), (8, 1024), (8, 2048), (16, 1024), (16, 2048))
                    for w in (4, 8) for s in (1, 3)],
                8: [(bn, bk, w, s) for bn, bk in ((8, 512), (8, 1024), (16, 512), (16, 1024))
                    for w in (4, 8) for s in (1, 3)]}
GEMM_CONFIGS = {M: sorted({(min(M, bm), bn, 128, w, s, split) for bm in (16, 32, 64) for bn in (16, 32, 64)
                           for w, s in ((4, 3), (4, 4)) for split in (1, 2, 4, 8)}) for M in (16, 32, 64)}
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
                err = _err(_quant_gemv(x1, qw, None, res1, _PRO_NONE, tiles=tiles), ref1)
                us = graph_timed([lambda q=q: _quant_gemv(x1, q, None, res1, _PRO_NONE, tiles=tiles) for q in qws])
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


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    res = sweep()
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()

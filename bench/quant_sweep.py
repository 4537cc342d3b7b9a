"""Tile sweep of the quantized projections on the GPU (Llama-2-7B shapes), to set kernels/quant_gemv.py's
GEMV_TILES and kernels/quant_matmul.py's GEMM_TILES / DEQUANT_CUBLAS_ROWS by measurement.

    python -m bench.quant_sweep [--json OUT.json]

Per projection and scheme (w4a16 groups of 128, w8a16 per channel): the one-row GEMV per (BLOCK_N, BLOCK_K, warps)
with its GB/s and the bf16 GEMV beside it; the fused GEMM per tile at M = 16, 32, 64, 128 against dequantize +
cuBLAS and bf16 cuBLAS. Every config's output is checked against the twin (max relative error printed).
"""
from __future__ import annotations

import argparse
import itertools
import json

import torch

from bench.gpu import timed
from bench.gpu_quant import SHAPES
from engine.quant.rtn import quantize_rtn
from kernels.gemv import linear_add_triton
from kernels.quant_gemv import _PRO_NONE, _quant_gemv, group_mode
from kernels.quant_matmul import dequantize_triton, quant_matmul_triton
from kernels.quant_weight import quant_linear_torch

GEMV_CONFIGS = list(itertools.product((8, 16, 32, 64), (64, 128, 256, 512, 1024), (4, 8)))
GEMM_CONFIGS = [(bm, bn, bk, w, s) for bm in (16, 32, 64) for bn in (64, 128) for bk in (64, 128)
                for w, s in ((4, 3), (8, 4))]


def _err(y, ref) -> float:
    return ((y.float() - ref.float()).abs().max() / ref.float().abs().max()).item()


def sweep() -> dict:
    out = {"gemv": [], "gemm": []}
    for (name, (N, K)), scheme in itertools.product(SHAPES.items(), ("w4a16", "w8a16")):
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5
        qw = quantize_rtn(w, scheme)
        x1 = torch.randn(1, K, dtype=torch.bfloat16, device="cuda")
        res1 = torch.zeros(1, N, dtype=torch.bfloat16, device="cuda")
        ref1 = quant_linear_torch(x1, qw)
        dense_us = 1e3 * timed(lambda: linear_add_triton(x1, w, None, res1), 50)
        best = None
        configs = [(bn, bk, warps, group_mode(qw, bk)) for bn, bk, warps in GEMV_CONFIGS]
        for bn, bk, warps, mode in configs:
            try:
                y = _quant_gemv(x1, qw, None, res1, _PRO_NONE, tiles=(bn, bk, warps, mode))
                us = 1e3 * timed(lambda: _quant_gemv(x1, qw, None, res1, _PRO_NONE, tiles=(bn, bk, warps, mode)), 50)
            except Exception as exc:  # a config the compiler refuses: noted, not fatal
                print(f"gemv {name} {scheme} {(bn, bk, warps)}: {type(exc).__name__}", flush=True)
                continue
            row = {"shape": name, "scheme": scheme, "tiles": (bn, bk, warps, mode), "us": us,
                   "GBps": qw.nbytes() / (us * 1e-6) / 1e9, "dense_us": dense_us, "err": _err(y, ref1)}
            out["gemv"].append(row)
            best = row if best is None or us < best["us"] else best
        print(f"GEMV {name:<13}{scheme}: best {best['tiles']} {best['us']:.1f} us ({best['GBps']:.0f} GB/s, err "
              f"{best['err']:.1e}); bf16 {dense_us:.1f} us ({N * K * 2 / (dense_us * 1e-6) / 1e9:.0f} GB/s)",
              flush=True)
        for M in (16, 32, 64):
            x = torch.randn(M, K, dtype=torch.bfloat16, device="cuda")
            ref = quant_linear_torch(x, qw)
            cublas = 1e3 * timed(lambda: torch.nn.functional.linear(x, w), 20)
            deq = 1e3 * timed(lambda: torch.nn.functional.linear(x, dequantize_triton(qw, x.dtype)), 20)
            best = None
            for tiles in GEMM_CONFIGS:
                if tiles[0] < min(M, 64) // 2 or tiles[0] > max(M, 16):
                    continue
                try:
                    y = quant_matmul_triton(x, qw, tiles=tiles)
                    us = 1e3 * timed(lambda: quant_matmul_triton(x, qw, tiles=tiles), 20)
                except Exception as exc:
                    print(f"gemm {name} {scheme} M={M} {tiles}: {type(exc).__name__}", flush=True)
                    continue
                row = {"shape": name, "scheme": scheme, "M": M, "tiles": tiles, "us": us, "bf16_cublas_us": cublas,
                       "dequant_cublas_us": deq, "err": _err(y, ref)}
                out["gemm"].append(row)
                best = row if best is None or us < best["us"] else best
            print(f"GEMM {name:<13}{scheme} M={M:<4}: best {best['tiles']} {best['us']:.1f} us (err {best['err']:.1e})"
                  f"; dequant+cuBLAS {deq:.1f}; bf16 cuBLAS {cublas:.1f}", flush=True)
        del w, qw
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

"""GPU benchmark of weight-only quantization and the int8 KV cache on a Llama-2-7B-shaped language model.

    python -m bench.gpu_quant [--modes bf16 w4a16 w8a16] [--json OUT.json]

Random weights at Llama-2-7B's shapes (bench/gpu.py's `llama2_7b`), made on the GPU; w4a16 / w8a16 are round-to-
nearest of them at load (engine/quant/rtn.py: int4 groups of 128 asymmetric; int8 per channel; LM head int8).
Measured, per mode, through the engine (CUDA graphs on, as served):
  - decode tokens/s at batch 1 (64-token prompt, 256 new), 16 and 32 (128 new each), and TTFT of a 640-token prompt;
  - with kv_cache_dtype int8: the same decode rows at a 2,048-token context, and how many KV blocks fit;
  - kernels alone (graph-timed over weight copies that outgrow the L2): the one-row GEMV (quantized vs gemv.py's
    bf16) and the many-row projection (32 rows: the fused dequantize-GEMM; 640 and 2048: dequantize + cuBLAS) vs
    bf16 cuBLAS, on the 7B projections, with the bytes each GEMV reads per second.
Peak memory per mode. Printed as tables; --json writes them too.
"""
from __future__ import annotations

import argparse
import gc
import json
import time

import torch

from bench.gpu import copy_bandwidth, graph_timed, llama2_7b, timed
from engine.config import EngineConfig, TextConfig
from engine.llm_engine import LLMEngine
from engine.models import MODELS
from engine.quant.rtn import quantize_rtn
from engine.sampling_params import SamplingParams
from kernels.gemv import linear_add_triton

SHAPES = {"qkv_proj": (12288, 4096), "o_proj": (4096, 4096), "gate_up_proj": (22016, 4096), "down_proj": (4096, 11008)}


def random_weights(hf_cfg) -> dict[str, torch.Tensor]:
    """HF-named bf16 tensors on the GPU, scaled like a trained model's (std 1/sqrt(fan_in))."""
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, I, V = hf_cfg.hidden_size, hf_cfg.intermediate_size, hf_cfg.vocab_size
    kv = hf_cfg.num_key_value_heads * H // hf_cfg.num_attention_heads
    shapes = {"model.embed_tokens.weight": (V, H), "model.norm.weight": (H,), "lm_head.weight": (V, H)}
    for i in range(hf_cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        shapes.update({p + "self_attn.q_proj.weight": (H, H), p + "self_attn.k_proj.weight": (kv, H),
                       p + "self_attn.v_proj.weight": (kv, H), p + "self_attn.o_proj.weight": (H, H),
                       p + "mlp.gate_proj.weight": (I, H), p + "mlp.up_proj.weight": (I, H),
                       p + "mlp.down_proj.weight": (H, I), p + "input_layernorm.weight": (H,),
                       p + "post_attention_layernorm.weight": (H,)})
    out = {}
    for key, shape in shapes.items():
        if len(shape) == 1:
            out[key] = torch.ones(shape, dtype=torch.bfloat16, device="cuda")
        else:
            out[key] = torch.randn(shape, generator=gen, dtype=torch.bfloat16, device="cuda") / shape[1] ** 0.5
    return out


def decode_rate(engine: LLMEngine, batch: int, prompt_len: int, new: int) -> float:
    prompts = [[(7 * i + 3 * b) % 31000 + 1 for i in range(prompt_len)] for b in range(batch)]
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    seqs = [engine.add_request(p, params) for p in prompts]
    while any(s.num_output_tokens == 0 for s in seqs):  # prefill (and the first token) out of the timing
        engine.step()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    while engine.has_work():
        engine.step()
    torch.cuda.synchronize()
    return sum(s.num_output_tokens - 1 for s in seqs) / (time.perf_counter() - t0)


def ttft_ms(engine: LLMEngine, prompt_len: int) -> float:
    prompt = [(5 * i + 1) % 31000 + 1 for i in range(prompt_len)]

    def one():
        engine.add_request(prompt, SamplingParams(max_new_tokens=1, ignore_eos=True))
        while engine.has_work():
            engine.step()
    return timed(one, 5)


def engine_rows(hf_cfg, weights: dict, mode: str, kv: str) -> dict:
    text = TextConfig.from_dict(hf_cfg.to_dict(), MODELS["llama"][1])
    cfg = EngineConfig(device="cuda", dtype="bfloat16", quantize=None if mode == "bf16" else mode,
                       kv_cache_dtype=kv, enable_prefix_caching=False, max_model_len=4096, max_num_seqs=256)  # no cap on blocks
    torch.cuda.reset_peak_memory_stats()
    engine = LLMEngine(text, weights, None, cfg)
    res = {"kv_blocks": engine.blocks.num_blocks, "weights_gb": torch.cuda.memory_allocated() / 2**30}  # + KV pool
    if kv == "auto":
        res["ttft_640_ms"] = ttft_ms(engine, 640)
        res["b1_tok_s"] = decode_rate(engine, 1, 64, 256)
        res["b16_tok_s"] = decode_rate(engine, 16, 64, 128)
        res["b32_tok_s"] = decode_rate(engine, 32, 64, 128)
    res["b1_ctx2048_tok_s"] = decode_rate(engine, 1, 2048, 128)
    res["b32_ctx2048_tok_s"] = decode_rate(engine, 32, 2048, 64)
    res["peak_gb"] = torch.cuda.max_memory_allocated() / 2**30
    del engine
    gc.collect()
    torch.cuda.empty_cache()
    return res


def kernel_rows(bw: float) -> list[dict]:
    """Each projection alone, graph-timed over copies of its weight that outgrow the L2 (bench.gpu.graph_timed):
    the one-row GEMV and the many-row GEMM (plus residual) for bf16 and both schemes."""
    rows = []
    for name, (N, K) in SHAPES.items():
        w = torch.randn(N, K, dtype=torch.bfloat16, device="cuda") / K ** 0.5
        dense = [w] + [w.clone() for _ in range(int(400e6 // (N * K * 2)) + 1)]
        x1, res1 = torch.randn(1, K, dtype=torch.bfloat16, device="cuda"), torch.randn(1, N, dtype=torch.bfloat16,
                                                                                       device="cuda")
        row = {"shape": name, "dense_gemv_us": graph_timed([lambda d=d: linear_add_triton(x1, d, None, res1)
                                                             for d in dense])}
        xs = {M: (torch.randn(M, K, dtype=torch.bfloat16, device="cuda"),
                  torch.randn(M, N, dtype=torch.bfloat16, device="cuda")) for M in (32, 640, 2048)}
        for scheme in ("w4a16", "w8a16"):
            qw = quantize_rtn(w, scheme)
            qws = [qw] + [quantize_rtn(w, scheme) for _ in range(int(400e6 // qw.nbytes()) + 1)]
            row[f"{scheme}_gemv_us"] = graph_timed([lambda q=q: linear_add_triton(x1, q, None, res1) for q in qws])
            row[f"{scheme}_gemv_GBps"] = qw.nbytes() / row[f"{scheme}_gemv_us"] / 1e3
            for M, (x, res) in xs.items():
                row[f"{scheme}_gemm{M}_us"] = graph_timed([lambda q=q: linear_add_triton(x, q, None, res)
                                                           for q in qws], calls=40)
            del qws
        for M, (x, res) in xs.items():
            row[f"dense_gemm{M}_cublas_us"] = graph_timed([lambda d=d: torch.addmm(res, x, d.t()) for d in dense],
                                                          calls=40)
        row["dense_gemv_GBps"] = N * K * 2 / row["dense_gemv_us"] / 1e3
        rows.append(row)
        del w, dense
    return rows


def report(engines: dict, kernels: list[dict], bw: float) -> None:
    print(f"\nLlama-2-7B shapes, bf16 activations; copy bandwidth {bw / 1e12:.2f} TB/s")
    print(f"{'mode':<16}{'KV':<6}{'loaded GB':>11}{'peak GB':>9}{'KV blocks':>10}{'TTFT640 ms':>11}{'b1 tok/s':>10}"
          f"{'b16 tok/s':>10}{'b32 tok/s':>10}{'b1@2k':>8}{'b32@2k':>9}")
    for (mode, kv), r in engines.items():
        print(f"{mode:<16}{kv:<6}{r['weights_gb']:>11.1f}{r['peak_gb']:>9.1f}{r['kv_blocks']:>10}"
              f"{r.get('ttft_640_ms', float('nan')):>11.1f}{r.get('b1_tok_s', float('nan')):>10.1f}"
              f"{r.get('b16_tok_s', float('nan')):>10.1f}{r.get('b32_tok_s', float('nan')):>10.1f}"
              f"{r['b1_ctx2048_tok_s']:>8.1f}{r['b32_ctx2048_tok_s']:>9.1f}")
    print(f"\n{'projection':<14}{'GEMV us: bf16':>14}{'w4a16':>8}{'w8a16':>8}{'GB/s: bf16':>12}{'w4':>7}{'w8':>7}"
          f"   many rows + residual, us (M=32/640/2048): bf16 cuBLAS | w4a16 | w8a16")
    for r in kernels:
        gemm = " | ".join("/".join(f"{r[f'{p}_gemm{M}{k}_us']:.0f}" for M in (32, 640, 2048)) for p, k in
                          (("dense", "_cublas"), ("w4a16", ""), ("w8a16", "")))
        print(f"{r['shape']:<14}{r['dense_gemv_us']:>14.1f}{r['w4a16_gemv_us']:>8.1f}{r['w8a16_gemv_us']:>8.1f}"
              f"{r['dense_gemv_GBps']:>12.0f}{r['w4a16_gemv_GBps']:>7.0f}{r['w8a16_gemv_GBps']:>7.0f}   {gemm}")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--modes", nargs="+", default=["bf16", "w4a16", "w8a16"])
    ap.add_argument("--no-kernels", action="store_true")
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    bw = copy_bandwidth()
    hf_cfg = llama2_7b()
    kernels = [] if args.no_kernels else kernel_rows(bw)
    weights = random_weights(hf_cfg)
    engines = {}
    for mode in args.modes:
        for kv in ("auto", "int8"):
            print(f"... {mode} kv {kv}", flush=True)
            engines[(mode, kv)] = engine_rows(hf_cfg, weights, mode, kv)
    report(engines, kernels, bw)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"bandwidth": bw, "engines": {f"{m}/{k}": r for (m, k), r in engines.items()},
                       "kernels": kernels}, f, indent=1)


if __name__ == "__main__":
    main()

"""CPU benchmark: our engine vs transformers `generate` on the embedded default's language model, same run.

    python -m bench.cpu_lm [--prompt-tokens 128 512] [--new-tokens 64] [--threads N]

Prints time to first token and decode tokens/s for our engine (pure fp32, and the CPU default: fp32 prefill with
bf16 weight copies for decode) and for transformers in fp32 and bf16, with ratios against transformers' best, and
the memory-bandwidth limit on decode (weights read once per token, bandwidth measured here).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.checkpoints.reader import Checkpoint
from engine.config import EngineConfig, TextConfig
from engine.checkpoints.smollm_gguf import default_lm_checkpoint
from engine.llm_engine import DTYPES, LLMEngine
from engine.models import MODELS
from engine.sampling_params import SamplingParams


def read_bandwidth() -> float:
    """Bytes/s of streaming a 256 MB tensor once (a sum: reads only, as a decode step's weights are read)."""
    src = torch.randn(256 * 2**20 // 4)
    src.sum()
    times = []
    for _ in range(5):
        t = time.perf_counter()
        src.sum()
        times.append(time.perf_counter() - t)
    return src.numel() * 4 / min(times)


def ours(engine: LLMEngine, prompt: list[int], new: int, repeats: int):
    params = SamplingParams(max_new_tokens=new, ignore_eos=True)
    ttfts, rates = [], []
    for _ in range(repeats):
        seq = engine.add_request(prompt, params)
        t0 = time.perf_counter()
        engine.step()
        t1 = time.perf_counter()
        while engine.has_work():
            engine.step()
        t2 = time.perf_counter()
        ttfts.append(t1 - t0)
        rates.append((seq.num_output_tokens - 1) / (t2 - t1))
    return statistics.median(ttfts), statistics.median(rates)


def theirs(model, prompt: list[int], new: int, repeats: int):
    ids = torch.tensor([prompt])
    ttfts, rates = [], []
    for _ in range(repeats):
        with torch.inference_mode():
            t0 = time.perf_counter()
            model.generate(ids, max_new_tokens=1, do_sample=False)
            t1 = time.perf_counter()
            model.generate(ids, max_new_tokens=new, do_sample=False, min_new_tokens=new)
            t2 = time.perf_counter()
        ttfts.append(t1 - t0)
        rates.append((new - 1) / ((t2 - t1) - (t1 - t0)))
    return statistics.median(ttfts), statistics.median(rates)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, nargs="+", default=[128, 512])
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path = default_lm_checkpoint()
    ck = Checkpoint.load(path)
    cfg = TextConfig.from_dict(ck.config, MODELS[ck.config["model_type"]][1])
    tok = AutoTokenizer.from_pretrained(path)
    ours_variants = {
        "ours fp32": EngineConfig(enable_prefix_caching=False),
        "ours fp32 + bf16 decode weights (default)": EngineConfig(enable_prefix_caching=False,
                                                                  decode_weight_dtype="bfloat16"),
    }
    engines = {name: LLMEngine(cfg, ck.parts["text"], tok, c) for name, c in ours_variants.items()}
    hfs = {f"transformers {d}": AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[d]).eval()
           for d in ("float32", "bfloat16")}
    fp32_bytes = sum(p.numel() * 4 for p in engines["ours fp32"].model.parameters())
    bw = read_bandwidth()
    print(f"SmolLM2-135M on {torch.get_num_threads()} threads; read bandwidth {bw / 1e9:.1f} GB/s -> decode limit "
          f"{bw / fp32_bytes:.0f} tokens/s with fp32 weights, {2 * bw / fp32_bytes:.0f} with bf16 weights")
    for n in args.prompt_tokens:
        prompt = [(7 * i + 3) % (cfg.vocab_size - 1) + 1 for i in range(n)]
        rows = {}
        for name, engine in engines.items():
            ours(engine, prompt, 4, 1)  # warm-up
            rows[name] = ours(engine, prompt, args.new_tokens, args.repeats)
        for name, model in hfs.items():
            theirs(model, prompt, 4, 1)
            rows[name] = theirs(model, prompt, args.new_tokens, args.repeats)
        best_ttft = min(v[0] for k, v in rows.items() if k.startswith("transformers"))
        best_rate = max(v[1] for k, v in rows.items() if k.startswith("transformers"))
        print(f"\nprompt {n} tokens, {args.new_tokens} new       TTFT ms  x best HF | decode tok/s  x best HF")
        for name, (ttft, rate) in rows.items():
            print(f"  {name:<42}{ttft * 1000:>7.0f} {best_ttft / ttft:>9.2f} | {rate:>12.1f} {rate / best_rate:>9.2f}")


if __name__ == "__main__":
    main()

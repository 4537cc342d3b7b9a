"""CPU benchmark: our engine vs transformers `generate` on the embedded default's language model, same run.

    python bench/cpu_lm.py [--prompt-tokens 128 512] [--new-tokens 64] [--dtype float32] [--threads N]

Prints time to first token and decode tokens/s for both, the ratios, and decode speed as a share of the
memory-bandwidth limit (weights read once per token; bandwidth measured here with a large copy).
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from engine.checkpoint import Checkpoint
from engine.config import EngineConfig, TextConfig
from engine.default_lm import default_lm_checkpoint
from engine.llm_engine import DTYPES, LLMEngine
from engine.models import MODELS
from engine.sampling_params import SamplingParams


def copy_bandwidth() -> float:
    """Bytes/s of a large tensor copy (read + write counted)."""
    src = torch.randn(64 * 2**20 // 4)
    dst = torch.empty_like(src)
    times = []
    for _ in range(5):
        t = time.perf_counter()
        dst.copy_(src)
        times.append(time.perf_counter() - t)
    return 2 * src.numel() * 4 / min(times)


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
        engine.blocks.__init__(engine.blocks.num_blocks, engine.blocks.block_size, False)  # no prefix reuse
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
    ap.add_argument("--dtype", default="float32", choices=list(DTYPES))
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
    engine = LLMEngine(cfg, ck.parts["text"], tok, EngineConfig(dtype=args.dtype, enable_prefix_caching=False))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[args.dtype]).eval()
    weight_bytes = sum(p.numel() * p.element_size() for p in engine.model.parameters())
    bw = copy_bandwidth()
    limit = bw / weight_bytes
    print(f"SmolLM2-135M {args.dtype}, {torch.get_num_threads()} threads; weights {weight_bytes / 1e6:.0f} MB; "
          f"copy bandwidth {bw / 1e9:.1f} GB/s -> decode limit {limit:.0f} tokens/s")
    print(f"{'prompt':>6} | {'TTFT ours':>9} {'TTFT HF':>8} {'ratio':>5} | {'tok/s ours':>10} {'tok/s HF':>8} "
          f"{'ratio':>5} {'% limit':>7}")
    for n in args.prompt_tokens:
        prompt = [(7 * i + 3) % (cfg.vocab_size - 1) + 1 for i in range(n)]
        ours(engine, prompt, 4, 1)  # warm-up
        theirs(hf, prompt, 4, 1)
        t_o, r_o = ours(engine, prompt, args.new_tokens, args.repeats)
        t_h, r_h = theirs(hf, prompt, args.new_tokens, args.repeats)
        print(f"{n:>6} | {t_o * 1000:>7.0f}ms {t_h * 1000:>6.0f}ms {t_h / t_o:>5.2f} | {r_o:>10.1f} {r_h:>8.1f} "
              f"{r_o / r_h:>5.2f} {100 * r_o / limit:>6.0f}%")


if __name__ == "__main__":
    main()

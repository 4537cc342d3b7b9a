"""Long prompts: time to first token and peak memory against prompt length, ours and transformers side by side.

    python -m bench.long_prompt --model default --device cpu [--lengths 1024 2048 4096 8192] [--threads 2]
    python -m bench.long_prompt --device cuda --arch llama-2-7b qwen2-0.5b [--lengths 1024 4096 16384 32768]

One request of N random prompt tokens and one new token, greedy. Ours: the engine's chunked prefill (the device's
per-step budget unless --budget: 128 tokens on a CPU, 1,024 on CUDA) attending over the paged KV cache, no prefix
cache; transformers: `generate(max_new_tokens=1)` with sdpa attention, on the same weights and dtype. A length past
the model's context is cut to context - 1 (the new token needs the last slot).

TTFT: the wall time of that call, best of --repeats after a warm-up. Peak memory, what the call adds:
- CUDA: torch.cuda.max_memory_allocated during the call minus what was allocated before it. Our KV pool is allocated
  up front for the longest length, so ours adds the KV the prompt fills (N x bytes per token); transformers' cache
  grows inside the call and is counted there.
- CPU: the process's peak resident set (VmHWM, reset through /proc/self/clear_refs) minus its resident set before
  the call. Each (side, length) runs in a fresh process, so no allocator cache left by an earlier run hides memory;
  KV pages count as they are written, on both sides.

--arch: random-weight language models of the GPU benchmark's architectures (bench/gpu.py's config builders), their
max_position_embeddings raised to hold the longest prompt. --model default: the embedded SmolLM2-135M-Instruct,
context 8,192.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import multiprocessing
import time
from pathlib import Path

import torch

from engine.config import DEFAULT_STEP_TOKENS

# --arch name -> the transformers config builder in bench/gpu.py (the language models of its LLaVA rows)
ARCHS = {"llama-2-7b": "llama2_7b", "qwen2-0.5b": "qwen2_05b"}
WARMUP_TOKENS = 256


def load(model: str, device: str, dtype: torch.dtype, longest: int, budget: int | None):
    """(transformers model, our engine) on the same weights; the engine's KV pool holds `longest` + 1 tokens."""
    from transformers import AutoModelForCausalLM

    from engine.checkpoints.reader import split_parts
    from engine.config import EngineConfig, TextConfig
    from engine.families.common import TEXT_PREFIXES
    from engine.llm_engine import LLMEngine
    from engine.models import MODELS

    if model == "default":
        from engine.checkpoints.smollm_gguf import default_lm_checkpoint

        hf = AutoModelForCausalLM.from_pretrained(default_lm_checkpoint(), dtype=dtype, attn_implementation="sdpa")
    else:
        import bench.gpu

        config = getattr(bench.gpu, ARCHS[model])()
        config.max_position_embeddings = max(config.max_position_embeddings, longest + 64)
        with torch.device(device):
            hf = AutoModelForCausalLM.from_config(config, dtype=dtype, attn_implementation="sdpa")
    hf = hf.to(device).eval()
    text = hf.config.to_dict()
    cfg = TextConfig.from_dict(text, MODELS[text["model_type"]][1])
    weights = split_parts(hf.state_dict(), TEXT_PREFIXES)["text"]
    if cfg.tie_word_embeddings:  # as a checkpoint stores it: the head is the embedding table, not a tensor of its own
        weights.pop("lm_head.weight", None)
    engine = LLMEngine(cfg, weights, None, EngineConfig(
        device=device, dtype=str(dtype).removeprefix("torch."), max_num_seqs=4, max_num_batched_tokens=budget,
        num_kv_blocks=longest // 16 + 2, enable_prefix_caching=False))
    return hf, engine


def max_prompt(model: str) -> int | None:
    """The longest prompt that runs: the default's context less one (its config.json); --arch models are raised to
    fit whatever is asked."""
    if model != "default":
        return None
    from engine.checkpoints.smollm_gguf import default_lm_checkpoint

    return json.loads((default_lm_checkpoint() / "config.json").read_text())["max_position_embeddings"] - 1


def ours_call(engine, ids: list[int]):
    from engine.sampling_params import SamplingParams

    return lambda: engine.generate([ids], SamplingParams(max_new_tokens=1, ignore_eos=True))


def hf_call(hf, ids: list[int]):
    x = torch.tensor([ids], device=hf.device)
    mask = torch.ones_like(x)
    return lambda: hf.generate(x, attention_mask=mask, max_new_tokens=1, do_sample=False, pad_token_id=0)


def random_ids(n: int, vocab: int, seed: int = 0) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(100, vocab - 100, (n,), generator=g).tolist()


def _proc_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def cpu_measure(side: str, model: str, length: int, longest: int, dtype: str, threads: int, budget) -> dict:
    """In a fresh process: load, warm up, then one call; TTFT and the peak-RSS growth during it (MB)."""
    torch.set_num_threads(threads)
    hf, engine = load(model, "cpu", getattr(torch, dtype), longest, budget)
    vocab = hf.config.vocab_size
    with torch.inference_mode():
        warm = random_ids(WARMUP_TOKENS, vocab, 1)
        (ours_call(engine, warm) if side == "ours" else hf_call(hf, warm))()
        ids = random_ids(length, vocab)
        call = ours_call(engine, ids) if side == "ours" else hf_call(hf, ids)
        before = _proc_kb("VmRSS")
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := VmRSS from here
        t0 = time.perf_counter()
        call()
        ttft = time.perf_counter() - t0
    return {"ttft": ttft, "mb": (_proc_kb("VmHWM") - before) / 1024}


def cpu_rows(args, model: str, lengths: list[int]) -> dict:
    """(side, length) -> measurement, each in a process of its own (spawned, one at a time)."""
    rows = {}
    spawn = multiprocessing.get_context("spawn")
    for length in lengths:
        for side in ("ours", "transformers"):
            with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as pool:
                rows[side, length] = pool.submit(cpu_measure, side, model, length, max(lengths), args.dtype,
                                                 args.threads, args.budget).result()
            print(f"  {side:<13}{length:>7} tokens: {rows[side, length]}", flush=True)
    return rows


def cuda_measure(call, repeats: int, extra_bytes: int = 0) -> dict:
    torch.cuda.synchronize()
    times = []
    for _ in range(repeats):
        torch.cuda.reset_peak_memory_stats()
        before = torch.cuda.memory_allocated()
        t0 = time.perf_counter()
        with torch.inference_mode():
            call()
        torch.cuda.synchronize()
        times.append(time.perf_counter() - t0)
        peak = torch.cuda.max_memory_allocated() - before
    return {"ttft": min(times), "mb": (peak + extra_bytes) / 2**20}


def cuda_rows(args, model: str, lengths: list[int]) -> dict:
    """Both sides in this process on one GPU, the same weights; one warm-up call each at the shortest length."""
    hf, engine = load(model, args.device, getattr(torch, args.dtype), max(lengths), args.budget)
    vocab = hf.config.vocab_size
    kv_per_token = engine.model.config.kv_bytes_per_token * torch.empty((), dtype=engine.dtype).element_size()
    rows = {}
    for side, make in (("ours", lambda ids: ours_call(engine, ids)), ("transformers", lambda ids: hf_call(hf, ids))):
        cuda_measure(make(random_ids(lengths[0], vocab, 1)), 1)
        for length in lengths:
            kv = kv_per_token * length if side == "ours" else 0
            rows[side, length] = cuda_measure(make(random_ids(length, vocab)), args.repeats, kv)
            print(f"  {side:<13}{length:>7} tokens: {rows[side, length]}", flush=True)
    del hf, engine
    torch.cuda.empty_cache()
    return rows


def table(title: str, rows: dict, lengths: list[int]) -> list[str]:
    header = f"{'prompt':>8}{'TTFT ours':>12}{'TTFT HF':>10}{'HF/ours':>9}{'peak MB ours':>14}{'peak MB HF':>12}"
    lines = [title, header]
    for n in lengths:
        ours, hf = rows["ours", n], rows["transformers", n]
        lines.append(f"{n:>8}{ours['ttft']:>11.2f}s{hf['ttft']:>9.2f}s{hf['ttft'] / ours['ttft']:>8.2f}x"
                     f"{ours['mb']:>14.0f}{hf['mb']:>12.0f}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--model", default=None, help="'default': the embedded model (the CPU run)")
    ap.add_argument("--arch", nargs="+", default=None, choices=sorted(ARCHS), help="random-weight GPU architectures")
    ap.add_argument("--lengths", nargs="+", type=int, default=None)
    ap.add_argument("--dtype", default=None, help="float32 (CPU default) or bfloat16 (CUDA default)")
    ap.add_argument("--budget", type=int, default=None, help="our per-step token budget (default: the device's)")
    ap.add_argument("--repeats", type=int, default=3, help="CUDA: best of this many calls")
    ap.add_argument("--threads", type=int, default=torch.get_num_threads())
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    cuda = args.device.startswith("cuda")
    args.dtype = args.dtype or ("bfloat16" if cuda else "float32")
    models = args.arch or [args.model or ("llama-2-7b" if cuda else "default")]
    lines = []
    for model in models:
        lengths = args.lengths or ([1024, 4096, 16384, 32768] if cuda else [1024, 2048, 4096, 8192])
        cap = max_prompt(model) or max(lengths)
        lengths = sorted({min(n, cap) for n in lengths})
        print(f"{model}: {lengths}", flush=True)
        rows = cuda_rows(args, model, lengths) if cuda else cpu_rows(args, model, lengths)
        where = torch.cuda.get_device_name() if cuda else f"CPU, {args.threads} threads"
        budget = args.budget or DEFAULT_STEP_TOKENS["cuda" if cuda else "cpu"]
        lines += table(f"{model}, {args.dtype}, {where}; ours: {budget}-token prefill chunks; TTFT of 1 new token, "
                       f"peak memory the call adds", rows, lengths) + [""]
    print("\n".join(lines))
    if args.out:
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text("\n".join(lines))


if __name__ == "__main__":
    main()

"""CPU benchmark of the embedded default's language model (SmolLM2-135M-Instruct): our engine's modes, transformers
and llama.cpp, in one run, on the same threads.

    python -m bench.cpu_lm [--threads 2] [--prompt-tokens 128] [--new-tokens 128] [--repeats 5]
                           [--sampling {greedy,chat}] [--out bench/results/cpu_lm.txt]

Rows: ours in fp32 (pure fp32, dense), auto (what `--dtype auto` picks on this machine, engine/quant/policy.py,
with the embedded default's GGUF blocks kept where int4 measures faster), auto's dtype on the dense weights (what the
default ran before), w8a16 and w4a16 (round to nearest at
load), q4_1-native (the GGUF's own Q4_1 / Q8_0 blocks: int8 activations on kernels/cpu_qgemv.c where the policy
measured it faster, else bf16 on aten's int4 / int8 kernels), auto + int8 KV cache; transformers fp32
and bf16 (`generate`, eager); llama.cpp through llama-cpp-python on the same GGUF (when `llama_cpp` imports: it is
not a requirement). TTFT: a 128-token prompt to its first token. Decode: tokens/s over 128 new tokens after the first.
--sampling chat draws every token with the chat's defaults (engine/chat/types.py CHAT_DEFAULTS: temperature 0.7,
top-p 0.9, top-k 50, repetition penalty 1.1) in every row (llama.cpp: min-p off; its penalty looks at the last 64
tokens, ours and transformers' at all of them); greedy (the default) takes the likeliest token.
Every number is the best of --repeats runs: other processes share this machine's cores and only ever slow a run
down, so the best run is the one closest to the machine's own speed. The load average is printed before and after.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
import platform
import time
from pathlib import Path

import torch

from engine.chat.types import CHAT_DEFAULTS
from engine.checkpoints.reader import Checkpoint
from engine.checkpoints.smollm_gguf import default_lm_blocks, default_lm_checkpoint, find_gguf, DEFAULT_CACHE
from engine.config import EngineConfig, TextConfig
from engine.families import engine_config
from engine.families.common import TEXT_PREFIXES
from engine.families.embedded import keeps_gguf_blocks
from engine.llm_engine import LLMEngine
from engine.models import MODELS
from engine.sampling_params import SamplingParams


def ours(engine: LLMEngine, prompt: list[int], new: int, chat: bool) -> tuple[float, float]:
    params = (dataclasses.replace(CHAT_DEFAULTS, ignore_eos=True, seed=0).sampling_params(new) if chat else
              SamplingParams(max_new_tokens=new, ignore_eos=True))
    seq = engine.add_request(prompt, params)
    t0 = time.perf_counter()
    engine.step()
    t1 = time.perf_counter()
    while engine.has_work():
        engine.step()
    t2 = time.perf_counter()
    return t1 - t0, (seq.num_output_tokens - 1) / (t2 - t1)


def theirs(model, prompt: list[int], new: int, chat: bool) -> tuple[float, float]:
    ids = torch.tensor([prompt])
    d = CHAT_DEFAULTS
    sampling = (dict(do_sample=True, temperature=d.temperature, top_p=d.top_p, top_k=d.top_k,
                     repetition_penalty=d.repetition_penalty) if chat else dict(do_sample=False))
    with torch.inference_mode():
        t0 = time.perf_counter()
        model.generate(ids, max_new_tokens=1, **sampling)
        t1 = time.perf_counter()
        model.generate(ids, max_new_tokens=new, min_new_tokens=new, **sampling)
        t2 = time.perf_counter()
    return t1 - t0, (new - 1) / ((t2 - t1) - (t1 - t0))


def llama_cpp_row(threads: int, chat: bool):
    """(name, run) for llama.cpp on the same GGUF, or None where llama-cpp-python is not installed."""
    try:
        from llama_cpp import Llama
    except ImportError:
        return None
    llm = Llama(model_path=str(find_gguf(DEFAULT_CACHE)), n_threads=threads, n_threads_batch=threads, n_ctx=1024,
                n_batch=512, verbose=False)

    d = CHAT_DEFAULTS
    sampling = (dict(temp=d.temperature, top_p=d.top_p, top_k=d.top_k, min_p=0.0, repeat_penalty=d.repetition_penalty)
                if chat else dict(temp=0.0))

    def run(prompt: list[int], new: int) -> tuple[float, float]:
        llm.reset()
        t0 = time.perf_counter()
        llm.eval(prompt)
        token = llm.sample(**sampling)
        t1 = time.perf_counter()
        for _ in range(new - 1):
            llm.eval([token])
            token = llm.sample(**sampling)
        t2 = time.perf_counter()
        return t1 - t0, (new - 1) / (t2 - t1)

    return "llama.cpp Q4_1 (llama-cpp-python)", run


def our_engines(cfg: TextConfig, dense: dict, blocks: dict) -> dict[str, LLMEngine]:
    auto = engine_config("cpu", "auto", enable_prefix_caching=False)
    auto_blocks = keeps_gguf_blocks(auto)
    auto = dataclasses.replace(auto, quantize="gguf" if auto_blocks else None)
    base = dict(enable_prefix_caching=False)
    configs = {
        "ours fp32": (dense, EngineConfig(dtype="float32", **base)),
        f"ours auto ({auto.dtype}{', Q4_1 kept' if auto_blocks else ''})": (blocks if auto_blocks else dense, auto),
        f"ours {auto.dtype} dense (GGUF dequantized)": (dense, dataclasses.replace(auto, quantize=None)),
        "ours w8a16": (dense, EngineConfig(dtype=auto.dtype, quantize="w8a16", **base)),
        "ours w4a16": (dense, EngineConfig(dtype=auto.dtype, quantize="w4a16", **base)),
        "ours q4_1-native": (blocks, EngineConfig(dtype=auto.dtype, quantize="gguf", **base)),
        "ours auto + kv int8": (blocks if auto_blocks else dense, dataclasses.replace(auto, kv_cache_dtype="int8")),
    }
    return {name: LLMEngine(cfg, w, None, c) for name, (w, c) in configs.items()}


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompt-tokens", type=int, default=128)
    ap.add_argument("--new-tokens", type=int, default=128)
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--no-transformers", action="store_true")
    ap.add_argument("--no-llama-cpp", action="store_true")
    ap.add_argument("--sampling", choices=("greedy", "chat"), default="greedy")
    ap.add_argument("--out", default="bench/results/cpu_lm.txt")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM

    from engine.quant.policy import cpu_policy

    path = default_lm_checkpoint()
    ck = Checkpoint.load(path)
    cfg = TextConfig.from_dict(ck.config, MODELS[ck.config["model_type"]][1])
    chat = args.sampling == "chat"
    runs = {name: (lambda e: lambda p, n: ours(e, p, n, chat))(e)
            for name, e in our_engines(cfg, ck.parts(TEXT_PREFIXES)["text"], default_lm_blocks()).items()}
    if not args.no_transformers:
        for d in ("float32", "bfloat16"):
            model = AutoModelForCausalLM.from_pretrained(path, dtype=getattr(torch, d)).eval()
            runs[f"transformers {d}"] = (lambda m: lambda p, n: theirs(m, p, n, chat))(model)
    row = None if args.no_llama_cpp else llama_cpp_row(args.threads, chat)
    if row is not None:
        runs[row[0]] = row[1]
    cpu = next((line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")), platform.processor()) if Path("/proc/cpuinfo").is_file() else ""
    lines = [f"SmolLM2-135M-Instruct on {cpu}, {args.threads} threads (torch {torch.__version__}); "
             f"prompt {args.prompt_tokens} tokens, {args.new_tokens} new, {args.sampling} sampling; best of "
             f"{args.repeats} runs each",
             f"load average before: {os.getloadavg()[0]:.2f}; auto policy: {cpu_policy().dtype}, int4 decode "
             f"{'on' if cpu_policy().int4_decode else 'off'} ({cpu_policy().describe()})",
             f"{'':<44}{'TTFT ms':>9}{'decode tok/s':>14}"]
    print("\n".join(lines), flush=True)
    prompt = [(7 * i + 3) % (cfg.vocab_size - 1) + 1 for i in range(args.prompt_tokens)]
    best = {name: (float("inf"), 0.0) for name in runs}
    for name, run in runs.items():
        run(prompt, 4)  # warm-up
    for _ in range(args.repeats):  # interleaved, so a busy spell does not hit one row's every run
        for name, run in runs.items():
            ttft, rate = run(prompt, args.new_tokens)
            best[name] = (min(best[name][0], ttft), max(best[name][1], rate))
    for name, (ttft, rate) in best.items():
        lines.append(f"  {name:<42}{ttft * 1000:>9.0f}{rate:>14.1f}")
    lines.append(f"load average after: {os.getloadavg()[0]:.2f}")
    print("\n".join(lines[3:]))
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

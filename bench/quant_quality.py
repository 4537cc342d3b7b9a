"""Quality of the quantized modes on real weights: the embedded default (SmolLM2-135M-Instruct from its Q4_1 GGUF).

    python -m bench.quant_quality [--prompts 16] [--new-tokens 64] [--out bench/results/quant_quality.txt]

Perplexity: exp of the mean next-token cross-entropy over Python's own LICENSE.txt (the PSF license and the history
of the software: ~3.8k tokens of English prose and legal text, shipped with every CPython at
`sys.base_prefix/lib/pythonX.Y/LICENSE.txt`), in windows of 512 tokens, each scored from its own start (as LMDeploy's
get_ppl does per sequence), through the engine's own prefill (paged attention, the KV cache in the mode's format).
On a CPU prefill reads the dense copy of the quantized weights (the same values), so the logits are taken 8 rows at a
time, through the LM head's decode weight (a Q8_0 head re-rounded to int8 per row, say). Greedy agreement: N chat
prompts x 64 new tokens against the fp32 engine's tokens and against the bf16 engine's (same activations, so what
the weights alone change): the share of equal tokens, position by position, and the mean length of the common
prefix. Decode steps run in batches of at most 8 rows, so they read the CPU's decode weights (the packed int4 / int8
kernels), not the dense copy.

Modes: fp32 (the reference: the GGUF dequantized, as transformers loads it), bf16, w8a16 and w4a16 (round to nearest
of those fp32 weights, LM head int8), gguf-q4_1 (the file's own Q4_1 blocks and Q8_0 head, kept), and the int8 KV
cache on fp32 and on the CPU's auto mode. transformers fp32 is scored too, as a check of the fp32 row.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

from engine.checkpoints.reader import Checkpoint
from engine.checkpoints.smollm_gguf import default_lm_blocks, default_lm_checkpoint
from engine.config import EngineConfig, TextConfig
from engine.families.common import TEXT_PREFIXES
from engine.llm_engine import LLMEngine
from engine.models import MODELS
from engine.sampling_params import SamplingParams

WINDOW = 512
QUESTIONS = [
    "What is the capital of France?", "Explain photosynthesis in two sentences.", "Write a haiku about autumn.",
    "How do I reverse a list in Python?", "What causes the seasons on Earth?", "Give three tips for better sleep.",
    "What is the difference between a virus and a bacterium?", "Summarize the plot of Romeo and Juliet.",
    "Why is the sky blue?", "What is a prime number? Give examples.", "How does a refrigerator keep food cold?",
    "Name three famous painters and one work by each.", "What is machine learning?",
    "Translate 'good morning' into Spanish and French.", "How many legs does a spider have?",
    "Describe a cat to someone who has never seen one.", "What is the boiling point of water at sea level?",
    "Suggest a name for a bakery.", "What are the primary colors?", "How do vaccines work?",
]


def corpus_path() -> Path:
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"


def modes(dense: dict, blocks: dict, auto_dtype: str) -> dict[str, tuple[dict, dict]]:
    """name -> (weights, EngineConfig kwargs)."""
    return {
        "fp32": (dense, dict(dtype="float32")),
        "bf16": (dense, dict(dtype="bfloat16")),
        "w8a16": (dense, dict(dtype="bfloat16", quantize="w8a16")),
        "w4a16": (dense, dict(dtype="bfloat16", quantize="w4a16")),
        "gguf-q4_1": (blocks, dict(dtype="bfloat16", quantize="gguf")),
        "fp32 + kv int8": (dense, dict(dtype="float32", kv_cache_dtype="int8")),
        f"gguf-q4_1 {auto_dtype} + kv int8": (blocks, dict(dtype=auto_dtype, quantize="gguf", kv_cache_dtype="int8")),
    }


@torch.inference_mode()
def window_nll(engine: LLMEngine, ids: list[int]) -> tuple[float, int]:
    """Sum of next-token negative log-likelihoods over one window, through the engine's prefill."""
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1))
    batch = engine.scheduler.schedule()
    assert [(c.seq, c.start, c.end) for c in batch.chunks] == [(seq, 0, len(ids))], "one chunk: the whole window"
    embeds, positions, md = engine.runner.prepare_prefill(batch.chunks)
    hidden = engine.model(embeds, positions, engine.runner.cos_sin, md)
    logits = torch.cat([engine.model.logits(hidden[i:i + 8]) for i in range(0, len(ids), 8)])  # (T, V) fp32
    engine.abort(seq)
    target = torch.tensor(ids[1:])
    return F.cross_entropy(logits[:-1], target, reduction="sum").item(), len(ids) - 1


def perplexity(score, tokens: list[int]) -> float:
    total, count = 0.0, 0
    for start in range(0, len(tokens) - 1, WINDOW):
        window = tokens[start:start + WINDOW]
        if len(window) < 2:
            break
        nll, n = score(window)
        total, count = total + nll, count + n
    return math.exp(total / count)


def hf_window_nll(model, ids: list[int]) -> tuple[float, int]:
    with torch.inference_mode():
        logits = model(torch.tensor([ids])).logits[0].float()
    return F.cross_entropy(logits[:-1], torch.tensor(ids[1:]), reduction="sum").item(), len(ids) - 1


def greedy(engine: LLMEngine, prompts: list[list[int]], new: int) -> list[list[int]]:
    out = engine.generate(prompts, SamplingParams(max_new_tokens=new, ignore_eos=True))
    return [o.token_ids for o in out]


def agreement(ref: list[list[int]], ours: list[list[int]]) -> tuple[float, float]:
    equal = sum(a == b for r, o in zip(ref, ours) for a, b in zip(r, o)) / sum(len(r) for r in ref)
    prefix = []
    for r, o in zip(ref, ours):
        n = next((i for i, (a, b) in enumerate(zip(r, o)) if a != b), len(r))
        prefix.append(n)
    return equal, sum(prefix) / len(prefix)


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--prompts", type=int, default=16)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default="bench/results/quant_quality.txt")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from engine.quant.policy import cpu_policy

    path = default_lm_checkpoint()
    ck = Checkpoint.load(path)
    cfg = TextConfig.from_dict(ck.config, MODELS[ck.config["model_type"]][1])
    tok = AutoTokenizer.from_pretrained(path)
    text = corpus_path().read_text()
    tokens = tok(text).input_ids
    prompts = [tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                       tokenize=True, return_dict=True)["input_ids"]
               for q in QUESTIONS[:args.prompts]]
    dense, blocks = ck.parts(TEXT_PREFIXES)["text"], default_lm_blocks()
    lines = [f"SmolLM2-135M-Instruct (embedded default), CPU, {torch.get_num_threads()} threads; "
             f"corpus {corpus_path()} ({len(tokens)} tokens, windows of {WINDOW}); "
             f"greedy: {len(prompts)} chat prompts x {args.new_tokens} new tokens vs ours fp32; "
             f"auto policy here: {cpu_policy().dtype} ({cpu_policy().describe()})",
             f"{'mode':<32}{'perplexity':>11}{'vs fp32':>9}{'equal/fp32':>12}{'prefix/fp32':>12}"
             f"{'equal/bf16':>12}{'prefix/bf16':>12}"]
    print(lines[0])
    runs: dict[str, list[list[int]]] = {}
    ppl32 = None
    for name, (weights, kw) in modes(dense, blocks, cpu_policy().dtype).items():
        t0 = time.time()
        config = EngineConfig(enable_prefix_caching=False, max_num_seqs=8, max_num_batched_tokens=WINDOW, **kw)
        engine = LLMEngine(cfg, weights, tok, config)  # a window's prompt: one prefill chunk
        ppl = perplexity(lambda w: window_nll(engine, w), tokens)
        runs[name] = ids = greedy(engine, prompts, args.new_tokens)
        ppl32 = ppl32 or ppl
        (e32, p32), (e16, p16) = agreement(runs["fp32"], ids), agreement(runs.get("bf16", ids), ids)
        lines.append(f"{name:<32}{ppl:>11.3f}{ppl / ppl32 - 1:>+9.2%}{e32:>12.1%}{p32:>12.1f}{e16:>12.1%}{p16:>12.1f}")
        print(lines[-1], f"({time.time() - t0:.0f} s)", flush=True)
        del engine
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ppl = perplexity(lambda w: hf_window_nll(hf, w), tokens)
    lines.append(f"{'transformers fp32 (check)':<32}{ppl:>11.3f}{ppl / ppl32 - 1:>+9.2%}")
    print(lines[-1])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()

"""Perplexity of a text file through the engine's scoring requests (`Pipeline.get_ppl`), transformers' beside it.

    python -m bench.ppl FILE [--model default] [--dtype float32] [--device cpu] [--max-tokens N] [--window W]
                        [--compare] [--out bench/results/ppl_cpu.txt]

The file is tokenized whole (the tokenizer's own special tokens, no chat template), cut to --max-tokens and split
into windows of --window tokens (default: the model's context), each scored from its own start as one sequence
(LMDeploy's get_ppl semantics); all windows go in one get_ppl call, so they batch. Printed: tokens scored, the mean
cross-entropy over them (nats per token, windows weighted by their targets), the perplexity (its exp) and the
seconds. `--compare`: transformers in fp32 on the same windows, its forward and LM head (the head in blocks of rows,
the loss in fp32, as `model(ids, labels=ids).loss` computes it), for checkpoints transformers loads as a causal LM:
the embedded default's dequantized folder, or a text-only Llama / Qwen2.
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HEAD_ROWS = 512  # transformers' LM head runs on this many rows at a time (a full 8k window's logits are 1.6 GB)


def corpus_path() -> Path:
    """CPython's own LICENSE.txt: ~3.8k tokens of English prose and legal text, on every install."""
    return Path(sys.base_prefix) / "lib" / f"python{sys.version_info.major}.{sys.version_info.minor}" / "LICENSE.txt"


def windows(tokens: list[int], size: int) -> list[list[int]]:
    """Consecutive windows of `size` tokens; a last one of fewer than two tokens has nothing to score."""
    return [w for w in (tokens[i:i + size] for i in range(0, len(tokens), size)) if len(w) >= 2]


def mean_over(windows_: list[list[int]], means: list[float]) -> float:
    """Per-window mean CEs -> the mean over all their targets (a window of n tokens has n - 1)."""
    return sum(m * (len(w) - 1) for w, m in zip(windows_, means)) / sum(len(w) - 1 for w in windows_)


@torch.inference_mode()
def hf_mean_ce(model, ids: list[int]) -> float:
    """transformers' mean next-token cross-entropy of one sequence, its logits made HEAD_ROWS rows at a time."""
    x = torch.tensor([ids], device=model.device)
    hidden = model.model(x).last_hidden_state[0, :-1]  # (T - 1, hidden): the rows that have a next token
    target = x[0, 1:]
    total = sum(F.cross_entropy(model.lm_head(hidden[i:i + HEAD_ROWS]).float(), target[i:i + HEAD_ROWS],
                                reduction="sum").item() for i in range(0, len(target), HEAD_ROWS))
    return total / len(target)


def hf_checkpoint(model: str) -> str:
    if model == "default":
        from engine.checkpoints.smollm_gguf import default_lm_checkpoint

        return str(default_lm_checkpoint())
    return model


def run(args) -> list[str]:
    from engine import pipeline

    with pipeline(args.model, device=args.device, dtype=args.dtype) as pipe:
        tokens = pipe.tokenizer(Path(args.file).read_text()).input_ids[:args.max_tokens]
        chunks = windows(tokens, args.window or pipe.model.context_len)
        engine = pipe.model.loaded.engine
        mode = f"{engine.cfg.dtype}, quantize={engine.cfg.quantize}, {engine.cfg.max_num_batched_tokens} tokens/step"
        t0 = time.perf_counter()
        ours = mean_over(chunks, pipe.get_ppl(chunks))
        seconds = time.perf_counter() - t0
    scored = sum(len(w) - 1 for w in chunks)
    lines = [f"{args.file}: {len(tokens)} tokens in {len(chunks)} window(s) of <= {len(chunks[0])}; "
             f"model {args.model} on {args.device}, {torch.get_num_threads()} threads",
             f"{'':<50}{'tokens':>8}{'mean CE':>10}{'ppl':>10}{'seconds':>9}",
             f"{'ours (' + mode + ')':<50}{scored:>8}{ours:>10.5f}{math.exp(ours):>10.4f}{seconds:>9.1f}"]
    if args.compare:
        from transformers import AutoModelForCausalLM

        hf = AutoModelForCausalLM.from_pretrained(hf_checkpoint(args.model), dtype=torch.float32)
        hf = hf.to(args.device).eval()
        t0 = time.perf_counter()
        theirs = mean_over(chunks, [hf_mean_ce(hf, w) for w in chunks])
        seconds = time.perf_counter() - t0
        lines.append(f"{'transformers (float32)':<50}{scored:>8}{theirs:>10.5f}{math.exp(theirs):>10.4f}"
                     f"{seconds:>9.1f}")
        lines.append(f"difference in mean CE: {ours - theirs:+.2e}")
    return lines


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("file", nargs="?", default=str(corpus_path()), help="a text file (default: CPython's LICENSE.txt)")
    ap.add_argument("--model", default="default")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--dtype", default="auto", help="auto (the product's choice), float32, bfloat16, float16")
    ap.add_argument("--max-tokens", type=int, default=None)
    ap.add_argument("--window", type=int, default=None, help="tokens per sequence (default: the model's context)")
    ap.add_argument("--compare", action="store_true", help="transformers fp32 on the same windows")
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--out", default=None, help="also append the lines to this file")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    lines = run(args)
    print("\n".join(lines))
    if args.out:
        out = Path(args.out)
        out.parent.mkdir(parents=True, exist_ok=True)
        with out.open("a") as f:
            f.write("\n".join(lines) + "\n\n")


if __name__ == "__main__":
    main()

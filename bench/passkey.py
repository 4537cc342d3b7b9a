"""Passkey retrieval: can the model find one line hidden in filler text, inside and past its trained length?

    python -m bench.passkey --model default --lengths 2048 8192 12288 --rope-scaling-factor 2 --rounds 3
    python -m bench.passkey --arch llava-1.5-7b --lengths 4096 8192 --rope-scaling-factor 2     (GPU, speed only)

The test of the long-context papers (landmark attention, LongLoRA) and LMDeploy's long-context docs: a task line,
filler ("The grass is green. The sky is blue. ..."), "The pass key is N. Remember it. N is the pass key." at a
random depth, more filler, then "What is the pass key? The pass key is", completed greedily (no chat template); a
round succeeds when the reply holds N. Each length's prompt is filled to within one filler group of the length.
Printed per length: successes, failures, seconds per round (prefill of the whole prompt and the few reply tokens).

`--model`: a checkpoint the engine loads ("default": the embedded SmolLM2-135M-Instruct, trained for 8,192 tokens).
`--arch`: one of bench/gpu.py's real-size architectures with random weights (its language model only): random
weights retrieve nothing, so only seconds are printed. `--rope-scaling-factor` sets dynamic NTK (what lengths past
the trained one need); `--session-len` defaults to the longest length plus the reply. Prefix caching is off, so every
round prefills its whole prompt.
"""
from __future__ import annotations

import argparse
import os
import random
import time

import torch

from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams

TASK = ("There is an important info hidden inside a lot of irrelevant text. Find it and memorize them. I will quiz "
        "you about the important information there.")
FILLER = " The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again."
INFO = " The pass key is {key}. Remember it. {key} is the pass key."
QUESTION = " What is the pass key? The pass key is"
REPLY_TOKENS = 8


def passkey_prompt(encode, length: int, key: int, depth: float) -> list[int]:
    """Token ids of about `length` tokens (never more): the task, filler with the key line at `depth` (0 = first),
    the question. Parts are tokenized apart and joined, so the length is exact to one filler group."""
    task, filler, info, question = encode(TASK), encode(FILLER), encode(INFO.format(key=key)), encode(QUESTION)
    groups = max(0, (length - len(task) - len(info) - len(question)) // len(filler))
    before = round(groups * depth)
    return task + filler * before + info + filler * (groups - before) + question


def run_round(engine: LLMEngine, ids: list[int]) -> tuple[list[int], float]:
    t0 = time.perf_counter()
    out = engine.generate([ids], SamplingParams(max_new_tokens=REPLY_TOKENS, ignore_eos=True))[0]
    return out.token_ids, time.perf_counter() - t0


def budget(args) -> dict:
    return {} if args.step_tokens is None else {"max_num_batched_tokens": args.step_tokens}


def checkpoint_engine(args, session_len: int):
    """(engine, encode, decode) of a checkpoint loaded as the app loads it."""
    from engine.families import load_model

    loaded = load_model(args.model, args.device, args.dtype, max_model_len=session_len,
                        rope_scaling_factor=args.rope_scaling_factor, enable_prefix_caching=False, max_num_seqs=1,
                        **budget(args))
    tok = loaded.engine.tokenizer
    return loaded.engine, lambda text: tok(text, add_special_tokens=False).input_ids, tok.decode


def arch_engine(args, session_len: int) -> LLMEngine:
    """bench/gpu.py's architecture `args.arch`, its language model alone with random weights (bf16 on CUDA unless
    --device / --dtype say otherwise)."""
    from transformers import AutoModelForCausalLM

    from bench.gpu import arch_config
    from engine.config import EngineConfig, TextConfig
    from engine.models import MODELS

    text = arch_config(args.arch)[0].text_config
    device = args.device or "cuda"
    dtype = "bfloat16" if args.dtype == "auto" else args.dtype
    torch.manual_seed(0)
    with torch.device(device):
        state = AutoModelForCausalLM.from_config(text).to(getattr(torch, dtype)).state_dict()
    cfg = EngineConfig(device=device, dtype=dtype, max_model_len=session_len, max_num_seqs=1,
                       rope_scaling_factor=args.rope_scaling_factor, enable_prefix_caching=False, **budget(args))
    if text.tie_word_embeddings:  # the engine ties the head itself
        state.pop("lm_head.weight", None)
    d = text.to_dict()
    return LLMEngine(TextConfig.from_dict(d, MODELS[d["model_type"]][1]), state, None, cfg)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    which = ap.add_mutually_exclusive_group()
    which.add_argument("--model", default="default", help="a checkpoint folder or Hub id; default: the embedded one")
    which.add_argument("--arch", default=None, help="a bench/gpu.py architecture with random weights (CUDA)")
    ap.add_argument("--lengths", type=int, nargs="+", default=[2048, 8192, 12288])
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--rope-scaling-factor", type=float, default=None)
    ap.add_argument("--session-len", type=int, default=None)
    ap.add_argument("--device", default=None)
    ap.add_argument("--dtype", default="auto")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (CPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--step-tokens", type=int, default=None,
                    help="max_num_batched_tokens: prompt tokens per step (default: the device's); one request runs "
                         "at a time here, so larger chunks only save steps")
    args = ap.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    session_len = args.session_len or max(args.lengths) + REPLY_TOKENS
    if args.arch:
        engine, encode, decode = arch_engine(args, session_len), None, None
        name = f"{args.arch} (random weights)"
    else:
        engine, encode, decode = checkpoint_engine(args, session_len)
        name = args.model
    text = engine.model.config
    rng = random.Random(args.seed)
    print(f"passkey: {name} on {engine.device} ({engine.dtype}), trained length {text.max_position_embeddings}, "
          f"rope {engine.rope.kind} factor {engine.rope.factor:g}, session {engine.max_model_len}; "
          f"{args.rounds} rounds per length; load average {os.getloadavg()[0]:.1f}", flush=True)
    print(f"{'length':>8}{'prompt tokens':>15}{'successes':>11}{'failures':>10}{'s/round':>9}", flush=True)
    run_round(engine, [1] * 16)  # warm-up: kernels, graphs
    for length in args.lengths:
        ok = fail = 0
        seconds, tokens = [], []
        for _ in range(args.rounds):
            key, depth = rng.randint(1, 50000), rng.random()
            ids = (passkey_prompt(encode, length, key, depth) if encode else
                   [rng.randrange(1, text.vocab_size) for _ in range(length)])
            reply, s = run_round(engine, ids)
            seconds.append(s)
            tokens.append(len(ids))
            if decode is not None:
                found = str(key) in decode(reply)
                ok, fail = ok + found, fail + (not found)
        counts = (f"{ok:>11}{fail:>10}" if decode else f"{'-':>11}{'-':>10}")
        print(f"{length:>8}{round(sum(tokens) / len(tokens)):>15}{counts}{sum(seconds) / len(seconds):>9.2f}",
              flush=True)


if __name__ == "__main__":
    main()

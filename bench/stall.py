"""CPU benchmark of chunked prefill on the embedded default model: how long one long message stalls another chat.

    python -m bench.stall [--prompt-tokens 6000] [--budgets 64 128 256 512] [--turns 30] [--part stall chat]
                          [--threads N]

Part `stall`: chat A decodes a long reply; chat B then sends a ~6,000-token message. For each per-step token budget
(`EngineConfig.max_num_batched_tokens`) and for the whole prompt in one step (the behaviour before chunked prefill:
a budget above the prompt's length), it prints A's longest and median gap between tokens while B is prefilled, A's
median gap before B arrived, B's time to first token (TTFT), and ratios against the whole-prompt run. The engine is
stepped on this thread, so the times are the engine's own, with no serving loop around them.

Part `chat`: the TTFT of each turn of one long chat of ~300-token messages in a 2,048-token context, so old turns
must be dropped (engine/chat/budget.py drops them in blocks of a quarter of the context, so the following turns hit
the prefix cache), through `ChatModel.plan` / `.stream`. `--chat-api vlm`, run from a checkout of an older commit
(e1f0972), measures the same chat on that code's `vlm.ChatModel`: `cd OLD && PYTHONPATH=. python
/path/to/bench/stall.py --part chat --chat-api vlm`. Nothing here is imported from the engine at module level, so
that works.

Not here: GPU numbers (bench/gpu.py), transformers (bench/cpu_lm.py).
"""
from __future__ import annotations

import argparse
import importlib
import os
import random
import statistics
import time

WORDS = ("the model reads every word of a long document and answers questions about its history science music "
         "rivers cities people animals weather markets gardens ships trains bridges stars planets oceans forests "
         "kitchen recipes letters numbers colours seasons mountains villages schools libraries museums theatres "
         "engines clocks maps lamps windows doors roads fields farms bakers painters sailors doctors teachers").split()


def filler(n_words: int, seed: int) -> str:
    """Plain English-like text, different for every seed (so no two chats share a prefix by accident)."""
    rng = random.Random(seed)
    sentences, count = [], 0
    while count < n_words:
        length = rng.randint(8, 16)
        sentences.append(" ".join(rng.choice(WORDS) for _ in range(length)).capitalize() + ".")
        count += length
    return " ".join(sentences)


def long_prompt(loaded, tokens: int, seed: int) -> list[int]:
    """A chat-template prompt of a user message of about `tokens` tokens."""
    from engine.prompt import Message

    words = tokens
    while True:  # the filler runs a little over one token per word: fewer words until it fits
        ids = loaded.prompt.build([Message("user", filler(words, seed))], []).ids
        if len(ids) <= tokens:
            return ids
        words -= len(ids) - tokens


def stall_run(budget: int, prompt_tokens: int, before: int = 12, after: int = 4) -> dict:
    """One engine with this budget: A decodes `before` tokens, B arrives; steps until B has `after` tokens."""
    from engine.families import load_model
    from engine.prompt import Message
    from engine.sampling_params import SamplingParams

    loaded = load_model("default", "cpu", max_num_batched_tokens=budget)
    engine = loaded.engine
    engine.generate([long_prompt(loaded, 300, 99)], SamplingParams(max_new_tokens=4))  # warm-up
    a_prompt = loaded.prompt.build([Message("user", "Tell me a very long story about a lighthouse keeper.")], []).ids
    a = engine.add_request(a_prompt, SamplingParams(max_new_tokens=4000, ignore_eos=True))
    b_prompt = long_prompt(loaded, prompt_tokens, seed=1)  # the same message in every run (a fresh engine each)
    times = []  # when each of A's tokens came back
    b = submitted = first = None
    while b is None or b.num_output_tokens < after:
        if b is None and a.num_output_tokens >= before:
            b = engine.add_request(b_prompt, SamplingParams(max_new_tokens=after, ignore_eos=True))
            submitted = time.perf_counter()
        outputs = engine.step()
        now = time.perf_counter()
        times += [now for out in outputs if out.seq is a]
        if b is not None and first is None and b.num_output_tokens:
            first = now
    engine.abort(a)
    gaps_before = [t1 - t0 for t0, t1 in zip(times, times[1:]) if t1 <= submitted]
    during = [t1 - t0 for t0, t1 in zip(times, times[1:]) if submitted < t1 <= first]
    return dict(budget=budget, b_tokens=len(b_prompt), ttft=first - submitted, max_gap=max(during),
                median_gap=statistics.median(during), median_before=statistics.median(gaps_before),
                a_tokens_during=len(during))


def stall(prompt_tokens: int, budgets: list[int]) -> None:
    print(f"== Part stall: chat A decodes; chat B sends a ~{prompt_tokens}-token message (CPU, embedded default) ==")
    print(f"{'budget (tokens/step)':>22} | {'A max gap':>9} | {'A median gap':>12} | {'A gaps':>6} | "
          f"{'A median before':>15} | {'B TTFT':>7} | {'A max gap: whole / this':>23} | {'B TTFT: this / whole':>20}",
          flush=True)
    whole = None
    for budget in [max(8192, prompt_tokens + 1)] + budgets:
        r = stall_run(budget, prompt_tokens)
        whole = whole or r
        name = f"whole prompt ({r['b_tokens']})" if r is whole else str(budget)
        print(f"{name:>22} | {r['max_gap']:8.2f}s | {r['median_gap'] * 1e3:10.0f}ms | {r['a_tokens_during']:>6} | "
              f"{r['median_before'] * 1e3:13.0f}ms | {r['ttft']:6.1f}s | {whole['max_gap'] / r['max_gap']:22.1f}x | "
              f"{r['ttft'] / whole['ttft']:19.2f}x", flush=True)


def chat(turns: int, report_from: int, api: str, reply_tokens: int = 32) -> None:
    mod = importlib.import_module(api)
    model = mod.ChatModel.load("default", "cpu", max_model_len=2048)
    settings = mod.GenerationSettings(max_new_tokens=reply_tokens, temperature=0.0, ignore_eos=True)
    print(f"== Part chat ({api}): {turns} turns of ~300-token messages, {reply_tokens}-token replies, "
          f"context {model.context_len} ==", flush=True)
    history, rows = [], []
    for k in range(1, turns + 1):
        history.append(mod.ChatTurn("user", f"Message {k}. " + filler(235, 1000 + k)))
        plan = model.plan("", history, reply_tokens)
        assert plan.error is None, plan.error
        text, finished = [], None
        for event in model.stream(plan, settings):
            if isinstance(event, mod.Finished):
                finished = event
            elif hasattr(event, "text"):
                text.append(event.text)
        history.append(mod.ChatTurn("assistant", "".join(text)))
        rows.append((k, plan.prompt_tokens, finished.stats.ttft_s))
    if hasattr(model, "close"):  # the older ChatModel has none; its loop thread is a daemon
        model.close()
    print("turn | prompt tokens | TTFT")
    for k, tokens, ttft in rows:
        if k >= report_from:
            print(f"{k:>4} | {tokens:>13} | {ttft:5.2f}s")
    tail = [ttft for k, _, ttft in rows if k >= report_from]
    print(f"turns {report_from}-{turns}: mean TTFT {statistics.mean(tail):.2f}s, max {max(tail):.2f}s")


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--part", nargs="+", default=["stall", "chat"], choices=["stall", "chat"])
    ap.add_argument("--prompt-tokens", type=int, default=6000)
    ap.add_argument("--budgets", type=int, nargs="+", default=[64, 128, 256, 512])
    ap.add_argument("--turns", type=int, default=30)
    ap.add_argument("--report-from", type=int, default=25)
    ap.add_argument("--chat-api", default="engine.chat", help="engine.chat (this code) or vlm (commit e1f0972)")
    ap.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    args = ap.parse_args()
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    # Other work on the machine slows these numbers (and with several threads, much more than its share).
    print(f"torch threads: {torch.get_num_threads()}; load average at start: {os.getloadavg()[0]:.1f}", flush=True)
    if "stall" in args.part:
        stall(args.prompt_tokens, args.budgets)
    if "chat" in args.part:
        chat(args.turns, args.report_from, args.chat_api)
    print(f"load average at the end: {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

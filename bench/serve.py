"""Serving benchmark: N concurrent OpenAI-API clients chatting about an image with a launched `python -m api`.

    python -m bench.serve [--model default] [--clients 1 8 32] [--requests 2] [--max-tokens 32] [--device cpu]
    python -m bench.serve --url http://host:8000/v1 [--api-key K]      # a server that is already running

Each client streams its chats one after another (`--requests` each); every chat sends a different crop of
scikit-image's cat photo (so no prefix or feature cache hits) and asks for exactly `--max-tokens` tokens
(`ignore_eos`). Per concurrency level it prints requests/s, output tokens/s, time to first token (TTFT) and
inter-token latency (ITL: gaps between streamed chunks) at p50 / p99, and beside them the batch-1 decode speed
(1 client: tokens after the first over the time after the first). The clients run in this process, on the same
machine as the server unless --url points elsewhere: on a small CPU they take some of its time.
"""
from __future__ import annotations

import argparse
import asyncio
import base64
import contextlib
import io
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field

import openai


@dataclass
class Sample:
    ttft: float
    gaps: list[float] = field(default_factory=list)
    tokens: int = 0
    decode_s: float = 0.0


def images(count: int) -> list[str]:
    """`count` different JPEG crops of the cat photo, as data URIs."""
    from PIL import Image
    from skimage import data

    cat = Image.fromarray(data.chelsea())
    out = []
    for i in range(count):
        dx, dy = (i * 7) % 60, (i * 5) % 40
        buf = io.BytesIO()
        cat.crop((dx, dy, dx + 380, dy + 250)).save(buf, "JPEG", quality=90)
        out.append("data:image/jpeg;base64," + base64.b64encode(buf.getvalue()).decode())
    return out


async def chat(client: openai.AsyncOpenAI, model: str, image: str, i: int, max_tokens: int) -> Sample:
    start = time.perf_counter()
    stream = await client.chat.completions.create(
        model=model, max_tokens=max_tokens, temperature=0.7, seed=i, stream=True,
        stream_options={"include_usage": True}, extra_body={"ignore_eos": True},
        messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": image}},
                                               {"type": "text", "text": f"Describe this picture ({i})."}]}])
    sample, last = None, start
    async for chunk in stream:
        if chunk.usage is not None:
            sample.tokens = chunk.usage.completion_tokens
        if not chunk.choices or not chunk.choices[0].delta.content:
            continue
        now = time.perf_counter()
        if sample is None:
            sample, first = Sample(now - start), now
        else:
            sample.gaps.append(now - last)
        last = now
    sample.decode_s = last - first
    return sample


async def level(url: str, key: str, model: str, clients: int, requests: int, max_tokens: int) -> tuple:
    pictures = images(clients * requests)
    async with openai.AsyncOpenAI(base_url=url, api_key=key, max_retries=0, timeout=3600) as client:
        async def worker(c: int) -> list[Sample]:
            return [await chat(client, model, pictures[c * requests + r], c * requests + r, max_tokens)
                    for r in range(requests)]

        start = time.perf_counter()
        results = await asyncio.gather(*(worker(c) for c in range(clients)))
        wall = time.perf_counter() - start
    return [s for samples in results for s in samples], wall


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def report(clients: int, samples: list[Sample], wall: float) -> str:
    ttft = [s.ttft for s in samples]
    gaps = [g for s in samples for g in s.gaps]
    tokens = sum(s.tokens for s in samples)
    line = (f"{clients:>7} {len(samples):>8} {len(samples) / wall:>10.2f} {tokens / wall:>10.1f} "
            f"{pct(ttft, 50) * 1e3:>9.0f} {pct(ttft, 99) * 1e3:>9.0f} {pct(gaps, 50) * 1e3:>8.1f} "
            f"{pct(gaps, 99) * 1e3:>8.1f}")
    if clients == 1:
        rate = statistics.median((s.tokens - 1) / s.decode_s for s in samples if s.decode_s > 0)
        line += f"   <- batch-1 decode {rate:.1f} tokens/s"
    return line


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextlib.contextmanager
def launched(model: str, device: str | None, key: str):
    port = free_port()
    cmd = [sys.executable, "-m", "api", "--model", model, "--port", str(port), "--api-key", key]
    proc = subprocess.Popen(cmd + (["--device", device] if device else []), stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 900
        while True:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"the API server did not start: {proc.stderr.read()[-2000:]}")
            with contextlib.suppress(OSError):
                urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=5)
                break
            time.sleep(0.5)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=60)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.serve", description=__doc__.splitlines()[0])
    p.add_argument("--url", default=None, help="a running server's /v1 URL (default: launch one here)")
    p.add_argument("--api-key", default="bench")
    p.add_argument("--model", default="default")
    p.add_argument("--device", default=None)
    p.add_argument("--clients", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--requests", type=int, default=2, help="chats per client, one after another")
    p.add_argument("--max-tokens", type=int, default=32)
    args = p.parse_args(argv)
    with (contextlib.nullcontext(args.url) if args.url else launched(args.model, args.device, args.api_key)) as url:
        served = openai.OpenAI(base_url=url, api_key=args.api_key).models.list().data[0].id
        asyncio.run(level(url, args.api_key, served, 1, 1, 4))  # warm-up: first-call costs out of the figures
        print(f"# python -m bench.serve {' '.join(argv if argv is not None else sys.argv[1:])}")
        print(f"# model {served} at {url}; {platform.processor() or platform.machine()}, {os.cpu_count()} CPUs; "
              f"{args.requests} chats per client, one image each, {args.max_tokens} tokens each")
        print(f"{'clients':>7} {'requests':>8} {'req/s':>10} {'tok/s':>10} {'TTFT p50':>9} {'TTFT p99':>9} "
              f"{'ITL p50':>8} {'ITL p99':>8}   (milliseconds)")
        for clients in args.clients:
            samples, wall = asyncio.run(level(url, args.api_key, served, clients, args.requests, args.max_tokens))
            print(report(clients, samples, wall), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())

"""Command line: `python -m engine --model M --image PATH --prompt TEXT`: streams the reply to stdout.

`--document PATH` adds a TXT, Markdown or PDF file's text to the prompt (trimmed to fit, with a note, as in the
chat). Stdout carries the reply and nothing else; notes and `--stats` (prompt, image and document tokens, time to
first token, decode tokens/s) go to stderr. This entry point is a front end like app.py: it reaches the vision side through the
`vlm` glue, imported here only.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from engine.chat.types import CLI_DEFAULTS
from engine.options import add_model_args, model_kwargs


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m engine", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None,
                   help="Hub id or local folder (llava-hf format); omit for the Hub default, or the embedded "
                        "offline default when the Hub cannot be reached; 'default' forces the embedded one")
    p.add_argument("--image", action="append", default=[], help="an image file; repeat for several")
    p.add_argument("--document", action="append", default=[],
                   help="a TXT, Markdown or PDF file whose text goes into the prompt; repeat for several")
    p.add_argument("--prompt", required=True)
    p.add_argument("--system", default="")
    p.add_argument("--raw", action="store_true", help="no chat template; mark each image with <image>")
    d = CLI_DEFAULTS
    p.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    p.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    p.add_argument("--top-p", type=float, default=d.top_p)
    p.add_argument("--top-k", type=int, default=d.top_k)
    p.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--ignore-eos", action="store_true")
    p.add_argument("--max-image-tokens", type=int, default=None,
                   help="at most this many tokens per image (a cheaper reading of it where the model has one)")
    add_model_args(p)
    p.add_argument("--stats", action="store_true", help="print token counts and speed to stderr")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse(argv)
    from engine.chat import ChatDocument, ChatImage, ChatModel, GenerationSettings
    from engine.sampling_params import InvalidParameter

    if args.raw and args.document:
        print("error: --document needs the chat template; it cannot be used with --raw", file=sys.stderr)
        return 2
    try:
        images = tuple(ChatImage(Path(p).read_bytes(), Path(p).name) for p in args.image)
        documents = tuple(ChatDocument(Path(p).read_bytes(), Path(p).name) for p in args.document)
    except OSError as exc:
        print(f"error: cannot read file: {exc}", file=sys.stderr)
        return 2
    try:
        settings = GenerationSettings(max_new_tokens=args.max_new_tokens, temperature=args.temperature,
                                      top_p=args.top_p, top_k=args.top_k, repetition_penalty=args.repetition_penalty,
                                      seed=args.seed, ignore_eos=args.ignore_eos,
                                      max_image_tokens=args.max_image_tokens)
    except InvalidParameter as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    model = ChatModel.load(args.model, **model_kwargs(args))
    try:
        return _run(model, args, images, documents, settings)
    finally:
        model.close()  # stop and join the engine loop: no thread may still be in native code at exit


def _run(model, args, images, documents, settings) -> int:
    from engine.chat import ChatTurn, Finished, TextDelta

    try:
        if args.raw:
            plan = model.plan_raw(args.prompt, list(images), args.max_new_tokens, args.max_image_tokens)
        else:
            plan = model.plan(args.system, [ChatTurn("user", args.prompt, images, documents)],
                              args.max_new_tokens, args.max_image_tokens)
    except ValueError as exc:  # raw mode: an unreadable image, images on a text-only model, a marker miscount
        print(f"error: {exc}", file=sys.stderr)
        return 2
    for notice in plan.notices:
        print(f"note: {notice}", file=sys.stderr)
    finished = None
    for event in model.stream(plan, settings):
        if isinstance(event, TextDelta):
            sys.stdout.write(event.text)
            sys.stdout.flush()
        elif isinstance(event, Finished):
            finished = event
    sys.stdout.write("\n")
    sys.stdout.flush()
    if finished.message:
        print(f"[{finished.stats.finish_reason}] {finished.message}", file=sys.stderr)
    if args.stats:
        s = finished.stats
        print(f"prompt tokens: {s.prompt_tokens}  image tokens: {s.image_tokens}  document tokens: "
              f"{s.document_tokens}  generated: {s.generated_tokens}  "
              f"TTFT: {s.ttft_s * 1000:.0f} ms  decode: {s.decode_tokens_per_s:.1f} tokens/s  "
              f"finish: {s.finish_reason}", file=sys.stderr)
    return 1 if finished.stats.finish_reason == "error" else 0

if __name__ == "__main__":
    sys.exit(main())

"""`python -m api --model M --port P`: the OpenAI-compatible API alone (no UI), for servers, replicas and tests.

    python -m api --model default --port 8000 [--api-key KEY] [--allowed-media-domains upload.wikimedia.org]

Requests may name the model by `--served-model-name` (default: the `--model` value, else the model's name), by the
`--model` value (or "default" for the embedded model, however it was chosen), or by the model's own long name. No
access log is written (no client addresses in logs).
"""
from __future__ import annotations

import argparse
import sys

from engine.options import add_model_args, model_kwargs


def parse(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m api", description=__doc__.splitlines()[0])
    p.add_argument("--model", default=None, help="Hub id or local folder (llava-hf format); 'default': the "
                   "embedded offline model; omitted: the Hub default, or the embedded one offline")
    p.add_argument("--served-model-name", default=None, help="the name clients send as `model`")
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--api-key", default=None, help="require 'Authorization: Bearer KEY' on every /v1 request")
    p.add_argument("--allowed-media-domains", nargs="*", default=[],
                   help="hosts whose http(s) image URLs may be fetched (exact names, or *.example.com); "
                        "data: URIs are always accepted")
    add_model_args(p)
    p.add_argument("--max-model-len", type=int, default=None, help="the same as --session-len (vLLM's name)")
    return p.parse_args(argv)


def build_app(model, name: str, args: argparse.Namespace):
    from fastapi import FastAPI

    from api import openai_router

    aliases = [a for a in (args.model, model.model_id, model.name) if a]
    app = FastAPI(title="VisionChat OpenAI-compatible API")
    app.include_router(openai_router(model, name, args.api_key, args.allowed_media_domains, aliases))
    return app


def main(argv=None) -> int:
    args = parse(argv)
    import uvicorn

    from engine.chat import ChatModel

    if args.max_model_len is not None:
        args.session_len = args.max_model_len
    model = ChatModel.load(args.model, **model_kwargs(args))
    name = args.served_model_name or args.model or model.name
    try:
        print(f"serving {name} ({model.name}, context {model.context_len}) at http://{args.host}:{args.port}/v1",
              file=sys.stderr, flush=True)
        uvicorn.run(build_app(model, name, args), host=args.host, port=args.port, log_level="warning",
                    access_log=False)
    finally:
        model.close()
    return 0


if __name__ == "__main__":
    sys.exit(main())

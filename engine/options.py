"""The load options every front end offers (the app, the CLI, the API server), in one place: the flags, their help,
and the keyword arguments they become for `ChatModel.load` / `load_model` / `pipeline`."""
from __future__ import annotations

import argparse

from engine.config import KV_CACHE_DTYPES, QUANTIZE
from engine.families import DTYPES


def add_model_args(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """--device, --dtype, --quantize, --kv-cache-dtype, --session-len, --rope-scaling-factor, --max-num-seqs."""
    parser.add_argument("--device", default=None, help="cpu, cuda, cuda:1 ... (default: cuda when present)")
    parser.add_argument("--dtype", default="auto", choices=DTYPES,
                        help="auto: bf16 on CUDA; on a CPU chosen by a quick measurement at load (bf16 where this "
                             "CPU's bf16 matmul is faster, else fp32 with bf16 copies for decode); float32: fp32 "
                             "everywhere (greedy text equals transformers' fp32)")
    parser.add_argument("--quantize", default=None, choices=[q for q in QUANTIZE if q],
                        help="weight-only quantization at load: w8a16 (int8 per channel), w4a16 (int4, groups of "
                             "128), gguf (keep a GGUF's own blocks); AWQ and GPTQ checkpoints load quantized anyway "
                             "(default with --dtype auto: auto, the embedded model keeps its 4-bit GGUF where that "
                             "measures faster)")
    parser.add_argument("--kv-cache-dtype", default=None, choices=KV_CACHE_DTYPES,
                        help="int8: K/V stored in int8 per token and head, about twice the context or batch in "
                             "the same memory (default auto: the model's dtype)")
    parser.add_argument("--session-len", type=int, default=None,
                        help="the context length in tokens (default: the model's trained length); past it, set "
                             "--rope-scaling-factor or use a checkpoint with rope scaling")
    parser.add_argument("--rope-scaling-factor", type=float, default=None,
                        help="dynamic NTK RoPE scaling with this factor (as transformers and LMDeploy), to run "
                             "past the trained length")
    parser.add_argument("--max-num-seqs", type=int, default=None, help="replies run at once (more wait in a queue)")


def model_kwargs(args: argparse.Namespace) -> dict:
    """`ChatModel.load(**model_kwargs(args))` for the flags of `add_model_args` (unset ones keep their defaults)."""
    kw = {"device": args.device, "dtype": args.dtype}
    for flag, key in (("quantize", "quantize"), ("kv_cache_dtype", "kv_cache_dtype"),
                      ("session_len", "max_model_len"), ("rope_scaling_factor", "rope_scaling_factor"),
                      ("max_num_seqs", "max_num_seqs")):
        value = getattr(args, flag, None)
        if value is not None:
            kw[key] = value
    return kw

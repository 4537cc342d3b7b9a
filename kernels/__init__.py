"""The engine's hot ops, each a Triton kernel with a pure-PyTorch twin of the same signature.

One file per op: `rms_norm`, `rotary`, `activation`, `kv_store`, `paged_decode`, `paged_prefill`. The twins
(`*_torch`) are the CPU path and the tests' oracle; the Triton launchers (`*_triton`) are the CUDA path. The engine
picks once, with `load_ops(use_triton)`, and passes the resulting `KernelOps` around. This package is a leaf: it
imports torch, triton and the standard library only, and knows nothing of models or scheduling.
"""

import importlib.util
from dataclasses import dataclass
from typing import Callable

# Found, not imported: triton fixes TRITON_INTERPRET for its own library functions (tl.sum, tl.cdiv) when it is
# first imported, so `import kernels` must not import it; `load_ops` does.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class KernelOps:
    rms_norm: Callable  # (x, weight, eps) -> y
    add_rms_norm: Callable  # (x, residual, weight, eps) -> (y, new_residual)
    rotary: Callable  # (q, k, positions, cos_sin) -> None, in place
    silu_and_mul: Callable  # (x) -> y
    store_kv: Callable  # (k, v, k_cache, v_cache, slot_mapping) -> None
    paged_decode_attention: Callable  # (q, k_cache, v_cache, block_tables, seq_lens, scale) -> out
    # (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale) -> out
    paged_prefill_attention: Callable


def load_ops(use_triton: bool) -> KernelOps:
    # Imported here, not with the package: see HAS_TRITON.
    from . import _triton
    from .activation import silu_and_mul_torch, silu_and_mul_triton
    from .kv_store import store_kv_torch, store_kv_triton
    from .paged_decode import paged_decode_attention_torch, paged_decode_attention_triton
    from .paged_prefill import paged_prefill_attention_torch, paged_prefill_attention_triton
    from .rms_norm import add_rms_norm_torch, add_rms_norm_triton, rms_norm_torch, rms_norm_triton
    from .rotary import rotary_torch, rotary_triton

    impls = {  # op -> (torch twin, Triton launcher)
        "rms_norm": (rms_norm_torch, rms_norm_triton),
        "add_rms_norm": (add_rms_norm_torch, add_rms_norm_triton),
        "rotary": (rotary_torch, rotary_triton),
        "silu_and_mul": (silu_and_mul_torch, silu_and_mul_triton),
        "store_kv": (store_kv_torch, store_kv_triton),
        "paged_decode_attention": (paged_decode_attention_torch, paged_decode_attention_triton),
        "paged_prefill_attention": (paged_prefill_attention_torch, paged_prefill_attention_triton),
    }
    if use_triton and not _triton.HAS_TRITON:
        raise ImportError("load_ops(use_triton=True) needs triton, which is not installed")
    return KernelOps(**{name: pair[int(use_triton)] for name, pair in impls.items()})


__all__ = ["HAS_TRITON", "KernelOps", "load_ops"]

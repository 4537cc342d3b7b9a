"""The engine's hot ops, each a Triton kernel with a pure-PyTorch twin of the same signature.

One file per op: `gemv` (the projections with the norm, activation and residual add fused in; `rms_norm` and
`activation` serve it for several rows; a quantized weight goes to `quant_gemv` / `quant_matmul`, or on a CPU to
`quant_cpu`'s packing, see `quant_weight`), `kv_store` (rotary embedding, in `rotary`, fused with the KV-cache
write; int8 caches in the format of `kv_int8`), `paged_decode`, `paged_prefill`; `cpu_ops` (C through ctypes) does a
CPU decode step's norm, rotary + store and attention in one call each (`load_cpu_ops`), and with
`cpu_qgemv`'s int8-activation GEMVs a whole step's layers in one (`cpu_decoder`). The twins
(`*_torch`) are the CPU path and the tests' oracle; the Triton launchers (`*_triton`) are the CUDA path. The engine
picks once, with `load_ops(use_triton)`, and passes the resulting `KernelOps` around. This package is a leaf: it
imports torch, triton and the standard library only, and knows nothing of models or scheduling.
"""

import dataclasses
import importlib.util
from dataclasses import dataclass
from typing import Callable

# Found, not imported: triton fixes TRITON_INTERPRET for its own library functions (tl.sum, tl.cdiv) when it is
# first imported, so `import kernels` must not import it; `load_ops` does.
HAS_TRITON = importlib.util.find_spec("triton") is not None


@dataclass(frozen=True)
class KernelOps:
    norm_linear: Callable  # (x, norm_weight, eps, weight, bias) -> linear(rms_norm(x))
    linear_add: Callable  # (x, weight, bias, residual) -> residual + linear(x)
    act_linear_add: Callable  # (x, weight, residual) -> residual + linear(silu(gate) * up)
    # (x, norm_weight, eps, gate_up, down) -> x + down(silu(gate) * up), gate | up = gate_up(rms_norm(x)): the MLP
    norm_mlp_add: Callable
    # The three KV ops end with (k_scale_zero=None, v_scale_zero=None): given, the caches are int8 (kv_int8.py).
    # (q, k, v, positions, cos_sin, k_cache, v_cache, slot_mapping) -> None: q rotated in place, k/v into the cache
    rope_store_kv: Callable
    paged_decode_attention: Callable  # (q, k_cache, v_cache, block_tables, seq_lens, scale) -> out
    # (q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, max_seqlen_q, scale) -> out
    paged_prefill_attention: Callable
    # (h, LayerStack, positions, cos_sin, slot_mapping, block_tables, seq_lens) -> h after every layer, or None where
    # it does not take the call: a decode step's layers in one call (cpu_decoder.py). None: the model runs its layers.
    decode_layers: Callable | None = None


def load_ops(use_triton: bool) -> KernelOps:
    # Imported here, not with the package: see HAS_TRITON.
    from . import _triton
    from .gemv import (act_linear_add_torch, act_linear_add_triton, linear_add_torch, linear_add_triton,
                       norm_linear_torch, norm_linear_triton, norm_mlp_add_torch, norm_mlp_add_triton)
    from .kv_store import rope_store_kv_torch, rope_store_kv_triton
    from .paged_decode import paged_decode_attention_torch, paged_decode_attention_triton
    from .paged_prefill import paged_prefill_attention_torch, paged_prefill_attention_triton

    impls = {  # op -> (torch twin, Triton launcher)
        "norm_linear": (norm_linear_torch, norm_linear_triton),
        "linear_add": (linear_add_torch, linear_add_triton),
        "act_linear_add": (act_linear_add_torch, act_linear_add_triton),
        "norm_mlp_add": (norm_mlp_add_torch, norm_mlp_add_triton),
        "rope_store_kv": (rope_store_kv_torch, rope_store_kv_triton),
        "paged_decode_attention": (paged_decode_attention_torch, paged_decode_attention_triton),
        "paged_prefill_attention": (paged_prefill_attention_torch, paged_prefill_attention_triton),
    }
    if use_triton and not _triton.HAS_TRITON:
        raise ImportError("load_ops(use_triton=True) needs triton, which is not installed")
    return KernelOps(**{name: pair[int(use_triton)] for name, pair in impls.items()})


def load_cpu_ops() -> KernelOps:
    """The CPU's ops: the twins, with the decode step's small ops in C where a C compiler built them (cpu_ops.py;
    each call still falls back to its twin for dtypes and layouts the C code does not take)."""
    from .cpu_decoder import decode_layers_cpu
    from .cpu_build import library
    from .cpu_ops import (act_linear_add_cpu, linear_add_cpu, norm_linear_cpu, norm_mlp_add_cpu,
                          paged_decode_attention_cpu, rope_store_kv_cpu)

    twins = load_ops(use_triton=False)
    if library() is None:
        return twins
    return dataclasses.replace(twins, norm_linear=norm_linear_cpu, linear_add=linear_add_cpu,
                               act_linear_add=act_linear_add_cpu, norm_mlp_add=norm_mlp_add_cpu,
                               rope_store_kv=rope_store_kv_cpu,
                               paged_decode_attention=paged_decode_attention_cpu, decode_layers=decode_layers_cpu)


__all__ = ["HAS_TRITON", "KernelOps", "load_cpu_ops", "load_ops"]

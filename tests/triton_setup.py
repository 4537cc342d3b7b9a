"""Shared setup of the kernel tests (tests/test_kernels_*.py): the device they run on, the skip rule for tests that
launch Triton kernels, and the paged KV cache the paged-attention tests build.

TRITON_INTERPRET=1 (no CUDA) is set by tests/conftest.py, before any test module, and so before this one, loads.
"""

import pytest
import torch

from kernels import HAS_TRITON

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


def _interpreter_usable() -> bool:
    # Triton makes its own library (tl.sum, tl.cdiv) interpreted or compiled when first imported. If something
    # imported it before TRITON_INTERPRET was set (torch._dynamo does, in a full-suite run), kernels cannot run.
    from triton.language import cdiv
    from triton.runtime.interpreter import InterpretedFunction

    return isinstance(cdiv, InterpretedFunction)


needs_triton = pytest.mark.skipif(
    DEVICE == "cpu" and not (HAS_TRITON and _interpreter_usable()),
    reason="no triton, or it was imported before TRITON_INTERPRET=1: set that in tests/conftest.py",
)


GARBAGE_BLOCK = 2**30  # block-table entries past a sequence's keys: any use of one would read far out of bounds


def paged_kv(seq_lens, Hk, D, block_size, dtype, spare_blocks=2):
    """Dense per-sequence K/V scattered over a shuffled paged cache whose other slots hold random data.

    Returns k_cache, v_cache, block_tables (spare_blocks columns of GARBAGE_BLOCK past the longest sequence's
    blocks), seq_lens as an int32 tensor, and the per-sequence keys and values (n, Hk, D) a sequence must attend to.
    """
    need = [-(-n // block_size) for n in seq_lens]
    num_blocks = sum(need) + 3
    k_cache = torch.randn(num_blocks, block_size, Hk, D, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    block_tables = torch.full((len(seq_lens), max(need) + spare_blocks), GARBAGE_BLOCK, dtype=torch.int32)
    order = iter(torch.randperm(num_blocks).tolist())
    keys, values = [], []
    for b, (n, nb) in enumerate(zip(seq_lens, need)):
        block_tables[b, :nb] = torch.tensor([next(order) for _ in range(nb)], dtype=torch.int32)
        rows = block_tables[b, :nb].long().to(DEVICE)
        keys.append(k_cache[rows].reshape(-1, Hk, D)[:n])  # (n, Hk, D): what the sequence must attend to
        values.append(v_cache[rows].reshape(-1, Hk, D)[:n])
    seq_lens = torch.tensor(seq_lens, dtype=torch.int32, device=DEVICE)
    return k_cache, v_cache, block_tables.to(DEVICE), seq_lens, keys, values

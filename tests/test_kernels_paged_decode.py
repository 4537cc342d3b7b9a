"""paged_decode_attention: Triton (split-K and single-pass) vs its twin, the twin vs dense float64 attention."""

import pytest
import torch

from kernels.paged_decode import (
    _num_splits,
    paged_decode_attention_torch,
    paged_decode_attention_triton,
)
from tests.triton_setup import DEVICE, needs_triton, paged_kv

# Triton vs twin. fp32: both exact fp32 (no TF32), only summation order differs. fp16/bf16: the kernel rounds the
# softmax weights to dtype before the PV product (flash attention does), the twin's SDPA does not round the same
# way; outputs are O(1), so this is a few ulps: fp16 2**-11, bf16 2**-8 (TRITON_INTERPRET truncates to bf16).
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (3e-2, 2e-2)}
DTYPES = list(TOL)
# (seq_lens, Hk, GQA ratio, D, block_size). 0 = a padding row. Lengths off the block grid; long rows force splits.
CASES = [
    ([1, 17, 0, 40], 2, 1, 64, 16),
    ([300, 0], 1, 3, 128, 16),
    ([1], 1, 7, 80, 32),
    ([200, 129, 5], 1, 3, 64, 32),
    ([33, 64], 4, 3, 128, 16),
    pytest.param([2000, 1, 777], 2, 7, 128, 16, marks=pytest.mark.slow),
] + [pytest.param(*case, marks=pytest.mark.gpu) for case in [
    ([32000], 8, 4, 128, 16),  # batch 1, long context: many splits
    ([1, 0, 4097, 513, 2048] * 8, 8, 4, 128, 16),  # batch 40, mixed, padding rows
    ([700] * 64, 4, 7, 128, 32),
    ([1000, 1], 2, 3, 80, 32),
    ([4096] * 256, 8, 4, 128, 16),  # big batch: one pass, no split
]]


def _dense64(q, keys, values, scale):
    """Float64 attention of one query row (Hq, D) to all of keys/values (S, Hk, D)."""
    group = q.shape[0] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # (S, Hq, D)
    v = values.double().repeat_interleave(group, dim=1)
    p = torch.einsum("hd,shd->hs", q.double(), k).mul(scale).softmax(-1)
    return torch.einsum("hs,shd->hd", p, v)


def _case(seq_lens, Hk, group, D, block_size, dtype):
    k_cache, v_cache, block_tables, lens, keys, values = paged_kv(seq_lens, Hk, D, block_size, dtype)
    q = torch.randn(len(seq_lens), Hk * group, D, device=DEVICE, dtype=dtype)
    return q, k_cache, v_cache, block_tables, lens, keys, values


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens, Hk, group, D, block_size", CASES)
def test_triton_matches_twin(seq_lens, Hk, group, D, block_size, dtype, poison_empty):
    q, k_cache, v_cache, block_tables, lens, _, _ = _case(seq_lens, Hk, group, D, block_size, dtype)
    out = paged_decode_attention_triton(q, k_cache, v_cache, block_tables, lens, D**-0.5)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, lens, D**-0.5)
    assert out.dtype == dtype and not out.isnan().any()
    assert torch.all(out[lens == 0] == 0)  # padding rows: zeros, not NaN
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens, Hk, group, D, block_size", CASES)
def test_twin_matches_dense_float64(seq_lens, Hk, group, D, block_size, dtype):
    q, k_cache, v_cache, block_tables, lens, keys, values = _case(seq_lens, Hk, group, D, block_size, dtype)
    out = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, lens, D**-0.5)
    for b, n in enumerate(seq_lens):
        expected = _dense64(q[b], keys[b], values[b], D**-0.5) if n else torch.zeros_like(out[b], dtype=torch.float64)
        # Rounding q, K, V is shared with the reference; what remains is the twin's own arithmetic in dtype.
        atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
        torch.testing.assert_close(out[b].double(), expected, atol=atol, rtol=rtol)


def test_cases_cover_split_and_single_pass():
    split = set()
    for case in CASES:
        seq_lens, Hk, _, _, block_size = case.values if hasattr(case, "values") else case  # pytest.param or tuple
        max_keys = (-(-max(seq_lens) // block_size) + 2) * block_size  # block_tables width from paged_kv
        split.add(_num_splits(len(seq_lens), Hk, max_keys, torch.device(DEVICE)) > 1)
    assert split == {True, False}


@needs_triton
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_cuda_graph_replay_follows_new_lengths_and_tables(dtype):
    B, Hk, group, D, block_size, max_blocks = 4, 2, 4, 128, 16, 64
    k_cache = torch.randn(B * max_blocks + 7, block_size, Hk, D, device=DEVICE, dtype=dtype)
    v_cache = torch.randn_like(k_cache)
    q = torch.randn(B, Hk * group, D, device=DEVICE, dtype=dtype)
    block_tables = torch.randperm(k_cache.shape[0], device=DEVICE)[: B * max_blocks].view(B, max_blocks).int()
    seq_lens = torch.tensor([5, 0, 100, 1000], dtype=torch.int32, device=DEVICE)
    args = (q, k_cache, v_cache, block_tables, seq_lens, D**-0.5)
    paged_decode_attention_triton(*args)  # compile outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = paged_decode_attention_triton(*args)
    for lens in ([1, 1024, 0, 64], [1023, 17, 300, 0]):
        seq_lens.copy_(torch.tensor(lens, dtype=torch.int32))
        block_tables.copy_(torch.randperm(k_cache.shape[0], device=DEVICE)[: B * max_blocks].view(B, max_blocks))
        q.copy_(torch.randn_like(q))
        graph.replay()
        atol, rtol = TOL[dtype]
        torch.testing.assert_close(out, paged_decode_attention_torch(*args), atol=atol, rtol=rtol)

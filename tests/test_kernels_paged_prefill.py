"""paged_prefill_attention: Triton vs its twin over plain, prefix-cached and chunked prefill; twin vs float64."""

import pytest
import torch

from kernels.paged_prefill import paged_prefill_attention_torch, paged_prefill_attention_triton
from tests.triton_setup import DEVICE, needs_triton, paged_kv

# Triton vs twin. fp32: both exact fp32 (no TF32), only summation order differs. fp16/bf16: the kernel rounds the
# softmax weights to dtype before the PV product (flash attention does), the twin's SDPA does not round the same
# way; outputs are O(1), so this is a few ulps: fp16 2**-11, bf16 2**-8 (TRITON_INTERPRET truncates to bf16).
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (3e-2, 2e-2)}
DTYPES = list(TOL)
# (q_lens, seq_lens, Hk, GQA ratio, D, block_size). q_len == seq_len: plain prefill; q_len < seq_len: the first
# seq_len - q_len keys are a cached prefix or earlier chunks. q_len 0: a sequence with nothing to do this step.
CASES = [
    ([1, 17, 40], [1, 17, 40], 2, 1, 64, 16),
    ([5, 32, 1], [37, 64, 5], 1, 3, 128, 16),
    ([9, 0, 16], [9, 20, 48], 1, 7, 80, 32),
    ([41], [41], 2, 3, 64, 32),
    ([3, 2], [130, 70], 2, 3, 64, 16),
    pytest.param([341, 100], [341, 400], 2, 7, 128, 16, marks=pytest.mark.slow),
    pytest.param([200, 9], [1000, 9], 1, 1, 128, 32, marks=pytest.mark.slow),
] + [pytest.param(*case, marks=pytest.mark.gpu) for case in [
    ([2048], [2048], 8, 4, 128, 16),  # one long prompt
    ([1000, 576, 33], [4000, 576, 100], 8, 4, 128, 16),  # prefix-cached, plain, chunked
    ([512] * 4, [512, 1024, 1536, 2048], 4, 7, 128, 32),
    ([300, 1], [300, 900], 2, 3, 80, 32),
]]


def _case(q_lens, seq_lens, Hk, group, D, block_size, dtype, spare_blocks=2):
    """Packed queries and dense per-sequence K/V scattered over a shuffled paged cache of random data."""
    k_cache, v_cache, block_tables, lens, keys, values = paged_kv(seq_lens, Hk, D, block_size, dtype, spare_blocks)
    cu_seqlens_q = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), Hk * group, D, device=DEVICE, dtype=dtype)
    args = (q, k_cache, v_cache, block_tables, cu_seqlens_q, lens, max(q_lens), D**-0.5)
    return args, keys, values


def _dense64(q, keys, values, scale):
    """Float64 causal attention of the last len(q) positions (L, Hq, D) to keys/values (S, Hk, D)."""
    L, S, group = q.shape[0], keys.shape[0], q.shape[1] // keys.shape[1]
    k = keys.double().repeat_interleave(group, dim=1)  # (S, Hq, D)
    v = values.double().repeat_interleave(group, dim=1)
    s = torch.einsum("lhd,shd->hls", q.double(), k) * scale
    visible = torch.arange(S, device=q.device)[None, :] <= torch.arange(S - L, S, device=q.device)[:, None]
    p = s.masked_fill(~visible, float("-inf")).softmax(-1)
    return torch.einsum("hls,shd->lhd", p, v)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_lens, seq_lens, Hk, group, D, block_size", CASES)
def test_triton_matches_twin(q_lens, seq_lens, Hk, group, D, block_size, dtype, poison_empty):
    args, _, _ = _case(q_lens, seq_lens, Hk, group, D, block_size, dtype)
    out = paged_prefill_attention_triton(*args)
    ref = paged_prefill_attention_torch(*args)
    assert out.dtype == dtype and not out.isnan().any()  # every packed row was written
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out, ref, atol=atol, rtol=rtol)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_lens, seq_lens, Hk, group, D, block_size", CASES)
def test_twin_matches_dense_float64(q_lens, seq_lens, Hk, group, D, block_size, dtype):
    args, keys, values = _case(q_lens, seq_lens, Hk, group, D, block_size, dtype)
    q, cu = args[0], args[4].tolist()
    out = paged_prefill_attention_torch(*args)
    # Rounding q, K, V is shared with the reference; what remains is the twin's own arithmetic in dtype.
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (2e-2, 2e-2)}[dtype]
    for b in range(len(q_lens)):
        if q_lens[b]:
            expected = _dense64(q[cu[b] : cu[b + 1]], keys[b], values[b], args[7])
            torch.testing.assert_close(out[cu[b] : cu[b + 1]].double(), expected, atol=atol, rtol=rtol)

"""The int8 KV cache: the format's error bound, the store op's quantization (Triton vs twin), and paged decode /
prefill attention reading int8 pages against the same attention over the unquantized K/V."""

import pytest
import torch

from kernels.kv_int8 import dequantize_kv, quantize_kv
from kernels.kv_store import rope_store_kv_torch, rope_store_kv_triton
from kernels.paged_decode import paged_decode_attention_torch, paged_decode_attention_triton
from kernels.paged_prefill import paged_prefill_attention_torch, paged_prefill_attention_triton
from tests.triton_setup import DEVICE, needs_triton, paged_kv

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Attention over int8 K/V against attention over the original K/V (randn, |x| <~ 4.5, so a row's step is
# ~9/255 = 0.035 and each value is off by <= half of it). A V error moves the output by at most that; a K error moves
# a score by <= 0.018 * sum|q| * scale ~ 0.1 for D=64..128, a softmax weight by ~10%: outputs are weighted means of
# O(1) values, observed max error ~0.03. Stated tolerance: 0.08 absolute (plus the dtype's own rounding).
ATTN_ATOL = 0.08
# Triton vs twin on the same int8 pages: the dequantized K/V are the same values (both round q*s+z to the dtype),
# so this is test_kernels_paged_*'s tolerance: summation order and the rounding of softmax weights.
TOL = {torch.float32: (2e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (3e-2, 2e-2)}


def quantized_cache(cache: torch.Tensor):
    """A dense (blocks, block_size, Hk, D) cache as int8 pages and their scale_zero."""
    q, sz = quantize_kv(cache.flatten(0, 1))
    return q.view(cache.shape), sz.view(*cache.shape[:3], 2)


def test_round_trip_error_is_half_a_step():
    x = torch.randn(97, 5, 64) * torch.rand(97, 5, 1) * 10  # rows of very different ranges
    x[3, 2] = 1.5  # a constant row: scale 0, stored exactly
    q, sz = quantize_kv(x)
    assert q.dtype == torch.uint8 and sz.dtype == torch.float16 and sz.shape == (97, 5, 2)
    back = dequantize_kv(q, sz, torch.float32)
    step = sz[..., :1].float()
    zero_err = (x.amin(-1, keepdim=True) - sz[..., 1:].float()).abs()  # fp16 rounding of the zero
    assert torch.all((back - x).abs() <= step / 2 + zero_err + 1e-6)
    assert torch.equal(back[3, 2], torch.full((64,), 1.5))


def test_half_the_bytes_of_bf16():
    # per (token, head): D codes + fp16 scale and zero, against 2 * D bytes in bf16
    D = 128
    assert (D + 4) / (2 * D) < 0.52


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, Hq, Hk, D", [(1, 4, 4, 64), (9, 6, 2, 80), (41, 21, 3, 128)])
def test_store_quantizes_like_the_twin(T, Hq, Hk, D, dtype):
    block_size, num_blocks = 16, T // 16 + 4
    qkv = torch.randn(T, Hq + 2 * Hk, D, device=DEVICE, dtype=dtype) * 3
    positions = torch.randint(0, 512, (T,), device=DEVICE)
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(512, dtype=torch.float32), inv_freq)
    cos_sin = torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]
    slots[::4] = -1  # padding rows write nothing
    caches = [torch.randint(0, 256, (num_blocks, block_size, Hk, D), dtype=torch.uint8, device=DEVICE)
              for _ in range(2)] + [torch.randn(num_blocks, block_size, Hk, 2, device=DEVICE).half() for _ in range(2)]
    fast, twin = [c.clone() for c in caches], [c.clone() for c in caches]
    qkv_fast, qkv_twin = qkv.clone(), qkv.clone()
    views = lambda t: (t[:, :Hq], t[:, Hq:Hq + Hk], t[:, Hq + Hk:])  # noqa: E731
    rope_store_kv_triton(*views(qkv_fast), positions, cos_sin, fast[0], fast[1], slots, fast[2], fast[3])
    rope_store_kv_torch(*views(qkv_twin), positions, cos_sin, twin[0], twin[1], slots, twin[2], twin[3])
    # V is stored as given: the same scales and zeros, codes equal or one apart (a value on a .5 boundary).
    assert torch.equal(fast[3], twin[3])
    assert (fast[1].int() - twin[1].int()).abs().max() <= 1
    # K is rotated first, which may differ by one ulp of the dtype (test_kernels_kv_store.py); so may its row's
    # zero, and the dequantized values by that plus one step.
    written = torch.zeros(num_blocks * block_size, dtype=torch.bool, device=DEVICE)
    written[slots[slots >= 0]] = True
    k_fast, k_twin = (dequantize_kv(c[0].flatten(0, 1)[written], c[2].flatten(0, 1)[written], torch.float32)
                      for c in (fast, twin))
    ulp = {torch.float32: 1e-4, torch.float16: 2e-2, torch.bfloat16: 0.13}[dtype]  # at |x| <~ 16
    assert torch.all((k_fast - k_twin).abs() <= twin[2].flatten(0, 1)[written][..., :1].float() + ulp)
    for before, after in zip(caches, fast):  # untouched slots stay as they were
        assert torch.equal(before.flatten(0, 1)[~written], after.flatten(0, 1)[~written])


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_store_then_read_equals_quantize_dequantize(dtype):
    T, Hk, D = 7, 2, 64
    k, v = torch.randn(T, Hk, D, dtype=dtype), torch.randn(T, Hk, D, dtype=dtype)
    q = torch.randn(T, 4, D, dtype=dtype)
    caches = [torch.zeros(2, 16, Hk, D, dtype=torch.uint8) for _ in range(2)] + [
        torch.zeros(2, 16, Hk, 2, dtype=torch.float16) for _ in range(2)]
    positions = torch.arange(T)
    cos_sin = torch.cat([torch.ones(T, D // 2), torch.zeros(T, D // 2)], dim=-1)  # rotation by 0
    slots = torch.arange(T) + 16
    rope_store_kv_torch(q, k.clone(), v.clone(), positions, cos_sin, caches[0], caches[1], slots, *caches[2:])
    got = dequantize_kv(caches[1][1, :T], caches[3][1, :T], dtype)
    torch.testing.assert_close(got, dequantize_kv(*quantize_kv(v), dtype))


# group 1 (multi-head attention) takes the CUDA-core path, the others the tensor cores
DECODE_CASES = [([1, 17, 0, 40], 2, 1, 64, 16), ([300, 0], 1, 3, 128, 16), ([200, 129, 5], 1, 3, 64, 32),
                ([130, 0, 64], 3, 1, 80, 16)] + [pytest.param(*case, marks=pytest.mark.gpu) for case in [
                    ([2048, 1, 0, 777] * 8, 8, 1, 128, 16),  # batch 32, one pass, padding rows
                    ([9000], 4, 1, 128, 16),  # batch 1, many splits
                ]]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens, Hk, group, D, block_size", DECODE_CASES)
def test_decode_int8_triton_twin_and_unquantized(seq_lens, Hk, group, D, block_size, dtype, poison_empty):
    k_cache, v_cache, block_tables, lens, _, _ = paged_kv(seq_lens, Hk, D, block_size, dtype)
    q = torch.randn(len(seq_lens), Hk * group, D, device=DEVICE, dtype=dtype)
    (kq, ksz), (vq, vsz) = quantized_cache(k_cache), quantized_cache(v_cache)
    scale = D ** -0.5
    out = paged_decode_attention_triton(q, kq, vq, block_tables, lens, scale, ksz, vsz)
    ref = paged_decode_attention_torch(q, kq, vq, block_tables, lens, scale, ksz, vsz)
    dense = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, lens, scale)
    assert out.dtype == dtype and not out.isnan().any() and torch.all(out[lens == 0] == 0)
    torch.testing.assert_close(out, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(ref.float(), dense.float(), atol=ATTN_ATOL + TOL[dtype][0], rtol=0)


PREFILL_CASES = [([1, 5, 17], [1, 5, 17], 2, 1, 64, 16), ([7, 40], [30, 40], 1, 3, 80, 16)]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("q_lens, seq_lens, Hk, group, D, block_size", PREFILL_CASES)
def test_prefill_int8_triton_twin_and_unquantized(q_lens, seq_lens, Hk, group, D, block_size, dtype, poison_empty):
    k_cache, v_cache, block_tables, lens, _, _ = paged_kv(seq_lens, Hk, D, block_size, dtype)
    cu = torch.tensor([0] + q_lens, dtype=torch.int32).cumsum(0, dtype=torch.int32).to(DEVICE)
    q = torch.randn(sum(q_lens), Hk * group, D, device=DEVICE, dtype=dtype)
    (kq, ksz), (vq, vsz) = quantized_cache(k_cache), quantized_cache(v_cache)
    common = (block_tables, cu, lens, max(q_lens), D ** -0.5)
    out = paged_prefill_attention_triton(q, kq, vq, *common, ksz, vsz)
    ref = paged_prefill_attention_torch(q, kq, vq, *common, ksz, vsz)
    dense = paged_prefill_attention_torch(q, k_cache, v_cache, *common)
    assert out.dtype == dtype and not out.isnan().any()
    torch.testing.assert_close(out, ref, atol=TOL[dtype][0], rtol=TOL[dtype][1])
    torch.testing.assert_close(ref.float(), dense.float(), atol=ATTN_ATOL + TOL[dtype][0], rtol=0)


def test_half_given_scales_are_refused():
    k = torch.zeros(2, 16, 1, 64, dtype=torch.uint8)
    with pytest.raises(ValueError, match="both"):
        paged_decode_attention_torch(torch.randn(1, 1, 64), k, k, torch.zeros(1, 1, dtype=torch.int32),
                                     torch.ones(1, dtype=torch.int32), 0.125, torch.zeros(2, 16, 1, 2).half(), None)

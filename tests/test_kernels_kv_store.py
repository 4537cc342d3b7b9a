"""rope_store_kv: Triton launcher vs its twin and vs a per-token loop: q rotated in place, rotated k and v written to
their slots, padding slots (< 0) and every other slot untouched."""

import pytest
import torch

from kernels.kv_store import rope_store_kv_torch, rope_store_kv_triton
from kernels.rotary import rotary_torch
from tests.triton_setup import DEVICE, needs_triton

MAX_POS = 4096
# Rotated values (q, and k in the cache): both round the table to dtype like HF; the twin then rounds each product
# (as HF does), the kernel only the result. Where x1*cos and x2*sin nearly cancel, the output keeps the products'
# rounding error, so atol is one ulp at the products' size (|x| <= ~4 for randn): fp16 2**-11 * 4 * 2, bf16
# 2**-8 * 4 * 2 (TRITON_INTERPRET also truncates fp32 -> bf16 instead of rounding). fp32: 1e-5 covers FMA
# contraction. V is a copy: bit for bit.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (4e-3, 2e-3), torch.bfloat16: (3.2e-2, 1.6e-2)}
DTYPES = list(TOL)
# (T, Hq, Hk, D): GQA ratios 1, 3, 7 and head dims 64, 80, 128; the interpreter runs one program per token.
CASES = [(T, Hq, Hk, D) for T in (1, 9, 41) for Hq, Hk, D in [(4, 4, 64), (6, 2, 80), (21, 3, 128)]] + [
    pytest.param(341, 21, 3, 128, marks=pytest.mark.slow)
] + [pytest.param(*case, marks=pytest.mark.gpu) for case in [(4099, 32, 8, 128), (2048, 64, 64, 128),
                                                              (341, 28, 4, 80)]]


def _table(D: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # HF's default rope
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)  # (MAX_POS, D/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # (MAX_POS, D): [cos | sin]


def _case(T, Hq, Hk, D, block_size, dtype, pad_share=0.25):
    num_blocks = T // block_size + 4
    qkv = torch.randn(T, Hq + 2 * Hk, D, device=DEVICE, dtype=dtype)
    k_cache = torch.randn(num_blocks, block_size, Hk, D, device=DEVICE, dtype=dtype)  # random, never zeros
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]  # distinct slots anywhere in the cache
    pad = torch.rand(T, device=DEVICE) < pad_share  # CUDA-graph padding rows
    positions = torch.randint(0, MAX_POS, (T,), device=DEVICE)
    return qkv, positions, k_cache, v_cache, torch.where(pad, -1, slots)


def _views(qkv, Hq, Hk):  # strided views of one packed qkv, as the engine passes them
    return qkv[:, :Hq], qkv[:, Hq:Hq + Hk], qkv[:, Hq + Hk:]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("T, Hq, Hk, D", CASES)
def test_triton_matches_twin_and_loop(T, Hq, Hk, D, block_size, dtype):
    qkv, positions, k_cache, v_cache, slot_mapping = _case(T, Hq, Hk, D, block_size, dtype)
    cos_sin = _table(D)
    qkv_twin, k_twin, v_twin = qkv.clone(), k_cache.clone(), v_cache.clone()
    k_loop, v_loop = k_cache.clone(), v_cache.clone()
    qkv0 = qkv.clone()
    rope_store_kv_triton(*_views(qkv, Hq, Hk), positions, cos_sin, k_cache, v_cache, slot_mapping)
    rope_store_kv_torch(*_views(qkv_twin, Hq, Hk), positions, cos_sin, k_twin, v_twin, slot_mapping)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(qkv[:, :Hq], qkv_twin[:, :Hq], atol=atol, rtol=rtol)  # q rotated in place
    assert torch.equal(qkv[:, Hq:], qkv0[:, Hq:])  # the kernel leaves k and v where they were
    torch.testing.assert_close(k_cache, k_twin, atol=atol, rtol=rtol)
    assert torch.equal(v_cache, v_twin)
    # Per-token loop on the twin's rotated k: written slots hold the rows, every other slot is untouched.
    _, k_rot, v = _views(qkv_twin, Hq, Hk)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_loop[slot // block_size, slot % block_size] = k_rot[t]
            v_loop[slot // block_size, slot % block_size] = v[t]
    written = torch.zeros(k_cache.shape[:2], dtype=torch.bool, device=DEVICE).view(-1)
    written[slot_mapping[slot_mapping >= 0]] = True
    written = written.view(k_cache.shape[:2])
    assert torch.equal(k_cache[~written], k_loop[~written]) and torch.equal(v_cache, v_loop)
    torch.testing.assert_close(k_cache[written], k_loop[written], atol=atol, rtol=rtol)


@needs_triton
def test_all_padding_writes_nothing_but_still_rotates_q():
    qkv, positions, k_cache, v_cache, _ = _case(9, 4, 2, 64, 16, torch.float16)
    before = k_cache.clone(), v_cache.clone()
    q_ref = qkv[:, :4].clone()
    rotary_torch(q_ref, qkv[:, 4:6].clone(), positions, _table(64))
    rope_store_kv_triton(*_views(qkv, 4, 2), positions, _table(64), k_cache, v_cache,
                         torch.full((9,), -1, device=DEVICE, dtype=torch.int64))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])
    torch.testing.assert_close(qkv[:, :4], q_ref, atol=4e-3, rtol=2e-3)

"""store_kv: Triton launcher vs its twin and vs a per-token loop; padding slots (< 0) and other slots untouched."""

import pytest
import torch

from kernels.kv_store import store_kv_torch, store_kv_triton
from tests.triton_setup import DEVICE, needs_triton

DTYPES = [torch.float32, torch.float16, torch.bfloat16]  # a copy: every dtype must match bit for bit
# (T, Hq, Hk, D) of the packed qkv the k/v views come from; the interpreter runs one program per token.
CASES = [(T, Hq, Hk, D) for T in (1, 9, 41) for Hq, Hk, D in [(4, 1, 64), (6, 2, 80), (21, 3, 128)]] + [
    pytest.param(341, 21, 3, 128, marks=pytest.mark.slow)
] + [pytest.param(*case, marks=pytest.mark.gpu) for case in [(4099, 32, 8, 128), (2048, 64, 64, 128)]]


def _case(T, Hq, Hk, D, block_size, dtype):
    num_blocks = T // block_size + 4
    qkv = torch.randn(T, Hq + 2 * Hk, D, device=DEVICE, dtype=dtype)
    k, v = qkv[:, Hq : Hq + Hk], qkv[:, Hq + Hk :]  # strided views, as the engine passes them
    k_cache = torch.randn(num_blocks, block_size, Hk, D, device=DEVICE, dtype=dtype)  # random, never zeros
    v_cache = torch.randn_like(k_cache)
    slots = torch.randperm(num_blocks * block_size, device=DEVICE)[:T]  # distinct slots anywhere in the cache
    pad = torch.rand(T, device=DEVICE) < 0.25  # CUDA-graph padding rows
    slot_mapping = torch.where(pad, -1, slots)
    return k, v, k_cache, v_cache, slot_mapping


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("block_size", [16, 32])
@pytest.mark.parametrize("T, Hq, Hk, D", CASES)
def test_triton_matches_twin_and_loop(T, Hq, Hk, D, block_size, dtype):
    k, v, k_cache, v_cache, slot_mapping = _case(T, Hq, Hk, D, block_size, dtype)
    k_twin, v_twin = k_cache.clone(), v_cache.clone()
    k_loop, v_loop = k_cache.clone(), v_cache.clone()
    store_kv_triton(k, v, k_cache, v_cache, slot_mapping)
    store_kv_torch(k, v, k_twin, v_twin, slot_mapping)
    for t, slot in enumerate(slot_mapping.tolist()):
        if slot >= 0:
            k_loop[slot // block_size, slot % block_size] = k[t]
            v_loop[slot // block_size, slot % block_size] = v[t]
    for cache, twin, loop in ((k_cache, k_twin, k_loop), (v_cache, v_twin, v_loop)):
        assert torch.equal(cache, loop)  # written slots hold the rows, every other slot is untouched
        assert torch.equal(twin, loop)


@needs_triton
def test_all_padding_writes_nothing():
    k, v, k_cache, v_cache, _ = _case(9, 4, 2, 64, 16, torch.float16)
    before = k_cache.clone(), v_cache.clone()
    store_kv_triton(k, v, k_cache, v_cache, torch.full((9,), -1, device=DEVICE, dtype=torch.int64))
    assert torch.equal(k_cache, before[0]) and torch.equal(v_cache, before[1])

"""rotary_torch (in place): the twin vs float64 and vs HF. Its Triton path runs inside rope_store_kv
(tests/test_kernels_kv_store.py)."""

import pytest
import torch

from kernels.rotary import rotary_torch
from tests.triton_setup import DEVICE

MAX_POS = 4096
DTYPES = [torch.float32, torch.float16, torch.bfloat16]
def _table(D: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)  # HF's default rope
    freqs = torch.outer(torch.arange(MAX_POS, dtype=torch.float32), inv_freq)  # (MAX_POS, D/2)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1).to(DEVICE)  # (MAX_POS, D): [cos | sin]


def _packed_qkv(T, Hq, Hk, D, dtype):
    qkv = torch.randn(T, Hq + 2 * Hk, D, device=DEVICE, dtype=dtype)  # q, k: strided views, like the engine's
    return qkv, qkv[:, :Hq], qkv[:, Hq : Hq + Hk]


def _rotate64(x: torch.Tensor, positions: torch.Tensor, D: int) -> torch.Tensor:
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float64) / D)
    angle = positions.double()[:, None, None] * inv_freq.to(x.device)  # (T, 1, D/2)
    x1, x2 = x.double().chunk(2, dim=-1)
    return torch.cat([x1 * angle.cos() - x2 * angle.sin(), x2 * angle.cos() + x1 * angle.sin()], dim=-1)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_matches_float64(dtype):
    T, Hq, Hk, D = 41, 6, 2, 128
    positions = torch.randint(0, MAX_POS, (T,), device=DEVICE)
    _, q, k = _packed_qkv(T, Hq, Hk, D, dtype)
    q_ref, k_ref = _rotate64(q, positions, D), _rotate64(k, positions, D)
    rotary_torch(q, k, positions, _table(D))
    # The fp32 table's angles are off by ~pos * 2**-24 rad: 4e-4 at pos 4095 even in fp32. Lower precisions add the
    # table's rounding to dtype and three roundings of the arithmetic.
    atol, rtol = {torch.float32: (1e-3, 1e-4), torch.float16: (8e-3, 4e-3), torch.bfloat16: (6e-2, 3e-2)}[dtype]
    torch.testing.assert_close(q.double(), q_ref, atol=atol, rtol=rtol)
    torch.testing.assert_close(k.double(), k_ref, atol=atol, rtol=rtol)


@pytest.mark.slow  # imports transformers (~10 s)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_equals_hf_apply_rotary_pos_emb(dtype):
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    T, Hq, Hk, D = 41, 6, 2, 64
    positions = torch.randint(0, MAX_POS, (T,), device=DEVICE)
    cos_sin = _table(D)
    _, q, k = _packed_qkv(T, Hq, Hk, D, dtype)
    cos = cos_sin[positions, : D // 2].repeat(1, 2)[None].to(dtype)  # (1, T, D), as HF's rotary module returns
    sin = cos_sin[positions, D // 2 :].repeat(1, 2)[None].to(dtype)
    q_hf, k_hf = modeling_llama.apply_rotary_pos_emb(q.transpose(0, 1)[None], k.transpose(0, 1)[None], cos, sin)
    rotary_torch(q, k, positions, cos_sin)
    assert torch.equal(q, q_hf[0].transpose(0, 1)) and torch.equal(k, k_hf[0].transpose(0, 1))

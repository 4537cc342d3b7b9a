"""rms_norm: Triton launcher vs its twin, the twin vs float64 and vs HF's LlamaRMSNorm."""

import pytest
import torch

from kernels.rms_norm import rms_norm_torch, rms_norm_triton
from tests.triton_setup import DEVICE, needs_triton

EPS = 1e-6
# Triton vs twin. fp32: same math, only the sum-of-squares order and rsqrt's last bit differ (~1e-7 relative).
# fp16/bf16: the same roundings, but a 1-ulp flip of the normalised row (rsqrt, order) can become 2 ulps after the
# weight multiply: fp16 2 * 2**-10; bf16 2 * 2**-7, also covering TRITON_INTERPRET's truncating fp32 -> bf16.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)
# (T, H): odd rows x odd widths. The interpreter runs one program per row (~5-15 ms each), so the big ones are slow.
SHAPES = [(1, 64), (1, 4231), (9, 576), (9, 4231), (41, 64), (41, 576)] + [
    pytest.param(T, H, marks=pytest.mark.slow) for T, H in [(41, 4231), (341, 576)]
] + [pytest.param(T, H, marks=pytest.mark.gpu) for T, H in [(341, 4231), (4096, 4096), (4099, 8192)]]


def _close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol)


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H", SHAPES)
def test_rms_norm_triton_matches_twin(T, H, dtype, poison_empty):
    x = torch.randn(T, H, device=DEVICE, dtype=dtype) * 3
    w = torch.randn(H, device=DEVICE, dtype=dtype)
    _close(rms_norm_triton(x, w, EPS), rms_norm_torch(x, w, EPS), dtype)


@needs_triton
def test_strided_rows_and_leading_dims():
    big = torch.randn(2, 9, 700, device=DEVICE)
    x = big[..., 13:589]  # (2, 9, 576): rows 700 apart
    w = torch.randn(576, device=DEVICE)
    _close(rms_norm_triton(x, w, EPS), rms_norm_torch(x, w, EPS), torch.float32)


@needs_triton
def test_fp32_weight_on_bf16_input_promotes_like_hf():
    x = torch.randn(9, 576, device=DEVICE, dtype=torch.bfloat16)
    w = torch.randn(576, device=DEVICE, dtype=torch.float32)
    y = rms_norm_triton(x, w, EPS)
    assert y.dtype == torch.float32  # HF: weight * y.to(x.dtype) promotes to the weight's dtype
    _close(y.to(torch.bfloat16), rms_norm_torch(x, w, EPS).to(torch.bfloat16), torch.bfloat16)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_matches_float64(dtype):
    x = torch.randn(41, 4231, device=DEVICE, dtype=dtype)
    w = torch.randn(4231, device=DEVICE, dtype=dtype)
    s = x.double()
    ref = s * torch.rsqrt(s.pow(2).mean(-1, keepdim=True) + EPS) * w.double()
    y = rms_norm_torch(x, w, EPS)
    # Two roundings to dtype (normalised row, then product): 2 ulps of dtype; fp32 adds reduction error.
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(y.double(), ref, atol=atol, rtol=rtol)


@pytest.mark.slow  # imports transformers (~10 s)
def test_twin_equals_hf_llama_rms_norm_in_fp32():
    modeling_llama = pytest.importorskip("transformers.models.llama.modeling_llama")
    norm = modeling_llama.LlamaRMSNorm(576, eps=EPS).to(DEVICE)
    with torch.no_grad():
        norm.weight.copy_(torch.randn(576))
        x = torch.randn(41, 576, device=DEVICE)
        assert torch.equal(rms_norm_torch(x, norm.weight, EPS), norm(x))

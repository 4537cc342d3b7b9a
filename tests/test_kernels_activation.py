"""silu_and_mul: Triton launcher vs its twin, and the twin vs float64."""

import pytest
import torch

from kernels.activation import silu_and_mul_torch, silu_and_mul_triton
from tests.triton_setup import DEVICE, needs_triton

# Triton vs twin: both round silu to dtype, then the product. fp32: exp() implementations differ by ~1 ulp.
# fp16: 1 ulp. bf16: 2 ulps (2**-7 each) since TRITON_INTERPRET truncates fp32 -> bf16 instead of rounding.
TOL = {torch.float32: (1e-5, 1e-5), torch.float16: (1e-3, 1e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)
# (T, I): odd rows x odd widths; the interpreter runs one program per (row, 1024 columns), so big ones are slow.
SHAPES = [(1, 64), (1, 4231), (9, 576), (9, 4231), (41, 64), (41, 576)] + [
    pytest.param(T, I, marks=pytest.mark.slow) for T, I in [(41, 4231), (341, 576)]
] + [pytest.param(T, I, marks=pytest.mark.gpu) for T, I in [(341, 4231), (4099, 11008), (4096, 14336)]]


@needs_triton
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, I", SHAPES)
def test_triton_matches_twin(T, I, dtype, poison_empty):
    x = torch.randn(T, 2 * I, device=DEVICE, dtype=dtype) * 4  # reach silu's curved part and its tails
    y = silu_and_mul_triton(x)
    assert y.shape == (T, I) and not y.isnan().any()
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(y, silu_and_mul_torch(x), atol=atol, rtol=rtol)


@needs_triton
def test_strided_rows():
    x = torch.randn(9, 1500, device=DEVICE)[:, :1152]  # (9, 2*576), rows 1500 apart
    torch.testing.assert_close(silu_and_mul_triton(x), silu_and_mul_torch(x), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twin_matches_float64(dtype):
    x = torch.randn(41, 2 * 576, device=DEVICE, dtype=dtype) * 4
    gate, up = x.double().chunk(2, dim=-1)
    ref = gate * torch.sigmoid(gate) * up
    # Two roundings to dtype (silu, then the product): 2 ulps.
    atol, rtol = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3), torch.bfloat16: (1.6e-2, 1.6e-2)}[dtype]
    torch.testing.assert_close(silu_and_mul_torch(x).double(), ref, atol=atol, rtol=rtol)

"""norm_linear / linear_add / act_linear_add: Triton launchers (one-row fused GEMV, several-row fallback) vs twins."""

import pytest
import torch

from kernels.gemv import (act_linear_add_torch, act_linear_add_triton, linear_add_torch, linear_add_triton,
                          norm_linear_torch, norm_linear_triton)
from tests.triton_setup import DEVICE, needs_triton

EPS = 1e-5
# Tolerances are relative to the largest output (`_close`): where the residual and the product nearly cancel, the
# error is set by the magnitudes added, not by the small result. fp32: only the summation order differs.
# fp16/bf16: the GEMV accumulates in fp32 in another order than the matmul and rounds the output once where the
# twin rounds twice (matmul, then residual add): 2 ulps of the largest magnitude; an input rounded the other way
# (norm or activation, 1 ulp) moves the sum by far less. TRITON_INTERPRET truncates fp32 -> bf16: 1 more ulp.
TOL = {torch.float32: (1e-5, 1e-4), torch.float16: (2e-3, 4e-3), torch.bfloat16: (1.6e-2, 3e-2)}
DTYPES = list(TOL)
# (N, K): odd widths that leave partial row and column blocks; the interpreter runs one program per 16 rows.
SHAPES = [(9, 64), (41, 341), (97, 1000), (33, 4231)] + [
    pytest.param(N, K, marks=pytest.mark.gpu)
    for N, K in [(1152, 896), (896, 4864), (12288, 4096), (4096, 11008), (32064, 4096)]]
ROWS = [1, 3]  # one row: the fused GEMV; several: norm / activation kernels + cuBLAS


def _close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def _weights(N, K, dtype, bias):
    w = torch.randn(N, K, device=DEVICE, dtype=dtype) / K ** 0.5
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    return w, b


def _inputs(op, T, N, K, dtype, bias):
    """(triton launcher, twin, args) for one op; inputs scaled to reach the norm's and silu's interesting ranges."""
    w, b = _weights(N, K, dtype, bias)
    residual = torch.randn(T, N, device=DEVICE, dtype=dtype) * 4
    if op == "norm_linear":
        x = torch.randn(T, K, device=DEVICE, dtype=dtype) * 3
        norm_w = torch.randn(K, device=DEVICE, dtype=dtype)
        return norm_linear_triton, norm_linear_torch, (x, norm_w, EPS, w, b)
    if op == "linear_add":
        return linear_add_triton, linear_add_torch, (torch.randn(T, K, device=DEVICE, dtype=dtype), w, b, residual)
    x = torch.randn(T, 2 * K, device=DEVICE, dtype=dtype) * 4  # gate | up, reaching silu's curved part
    return act_linear_add_triton, act_linear_add_torch, (x, w, residual)


@needs_triton
@pytest.mark.parametrize("op, bias", [("norm_linear", False), ("norm_linear", True), ("linear_add", False),
                                      ("linear_add", True), ("act_linear_add", False)])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("T", ROWS)
def test_triton_matches_twin(T, N, K, dtype, op, bias, poison_empty):
    fast, twin, args = _inputs(op, T, N, K, dtype, bias)
    before = [a.clone() if isinstance(a, torch.Tensor) else a for a in args]
    _close(fast(*args), twin(*args), dtype)
    # Inputs (the residual stream above all) are read, never written.
    assert all(torch.equal(a, b) for a, b in zip(args, before) if isinstance(a, torch.Tensor))


@needs_triton
def test_low_precision_weight_copy_falls_back_to_the_twin_math():
    # The CPU decode path keeps a bf16 copy of fp32 weights: x is cast to it and the result back to fp32.
    x = torch.randn(1, 341, device=DEVICE)
    norm_w = torch.randn(341, device=DEVICE)
    w = (torch.randn(41, 341, device=DEVICE) / 341 ** 0.5).to(torch.bfloat16)
    y = norm_linear_triton(x, norm_w, EPS, w, None)
    assert y.dtype == torch.float32
    torch.testing.assert_close(y, norm_linear_torch(x, norm_w, EPS, w, None))


@needs_triton
def test_shape_errors_are_clear():
    x = torch.randn(1, 64, device=DEVICE)
    with pytest.raises(ValueError, match="residual"):
        linear_add_triton(x, torch.randn(9, 64, device=DEVICE), None, torch.randn(1, 8, device=DEVICE))
    with pytest.raises(ValueError, match=r"x \(T, 128\)"):
        act_linear_add_triton(x, torch.randn(9, 64, device=DEVICE), torch.randn(1, 9, device=DEVICE))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_twins_match_float64(dtype):
    x = torch.randn(3, 576, device=DEVICE, dtype=dtype)
    norm_w = torch.randn(576, device=DEVICE, dtype=dtype)
    w = torch.randn(97, 576, device=DEVICE, dtype=dtype) / 24
    xd = x.double()
    normed = (xd * torch.rsqrt(xd.pow(2).mean(-1, keepdim=True) + EPS) * norm_w.double())
    ref = normed @ w.double().t()
    # Roundings of the normed row (2 ulps) and of the output (1 ulp), plus the matmul's own accumulation.
    atol, rtol = {torch.float32: (1e-4, 1e-4), torch.float16: (1e-2, 1e-2), torch.bfloat16: (6e-2, 6e-2)}[dtype]
    torch.testing.assert_close(norm_linear_torch(x, norm_w, EPS, w).double(), ref, atol=atol, rtol=rtol)


def test_dependent_launches_only_for_gpu_tensors():
    """Programmatic dependent launch is a Hopper launch attribute: CPU tensors (TRITON_INTERPRET) never ask for it,
    and GPUs before sm_90 neither (checked on the GPU in tests/test_quant_gpu.py)."""
    from kernels._triton import dependent_launches

    assert not dependent_launches(torch.zeros(1))
    if torch.cuda.is_available():
        major = torch.cuda.get_device_capability()[0]
        assert dependent_launches(torch.zeros(1, device="cuda")) == (major >= 9 and torch.version.hip is None)

"""Quantized projections: the reference dequantization, the Triton GEMV / GEMM against the twin, the CPU kernels."""

import pytest
import torch

from kernels.gemv import (act_linear_add_torch, act_linear_add_triton, linear_add_torch, linear_add_triton,
                          norm_linear_torch, norm_linear_triton, norm_mlp_add_torch, norm_mlp_add_triton)
from kernels.quant_cpu import CpuInt4Weight, CpuInt8Weight, pack_for_cpu
from kernels.quant_matmul import _tiles, quant_matmul_torch, quant_matmul_triton
from kernels.quant_weight import QuantWeight, cat_rows, dequantize, pack_int4, quant_linear_torch, unpack_int4
from tests.triton_setup import DEVICE, needs_triton

EPS = 1e-5
# Relative to the largest output, as in test_kernels_gemv.py. The twin rounds the dequantized weight to x's dtype
# (1 ulp a weight) and the output; the kernels never round the weight and scale per group: for fp32 only the
# summation order differs, for bf16/fp16 the weight rounding adds ~1 ulp of the output on top of gemv.py's budget.
TOL = {torch.float32: (2e-5, 2e-4), torch.float16: (3e-3, 6e-3), torch.bfloat16: (2e-2, 4e-2)}
DTYPES = list(TOL)
# (bits, group, symmetric, act-order): Q4_1 / GGUF (32), AWQ / GPTQ (64, 128), RTN int8 per channel, GPTQ act-order
FORMATS = [(4, 32, False, False), (4, 128, False, False), (4, 64, False, True), (4, "K", False, False),
           (8, "K", True, False), (8, 32, True, False), (8, 64, False, True)]
FORMAT_IDS = [f"int{b}-g{g}-{'sym' if s else 'asym'}{'-perm' if p else ''}" for b, g, s, p in FORMATS]
# (N, K): odd N leaves partial row blocks; K a multiple of every group above but not of the GEMV's K step.
SHAPES = [(9, 128), (41, 384), (97, 1152)] + [
    pytest.param(N, K, marks=pytest.mark.gpu) for N, K in [(1152, 896), (896, 4864), (12288, 4096), (4096, 11008)]]


def random_quant(N, K, bits, group, symmetric, act_order, dtype=torch.float32, device=DEVICE, seed=0):
    """A QuantWeight of random integers whose dequantized rows have a ~1/sqrt(K) scale, like a trained layer's."""
    gen = torch.Generator().manual_seed(seed)
    G = K if group == "K" else group
    if bits == 4:
        qweight = pack_int4(torch.randint(0, 16, (N, K), generator=gen))
        scales = torch.rand(N, K // G, generator=gen) * 0.3 / K ** 0.5 + 0.05 / K ** 0.5
    else:
        qweight = torch.randint(-127, 128, (N, K), generator=gen, dtype=torch.int8)
        scales = (torch.rand(N, K // G, generator=gen) + 0.2) / (64 * K ** 0.5)
    zeros = None if symmetric else -scales * torch.randint(6, 10, scales.shape, generator=gen)
    perm = torch.randperm(K, generator=gen) if act_order else None
    w = QuantWeight(qweight, scales.to(dtype), None if zeros is None else zeros.to(dtype), bits, G, perm)
    return w.to(device)


def _close(actual, expected, dtype):
    atol, rtol = TOL[dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape
    assert not actual.isnan().any()
    scale = max(expected.abs().max().item(), 1.0)
    torch.testing.assert_close(actual, expected, atol=atol * scale, rtol=rtol)


def test_int4_packing_round_trips():
    q = torch.randint(0, 16, (7, 10))
    packed = pack_int4(q)
    assert packed.shape == (7, 5) and packed.dtype == torch.uint8
    assert torch.equal(unpack_int4(packed), q.to(torch.uint8))
    assert packed[0, 0].item() == q[0, 0].item() | (q[0, 1].item() << 4)  # column 2j low, 2j + 1 high


def test_dequantize_follows_the_written_formula():
    w = random_quant(5, 64, 4, 32, False, True, device="cpu")
    q = unpack_int4(w.qweight).float()
    stored = torch.empty(5, 64)
    for n in range(5):
        for k in range(64):
            stored[n, k] = q[n, k] * w.scales[n, k // 32] + w.zeros[n, k // 32]
    expected = torch.empty_like(stored)
    expected[:, w.perm] = stored  # stored column j is input column perm[j]
    torch.testing.assert_close(dequantize(w), expected)
    x = torch.randn(2, 64)
    torch.testing.assert_close(quant_linear_torch(x, w), x @ expected.t())
    torch.testing.assert_close(x[:, w.perm] @ stored.t(), x @ expected.t())


def test_cat_rows_stacks_shards_and_refuses_mixed_ones():
    a, b = random_quant(9, 64, 4, 32, False, False, device="cpu"), random_quant(7, 64, 4, 32, False, False,
                                                                                device="cpu", seed=1)
    torch.testing.assert_close(dequantize(cat_rows([a, b])), torch.cat([dequantize(a), dequantize(b)]))
    with pytest.raises(ValueError, match="share"):
        cat_rows([a, random_quant(7, 64, 4, 64, False, False, device="cpu")])
    with pytest.raises(ValueError, match="permutations"):
        cat_rows([random_quant(9, 64, 4, 32, False, True, device="cpu", seed=2),
                  random_quant(9, 64, 4, 32, False, True, device="cpu", seed=3)])


def test_bad_shapes_are_refused():
    with pytest.raises(ValueError, match="group_size"):
        QuantWeight(torch.zeros(4, 48, dtype=torch.int8), torch.ones(4, 2), None, 8, 32)
    with pytest.raises(ValueError, match="scales"):
        QuantWeight(torch.zeros(4, 16, dtype=torch.uint8), torch.ones(4, 2), None, 4, 32)


def _op_inputs(op, T, N, K, w, dtype, bias):
    b = torch.randn(N, device=DEVICE, dtype=dtype) if bias else None
    residual = torch.randn(T, N, device=DEVICE, dtype=dtype) * 4
    if op == "norm_linear":
        x = torch.randn(T, K, device=DEVICE, dtype=dtype) * 3
        return norm_linear_triton, norm_linear_torch, (x, torch.randn(K, device=DEVICE, dtype=dtype), EPS, w, b)
    if op == "linear_add":
        return linear_add_triton, linear_add_torch, (torch.randn(T, K, device=DEVICE, dtype=dtype), w, b, residual)
    if op == "norm_mlp_add":  # w is the packed (gate | up) of N / 2 features; down a plain weight back to K
        x = torch.randn(T, K, device=DEVICE, dtype=dtype) * 3
        down = torch.randn(K, N // 2, device=DEVICE, dtype=dtype) / N ** 0.5
        return norm_mlp_add_triton, norm_mlp_add_torch, (x, torch.randn(K, device=DEVICE, dtype=dtype), EPS, w, down)
    x = torch.randn(T, 2 * K, device=DEVICE, dtype=dtype) * 4
    return act_linear_add_triton, act_linear_add_torch, (x, w, residual)


OPS = [("norm_linear", True), ("linear_add", False), ("act_linear_add", False), ("norm_mlp_add", False)]


def _check_op(T, N, K, dtype, fmt, op, bias):
    N = 2 * N if op == "norm_mlp_add" else N  # a packed (gate | up): N features
    w = random_quant(N, K, *fmt, dtype=dtype)
    fast, twin, args = _op_inputs(op, T, N, K, w, dtype, bias)
    before = [a.clone() for a in args if isinstance(a, torch.Tensor)]
    _close(fast(*args), twin(*args), dtype)
    # Inputs (the residual stream above all) are read, never written.
    assert all(torch.equal(a, b) for a, b in zip([a for a in args if isinstance(a, torch.Tensor)], before))


@needs_triton
@pytest.mark.parametrize("op, bias", OPS)
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T", [1, 3])  # one row: the fused GEMV; several: the norm / activation + the GEMM
def test_triton_matches_twin_every_format(T, dtype, fmt, op, bias, poison_empty):
    _check_op(T, 41, 384, dtype, fmt, op, bias)


@needs_triton
@pytest.mark.parametrize("op, bias", OPS)
@pytest.mark.parametrize("N, K", SHAPES)
@pytest.mark.parametrize("T", [1, 3])
def test_triton_matches_twin_every_shape(T, N, K, op, bias, poison_empty):
    _check_op(T, N, K, torch.bfloat16, FORMATS[0], op, bias)


@needs_triton
@pytest.mark.parametrize("op, bias", OPS)
@pytest.mark.parametrize("fmt, K", [((4, "K", False, False), 36), ((8, "K", True, False), 18)],
                         ids=["int4-18-bytes", "int8-18-bytes"])
def test_gemv_rows_not_whole_words_take_the_other_path(K, fmt, op, bias, poison_empty):
    """The one-row GEMV reads a weight as int32 words: rows of 18 bytes are not, so the op goes the several-rows way
    (and still matches the twin)."""
    _check_op(1, 9, K, torch.float32, fmt, op, bias)


@needs_triton
@pytest.mark.parametrize("x_scale", [2.0 ** -50, 1e-6, 1e4, 2.0 ** 40])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("fmt", FORMATS[:2] + FORMATS[4:6], ids=FORMAT_IDS[:2] + FORMAT_IDS[4:6])
def test_gemv_exact_over_the_input_range(fmt, dtype, x_scale):
    """The one-row GEMV's codes are subnormal floats scaled by powers of two (quant_gemv.py `_plane_dot`): tiny and
    huge inputs, inside the documented range, keep the twin's relative accuracy (no flush to zero, no overflow)."""
    w = random_quant(97, 1152, *fmt, dtype=dtype)
    x = (torch.randn(1, 1152, device=DEVICE) * x_scale).to(dtype)
    residual = torch.zeros(1, 97, device=DEVICE, dtype=dtype)
    y, ref = linear_add_triton(x, w, None, residual), linear_add_torch(x, w, None, residual)
    assert y.isfinite().all()
    top = ref.float().abs().max()
    _close(y / top, ref / top, dtype)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS[:2] + FORMATS[4:5], ids=FORMAT_IDS[:2] + FORMAT_IDS[4:5])
@pytest.mark.parametrize("M", [17, 70])  # past one 16- and one 64-row tile
def test_triton_gemm_prefill_sizes(M, fmt):
    dtype = torch.bfloat16
    w = random_quant(41, 384, *fmt, dtype=dtype)
    x = torch.randn(M, 384, device=DEVICE, dtype=dtype)
    residual = torch.randn(M, 41, device=DEVICE, dtype=dtype)
    _close(quant_matmul_triton(x, w, None, residual), quant_matmul_torch(x, w, None, residual), dtype)


@needs_triton
@pytest.mark.parametrize("fmt", FORMATS[1:3] + FORMATS[4:5], ids=FORMAT_IDS[1:3] + FORMAT_IDS[4:5])
@pytest.mark.parametrize("split_k", [2, 3, 64])  # 3: the steps do not divide evenly; 64: more splits than steps
def test_triton_gemm_split_k_matches_twin(split_k, fmt):
    """Split-K: each split's fp32 partial, summed in order by a second kernel that adds bias and residual."""
    dtype = torch.bfloat16
    w = random_quant(41, 1152, *fmt, dtype=dtype)
    x = torch.randn(5, 1152, device=DEVICE, dtype=dtype)
    bias = torch.randn(41, device=DEVICE, dtype=dtype)
    residual = torch.randn(5, 41, device=DEVICE, dtype=dtype)
    y = quant_matmul_triton(x, w, bias, residual, tiles=(16, 32, 64, 4, 2, split_k, False))
    _close(y, quant_matmul_torch(x, w, bias, residual), dtype)
    y = quant_matmul_triton(x, w, bias, residual, tiles=(16, 64, 64, 4, 2, split_k, True))
    _close(y, quant_matmul_torch(x, w, bias, residual), dtype)


@needs_triton
@pytest.mark.parametrize("N, K", [(41, 384)] + [pytest.param(N, K, marks=pytest.mark.gpu)
                                                for N, K in [(4096, 4096), (4096, 11008), (12288, 4096)]])
@pytest.mark.parametrize("fmt", FORMATS, ids=FORMAT_IDS)
@pytest.mark.parametrize("M", [17, 32])
def test_triton_gemm_swapped_tiles_match_twin(M, fmt, N, K):
    """17-32 rows take the SWAP tiles (the weight tile as the MMA's first operand, the product transposed), narrow and
    wide N (12,288 >= WIDE_N), with a register cap."""
    dtype = torch.bfloat16
    w = random_quant(N, K, *fmt, dtype=dtype)
    assert _tiles(M, w).swap
    x = torch.randn(M, K, device=DEVICE, dtype=dtype)
    bias = torch.randn(N, device=DEVICE, dtype=dtype)
    residual = torch.randn(M, N, device=DEVICE, dtype=dtype)
    _close(quant_matmul_triton(x, w, bias, residual), quant_matmul_torch(x, w, bias, residual), dtype)


@pytest.mark.parametrize("fmt", [(4, 32, False, False), (4, 128, False, True), (4, 64, True, False),
                                 (8, "K", True, False), (8, "K", True, True)])
@pytest.mark.parametrize("T", [1, 5])
def test_cpu_kernels_match_twin(T, fmt):
    w = random_quant(48, 256, *fmt, device="cpu")
    packed = pack_for_cpu(w)
    assert isinstance(packed, CpuInt4Weight if fmt[0] == 4 else CpuInt8Weight)
    x, bias = torch.randn(T, 256), torch.randn(48)
    # bf16 activations and scales (the kernels' fast path): ~3 bf16 ulps of the largest output.
    expected = quant_linear_torch(x, w, bias)
    torch.testing.assert_close(packed.linear(x, bias), expected, atol=3e-2 * expected.abs().max().item(),
                               rtol=3e-2)


@pytest.mark.parametrize("N, K, fmt", [(41, 256, (4, 32, False, False)),  # N % 16
                                       (48, 96 * 3, (4, 96, False, False)),  # group 96
                                       (48, 344, (8, "K", True, False)),  # K % 16: torch 2.14 crashes there
                                       (48, 256, (8, 32, True, False))])  # group-wise int8 (GGUF Q8_0)
def test_cpu_packing_declines_what_the_kernels_cannot_take(N, K, fmt):
    assert pack_for_cpu(random_quant(N, K, *fmt, device="cpu")) is None

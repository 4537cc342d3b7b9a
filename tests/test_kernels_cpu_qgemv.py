"""kernels/cpu_qgemv.c (GGUF-grouped weights x int8 activations, AVX512-VNNI) against its twin: odd row counts,
4 and 8 bits, fp32 and bf16, the fused residual add, one and two threads; the packing round-trips and refuses what
the C code cannot take."""

import pytest
import torch

from kernels.cpu_qgemv import MAX_K, CpuQ8Weight, available, pack_q8, qgemv_torch, quantize_act, unpack_q8
from kernels.quant_weight import QuantWeight, dequantize, pack_int4

pytestmark = pytest.mark.skipif(not available(), reason="no AVX512-VNNI build here: aten's kernels run instead")
# The int8 codes and the integer dot products are the twin's exactly; only the fp32 sums of (scale x dot) per group
# differ in order: ~1e-7 of the terms, which for 8 bits (u = q + 128, the offset taken off through m) are ~100x the
# output. In bf16 the output is rounded: one ulp where a sum lands near a boundary.
TOL = {torch.float32: (2e-3, 1e-5), torch.bfloat16: (1.6e-2, 8e-3)}


def _weight(N: int, K: int, bits: int, gen: torch.Generator) -> QuantWeight:
    scales = (torch.rand(N, K // 32, generator=gen) / 20).half()
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
        return QuantWeight(pack_int4(q), scales, (-torch.rand(N, K // 32, generator=gen) / 3).half(), 4, 32)
    q = torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen)
    return QuantWeight(q, scales, None, 8, 32)


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("M, N, K", [(1, 4, 32), (3, 340, 576), (9, 1028, 1536), (16, 12, 11008)])
def test_qgemv_matches_twin(M, N, K, bits, dtype, threads):
    gen = torch.Generator().manual_seed(M * N + bits)
    qw = _weight(N, K, bits, gen)
    w = pack_q8(qw)
    x = (torch.randn(M, K + 5, generator=gen) * 2).to(dtype)[:, :K]  # strided rows
    residual = torch.randn(M, N, generator=gen).to(dtype)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        y, y_res = w.linear(x), w.linear(x, residual=residual)
    finally:
        torch.set_num_threads(before)
    atol, rtol = TOL[dtype]
    twin = qgemv_torch(x, w)
    torch.testing.assert_close(y, twin, atol=atol, rtol=rtol)
    torch.testing.assert_close(y_res, residual + twin, atol=2 * atol, rtol=rtol)
    dense = x.float() @ dequantize(qw, torch.float32).T  # what the int8 activations cost: ~1% of the output's norm
    assert (twin.float() - dense).norm() <= 0.02 * dense.norm()


@pytest.mark.parametrize("bits", [4, 8])
def test_packing_round_trips(bits):
    qw = _weight(8, 96, bits, torch.Generator().manual_seed(bits))
    u, d, m = unpack_q8(pack_q8(qw))
    torch.testing.assert_close((u.float().view(8, 3, 32) * d[..., None] + m[..., None]).view(8, 96),
                               dequantize(qw, torch.float32))


def test_activation_codes_are_rounded_per_group():
    x = torch.zeros(1, 64)
    x[0, 0], x[0, 1], x[0, 40] = 2.0, -0.5, 1e-3  # group 0 amax 2, group 1 amax 1e-3; zeros elsewhere
    q, dx, sx = quantize_act(x)
    assert q[0, 0] == 127 and q[0, 1] == -32 and q[0, 40] == 127 and torch.all(q[0, 2:40] == 0)
    torch.testing.assert_close(sx, dx * torch.tensor([[95.0, 127.0]]))


def test_pack_refuses_what_the_c_code_cannot_take():
    gen = torch.Generator().manual_seed(0)
    qw = _weight(8, 64, 4, gen)
    assert pack_q8(QuantWeight(qw.qweight, qw.scales.float(), qw.zeros.float(), 4, 32)) is None  # fp32 scales
    assert pack_q8(QuantWeight(qw.qweight[:6], qw.scales[:6], qw.zeros[:6], 4, 32)) is None  # N % 4
    assert pack_q8(QuantWeight(qw.qweight, qw.scales[:, :1], qw.zeros[:, :1], 4, 64)) is None  # group 64
    assert isinstance(pack_q8(qw), CpuQ8Weight)
    assert isinstance(pack_q8(_weight(4, MAX_K, 4, gen)), CpuQ8Weight)
    assert pack_q8(_weight(4, MAX_K + 32, 4, gen)) is None  # past the C code's activation buffers


def test_other_dtypes_and_batches_fall_back_to_the_twin():
    w = pack_q8(_weight(8, 64, 4, torch.Generator().manual_seed(1)))
    for x in (torch.randn(2, 64, dtype=torch.float16), torch.randn(17, 64)):  # fp16; more rows than the C code takes
        torch.testing.assert_close(w.linear(x), qgemv_torch(x, w))


def test_torch_on_one_thread_keeps_the_pools_count_and_leaves_other_threads_alone():
    import threading

    from kernels.cpu_build import _openmp, pool_threads, torch_on_one_thread

    if _openmp() is None:
        pytest.skip("torch does not run on GNU OpenMP here: the context changes nothing")
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert pool_threads() == 2
        other = []
        with pytest.raises(RuntimeError):
            with torch_on_one_thread():
                assert (torch.get_num_threads(), pool_threads()) == (1, 2)
                with torch_on_one_thread():  # nested: still the outer count for the pool
                    assert (torch.get_num_threads(), pool_threads()) == (1, 2)
                assert (torch.get_num_threads(), pool_threads()) == (1, 2)
                worker = threading.Thread(target=lambda: other.append(torch.get_num_threads()))
                worker.start()
                worker.join()
                raise RuntimeError("the step failed")
        assert other == [2]  # a thread starting meanwhile keeps torch's count
        assert (torch.get_num_threads(), pool_threads()) == (2, 2)
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("bits, group, scale_dtype", [(4, 128, torch.bfloat16), (4, 64, torch.float32),
                                                      (8, 256, torch.float32), (4, 32, torch.float16)])
def test_gguf_groups_keep_the_codes_and_round_scales_to_fp16(bits, group, scale_dtype):
    """Round-to-nearest / AWQ / GPTQ groups (multiples of 32 columns, any float scales) become GGUF's: the same
    codes, each 32-column block with its group's scale and zero rounded to fp16; the C kernel then computes with them
    as its twin does."""
    from kernels.cpu_qgemv import gguf_groups

    gen = torch.Generator().manual_seed(group + bits)
    N, K = 12, 256
    scales = (torch.rand(N, K // group, generator=gen) / 20 + 1e-3).to(scale_dtype)
    if bits == 4:
        q = torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen)
        qw = QuantWeight(pack_int4(q), scales, (-torch.rand(N, K // group, generator=gen) / 3).to(scale_dtype), 4,
                         group)
    else:
        qw = QuantWeight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), scales, None, 8, group)
    g = gguf_groups(qw)
    assert g.group_size == 32 and g.scales.dtype == torch.float16 and torch.equal(g.qweight, qw.qweight)
    want = dequantize(qw)
    torch.testing.assert_close(dequantize(g), want, atol=2 ** -10 * want.abs().max().item(), rtol=0)
    if scale_dtype == torch.float16:
        assert torch.equal(dequantize(g), want)  # nothing to round
    w = pack_q8(g)
    x = torch.randn(3, K, generator=gen)
    torch.testing.assert_close(w.linear(x), qgemv_torch(x, w), atol=2e-3, rtol=1e-5)


def test_gguf_groups_refuse_what_they_cannot_keep():
    from kernels.cpu_qgemv import gguf_groups

    gen = torch.Generator().manual_seed(0)
    qw = _weight(8, 128, 4, gen)
    assert gguf_groups(QuantWeight(qw.qweight, qw.scales[:, ::2], qw.zeros[:, ::2], 4, 64)) is not None
    odd = QuantWeight(qw.qweight, torch.ones(8, 8).half(), None, 4, 16)
    assert gguf_groups(odd) is None  # 16 columns a group: not whole 32-column blocks
    assert gguf_groups(QuantWeight(qw.qweight, qw.scales, qw.zeros, 4, 32, perm=torch.arange(128))) is None
    tiny = QuantWeight(qw.qweight, torch.full((8, 4), 1e-6), None, 4, 32)
    assert gguf_groups(tiny) is None  # below fp16's normal range: rounding would lose more than 2^-11
    w8 = _weight(8, 128, 8, gen)
    assert gguf_groups(QuantWeight(w8.qweight, w8.scales, w8.scales, 8, 32)) is None  # 8 bits with zero points

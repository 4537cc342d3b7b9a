"""The CPU's C decode ops (kernels/cpu_ops.c) against their twins: odd shapes, fp32 and bf16, GQA, padding rows,
blocks out of order, int8 caches; the fallback to the twin for what the C code does not take."""

import pytest
import torch

from kernels import load_cpu_ops, load_ops
from kernels.activation import silu_and_mul_torch
from kernels.cpu_build import library
from kernels.cpu_ops import paged_decode_attention_cpu, rms_norm_cpu, rope_store_kv_cpu, silu_and_mul_cpu
from kernels.kv_int8 import quantize_kv
from kernels.kv_store import rope_store_kv_torch
from kernels.paged_decode import paged_decode_attention_torch
from kernels.rms_norm import rms_norm_torch
from tests.triton_setup import paged_kv

pytestmark = pytest.mark.skipif(library() is None, reason="no C compiler here: the CPU runs the twins")
# Same roundings as the twins at the same points; only summation order differs (norm statistics, dot products,
# softmax sums): fp32 ~1e-6 relative; bf16 one ulp of the output where a sum lands near a rounding boundary.
TOL = {torch.float32: (2e-5, 2e-5), torch.bfloat16: (1.6e-2, 1.6e-2)}
DTYPES = list(TOL)


@pytest.fixture(autouse=True)
def _threads(one_thread):
    pass


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, H", [(1, 64), (3, 576), (9, 4231)])
def test_rms_norm_and_silu_mul_match_twins(T, H, dtype):
    big = torch.randn(T, H + 7, dtype=dtype) * 3
    x, w = big[:, :H], torch.randn(H, dtype=dtype)  # strided rows
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), rms_norm_torch(x, w, 1e-5), atol=TOL[dtype][0] * 4,
                               rtol=TOL[dtype][1])
    gu = big[:, : H - H % 2] * 2
    torch.testing.assert_close(silu_and_mul_cpu(gu), silu_and_mul_torch(gu), atol=TOL[dtype][0], rtol=TOL[dtype][1])


def _table(D, P=512):
    inv_freq = 1.0 / 10000 ** (torch.arange(0, D, 2, dtype=torch.float32) / D)
    freqs = torch.outer(torch.arange(P, dtype=torch.float32), inv_freq)
    return torch.cat([freqs.cos(), freqs.sin()], dim=-1)


@pytest.mark.parametrize("int8", [False, True], ids=["dense", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("T, Hq, Hk, D", [(1, 9, 3, 64), (7, 6, 2, 80), (5, 4, 4, 128)])
def test_rope_store_kv_matches_twin(T, Hq, Hk, D, dtype, int8):
    qkv = torch.randn(T, Hq + 2 * Hk, D, dtype=dtype) * 2
    positions = torch.randint(0, 512, (T,))
    slots = torch.randperm(64)[:T]
    slots[1::3] = -1  # padding rows
    shape = (4, 16, Hk, D)
    if int8:
        caches = [torch.randint(0, 256, shape, dtype=torch.uint8) for _ in range(2)] + [
            torch.randn(*shape[:3], 2).half() for _ in range(2)]
    else:
        caches = [torch.randn(shape, dtype=dtype) for _ in range(2)]
    ours, twin = [c.clone() for c in caches], [c.clone() for c in caches]
    qkv_ours, qkv_twin = qkv.clone(), qkv.clone()
    views = lambda t: (t[:, :Hq], t[:, Hq:Hq + Hk], t[:, Hq + Hk:])  # noqa: E731
    rope_store_kv_cpu(*views(qkv_ours), positions, _table(D), ours[0], ours[1], slots, *ours[2:])
    rope_store_kv_torch(*views(qkv_twin), positions, _table(D), twin[0], twin[1], slots, *twin[2:])
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(qkv_ours[:, :Hq], qkv_twin[:, :Hq], atol=atol * 2, rtol=rtol)  # q rotated in place
    if not int8:
        for a, b in zip(ours, twin):
            torch.testing.assert_close(a, b, atol=atol * 2, rtol=rtol)
        return
    assert torch.equal(ours[3], twin[3]) and (ours[1].int() - twin[1].int()).abs().max() <= 1  # v
    written = slots[slots >= 0]
    k_ours, k_twin = ((c[0].flatten(0, 1)[written].float() * c[2].flatten(0, 1)[written][..., :1].float()
                       + c[2].flatten(0, 1)[written][..., 1:].float()) for c in (ours, twin))
    step = twin[2].flatten(0, 1)[written][..., :1].float()  # k is rotated first: a dtype ulp, then one step
    assert torch.all((k_ours - k_twin).abs() <= step + (0.05 if dtype == torch.bfloat16 else 1e-4))


DECODE = [([1, 17, 0, 40], 2, 1, 64, 16), ([300, 0], 1, 3, 128, 16), ([200, 129, 5], 3, 3, 64, 32)]


@pytest.mark.parametrize("int8", [False, True], ids=["dense", "int8"])
@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("seq_lens, Hk, group, D, block_size", DECODE)
def test_paged_decode_matches_twin(seq_lens, Hk, group, D, block_size, dtype, int8, poison_empty):
    k_cache, v_cache, block_tables, lens, _, _ = paged_kv(seq_lens, Hk, D, block_size, dtype)
    q = torch.randn(len(seq_lens), Hk * group, D, dtype=dtype)
    extra = ()
    if int8:
        (k_cache, ksz), (v_cache, vsz) = ((codes.view(c.shape), sz.view(*c.shape[:3], 2)) for c in (k_cache, v_cache)
                                          for codes, sz in [quantize_kv(c.flatten(0, 1))])
        extra = (ksz, vsz)
    out = paged_decode_attention_cpu(q, k_cache, v_cache, block_tables, lens, D ** -0.5, *extra)
    ref = paged_decode_attention_torch(q, k_cache, v_cache, block_tables, lens, D ** -0.5, *extra)
    assert not out.isnan().any() and torch.all(out[lens == 0] == 0)
    torch.testing.assert_close(out, ref, atol=TOL[dtype][0] * 2, rtol=TOL[dtype][1])


def test_other_dtypes_and_layouts_fall_back_to_the_twins():
    x, w = torch.randn(3, 64, dtype=torch.float16), torch.randn(64, dtype=torch.float16)
    torch.testing.assert_close(rms_norm_cpu(x, w, 1e-5), rms_norm_torch(x, w, 1e-5))  # fp16: the twin
    xt = torch.randn(64, 3).t()  # column-major rows: the twin
    torch.testing.assert_close(rms_norm_cpu(xt, w.float(), 1e-5), rms_norm_torch(xt, w.float(), 1e-5))


def test_cpu_ops_keep_the_twins_signatures():
    import inspect

    twins, cpu = load_ops(use_triton=False), load_cpu_ops()
    for field in ("norm_linear", "linear_add", "act_linear_add", "norm_mlp_add", "rope_store_kv",
                  "paged_decode_attention", "paged_prefill_attention"):
        assert inspect.signature(getattr(cpu, field)) == inspect.signature(getattr(twins, field))

"""A decode step's layers in one C call (kernels/cpu_decoder.py) against the same chain op by op: fp32 and bf16,
dense and int8 KV caches, a batch with a padding row and blocks out of order; calls it does not take return None."""

import pytest
import torch

from kernels.cpu_decoder import DecoderLayerWeights, LayerStack, decode_layers_cpu, decode_layers_torch
from kernels.cpu_qgemv import available, pack_q8
from kernels.quant_weight import QuantWeight, pack_int4

pytestmark = pytest.mark.skipif(not available(), reason="no AVX512-VNNI build here: the model runs its layers")
H, I, HQ, HK, D, PAGE, BLOCKS = 64, 96, 4, 2, 16, 16, 8
# Same functions, same roundings; the per-op chain's attention and norms are the twins', so only summation order
# differs, compounded over two layers (and a bf16 ulp where it lands on a rounding boundary).
TOL = {torch.float32: (2e-3, 1e-3), torch.bfloat16: (6e-2, 3e-2)}


def _proj(N, K, bits, gen):
    scales = (torch.rand(N, K // 32, generator=gen) / 40).half()
    if bits == 8:
        return pack_q8(QuantWeight(torch.randint(-127, 128, (N, K), dtype=torch.int8, generator=gen), scales, None,
                                   8, 32))
    q = pack_int4(torch.randint(0, 16, (N, K), dtype=torch.uint8, generator=gen))
    return pack_q8(QuantWeight(q, scales, (-7.5 * scales.float()).half(), 4, 32))


def _stack(dtype, int8, gen):
    layers = []
    for _ in range(2):
        if int8:
            caches = [torch.randint(0, 256, (BLOCKS, PAGE, HK, D), dtype=torch.uint8, generator=gen) for _ in "kv"]
            sz = [torch.rand(BLOCKS, PAGE, HK, 2, generator=gen).half() / 20 for _ in "kv"]
        else:
            caches, sz = [torch.randn(BLOCKS, PAGE, HK, D, generator=gen).to(dtype) for _ in "kv"], [None, None]
        norms = [(1 + torch.randn(H, generator=gen) / 10).to(dtype) for _ in range(2)]
        layers.append(DecoderLayerWeights(norms[0], _proj((HQ + 2 * HK) * D, H, 4, gen), _proj(H, HQ * D, 8, gen),
                                          norms[1], _proj(2 * I, H, 4, gen), _proj(H, I, 4, gen), *caches, *sz))
    return LayerStack(layers, HQ, HK, D, 1e-5)


def _clone_caches(stack):
    return LayerStack([DecoderLayerWeights(*(t.clone() if isinstance(t, torch.Tensor) and t.dim() == 4 else t
                                             for t in vars(w).values())) for w in stack.layers],
                      stack.heads, stack.kv_heads, stack.head_dim, stack.eps)


@pytest.mark.parametrize("int8", [False, True], ids=["dense", "int8"])
@pytest.mark.parametrize("dtype", list(TOL), ids=str)
def test_decode_layers_match_the_op_by_op_chain(dtype, int8, one_thread):
    gen = torch.Generator().manual_seed(int(int8))
    ours = _stack(dtype, int8, gen)
    twin = _clone_caches(ours)
    seq_lens = torch.tensor([5, 0, 40], dtype=torch.int32)  # the middle row: padding
    block_tables = torch.tensor([[6, 0, 0], [0, 0, 0], [3, 7, 1]], dtype=torch.int32)
    positions = (seq_lens.long() - 1).clamp(min=0)
    slots = torch.tensor([6 * PAGE + 4, -1, 1 * PAGE + 7])
    cos_sin = torch.randn(64, D, generator=gen)
    h = torch.randn(3, H, generator=gen).to(dtype)
    args = (positions, cos_sin, slots, block_tables, seq_lens)
    out, ref = decode_layers_cpu(h, ours, *args), decode_layers_torch(h, twin, *args)
    atol, rtol = TOL[dtype]
    torch.testing.assert_close(out[[0, 2]], ref[[0, 2]], atol=atol * ref.abs().max().item(), rtol=rtol)
    for i, (a, b) in enumerate(zip(ours.layers, twin.layers)):  # the step's values went where the chain put them
        codes = 1 if i == 0 else 4  # int8: the first layer's v rounds alike but for ties, the next sees h's noise
        assert (a.v_cache.float() - b.v_cache.float()).abs().max() <= (codes if int8 else atol * 20)


def test_calls_it_does_not_take_return_none():
    stack = _stack(torch.float32, False, torch.Generator().manual_seed(0))
    args = (torch.zeros(17, dtype=torch.int64), torch.randn(64, D), torch.zeros(17, dtype=torch.int64),
            torch.zeros(17, 1, dtype=torch.int32), torch.ones(17, dtype=torch.int32))
    assert decode_layers_cpu(torch.randn(17, H), stack, *args) is None  # more rows than the C code takes
    assert decode_layers_cpu(torch.randn(17, H).bfloat16(), stack, *args) is None  # not the stack's dtype


def test_the_c_call_keeps_the_twins_signature():
    import inspect

    assert inspect.signature(decode_layers_cpu) == inspect.signature(decode_layers_torch)

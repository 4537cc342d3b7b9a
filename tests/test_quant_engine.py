"""The engine with an int8 KV cache: twice the blocks in the same bytes, and the same greedy text as the
unquantized cache on a tiny model (the quality on real weights is bench/quant_quality.py's)."""
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.runtime.kv_cache import count_blocks
from engine.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_lm
from tests.triton_setup import DEVICE, needs_triton

PROMPTS = [[1, 17, 42, 99, 7, 3, 250, 61, 5, 88, 140, 23], [1, 5, 9], [1, 300, 301, 302, 8, 8, 8]]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm-kv-int8"))


def test_int8_cache_holds_about_twice_the_blocks_of_bf16(tiny):
    cfg, _, _ = tiny
    bf16 = EngineConfig(dtype="bfloat16", kv_cache_cpu_bytes=1 << 24, max_num_seqs=1024)
    int8 = EngineConfig(dtype="bfloat16", kv_cache_cpu_bytes=1 << 24, max_num_seqs=1024, kv_cache_dtype="int8")
    blocks = [count_blocks(cfg, c, torch.bfloat16, torch.device("cpu"), 256) for c in (bf16, int8)]
    D = cfg.head_dim
    assert blocks[1] == pytest.approx(blocks[0] * 2 * D / (D + 4), rel=0.01)  # D codes + fp16 scale and zero


def _greedy(tiny, **kw):
    cfg, weights, tok = tiny
    engine = LLMEngine(cfg, weights, tok, EngineConfig(enable_prefix_caching=False, **kw))
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))
    return [o.token_ids for o in out], engine


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_int8_cache_decodes_like_the_unquantized_one(tiny, dtype):
    dense, _ = _greedy(tiny, dtype=dtype)
    int8, engine = _greedy(tiny, dtype=dtype, kv_cache_dtype="int8")
    attn = engine.model.model.layers[0].self_attn.attn
    assert attn.k_cache.dtype == torch.uint8 and attn.k_scale_zero.dtype == torch.float16
    same = sum(a == b for x, y in zip(dense, int8) for a, b in zip(x, y)) / sum(len(x) for x in dense)
    assert same >= 0.9, same  # a random tiny model has near-ties; real weights: bench/quant_quality.py


@needs_triton
def test_int8_cache_on_triton_kernels_matches_the_twins(tiny):
    weights = {k: v.to(DEVICE) for k, v in tiny[1].items()}
    on_device = (tiny[0], weights, tiny[2])
    twins, _ = _greedy(on_device, device=DEVICE, dtype="float32", kv_cache_dtype="int8", use_triton=False)
    fast, _ = _greedy(on_device, device=DEVICE, dtype="float32", kv_cache_dtype="int8", use_triton=True)
    assert fast == twins


def _as_q4_1(w: torch.Tensor):
    """A GGUF-style Q4_1 QuantWeight of w: groups of 32, fp16 scale and min (engine/quant/gguf.py's form)."""
    from kernels.quant_weight import QuantWeight, pack_int4

    g = w.float().view(w.shape[0], -1, 32)
    lo, hi = g.amin(-1), g.amax(-1)
    d, m = ((hi - lo) / 15).half(), lo.half()
    q = ((g - m.float()[..., None]) / d.float().clamp(min=1e-8)[..., None]).round().clamp(0, 15)
    return QuantWeight(pack_int4(q.to(torch.uint8).view(w.shape)), d, m, 4, 32)


@pytest.mark.parametrize("rope", [None, 2.0], ids=["as-trained", "dynamic-ntk"])
def test_gguf_blocks_decode_alike_in_one_c_call_and_op_by_op(tiny, rope, tmp_path):
    """The CPU's one-call decode step (kernels/cpu_decoder.py) against the model's own layers, on a batch of 3; with
    dynamic NTK past a 16-token trained length too (each decode token's cos|sin row is its own, per sequence)."""
    import dataclasses

    from engine.quant.install import is_projection
    from kernels.cpu_qgemv import available

    if not available():
        pytest.skip("no AVX512-VNNI build here: the model runs its layers")
    cfg, weights, tok = tiny if rope is None else make_tiny_lm(tmp_path, max_positions=16)
    blocks = {k: _as_q4_1(v) if is_projection(k) else v for k, v in weights.items()}
    extra = {} if rope is None else dict(rope_scaling_factor=rope, max_model_len=64)
    outs = []
    for one_call in (True, False):
        engine = LLMEngine(cfg, blocks, tok, EngineConfig(dtype="bfloat16", quantize="gguf",
                                                          enable_prefix_caching=False, **extra))
        if not one_call:
            engine.model.model.ops = dataclasses.replace(engine.model.model.ops, decode_layers=None)
        else:
            assert engine.model.model.layer_stack() is not None
        out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=24, ignore_eos=True))
        outs.append([o.token_ids for o in out])
    assert outs[0] == outs[1]


def test_a_decode_step_on_the_c_pool_leaves_torch_one_thread(tiny):
    """A decode step whose projections and LM head run on the C kernels' pool runs torch's own ops on one thread (so
    that torch's OpenMP workers do not spin on the pool's cores) while the pool keeps torch's thread count; a
    prefill step, and torch after the step, keep torch's count."""
    import dataclasses

    from engine.quant.install import is_projection
    from kernels import cpu_build
    from kernels.cpu_qgemv import available

    if not available() or cpu_build._openmp() is None:
        pytest.skip("no AVX512-VNNI build or no GNU OpenMP here")
    cfg, weights, tok = tiny
    blocks = {k: _as_q4_1(v) if is_projection(k) or k == "lm_head.weight" else v for k, v in weights.items()}
    engine = LLMEngine(cfg, blocks, tok, EngineConfig(dtype="bfloat16", quantize="gguf", enable_prefix_caching=False))
    seen = []
    decode_layers = engine.model.model.ops.decode_layers

    def recorded(*args, **kwargs):
        seen.append((torch.get_num_threads(), cpu_build.pool_threads()))
        return decode_layers(*args, **kwargs)

    engine.model.model.ops = dataclasses.replace(engine.model.model.ops, decode_layers=recorded)
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        assert engine.model.decodes_on_host_pool(1) and not engine.model.decodes_on_host_pool(9)
        engine.generate(PROMPTS[:2], SamplingParams(max_new_tokens=6, ignore_eos=True))
        assert seen and set(seen) == {(1, 2)}  # torch on one thread, the pool on two
        assert torch.get_num_threads() == 2
    finally:
        torch.set_num_threads(threads)

"""On a GPU: quantized weights and the int8 KV cache through the Triton kernels and CUDA graphs, against eager and
against the dense reference weights (tiny checkpoints; the 7B numbers are bench/gpu_quant.py's)."""
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.quant_checkpoints import make_tiny_quantized_lm
from tests.tiny_checkpoints import make_tiny_lm

pytestmark = pytest.mark.gpu
PROMPTS = [[1, 17, 42, 99, 7, 3, 250, 61, 5, 88, 140, 23], [1, 5, 9], [1, 300, 301, 302, 8, 8, 8]]


def _tokens(cfg, weights, tok, **kw) -> list[list[int]]:
    engine = LLMEngine(cfg, weights, tok, EngineConfig(device="cuda", enable_prefix_caching=False, **kw))
    out = engine.generate(PROMPTS, SamplingParams(max_new_tokens=16, ignore_eos=True))
    return [o.token_ids for o in out]


@pytest.mark.parametrize("method, group, bits, act_order", [("awq", 32, 4, False), ("gptq", 32, 4, True),
                                                            ("gptq", 64, 8, False)])
def test_quantized_checkpoint_on_gpu_matches_its_reference_weights(method, group, bits, act_order, tmp_path):
    from engine.checkpoints.reader import Checkpoint, read_safetensors
    from engine.config import TextConfig
    from engine.families.common import TEXT_PREFIXES

    folder, reference = make_tiny_quantized_lm(tmp_path, method, group, bits, act_order)
    ck = Checkpoint.load(folder)
    text = TextConfig.from_dict(ck.config)
    dense = {k: v for k, v in read_safetensors(folder).items()
             if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))} | reference
    for dtype in ("float32", "bfloat16"):
        quant = _tokens(text, ck.parts(TEXT_PREFIXES)["text"], None, dtype=dtype)
        ref = _tokens(text, dense, None, dtype=dtype)
        if dtype == "float32":
            assert quant == ref
        else:  # bf16 rounds the dequantized weight (reference) or not (the GEMV): a random tiny model's near-ties
            # then flip some greedy tokens, and the text diverges from there; the first tokens must agree
            assert [x[:2] for x in quant] == [y[:2] for y in ref]
            same = sum(a == b for x, y in zip(quant, ref) for a, b in zip(x, y)) / sum(map(len, ref))
            assert same >= 0.6, same


@pytest.mark.parametrize("kw", [dict(quantize="w4a16"), dict(quantize="w8a16"), dict(kv_cache_dtype="int8"),
                                dict(quantize="w4a16", kv_cache_dtype="int8")], ids=str)
def test_cuda_graphs_equal_eager(kw, tmp_path):
    cfg, weights, tok = make_tiny_lm(tmp_path)
    weights = {k: v.cuda() for k, v in weights.items()}
    graphed = _tokens(cfg, weights, tok, dtype="bfloat16", **kw)
    eager = _tokens(cfg, weights, tok, dtype="bfloat16", cuda_graphs=False, **kw)
    assert graphed == eager


def test_dependent_launches_in_a_cuda_graph_match_plain_launches(monkeypatch):
    """A decode step's chain of small kernels (RMSNorm -> 4-bit GEMV -> SiLU -> 8-bit GEMV + residual, bf16 GEMVs
    with their fused prologues, the rotary + KV store), launched with programmatic dependent launch inside a CUDA
    graph, gives bit for bit what plain launches give eagerly, for inputs that change between replays: every
    kernel waits for the one before it (`dependent_launch`) before it reads anything."""
    import kernels._triton as kt
    from engine.quant.rtn import quantize_rtn
    from kernels.gemv import act_linear_add_triton, linear_add_triton, norm_linear_triton
    from kernels.kv_store import rope_store_kv_triton

    if not kt.dependent_launches(torch.empty(0, device="cuda")):
        pytest.skip("programmatic dependent launch needs a Hopper (sm_90) or later GPU")
    gen = torch.Generator(device="cuda").manual_seed(0)
    H, I, heads, D = 512, 1408, 4, 128

    def rand(*shape):
        return torch.randn(*shape, generator=gen, device="cuda", dtype=torch.bfloat16) / shape[-1] ** 0.5

    layers = [(rand(H) + 1, quantize_rtn(rand(2 * I, H), "w4a16"), quantize_rtn(rand(H, I), "w8a16"), rand(H) + 1,
               rand(3 * heads * D, H), rand(H, heads * D)) for _ in range(3)]
    cos_sin = torch.randn(64, D, generator=gen, device="cuda")
    positions = torch.tensor([5], device="cuda")
    slots = torch.tensor([3], device="cuda")

    def step(h, k_cache, v_cache):
        for n1, w_gate_up, w_down, n2, w_qkv, w_o in layers:
            h = act_linear_add_triton(norm_linear_triton(h, n1, 1e-5, w_gate_up), w_down, h)
            q, k, v = norm_linear_triton(h, n2, 1e-5, w_qkv).view(1, 3 * heads, D).split(heads, dim=1)
            q = q.contiguous()
            rope_store_kv_triton(q, k, v, positions, cos_sin, k_cache, v_cache, slots)
            h = linear_add_triton(q.view(1, heads * D), w_o, None, h)
        return h

    def caches():
        return [torch.zeros(2, 16, heads, D, device="cuda", dtype=torch.bfloat16) for _ in range(2)]

    inputs = [rand(1, H) * 4 for _ in range(3)]
    with monkeypatch.context() as m:
        m.setattr(kt, "_device_dependent_launches", lambda index: False)
        expected = []
        for x in inputs:
            kc, vc = caches()
            expected.append((step(x, kc, vc), kc, vc))
    static_x, (kc, vc) = inputs[0].clone(), caches()
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        step(static_x, kc, vc)  # compile outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = step(static_x, kc, vc)
    for x, (y, k_ref, v_ref) in zip(inputs, expected):
        static_x.copy_(x)
        kc.zero_()
        vc.zero_()
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out, y) and torch.equal(kc, k_ref) and torch.equal(vc, v_ref)

"""Quantized weights at load: round-to-nearest, AWQ and GPTQ checkpoints (packed here as their tools pack them), a
GGUF's Q4_1 / Q8_0 blocks; then the engine on them, on the CPU kernels and on the Triton interpreter."""
import numpy as np
import pytest
import torch

from engine.config import EngineConfig
from engine.families import load_model
from engine.llm_engine import LLMEngine
from engine.models.decoder import PACKED, Linear
from engine.quant.formats import awq_weight, gptq_weight
from engine.quant.rtn import quantize_rtn
from engine.sampling_params import SamplingParams
from kernels.cpu_qgemv import CpuQ8Weight, unpack_q8
from kernels.quant_cpu import CpuInt4Weight, CpuInt8Weight
from kernels.quant_weight import QuantWeight, dequantize
from tests.quant_checkpoints import (make_tiny_quantized_lm, pack_awq, pack_gptq, random_int_quant,
                                     reference_dense)
from tests.tiny_checkpoints import make_tiny_lm
from tests.triton_setup import needs_triton

PROMPT = [1, 17, 42, 99, 7, 3, 250, 61, 5, 88, 140, 23]  # > LOWP_MAX_ROWS: prefill reads the dense weights


@pytest.mark.parametrize("scheme, bits, group", [("w8a16", 8, 576), ("w4a16", 4, 64), ("w4a16", 4, 128)])
def test_round_to_nearest_is_within_half_a_step(scheme, bits, group):
    K = 576 if group != 128 else 1536
    w = torch.randn(96, K) * torch.rand(96, 1)
    qw = quantize_rtn(w, scheme)
    assert (qw.bits, qw.group_size) == (bits, group if bits == 4 else K)
    step = qw.scales.repeat_interleave(qw.group_size, dim=1)
    assert torch.all((dequantize(qw) - w).abs() <= step / 2 + 1e-6)


@pytest.mark.parametrize("K, N, G", [(64, 8, 32), (256, 48, 128), (128, 24, 128)])
def test_awq_unpacking_follows_the_reference_formula(K, N, G):
    q, z, s, g_idx = random_int_quant(K, N, G)
    qweight, qzeros = pack_awq(q, z)
    assert qweight.shape == (K, N // 8) and qzeros.shape == (K // G, N // 8) and qweight.dtype == torch.int32
    torch.testing.assert_close(dequantize(awq_weight(qweight, qzeros, s, G)), reference_dense(q, z, s, g_idx))


@pytest.mark.parametrize("bits, act_order, v1", [(4, False, True), (4, True, True), (8, False, True),
                                                 (8, True, True), (4, False, False)])
def test_gptq_unpacking_follows_the_reference_formula(bits, act_order, v1):
    K, N, G = 256, 24, 64
    q, z, s, g_idx = random_int_quant(K, N, G, bits, act_order=act_order)
    qweight, qzeros = pack_gptq(q, z, bits, v1)
    assert qweight.shape == (K * bits // 32, N) and qzeros.shape == (K // G, N * bits // 32)
    w = gptq_weight(qweight, qzeros, s, g_idx, bits, G, v1)
    assert (w.perm is not None) == act_order
    torch.testing.assert_close(dequantize(w), reference_dense(q, z, s, g_idx))


def _prefill_logits(engine: LLMEngine, ids: list[int]) -> torch.Tensor:
    """All-position logits of one prefill of `ids` (a text-only prompt) in one step through the engine's runner."""
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1))
    budget, engine.scheduler.max_num_batched_tokens = engine.scheduler.max_num_batched_tokens, len(ids)
    try:
        batch = engine.scheduler.schedule()
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    assert [(c.seq, c.start, c.end) for c in batch.chunks] == [(seq, 0, len(ids))]
    with torch.inference_mode():
        embeds, positions, md = engine.runner.prepare_prefill(batch.chunks)
        logits = engine.model.logits(engine.model(embeds, positions, engine.runner.cos_sin, md))
    engine.abort(seq)
    return logits


def _dense_engine(loaded, folder, reference: dict) -> LLMEngine:
    """An engine on the same checkpoint's dense tensors, with the quantized projections' reference weights."""
    from engine.checkpoints.reader import read_safetensors

    src = loaded.engine
    weights = {k: v for k, v in read_safetensors(folder).items()
               if not k.endswith((".qweight", ".qzeros", ".scales", ".g_idx"))}
    weights.update(reference)
    return LLMEngine(src.model.config, weights, src.tokenizer, src.cfg, tuple(src.eos_token_ids))


def _packed_reference(reference: dict, path: str) -> torch.Tensor:
    """The reference weight of one of our modules: its checkpoint shards stacked (q | k | v, gate | up)."""
    parent, _, name = path.rpartition(".")
    shards = [leaf for leaf, (packed, _) in sorted(PACKED.items(), key=lambda kv: kv[1][1]) if packed == name]
    return torch.cat([reference[f"{parent}.{leaf}.weight"] for leaf in shards or [name]])


@pytest.fixture(scope="module", params=[("awq", 32, 4, False), ("gptq", 32, 4, True), ("gptq", 64, 8, False)],
                ids=["awq-g32", "gptq-g32-act-order", "gptq-8bit-g64"])
def quantized_checkpoint(request, tmp_path_factory):
    method, group, bits, act_order = request.param
    return make_tiny_quantized_lm(tmp_path_factory.mktemp(f"tiny-{method}"), method, group, bits, act_order)


def test_quantized_checkpoint_loads_as_its_reference_weights(quantized_checkpoint):
    """The CPU keeps the dequantized weight for prefill and a packed one for decode: aten's int4 / int8 layouts, or
    GGUF's 32-column groups on kernels/cpu_qgemv.c (then scales and zeros are rounded to fp16, at most 2^-11 of each,
    and both weights use those values)."""
    folder, reference = quantized_checkpoint
    loaded = load_model(str(folder), "cpu", "float32", enable_prefix_caching=False)
    model = loaded.engine.model
    rounded = False
    for path, module in model.named_modules():
        if isinstance(module, Linear) and path != "lm_head":
            assert isinstance(module.lowp, (CpuInt4Weight, CpuInt8Weight, CpuQ8Weight))
            want = _packed_reference(reference, path)
            if isinstance(module.lowp, CpuQ8Weight):
                rounded = True
                torch.testing.assert_close(module.weight, want, atol=2 ** -10 * want.abs().max().item(), rtol=0)
                u, d, m = unpack_q8(module.lowp)  # decode's weight is prefill's
                torch.testing.assert_close(d.repeat_interleave(32, 1) * u.float() + m.repeat_interleave(32, 1),
                                           module.weight, atol=1e-6, rtol=1e-6)
            else:
                torch.testing.assert_close(module.weight, want)
    dense_engine = _dense_engine(loaded, folder, reference)
    tol = 2e-3 if rounded else 1e-5
    torch.testing.assert_close(_prefill_logits(loaded.engine, PROMPT), _prefill_logits(dense_engine, PROMPT),
                               atol=tol, rtol=tol)
    out = loaded.engine.generate([PROMPT], SamplingParams(max_new_tokens=12, ignore_eos=True))[0]
    assert len(out.token_ids) == 12  # decode steps run on the packed int4 / int8 kernels


@needs_triton
@pytest.mark.parametrize("method, group, bits, act_order", [
    ("awq", 32, 4, False), pytest.param("gptq", 32, 4, True, marks=pytest.mark.slow),
    pytest.param("gptq", 64, 8, False, marks=pytest.mark.slow)])
def test_quantized_engine_on_triton_kernels_decodes_like_the_reference(method, group, bits, act_order, tmp_path):
    # TRITON_INTERPRET on CPU: the QuantWeight goes to the dequantize-GEMV / GEMM kernels as it would on a GPU.
    folder, reference = make_tiny_quantized_lm(tmp_path, method, group, bits, act_order)
    loaded = load_model(str(folder), "cpu", "float32", enable_prefix_caching=False, use_triton=True)
    assert isinstance(loaded.engine.model.model.layers[0].mlp.down_proj.weight, QuantWeight)
    dense_engine = _dense_engine(loaded, folder, reference)
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    ours = loaded.engine.generate([PROMPT], params)[0].token_ids
    assert ours == dense_engine.generate([PROMPT], params)[0].token_ids


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    folder = tmp_path_factory.mktemp("tiny-lm-quant")
    make_tiny_lm(folder)
    return folder


@pytest.mark.parametrize("scheme", ["w8a16", "w4a16"])
def test_round_to_nearest_at_load(tiny_lm, scheme):
    """Decode runs kernels/cpu_qgemv.c where this machine's policy measured it faster than aten's int4 kernel (the
    weights put in GGUF's groups), aten's int4 / int8 kernels elsewhere; the LM head is int8 in both schemes."""
    from engine.quant.policy import cpu_policy

    loaded = load_model(str(tiny_lm), "cpu", "float32", quantize=scheme, enable_prefix_caching=False)
    layer = loaded.engine.model.model.layers[0]
    fast = cpu_policy().int8_act_decode
    assert isinstance(layer.mlp.down_proj.lowp, CpuQ8Weight if fast else
                      CpuInt8Weight if scheme == "w8a16" else CpuInt4Weight)
    head = loaded.engine.model.lm_head.lowp
    assert isinstance(head, CpuQ8Weight if fast else CpuInt8Weight)
    assert not fast or head.bits == 8
    out = loaded.engine.generate([PROMPT], SamplingParams(max_new_tokens=8, ignore_eos=True))[0]
    assert len(out.token_ids) == 8


def test_quantize_errors_are_clear(tiny_lm, quantized_checkpoint):
    with pytest.raises(ValueError, match="already quantized"):
        load_model(str(quantized_checkpoint[0]), "cpu", "float32", quantize="w8a16")
    with pytest.raises(ValueError, match="GGUF"):
        load_model(str(tiny_lm), "cpu", "float32", quantize="gguf")
    with pytest.raises(ValueError, match="quantize must be"):
        EngineConfig(quantize="int3")


def test_gguf_blocks_read_as_the_gguf_package_dequantizes_them(tmp_path):
    from gguf import GGMLQuantizationType as T, GGUFWriter
    from gguf.quants import dequantize as gguf_dequantize, quantize as gguf_quantize

    from engine.quant.gguf import read_gguf

    rng = np.random.default_rng(0)
    tensors = {"blk.0.attn_q.weight": (rng.standard_normal((64, 96)), T.Q4_1),
               "blk.0.attn_k.weight": (rng.standard_normal((32, 96)), T.Q4_1),
               "blk.0.ffn_down.weight": (rng.standard_normal((96, 64)), T.Q8_0),
               "token_embd.weight": (rng.standard_normal((50, 96)), T.Q8_0),
               "blk.0.attn_norm.weight": (rng.standard_normal(96), T.F32)}
    writer = GGUFWriter(str(tmp_path / "tiny.gguf"), "llama")
    blocks = {}
    for name, (data, qtype) in tensors.items():
        data = data.astype(np.float32)
        blocks[name] = gguf_quantize(data, qtype) if qtype != T.F32 else data
        writer.add_tensor(name, blocks[name], raw_dtype=qtype if qtype != T.F32 else None)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    out = read_gguf(tmp_path / "tiny.gguf", num_heads=4, num_kv_heads=2)

    def unpermute(w, heads):  # transformers' `_reverse_permute_weights`
        dim = w.shape[0] // heads // 2
        return w.reshape(heads, dim, 2, *w.shape[1:]).swapaxes(2, 1).reshape(w.shape)

    want = {name: gguf_dequantize(b, tensors[name][1]) if tensors[name][1] != T.F32 else b
            for name, b in blocks.items()}
    q, k = out["model.layers.0.self_attn.q_proj.weight"], out["model.layers.0.self_attn.k_proj.weight"]
    assert isinstance(q, QuantWeight) and (q.bits, q.group_size) == (4, 32)
    np.testing.assert_array_equal(dequantize(q).numpy(), unpermute(want["blk.0.attn_q.weight"], 4))
    np.testing.assert_array_equal(dequantize(k).numpy(), unpermute(want["blk.0.attn_k.weight"], 2))
    down = out["model.layers.0.mlp.down_proj.weight"]
    assert (down.bits, down.group_size, down.zeros) == (8, 32, None)
    np.testing.assert_array_equal(dequantize(down).numpy(), want["blk.0.ffn_down.weight"])
    np.testing.assert_array_equal(out["model.embed_tokens.weight"].numpy(), want["token_embd.weight"])  # dense
    np.testing.assert_array_equal(dequantize(out["lm_head.weight"]).numpy(), want["token_embd.weight"])  # tied
    np.testing.assert_array_equal(out["model.layers.0.input_layernorm.weight"].numpy(),
                                  want["blk.0.attn_norm.weight"])

"""GPU path (Triton kernels, CUDA graphs) against the CPU path on the tiny parity checkpoints.

Tolerances, written down: in fp32 the GPU path must give the same greedy tokens and prefill logits within 1e-3
(Triton's fp32 dots may use a different summation order; TF32 is not used). In bf16, logits carry ~3 significant
digits (8-bit mantissa) through every layer, so we ask for max |diff| <= 5% of the logits' range and at least 90% of
the 48 greedy tokens equal (a near-tie can flip a token, and then the rest of the reply follows the new prefix).
"""
import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.test_engine_parity import QUESTION, run_prefill_logits
from tests.tiny_checkpoints import make_tiny_llava, random_png
from vlm import ChatImage, ChatModel, ChatTurn
from vlm.loading import load_bundle

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp(request.param), request.param)


def greedy_and_logits(checkpoint, device, **kw):
    bundle = load_bundle(str(checkpoint), device, **kw)
    plan = ChatModel(bundle).plan("", [ChatTurn("user", QUESTION, (ChatImage(random_png(), "x.png"),))], 48)
    ids, spans = plan.prepared
    tokens = bundle.engine.generate([ids], SamplingParams(max_new_tokens=48, ignore_eos=True), [spans])[0].token_ids
    logits = run_prefill_logits(bundle.engine, ids, spans).float().cpu()
    return tokens, logits


def test_gpu_fp32_equals_cpu(checkpoint):
    cpu_tokens, cpu_logits = greedy_and_logits(checkpoint, "cpu")
    gpu_tokens, gpu_logits = greedy_and_logits(checkpoint, "cuda", dtype="float32")
    assert (gpu_logits - cpu_logits).abs().max().item() < 1e-3
    assert gpu_tokens == cpu_tokens


def test_gpu_bf16_close_to_cpu(checkpoint):
    cpu_tokens, cpu_logits = greedy_and_logits(checkpoint, "cpu")
    gpu_tokens, gpu_logits = greedy_and_logits(checkpoint, "cuda")  # bf16 by default on CUDA
    span = (cpu_logits.max() - cpu_logits.min()).item()
    assert (gpu_logits - cpu_logits).abs().max().item() <= 0.05 * span
    same = sum(a == b for a, b in zip(gpu_tokens, cpu_tokens))
    assert same >= 0.9 * len(cpu_tokens)

"""GPU path (Triton kernels, CUDA graphs) against the CPU path on the tiny parity checkpoints.

The GPU generates 48 greedy tokens (prefill, then cached decode under CUDA graphs) and records the logits of each
step; the CPU path computes the same sequence's logits in one full forward. Tolerances, written down, as a share of
the logits' range: fp32 1e-4 (only summation order differs; TF32 is off), bf16 3% (an 8-bit mantissa through every
layer). Every GPU token must be the CPU's argmax wherever the CPU's top two logits are further apart than the
tolerance; at a near-tie either token is right, and comparing whole token lists would fail on rounding alone.
"""
import dataclasses

import pytest
import torch

from engine.sampling_params import SamplingParams
from tests.test_engine_parity import QUESTION, RecordingSampler, run_prefill_logits
from tests.tiny_checkpoints import make_tiny_llava, random_png
from engine.chat import ChatImage, ChatModel, ChatTurn
from engine.families import load_model

pytestmark = pytest.mark.gpu


@pytest.fixture(scope="module", params=["llama-clip", "qwen2-siglip"])
def checkpoint(request, tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp(request.param), request.param)


def plan_with_features(bundle):
    """The prompt and its image spans, with features from the model's own input side (the vision stage's work)."""
    ids, spans = ChatModel(bundle).plan("", [ChatTurn("user", QUESTION, (ChatImage(random_png(), "x.png"),))],
                                        48).prepared
    feats = bundle.images.encode([s.source for s in spans])
    return ids, tuple(dataclasses.replace(s, embeds=f) for s, f in zip(spans, feats))


def cpu_plan(checkpoint):
    bundle = load_model(str(checkpoint), "cpu", "float32")
    return bundle, plan_with_features(bundle)


def gpu_run(checkpoint, dtype, ids, spans):
    """Greedy 48 tokens on the GPU from the CPU's prompt and image features, with the logits of each step."""
    bundle = load_model(str(checkpoint), "cuda", dtype)
    spans = tuple(dataclasses.replace(s, embeds=s.embeds.to("cuda")) for s in spans)
    recorder = RecordingSampler(bundle.engine.runner.sampler)
    bundle.engine.runner.sampler = recorder
    out = bundle.engine.generate([ids], SamplingParams(max_new_tokens=48, ignore_eos=True), [spans])[0]
    return out.token_ids, torch.stack(recorder.seen).float().cpu()


def check(checkpoint, dtype, tol):
    cpu_bundle, (ids, spans) = cpu_plan(checkpoint)
    tokens, gpu = gpu_run(checkpoint, dtype, ids, spans)
    # The CPU path's logits for the same sequence, in one full forward (teacher forcing on the GPU's tokens).
    cpu = run_prefill_logits(cpu_bundle.engine, ids + tokens[:-1], spans)[len(ids) - 1:]
    span = (cpu.max() - cpu.min()).item()
    assert (gpu - cpu).abs().max().item() <= tol * span
    # Each GPU token is the CPU's argmax too, except where the CPU's top two are closer than the tolerance.
    top2 = cpu.topk(2, dim=-1).values
    clear = (top2[:, 0] - top2[:, 1]) > 2 * tol * span
    assert clear.any()  # never vacuous
    assert (cpu.argmax(-1) == torch.tensor(tokens))[clear].all()


def test_gpu_image_features_close_to_cpu(checkpoint):
    """GPU preprocessing (resize within 2/255 of the CPU's) and the CUDA-graphed tower, in fp32."""
    _, (_, spans) = cpu_plan(checkpoint)
    gpu = plan_with_features(load_model(str(checkpoint), "cuda", "float32"))[1][0].embeds.float().cpu()
    cpu = spans[0].embeds
    assert gpu.shape == cpu.shape
    assert ((gpu - cpu).norm() / cpu.norm()).item() < 0.05


def test_gpu_fp32_matches_cpu(checkpoint):
    check(checkpoint, "float32", 1e-4)


def test_gpu_bf16_close_to_cpu(checkpoint):
    check(checkpoint, "bfloat16", 0.03)


def test_gpu_logprobs_and_penalties_follow_the_steps_logits(checkpoint):
    """On the GPU (CUDA graphs, the next step launched before this one's tokens are read): each token is the argmax
    of its step's logits after bias and penalties (tests/test_sampler.py's reference, the pending token counted),
    and its log-probability and alternatives are the log-softmax of those logits before them, copied to the host
    with the tokens."""
    from engine.paging.sequence import Sequence
    from tests.test_sampler import reference_adjusted

    _, (ids, spans) = cpu_plan(checkpoint)
    bundle = load_model(str(checkpoint), "cuda", "float32")
    spans = tuple(dataclasses.replace(s, embeds=s.embeds.to("cuda")) for s in spans)
    recorder = RecordingSampler(bundle.engine.runner.sampler)
    bundle.engine.runner.sampler = recorder
    params = SamplingParams(max_new_tokens=24, ignore_eos=True, logprobs=3, logit_bias={9: 2.0, 11: -50.0},
                            repetition_penalty=1.2, presence_penalty=0.5, frequency_penalty=0.7)
    out = bundle.engine.generate([ids], params, [spans])[0]
    assert len(out.logprobs) == len(out.token_ids) == len(recorder.seen) == 24
    seq = Sequence(ids, params)
    for step, (logits, lp) in enumerate(zip(recorder.seen, out.logprobs)):
        logits = logits.float().cpu()
        want = torch.log_softmax(logits, -1)
        assert lp.token_id == out.token_ids[step] and abs(lp.logprob - want[lp.token_id].item()) < 1e-4, step
        assert all(abs(v - want[t].item()) < 1e-4 for t, v in lp.top), step
        adjusted = reference_adjusted(logits, seq, None)
        top2 = adjusted.topk(2).values
        if top2[0] - top2[1] > 1e-4:  # a near-tie may go either way
            assert lp.token_id == adjusted.argmax().item(), step
        seq.append(lp.token_id)

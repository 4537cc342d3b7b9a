"""Chunked prefill through the engine: prompts prefilled in chunks under the per-step token budget, mixed with other
chats' decode tokens, give the same tokens as prompts prefilled whole.

Covered: greedy and seeded outputs with overlap on and off; the Triton kernels under the interpreter; a tiny llava
whose chunk boundary falls inside the image's placeholder span; the bounded stall (a decoding chat gets a token in
every step while a long prompt takes ceil(len / budget) steps); preemption of a partially prefilled sequence under a
tiny KV cache; prefix-cache reuse after a chunked prefill; an abort and a failed step (`recover`) in the middle of
one. Steps are counted by wrapping the runner's `launch` (conftest's `record_steps`).
"""
import math

import pytest
import torch

from engine.config import DEFAULT_STEP_TOKENS, EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.triton_setup import DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_thread")

GREEDY = SamplingParams(max_new_tokens=12, ignore_eos=True)
WHOLE = 256  # a budget above every prompt here: no chunking


def words(n: int, seed: int) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return [1] + torch.randint(3, 300, (n - 1,), generator=g).tolist()


PROMPTS = [words(61, 0), words(7, 1), words(38, 2), words(90, 3)]


def make_engine(tiny_lm, budget: int, overlap: bool = False, **kw) -> LLMEngine:
    cfg, weights, tok = tiny_lm
    kw.setdefault("max_num_seqs", 4)
    return LLMEngine(cfg, weights, tok, EngineConfig(max_num_batched_tokens=budget, overlap_decode=overlap, **kw))


def summary(completions):
    return [(c.token_ids, c.text, c.finish_reason) for c in completions]


def partial_chunks(steps) -> int:
    """Chunks that ended inside their sequence's prompt (sampled nothing)."""
    return sum(1 for step in steps for seq, _, end in step if end < seq.num_prompt_tokens)


def test_the_step_token_budget_defaults_by_device_and_is_validated():
    assert EngineConfig().max_num_batched_tokens == DEFAULT_STEP_TOKENS["cpu"]
    assert EngineConfig(device="cuda:1").max_num_batched_tokens == DEFAULT_STEP_TOKENS["cuda"]
    assert EngineConfig(max_num_seqs=500).max_num_batched_tokens == 500  # room for every decode token
    assert EngineConfig(max_num_batched_tokens=40, max_num_seqs=40).max_num_batched_tokens == 40
    with pytest.raises(ValueError, match="at least max_num_seqs"):
        EngineConfig(max_num_batched_tokens=16, max_num_seqs=32)


@pytest.mark.parametrize("overlap", [False, True])
def test_chunked_greedy_and_seeded_outputs_equal_whole_prefill(tiny_lm, overlap, record_steps):
    params = [GREEDY, SamplingParams(max_new_tokens=10, temperature=0.9, top_k=40, repetition_penalty=1.3,
                                     seed=5, ignore_eos=True), GREEDY, GREEDY]
    want = make_engine(tiny_lm, WHOLE, overlap).generate(PROMPTS, params)
    engine = make_engine(tiny_lm, 24, overlap)
    steps = record_steps(engine)
    got = engine.generate(PROMPTS, params)
    assert summary(got) == summary(want)
    assert partial_chunks(steps) >= 6 and all(sum(e - s for _, s, e in step) <= 24 for step in steps)
    assert engine.blocks.num_free == engine.blocks.num_blocks


@needs_triton
def test_chunked_prefill_through_the_triton_kernels(tiny_lm, record_steps):
    """The Triton kernels (TRITON_INTERPRET on CPU) on mixed steps: a decode row and prompt chunks with cached
    context in one paged-prefill launch; the tokens of the torch twins prefilling whole."""
    # Three steps, all through paged prefill (one-row GEMVs in the interpreter are slow, so no pure decode step):
    # [a 0-3, b 0-1], [a's decode row 3-4, b 1-4], [b 4-8].
    prompts = [words(3, 4), words(8, 5)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (2, 1)]
    want = make_engine(tiny_lm, WHOLE).generate(prompts, params)
    engine = make_engine(tiny_lm, 4, max_num_seqs=2, use_triton=True, device=DEVICE)
    steps = record_steps(engine)
    got = engine.generate(prompts, params)
    by_prompt = [[(seq.num_prompt_tokens, start, end) for seq, start, end in step] for step in steps]
    assert by_prompt == [[(3, 0, 3), (8, 0, 1)], [(3, 3, 4), (8, 1, 4)], [(8, 4, 8)]]
    assert summary(got) == summary(want)


def test_decoding_chat_gets_a_token_every_step_while_a_long_prompt_is_prefilled(tiny_lm):
    budget = 16
    for overlap in (False, True):
        engine = make_engine(tiny_lm, budget, overlap)
        a = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=60, ignore_eos=True))
        while a.num_output_tokens < 3:
            engine.step()
        b = engine.add_request(PROMPTS[3], GREEDY)
        stalled_steps = 0
        while b.num_output_tokens == 0:
            before = a.num_output_tokens
            engine.step()
            assert a.num_output_tokens > before  # a's stream never stalls
            stalled_steps += 1
        assert stalled_steps == math.ceil(len(PROMPTS[3]) / (budget - 1))  # a's token takes one row of the budget


def test_preempting_a_partially_prefilled_sequence_under_a_tiny_kv_cache(tiny_lm):
    prompts = [words(6, 6), words(30, 7)]
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (20, 6)]
    want = make_engine(tiny_lm, WHOLE).generate(prompts, params)
    for overlap in (False, True):
        engine = make_engine(tiny_lm, 8, overlap, num_kv_blocks=11, block_size=4)
        partial, preempt = [], engine.scheduler._preempt

        def spy(seq):
            partial.append(0 < seq.num_computed_tokens < seq.num_prompt_tokens)
            preempt(seq)

        engine.scheduler._preempt = spy
        a = engine.add_request(prompts[0], params[0])
        while a.num_output_tokens < 3:  # a holds 3 blocks; b's 8 blocks fill the cache, and a needs more
            engine.step()
        b = engine.add_request(prompts[1], params[1])
        while engine.has_work():
            engine.step()
        assert [a.output_ids, b.output_ids] == [c.token_ids for c in want]
        assert any(partial)
        assert engine.blocks.num_free == engine.blocks.num_blocks


def test_prefix_cache_reuse_after_a_chunked_prefill(tiny_lm):
    engine = make_engine(tiny_lm, 20, block_size=8)
    first = engine.generate([PROMPTS[3]], GREEDY)[0]
    follow_up = PROMPTS[3] + first.token_ids + [5, 6, 7]
    cold = make_engine(tiny_lm, WHOLE, enable_prefix_caching=False).generate([follow_up], GREEDY)[0]
    seq = engine.add_request(follow_up, GREEDY)
    engine.step()
    # 90 prompt tokens and 12 replies: the chunks keyed blocks 0-10, decode block 11 (its last token's KV was never
    # computed, so block 12 is not keyed)
    assert seq.num_cached_tokens == 96
    while engine.has_work():
        engine.step()
    assert seq.output_ids == cold.token_ids


@pytest.mark.parametrize("overlap", [False, True])
def test_abort_in_the_middle_of_a_chunked_prefill_frees_everything(tiny_lm, overlap):
    engine = make_engine(tiny_lm, 16, overlap)
    a = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(3):
        engine.step()
    b = engine.add_request(PROMPTS[3], GREEDY)
    engine.step()
    engine.step()
    assert 0 < b.num_computed_tokens < len(b) and b.block_table
    engine.abort(b)
    assert b.block_table == [] and b not in engine.scheduler.running
    while engine.has_work():
        assert all(out.seq is not b for out in engine.step())
    assert b.output_ids == [] and a.num_output_tokens == 30
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_recover_in_the_middle_of_a_chunked_prefill(tiny_lm):
    """A mixed step (a's decode token and b's second chunk) raises: both are recomputed alone, the keys of the
    blocks that step was to complete are dropped (their KV was never written), and the replies are as undisturbed."""
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = make_engine(tiny_lm, WHOLE).generate([PROMPTS[1], PROMPTS[3]], params)
    engine = make_engine(tiny_lm, 16, block_size=4)
    a = engine.add_request(PROMPTS[1], params)
    engine.step()
    b = engine.add_request(PROMPTS[3], params)
    engine.step()  # a's token and b's first 15 tokens
    assert b.num_computed_tokens == 15 and len(engine.blocks.key_to_block) == 2 + 3  # a's 2 full blocks, b's 3
    launch = engine.runner.launch

    def failing(batch, after=None):
        engine.runner.launch = launch
        raise RuntimeError("device fault")

    engine.runner.launch = failing
    with pytest.raises(RuntimeError):
        engine.step()
    assert engine.recover("device fault") == []
    assert a.suspect == b.suspect == 1 and list(engine.scheduler.waiting) == [a, b]
    assert len(engine.blocks.key_to_block) == 2 + 3  # b's 4th-7th blocks (positions 15-27) were never computed
    while engine.has_work():
        engine.step()
    assert [a.output_ids, b.output_ids] == [c.token_ids for c in want]
    assert engine.blocks.num_free == engine.blocks.num_blocks

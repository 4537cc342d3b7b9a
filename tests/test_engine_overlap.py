"""Overlapped decode (decode step N+1 launched before the host handles step N's tokens) against the plain engine.

Every test runs the same requests with `overlap_decode` on and off and wants the same tokens, texts and finish
reasons: greedy and seeded sampling with a repetition penalty (the penalty must see the token still on the device),
EOS, stop strings, length and context limits, preemption under a tiny KV cache, aborts while a step is in flight,
and the prefix-cache keys registered along the way. On a CPU the overlap gains nothing, but its bookkeeping is the
same as on a GPU. The scheduler's lookahead decision is tested on its own at the end (pure Python).
"""
import pytest
import torch

from engine.paging.block_manager import BlockManager
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.runtime.sampler import Sampler
from engine.sampling_params import SamplingParams
from engine.paging.scheduler import Scheduler
from engine.paging.sequence import ErrorCode, FinishReason, Sequence
from tests.tiny_checkpoints import make_tiny_lm

pytestmark = pytest.mark.usefixtures("one_thread")

PROMPTS = [[1, 4, 8, 15], [1, 16, 23, 42, 7, 7, 9], [1, 2], [1, 99, 98, 97, 96, 95]]


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm-overlap"))


def make_engine(tiny_lm, overlap: bool, eos=(), **kw) -> LLMEngine:
    cfg, weights, tok = tiny_lm
    return LLMEngine(cfg, weights, tok, EngineConfig(overlap_decode=overlap, **kw), eos_token_ids=eos)


def count_launches_ahead(engine: LLMEngine) -> list[int]:
    """Wraps the runner's launch; the returned list counts launches fed by a step in flight."""
    counter, launch = [0], engine.runner.launch

    def spy(batch, after=None):
        counter[0] += after is not None
        return launch(batch, after)

    engine.runner.launch = spy
    return counter


def run_both(tiny_lm, prompts, params, eos=(), **kw):
    """(plain completions, overlapped completions, launches ahead in the overlapped run)."""
    plain = make_engine(tiny_lm, False, eos, **kw).generate(prompts, params)
    engine = make_engine(tiny_lm, True, eos, **kw)
    ahead = count_launches_ahead(engine)
    overlapped = engine.generate(prompts, params)
    assert not engine.has_work() and engine.blocks.num_free == engine.blocks.num_blocks
    return plain, overlapped, ahead[0]


def summary(completions):
    return [(c.token_ids, c.text, c.finish_reason) for c in completions]


def test_greedy_outputs_and_finish_reasons_match(tiny_lm):
    greedy = SamplingParams(max_new_tokens=30, ignore_eos=True)
    probe = make_engine(tiny_lm, False, max_model_len=64).generate(PROMPTS, greedy)
    eos = probe[0].token_ids[6]  # request 0 stops on this EOS id, mid-reply
    text = probe[1].text
    stop = text[len(text) // 2:len(text) // 2 + 3]  # request 1 stops on a string from the middle of its reply
    params = [SamplingParams(max_new_tokens=30), SamplingParams(max_new_tokens=30, stop=(stop,), ignore_eos=True),
              SamplingParams(max_new_tokens=5, ignore_eos=True), SamplingParams(max_new_tokens=1, ignore_eos=True),
              SamplingParams(max_new_tokens=100, ignore_eos=True)]
    prompts = PROMPTS + [[1] + list(range(3, 53))]  # 51 tokens: reaches the 64-token context after 13
    plain, overlapped, ahead = run_both(tiny_lm, prompts, params, eos=(eos,), max_model_len=64)
    assert summary(overlapped) == summary(plain)
    reasons = [c.finish_reason for c in plain]
    assert reasons == [FinishReason.STOP, FinishReason.STOP, FinishReason.LENGTH, FinishReason.LENGTH,
                       FinishReason.CONTEXT]
    assert len(plain[2].token_ids) == 5 and len(plain[3].token_ids) == 1 and len(plain[4].token_ids) == 13
    assert ahead > 10  # the overlapped run really launched ahead


def test_seeded_sampling_with_repetition_penalty_matches(tiny_lm):
    params = [SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=20, repetition_penalty=1.3,
                             seed=1234, ignore_eos=True),
              SamplingParams(max_new_tokens=17, temperature=0.8, repetition_penalty=1.5, seed=7, ignore_eos=True),
              SamplingParams(max_new_tokens=24, repetition_penalty=2.0, ignore_eos=True),  # greedy, penalised
              SamplingParams(max_new_tokens=9, temperature=1.2, seed=99, ignore_eos=True)]
    plain, overlapped, ahead = run_both(tiny_lm, PROMPTS, params)
    assert summary(overlapped) == summary(plain) and ahead > 10
    unpenalised = make_engine(tiny_lm, True).generate(PROMPTS[2:3], SamplingParams(max_new_tokens=24,
                                                                                   ignore_eos=True))
    assert unpenalised[0].token_ids != plain[2].token_ids  # the penalty is not vacuous here


def test_sampler_penalises_the_pending_token_like_an_appended_one():
    logits = torch.randn(2, 50)
    held = [Sequence([1, 5, 9], SamplingParams(repetition_penalty=1.7)),
            Sequence([3, 3, 4], SamplingParams(repetition_penalty=0.6))]
    pending = torch.tensor([12, 4])  # row 1's pending token is one it already holds: penalised once, not twice
    appended = [Sequence(s.token_ids + [int(t)], s.params) for s, t in zip(held, pending)]
    sampler = Sampler(torch.device("cpu"))
    want = sampler._apply_penalty(logits.clone(), appended, None)
    got = sampler._apply_penalty(logits.clone(), held, pending)
    assert torch.equal(got, want)
    assert not torch.equal(want, logits)


def test_next_step_is_launched_before_the_previous_tokens_are_read(tiny_lm):
    engine = make_engine(tiny_lm, True)
    log, launch = [], engine.runner.launch

    def spy(batch, after=None):
        step = launch(batch, after)
        n = sum(1 for e in log if e[0] == "launch")
        log.append(("launch", n))
        read = step.token_ids
        step.token_ids = lambda: (log.append(("read", n)), read())[1]
        return step

    engine.runner.launch = spy
    engine.generate([PROMPTS[0]], SamplingParams(max_new_tokens=8, ignore_eos=True))
    # The prefill is launched and read at once; decode step 1 is left in flight; from then on each decode step is
    # launched before the one before it is read, except after the step that reaches max_new_tokens.
    ahead = [e for k in range(2, 8) for e in (("launch", k), ("read", k - 1))]
    assert log == [("launch", 0), ("read", 0), ("launch", 1), *ahead, ("read", 7)]


def test_abort_while_in_flight_frees_blocks_and_stops_outputs(tiny_lm):
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True)
    alone = make_engine(tiny_lm, False).generate([PROMPTS[1]], greedy)[0].token_ids
    engine = make_engine(tiny_lm, True)
    a, b = engine.add_request(PROMPTS[0], greedy), engine.add_request(PROMPTS[1], greedy)
    while not (engine.inflight is not None and a.num_output_tokens >= 3):
        engine.step()
    assert a in engine.inflight.seqs
    engine.abort(a)
    assert a.finish_reason is FinishReason.ABORT and a.block_table == []
    tokens_at_abort = list(a.token_ids)
    while engine.has_work():
        assert all(out.seq is not a for out in engine.step())
    assert a.token_ids == tokens_at_abort and b.output_ids == alone
    assert engine.blocks.num_free == engine.blocks.num_blocks
    # Aborting everything in flight: the step still resolves (to nothing), then the engine is idle.
    c = engine.add_request(PROMPTS[2], greedy)
    while engine.inflight is None:
        engine.step()
    engine.abort(c)
    assert engine.has_work() and engine.step() == [] and not engine.has_work()
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_recover_retries_the_failed_step_alone_then_fails_a_repeat_offender(tiny_lm):
    """After a step raises, the requests in it (the step in flight included) are recomputed, one at a time, and
    finish with the same greedy tokens as an undisturbed run; a request in a second failed step ends with ERROR
    (code ENGINE) and frees everything."""
    greedy = SamplingParams(max_new_tokens=20, ignore_eos=True)
    alone = [make_engine(tiny_lm, True).generate([p], greedy)[0].token_ids for p in PROMPTS[:2]]
    engine = make_engine(tiny_lm, True)
    seqs = [engine.add_request(p, greedy) for p in PROMPTS[:2]]
    while engine.inflight is None:
        engine.step()
    assert engine.recover("test failure") == []
    assert engine.inflight is None and all(s.suspect == 1 and not s.is_finished for s in seqs)
    assert list(engine.scheduler.waiting) == seqs
    batch = engine.scheduler.schedule()
    assert batch.seqs == seqs[:1] and not batch.is_decode  # suspects are prefilled alone
    engine.runner.launch(batch)  # this step "fails" too:
    engine._attempt = batch.chunks
    failed = engine.recover("test failure")
    assert failed == seqs[:1] and seqs[0].finish_reason is FinishReason.ERROR
    assert seqs[0].error.code is ErrorCode.ENGINE
    while engine.has_work():
        engine.step()
    assert seqs[1].output_ids == alone[1]
    assert engine.blocks.num_free == engine.blocks.num_blocks


def test_a_waiting_request_is_admitted_at_the_next_step(tiny_lm):
    engine = make_engine(tiny_lm, True)
    engine.add_request(PROMPTS[0], SamplingParams(max_new_tokens=30, ignore_eos=True))
    for _ in range(5):
        engine.step()
    assert engine.inflight is not None
    late = engine.add_request(PROMPTS[1], SamplingParams(max_new_tokens=3, ignore_eos=True))
    outputs = engine.step()  # resolves the step in flight, then prefills the newcomer
    assert any(out.seq is late for out in outputs) and late.num_output_tokens == 1


def test_preemption_under_a_tiny_kv_cache_matches(tiny_lm):
    params = [SamplingParams(max_new_tokens=n, ignore_eos=True) for n in (14, 10, 12, 9)]
    kw = dict(num_kv_blocks=10, block_size=4)  # 40 token slots for requests needing up to 21 each
    plain = make_engine(tiny_lm, False, **kw)
    engine = make_engine(tiny_lm, True, **kw)
    preemptions = {}
    for name, e in (("plain", plain), ("overlap", engine)):
        def counting(seq, preempt=e.scheduler._preempt, name=name):
            preemptions[name] = preemptions.get(name, 0) + 1
            preempt(seq)
        e.scheduler._preempt = counting
    want = plain.generate(PROMPTS, params)
    got = engine.generate(PROMPTS, params)
    assert summary(got) == summary(want)
    assert preemptions.get("plain", 0) > 0 and preemptions.get("overlap", 0) > 0
    assert engine.blocks.num_free == engine.blocks.num_blocks


def cache_contents(engine: LLMEngine) -> dict:
    bm = engine.blocks
    return {key: bm.blocks[block_id].token_ids for key, block_id in bm.key_to_block.items()}


def test_prefix_cache_keys_match_and_hold_the_right_kv(tiny_lm):
    greedy = SamplingParams(max_new_tokens=21, ignore_eos=True)
    engines = [make_engine(tiny_lm, overlap, block_size=4) for overlap in (False, True)]
    first = [e.generate(PROMPTS, greedy) for e in engines]
    assert summary(first[1]) == summary(first[0])
    assert cache_contents(engines[1]) == cache_contents(engines[0])
    assert len(cache_contents(engines[0])) > 4 * len(PROMPTS)  # decode filled and keyed blocks, not just prompts
    # A follow-up turn reuses blocks keyed during decode; their KV must be what a cold engine computes.
    follow_up = PROMPTS[1] + first[0][1].token_ids + [5, 6]
    cold = make_engine(tiny_lm, False, enable_prefix_caching=False).generate([follow_up], greedy)[0].token_ids
    for e in engines:
        seq = e.add_request(follow_up, greedy)
        e.step()
        # 28 tokens held: blocks 0-5 are keyed; block 6 is not, since its last token's KV was never computed.
        assert seq.num_cached_tokens == 24
        while e.has_work():
            e.step()
        assert seq.output_ids == cold


# The lookahead decision, on the scheduler alone (pure Python).

def decoding(sched: Scheduler, *seqs: Sequence) -> None:
    for s in seqs:
        sched.add(s)
    sched.schedule()
    for s in seqs:
        s.append(1)  # the prefill's token
    assert sched.schedule().seqs == list(seqs)  # the decode step now in flight


def test_schedule_ahead_reserves_the_pending_slot_and_skips_sequences_at_a_limit():
    bm = BlockManager(16, 4)
    sched = Scheduler(bm, 8, 100, max_model_len=64)
    a = Sequence([1, 2, 3], SamplingParams(max_new_tokens=9))  # 4 tokens; the step in flight writes position 3
    b = Sequence([5, 6], SamplingParams(max_new_tokens=2))  # its pending token is its last: it ends there
    decoding(sched, a, b)
    blocks_before = len(a.block_table)
    assert sched.schedule_ahead([a, b]).seqs == [a]
    assert len(a.block_table) == blocks_before + 1  # position 4 (the pending token) opens a second block
    sched.abort(a)
    assert not sched.schedule_ahead([a, b]).chunks  # aborted: nothing left that surely continues


def test_schedule_ahead_waits_for_admissions_and_for_blocks():
    bm = BlockManager(3, 4)
    sched = Scheduler(bm, 8, 100, max_model_len=64)
    a, b = Sequence([1, 2, 3], SamplingParams()), Sequence([4, 5, 6], SamplingParams())
    decoding(sched, a, b)
    assert bm.num_free == 1 and not sched.schedule_ahead([a, b]).chunks  # both need a block at position 4: one is free
    assert len(a.block_table) == len(b.block_table) == 1  # nothing reserved on a refusal
    sched.finish(b, FinishReason.STOP)
    sched.add(Sequence([7, 8], SamplingParams()))
    assert sched.can_admit() and not sched.schedule_ahead([a]).chunks  # a newcomer fits: it goes first
    assert not sched.schedule().is_decode  # ... with its prompt

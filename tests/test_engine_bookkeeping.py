"""Scheduler and block manager: pure Python, no model. Prefix caching, image-aware keys, preemption, limits, and
chunked prefill under the per-step token budget."""
from engine.paging.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.paging.scheduler import Scheduler
from engine.paging.sequence import ErrorCode, FinishReason, ImageSpan, Sequence, Status

P = SamplingParams(max_new_tokens=8)


def seq(n, start=0, images=()):
    return Sequence(list(range(start, start + n)), P, images)


def prefilled(bm, s):
    """Allocate a sequence and key its full blocks, as a scheduled prefill of its whole prompt does."""
    bm.allocate(s)
    bm.register_full_blocks(s, s.num_computed_tokens, len(s))


def test_allocate_and_free_return_every_block():
    bm = BlockManager(8, 4)
    s = seq(10)
    bm.allocate(s)
    assert len(s.block_table) == 3 and bm.num_free == 5
    bm.free(s)
    assert bm.num_free == 8 and s.block_table == []


def test_prefix_cache_reuses_full_blocks_and_recomputes_last_token():
    bm = BlockManager(16, 4)
    a = seq(10)
    prefilled(bm, a)
    b = seq(10)
    bm.allocate(b)
    assert b.block_table[:2] == a.block_table[:2]  # two full blocks shared
    assert b.block_table[2] != a.block_table[2]  # the partial block never is
    assert b.num_cached_tokens == 8
    c = seq(8)  # entirely cached: the last token must still be computed
    bm.allocate(c)
    assert c.num_cached_tokens == 7


def test_prefix_survives_its_request_until_overwritten():
    bm = BlockManager(4, 4)
    a = seq(8)
    prefilled(bm, a)
    blocks = list(a.block_table)
    bm.free(a)
    b = seq(8)
    bm.allocate(b)
    assert b.num_cached_tokens == 7 and b.block_table == blocks


def test_different_images_behind_same_placeholders_never_share_kv():
    bm = BlockManager(16, 4)
    ids = [7] * 8
    a = Sequence(ids, P, (ImageSpan(0, 8, "digest-a"),))
    b = Sequence(ids, P, (ImageSpan(0, 8, "digest-b"),))
    c = Sequence(ids, P, (ImageSpan(0, 8, "digest-a"),))
    for s in (a, b, c):
        prefilled(bm, s)
    assert b.num_cached_tokens == 0 and set(a.block_table).isdisjoint(b.block_table)
    assert c.num_cached_tokens == 7 and c.block_table == a.block_table


def test_decode_blocks_get_registered_for_later_prefixes():
    bm = BlockManager(16, 4)
    s = seq(3)
    bm.allocate(s)
    s.append(100)  # 4 tokens: block 0 now full
    bm.append_slot(s)
    t = Sequence([0, 1, 2, 100, 5], P)
    bm.allocate(t)
    assert t.num_cached_tokens == 4 and t.block_table[0] == s.block_table[0]


def rows(batch):
    """A step as (sequence, first position, one past the last, samples) per chunk."""
    return [(c.seq, c.start, c.end, c.samples) for c in batch.chunks]


def sampled(batch):
    """What the engine does once a step's tokens are back: each sampling sequence gets a token."""
    for s in batch.sampling:
        s.append(1)


def test_scheduler_prefills_then_decodes_and_respects_batch_limits():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64)
    seqs = [seq(5, start=i * 10) for i in range(3)]
    for s in seqs:
        assert sched.add(s)
    batch = sched.schedule()
    assert rows(batch) == [(seqs[0], 0, 5, True), (seqs[1], 0, 5, True)] and not batch.is_decode
    sampled(batch)
    batch = sched.schedule()
    assert rows(batch) == [(seqs[0], 5, 6, True), (seqs[1], 5, 6, True)] and batch.is_decode
    sampled(batch)
    sched.finish(seqs[0], FinishReason.STOP)
    batch = sched.schedule()  # a seat is free: the newcomer's prompt rides along with the other's decode token
    assert rows(batch) == [(seqs[1], 6, 7, True), (seqs[2], 0, 5, True)] and not batch.is_decode


def test_prompt_longer_than_context_finishes_at_once():
    sched = Scheduler(BlockManager(64, 4), 4, 100, max_model_len=16)
    s = seq(16)
    assert not sched.add(s)
    assert s.finish_reason is FinishReason.ERROR and s.error.code is ErrorCode.CONTEXT_EXCEEDED


def test_long_prompt_is_chunked_under_the_budget_while_others_decode():
    sched = Scheduler(BlockManager(64, 4), 4, max_num_batched_tokens=8, max_model_len=64)
    a, b = seq(3), seq(20, start=30)
    sched.add(a)
    sampled(sched.schedule())
    sched.add(b)
    steps = []
    while b.num_output_tokens == 0:
        batch = sched.schedule()
        assert batch.num_tokens <= 8
        steps.append(rows(batch))
        sampled(batch)
    # a gets a token every step; b's 20 tokens take ceil(20 / 7) = 3 steps and only the last one samples
    assert steps == [[(a, 3, 4, True), (b, 0, 7, False)],
                     [(a, 4, 5, True), (b, 7, 14, False)],
                     [(a, 5, 6, True), (b, 14, 20, True)]]
    assert rows(sched.schedule()) == [(a, 6, 7, True), (b, 20, 21, True)]


def test_prefix_keys_follow_the_chunks_that_compute_them():
    bm = BlockManager(64, 4)
    sched = Scheduler(bm, 4, max_num_batched_tokens=7, max_model_len=64)
    a = seq(20)
    sched.add(a)
    assert rows(sched.schedule()) == [(a, 0, 7, False)]
    assert len(bm.key_to_block) == 1  # positions 0-6 complete block 0 only; block 1 still lacks position 7
    twin = seq(20)  # the same prompt, admitted now: it may only reuse what is computed
    sched.add(twin)
    batch = sched.schedule()
    assert rows(batch) == [(a, 7, 14, False)]  # the budget went to a's next chunk
    assert len(bm.key_to_block) == 3  # to position 13: blocks 0-2
    batch = sched.schedule()
    # a's last chunk keys blocks 3-4, so the twin admitted after it in the same step finds all five: in that step
    # each layer writes a's KV before either attends, so the twin computes its last token only.
    assert rows(batch) == [(a, 14, 20, True), (twin, 19, 20, True)]
    assert twin.num_cached_tokens == 19 and twin.block_table == a.block_table


def test_preemption_when_blocks_run_out_and_recovery():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, 4, 100, max_model_len=16)
    a, b = seq(8), seq(8, start=50)
    sched.add(a), sched.add(b)
    batch = sched.schedule()
    assert batch.seqs == [a, b] and bm.num_free == 0
    sampled(batch)
    batch = sched.schedule()  # both need a 3rd block: b is preempted for a
    assert rows(batch) == [(a, 8, 9, True)]
    assert b.status is Status.WAITING and b.block_table == [] and sched.waiting[0] is b
    sched.finish(a, FinishReason.STOP)
    batch = sched.schedule()
    assert rows(batch) == [(b, 4, 9, True)] and len(b) == 9  # recomputed with its generated token, after
    assert b.num_cached_tokens == 4  # its first block, keyed by its first prefill (a took over the second)


def test_a_partially_prefilled_sequence_is_preempted_and_resumes_from_its_keyed_blocks():
    bm = BlockManager(5, 4)
    sched = Scheduler(bm, 4, max_num_batched_tokens=5, max_model_len=20)
    a, b = seq(4), seq(12, start=50)
    sched.add(a)
    while len(a) < 8:
        sampled(sched.schedule())  # a alone, until its 2nd block is full
    sched.add(b)
    batch = sched.schedule()
    assert rows(batch) == [(a, 7, 8, True), (b, 0, 4, False)] and bm.num_free == 0
    sampled(batch)
    batch = sched.schedule()  # a needs a 3rd block: b, the newest, is preempted in the middle of its prompt
    assert rows(batch) == [(a, 8, 9, True)]
    assert b.status is Status.WAITING and b.block_table == [] and b.num_computed_tokens == 0
    assert not sched.can_admit()  # its whole prompt's blocks are not free
    sched.finish(a, FinishReason.STOP)
    batch = sched.schedule()
    assert rows(batch) == [(b, 4, 9, False)]  # its first block, computed before, comes from the prefix cache
    assert b.num_cached_tokens == 4


def test_schedule_ahead_waits_while_a_prompt_is_being_prefilled():
    sched = Scheduler(BlockManager(64, 4), 4, max_num_batched_tokens=6, max_model_len=64)
    a, b = seq(3), seq(20, start=30)
    sched.add(a)
    sampled(sched.schedule())
    decode = sched.schedule()
    assert decode.is_decode  # in flight; a's pending token is not appended yet
    sched.add(b)
    assert sched.can_admit() and not sched.schedule_ahead([a]).chunks
    sampled(decode)
    mixed = sched.schedule()
    assert rows(mixed) == [(a, 4, 5, True), (b, 0, 5, False)]
    sampled(mixed)
    assert not sched.can_admit() and not sched.schedule_ahead([a]).chunks  # b has 15 tokens to go


def test_a_suspect_is_prefilled_alone_chunk_by_chunk():
    sched = Scheduler(BlockManager(64, 4), 4, max_num_batched_tokens=6, max_model_len=64)
    a, b = seq(3), seq(10, start=30)
    sched.add(a)
    sampled(sched.schedule())
    b.suspect = 1
    sched.add(b)
    assert rows(sched.schedule()) == [(b, 0, 6, False)]  # a waits: nothing shares a step with a suspect's prompt
    assert rows(sched.schedule()) == [(b, 6, 10, True)]
    b.append(1)
    assert rows(sched.schedule()) == [(a, 3, 4, True), (b, 10, 11, True)]  # decoding, it is batched again


def test_abort_frees_blocks_from_waiting_and_running():
    bm = BlockManager(8, 4)
    sched = Scheduler(bm, 4, 100, 32)
    a, b = seq(4), seq(4, start=9)
    sched.add(a)
    sched.schedule()
    sched.add(b)
    sched.abort(a)
    sched.abort(b)
    assert bm.num_free == 8 and not sched.has_work()
    assert a.finish_reason is FinishReason.ABORT and b.finish_reason is FinishReason.ABORT

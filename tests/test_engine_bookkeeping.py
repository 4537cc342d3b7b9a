"""Scheduler and block manager: pure Python, no model. Prefix caching, image-aware keys, preemption, limits."""
from engine.paging.block_manager import BlockManager
from engine.sampling_params import SamplingParams
from engine.paging.scheduler import Scheduler
from engine.paging.sequence import ErrorCode, FinishReason, ImageSpan, Sequence, Status

P = SamplingParams(max_new_tokens=8)


def seq(n, start=0, images=()):
    return Sequence(list(range(start, start + n)), P, images)


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
    bm.allocate(a)
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
    bm.allocate(a)
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
        bm.allocate(s)
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


def test_scheduler_prefills_then_decodes_and_respects_batch_limits():
    sched = Scheduler(BlockManager(64, 4), max_num_seqs=2, max_num_batched_tokens=100, max_model_len=64)
    seqs = [seq(5, start=i * 10) for i in range(3)]
    for s in seqs:
        assert sched.add(s)
    batch, prefill = sched.schedule()
    assert prefill and batch == seqs[:2]
    for s in batch:
        s.append(1)
    batch, prefill = sched.schedule()
    assert not prefill and batch == seqs[:2]
    sched.finish(seqs[0], FinishReason.STOP)
    batch, prefill = sched.schedule()
    assert prefill and batch == [seqs[2]]


def test_prompt_longer_than_context_finishes_at_once():
    sched = Scheduler(BlockManager(64, 4), 4, 100, max_model_len=16)
    s = seq(16)
    assert not sched.add(s)
    assert s.finish_reason is FinishReason.ERROR and s.error.code is ErrorCode.CONTEXT_EXCEEDED


def test_preemption_when_blocks_run_out_and_recovery():
    bm = BlockManager(4, 4)
    sched = Scheduler(bm, 4, 100, max_model_len=16)
    a, b = seq(8), seq(8, start=50)
    sched.add(a), sched.add(b)
    batch, _ = sched.schedule()
    assert batch == [a, b] and bm.num_free == 0
    for s in batch:
        s.append(1)
    batch, prefill = sched.schedule()  # both need a 3rd block: b is preempted for a
    assert not prefill and batch == [a]
    assert b.status is Status.WAITING and b.block_table == [] and sched.waiting[0] is b
    sched.finish(a, FinishReason.STOP)
    batch, prefill = sched.schedule()
    assert prefill and batch == [b] and len(b) == 9  # recomputed with its generated token


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

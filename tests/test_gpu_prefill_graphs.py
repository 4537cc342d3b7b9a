"""Prefill under CUDA graphs against eager prefill, on the GPU, same weights, fp32 (TF32 off).

The graphs pad a batch's tokens to a 16-token bucket and its sequences to the graph's count; the logits of every
real row must not notice. Covered: one and two sequences, an image's features spliced in, a prefix-cache hit (keys
before the new tokens), and the batches that fall back to eager prefill (too many sequences, too many tokens).
Tolerance 1e-4 of the logits' range: cuBLAS may pick another kernel for the padded row count, so only summation
order differs.
"""
import pytest
import torch

from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.paging.sequence import ImageSpan
from tests.test_engine_parity import RecordingSampler
from tests.tiny_checkpoints import make_tiny_lm

pytestmark = pytest.mark.gpu

GRAPH_TOKENS, GRAPH_SEQS = 64, 2


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm-prefill-graphs"))


def make_engine(tiny_lm, graphs: bool) -> tuple[LLMEngine, RecordingSampler, list[int]]:
    cfg, weights, tok = tiny_lm
    engine = LLMEngine(cfg, weights, tok, EngineConfig(
        device="cuda", dtype="float32", max_num_seqs=8, max_model_len=256,
        cuda_graph_prefill_tokens=GRAPH_TOKENS if graphs else 0, cuda_graph_prefill_seqs=GRAPH_SEQS))
    recorder = RecordingSampler(engine.runner.sampler, all_rows=True)
    engine.runner.sampler = recorder
    replays = [0]
    if graphs:
        run = engine.runner.prefill_graphs.run

        def counted(seqs, rows):
            replays[0] += 1
            return run(seqs, rows)

        engine.runner.prefill_graphs.run = counted
    else:
        assert engine.runner.prefill_graphs is None
    return engine, recorder, replays


def image(hidden: int, length: int, seed: int) -> torch.Tensor:
    return torch.randn(length, hidden, generator=torch.Generator().manual_seed(seed)).cuda()


def scenario(engine: LLMEngine) -> list[list[int]]:
    """Four prefill steps (two graphed, two eager when graphs are on), each followed by a few decode steps."""
    hidden = engine.model.config.hidden_size
    g = torch.Generator().manual_seed(1)
    words = lambda n: torch.randint(3, 200, (n,), generator=g).tolist()  # noqa: E731
    params = SamplingParams(max_new_tokens=4, ignore_eos=True)
    first = [1] + [0] * 12 + words(9)  # 12 image rows at offset 1
    span = ImageSpan(1, 12, "img-a", image(hidden, 12, 0))
    batches = [
        [(first, (span,)), ([1] + words(30), ())],  # 2 sequences, 53 tokens: graphed, bucket 64
        [(first + words(6), (span,))],  # a prefix-cache hit: 16 cached keys, 12 new tokens: graphed
        [([1] + words(n), ()) for n in (5, 9, 14)],  # 3 sequences: eager
        [([1] + words(90), ())],  # 91 tokens: eager
    ]
    outputs = []
    for batch in batches:
        seqs = [engine.add_request(ids, params, spans) for ids, spans in batch]
        while engine.has_work():
            engine.step()
        outputs += [s.output_ids for s in seqs]
    return outputs


def test_graphed_prefill_matches_eager(tiny_lm):
    graphed, rec_g, replays = make_engine(tiny_lm, graphs=True)
    eager, rec_e, _ = make_engine(tiny_lm, graphs=False)
    assert graphed.runner.prefill_graphs.buckets == [16, 32, 48, 64]
    out_g, out_e = scenario(graphed), scenario(eager)
    assert replays[0] == 2  # the first two prefills ran from graphs, the last two eagerly
    assert out_g == out_e
    assert len(rec_g.seen) == len(rec_e.seen)
    for got, want in zip(rec_g.seen, rec_e.seen):
        assert got.shape == want.shape
        span = (want.max() - want.min()).item()
        assert (got - want).abs().max().item() <= 1e-4 * span


def test_prefill_graphs_leave_no_kv_behind(tiny_lm):
    """Padding rows write no KV: a graphed prefill changes exactly the slots of its real tokens."""
    engine, _, replays = make_engine(tiny_lm, graphs=True)
    for k, _ in engine.runner.kv:
        k.normal_()  # the cache starts as torch.empty: NaN there would never compare equal
    before = [k.clone() for k, _ in engine.runner.kv]
    seq = engine.add_request([1, 5, 6, 7, 8], SamplingParams(max_new_tokens=4))
    engine.step()  # the prefill alone: its token is resolved, no decode step launched yet
    assert replays[0] == 1
    written = torch.tensor([engine.blocks.slot(seq, p) for p in range(5)])
    for (k, _), old in zip(engine.runner.kv, before):
        changed = (k != old).flatten(2).any(-1).flatten().nonzero().flatten().cpu()  # flat slots that changed
        assert set(changed.tolist()) <= set(written.tolist())
        assert len(changed) > 0

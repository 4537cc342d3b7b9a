"""Scoring requests (LMDeploy's get_ppl): the mean next-token cross-entropy of each sequence, prefilled in chunks
through the engine's scheduler, against transformers' `model(ids, labels=ids).loss` in fp32.

Covered on a tiny random Llama: sequences of several lengths in one call under a 16-token step budget (chunk
boundaries everywhere, a last chunk of one row), also through the Triton kernels; a generating chat running alongside
(a token in every step, the same tokens as alone); the prefix cache neither read nor keyed by scoring; a scoring
request preempted halfway and scored again from the start; the Pipeline's `get_ppl` and its refusals; an 8,192-token
prompt prefilled in 128-token chunks with no tensor anywhere near the (8k x 8k) of full-length attention. Slow: the
embedded default's real weights over CPython's LICENSE.txt.
"""
import threading

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode

from engine import GenerationConfig, pipeline
from engine.config import EngineConfig
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from tests.tiny_checkpoints import CHATML_TEMPLATE, make_tiny_lm
from tests.triton_setup import DEVICE, needs_triton

pytestmark = pytest.mark.usefixtures("one_thread")

LONG = 8192  # the long-prompt test's length; the tiny model's context is a little longer
TOL = 1e-4  # fp32 on both sides: the same math up to summation order (measured ~5e-7)


@pytest.fixture(scope="module")
def lm(tmp_path_factory):
    """(folder, (TextConfig, weights, tokenizer), transformers model) of a tiny Llama with an 8.4k context."""
    from transformers import LlamaForCausalLM

    folder = tmp_path_factory.mktemp("ppl-lm")
    parts = make_tiny_lm(folder, max_positions=LONG + 256)
    parts[2].chat_template = CHATML_TEMPLATE  # for the pipeline's chat
    parts[2].save_pretrained(folder)
    return folder, parts, LlamaForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()


def make_engine(lm, budget: int = 16, **kw) -> LLMEngine:
    cfg, weights, tok = lm[1]
    kw.setdefault("num_kv_blocks", 64)
    return LLMEngine(cfg, weights, tok, EngineConfig(max_num_batched_tokens=budget, max_num_seqs=4, **kw))


def tokens(n: int, seed: int, vocab: int = 300) -> list[int]:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, vocab, (n,), generator=g).tolist()


def hf_loss(lm, ids: list[int]) -> float:
    with torch.inference_mode():
        return lm[2](torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()


SEQS = [tokens(2, 0), tokens(33, 1), tokens(16, 2), tokens(100, 3)]  # 33: a last chunk of one row


def test_scores_equal_transformers_loss(lm, record_steps):
    engine = make_engine(lm)
    steps = record_steps(engine)
    ours = engine.score(SEQS)
    assert ours == pytest.approx([hf_loss(lm, s) for s in SEQS], abs=TOL)
    assert max(sum(end - start for _, start, end in step) for step in steps) == 16  # chunked, several per step
    assert engine.blocks.num_free == engine.blocks.num_blocks and not engine.scheduler.has_work()


def test_scoring_runs_beside_a_chat_and_leaves_its_tokens_unchanged(lm, record_steps):
    prompt, params = tokens(20, 9), SamplingParams(max_new_tokens=24, ignore_eos=True)
    alone = make_engine(lm).generate([prompt], params)[0].token_ids
    engine = make_engine(lm)
    steps = record_steps(engine)
    chat = engine.add_request(prompt, params)
    engine.step()
    engine.step()  # the chat's prompt is prefilled (20 tokens, 16 a step) and it decodes from here on
    scored = engine.score(SEQS)
    while engine.has_work():
        engine.step()
    assert chat.output_ids == alone
    assert scored == pytest.approx([hf_loss(lm, s) for s in SEQS], abs=TOL)
    with_scoring = [step for step in steps[2:] if any(seq.score is not None for seq, _, _ in step)]
    assert len(with_scoring) >= 10  # 151 tokens at 15 a step
    assert all(any(seq is chat for seq, _, _ in step) for step in with_scoring)  # the chat never waits


def test_scoring_neither_reads_nor_keys_the_prefix_cache(lm):
    engine = make_engine(lm)
    shared = tokens(64, 4)
    engine.generate([shared], SamplingParams(max_new_tokens=2))  # keys the four blocks of `shared`
    keys = dict(engine.blocks.key_to_block)
    assert len(keys) == 4
    assert engine.score([shared])[0] == pytest.approx(hf_loss(lm, shared), abs=TOL)  # every position computed
    other = tokens(48, 5)
    engine.score([other])
    assert engine.blocks.key_to_block == keys  # nothing new keyed, nothing lost
    seq = engine.add_request(other + [7], SamplingParams(max_new_tokens=1))
    engine.step()
    assert seq.num_cached_tokens == 0


def test_a_preempted_scoring_request_is_scored_again_from_its_start(lm, record_steps):
    # 8 blocks of 16: the chat holds 3 (47 tokens), the scoring request the other 5 (80 tokens); the chat's next
    # block (position 48) preempts the scoring request, which runs again once the chat is done.
    engine = make_engine(lm, num_kv_blocks=8, enable_prefix_caching=False)
    steps = record_steps(engine)
    chat = engine.add_request(tokens(47, 6), SamplingParams(max_new_tokens=20, ignore_eos=True))
    long = tokens(80, 7)
    assert engine.score([long])[0] == pytest.approx(hf_loss(lm, long), abs=TOL)
    starts = [start for step in steps for seq, start, _ in step if seq.score is not None and start == 0]
    assert len(starts) == 2 and chat.num_output_tokens == 20


@needs_triton
def test_scores_through_the_triton_kernels(lm):
    """The GPU path's kernels (TRITON_INTERPRET on a CPU): chunks with cached context, scored, on the device."""
    engine = make_engine(lm, budget=8, use_triton=True, device=DEVICE)
    seqs = [tokens(11, 10), tokens(6, 11)]
    assert engine.score(seqs) == pytest.approx([hf_loss(lm, s) for s in seqs], abs=TOL)


class LargestTensor(TorchDispatchMode):
    """The most elements of any tensor an op returns while active."""

    def __init__(self):
        super().__init__()
        self.numel = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.numel = max(self.numel, t.numel())
        return out


def test_an_8k_prompt_prefills_in_chunks_with_bounded_temporaries(lm):
    engine = make_engine(lm, budget=128, num_kv_blocks=LONG // 16 + 8)
    ids = tokens(LONG, 8, vocab=lm[1][0].vocab_size)
    with LargestTensor() as largest:
        ours = engine.score([ids])[0]
    assert ours == pytest.approx(hf_loss(lm, ids), abs=TOL)
    # Per 128-row chunk: scores (heads, 128, keys) at most, 4M elements at 8k; full-length attention would make
    # (heads, 8192, 8192), 268M. The KV cache itself was allocated before.
    heads = lm[1][0].num_attention_heads
    assert largest.numel <= heads * 128 * LONG, largest.numel  # 1/64 of full-length attention's


@pytest.fixture(scope="module")
def tiny_pipe(lm):
    with pipeline(str(lm[0]), device="cpu", dtype="float32", max_num_batched_tokens=16, max_num_seqs=4,
                  max_model_len=512) as p:
        yield p


def test_pipeline_get_ppl_beside_a_streaming_chat(lm, tiny_pipe):
    config = GenerationConfig(max_new_tokens=40, ignore_eos=True)
    alone = tiny_pipe("Hello there", config).text
    pieces = []
    chat = threading.Thread(target=lambda: pieces.extend(r.text for r in tiny_pipe.stream_infer("Hello there",
                                                                                              config)))
    chat.start()
    scores = tiny_pipe.get_ppl(SEQS)
    chat.join()
    assert "".join(pieces) == alone
    assert scores == pytest.approx([hf_loss(lm, s) for s in SEQS], abs=TOL)
    assert tiny_pipe.get_ppl(SEQS[1]) == pytest.approx(scores[1:2], abs=1e-6)  # one sequence: a list of one


def test_pipeline_get_ppl_refuses_what_cannot_be_scored(tiny_pipe):
    assert tiny_pipe.model.context_len == 512
    assert len(tiny_pipe.get_ppl([tokens(512, 1)])) == 1  # the whole context: no reply token needed
    for bad, words in (([tokens(513, 1)], "2 to 512"), ([[5]], "2 to 512"), ([], "at least one"),
                       ([[5, 10**6]], "vocabulary")):
        with pytest.raises(ValueError, match=words):
            tiny_pipe.get_ppl(bad)


@pytest.mark.slow
def test_embedded_default_real_weights_over_a_real_text_equal_transformers():
    from transformers import AutoModelForCausalLM

    from bench.ppl import corpus_path
    from engine.checkpoints.smollm_gguf import default_lm_checkpoint

    with pipeline("default", device="cpu", dtype="float32") as pipe:
        ids = pipe.tokenizer(corpus_path().read_text()).input_ids[:3000]
        ours = pipe.get_ppl([ids])[0]
    hf = AutoModelForCausalLM.from_pretrained(default_lm_checkpoint(), dtype=torch.float32).eval()
    with torch.inference_mode():
        theirs = hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss.item()
    assert ours == pytest.approx(theirs, abs=TOL)
    assert 1.0 < ours < 4.0  # a real model on English prose: perplexity ~3-50

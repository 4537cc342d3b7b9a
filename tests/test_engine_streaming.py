"""Incremental detokenization (Chinese, emoji, stop strings), seeded sampling, and the serving loop."""
import pytest

from engine.config import EngineConfig
from engine.detokenizer import IncrementalDetokenizer
from engine.llm_engine import LLMEngine
from engine.sampling_params import SamplingParams
from engine.serving import EngineServer
from engine.paging.sequence import ErrorCode, FinishReason
from tests.tiny_checkpoints import build_tokenizer, make_tiny_lm

TEXTS = ["你好，世界。这是一只猫。", "Emoji: 🐱🐶🎉 and café", "The cat 🐱 sits on the mat 你好"]


@pytest.fixture(scope="module")
def tokenizer():
    return build_tokenizer(chatml=False)


@pytest.mark.parametrize("text", TEXTS)
def test_stream_never_emits_a_broken_character(tokenizer, text):
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [tokenizer.bos_token_id])
    deltas = [detok.push(i) for i in ids] + [detok.flush()]
    assert "".join(deltas) == text
    assert all("\ufffd" not in d for d in deltas)
    # byte-level BPE splits multi-byte characters: some steps must have held text back
    assert any(d == "" for d in deltas[:-1])


def test_stop_string_truncates_and_holds_back_partial_matches(tokenizer):
    text = "The cat sits. END of story"
    ids = tokenizer(text, add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=("END",))
    out = []
    for i in ids:
        out.append(detok.push(i))
        if detok.stopped:
            break
    assert "".join(out) == "The cat sits. "
    assert detok.stopped


def test_partial_stop_prefix_is_released_when_it_is_not_a_stop(tokenizer):
    ids = tokenizer("EN and more", add_special_tokens=False).input_ids
    detok = IncrementalDetokenizer(tokenizer, [], stop=("END",))
    out = "".join(detok.push(i) for i in ids) + detok.flush()
    assert out == "EN and more" and not detok.stopped


@pytest.fixture(scope="module")
def tiny_lm(tmp_path_factory):
    return make_tiny_lm(tmp_path_factory.mktemp("tiny-lm"))


def make_engine(tiny_lm, **kw):
    cfg, weights, tok = tiny_lm
    return LLMEngine(cfg, weights, tok, EngineConfig(**kw))


def test_seeded_sampling_is_reproducible_and_batch_independent(tiny_lm):
    engine = make_engine(tiny_lm)
    params = SamplingParams(max_new_tokens=24, temperature=1.0, top_p=0.9, top_k=20, seed=1234, ignore_eos=True)
    alone = engine.generate([[1, 5, 9]], params)[0].token_ids
    again = engine.generate([[1, 5, 9]], params)[0].token_ids
    other = SamplingParams(max_new_tokens=24, temperature=1.0, seed=99, ignore_eos=True)
    batched = engine.generate([[1, 7], [1, 5, 9]], [other, params])[1].token_ids
    different = engine.generate([[1, 5, 9]], SamplingParams(max_new_tokens=24, temperature=1.0, seed=4321,
                                                           ignore_eos=True))[0].token_ids
    assert alone == again == batched
    assert alone != different


def test_finish_reasons_length_and_context(tiny_lm):
    engine = make_engine(tiny_lm, max_model_len=32)
    out = engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=5, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.LENGTH and len(out.token_ids) == 5
    out = engine.generate([[1] * 30], SamplingParams(max_new_tokens=50, ignore_eos=True))[0]
    assert out.finish_reason is FinishReason.CONTEXT and len(out.token_ids) == 2
    refused = engine.add_request([1] * 40, SamplingParams(max_new_tokens=5))  # never fits: refused at once
    assert refused.finish_reason is FinishReason.ERROR and refused.error.code is ErrorCode.CONTEXT_EXCEEDED


def test_batch_of_requests_equals_each_alone(tiny_lm):
    engine = make_engine(tiny_lm)
    prompts = [[1, 4, 8, 15], [1, 16, 23, 42, 7, 7, 9], [1, 2]]
    greedy = SamplingParams(max_new_tokens=16, ignore_eos=True)
    together = [c.token_ids for c in engine.generate(prompts, greedy)]
    alone = [engine.generate([p], greedy)[0].token_ids for p in prompts]
    assert together == alone


def test_server_streams_and_abort_frees_the_request(tiny_lm):
    engine = make_engine(tiny_lm)
    server = EngineServer(engine)
    stream = server.submit([1, 5, 9], SamplingParams(max_new_tokens=1000, ignore_eos=True))
    deltas = []
    for delta in stream:
        deltas.append(delta)
        if len(deltas) == 3:
            break  # leaving the loop closes the stream and aborts the request
    free_before = engine.blocks.num_blocks
    done = server.submit([1, 2], SamplingParams(max_new_tokens=4, ignore_eos=True))
    final = list(done)
    assert final[-1].finish_reason is FinishReason.LENGTH
    assert not engine.scheduler.running and engine.blocks.num_free == free_before
    assert done.stats.generated_tokens == 4 and done.stats.ttft_s > 0


def test_prefix_cache_hit_gives_the_same_reply(tiny_lm):
    """A resent prompt reuses its KV blocks; with one token left to compute it runs as a decode step."""
    prompt = [1] + [(5 * i) % 300 + 3 for i in range(47)]  # 3 full blocks of 16: all cached on the resend
    greedy = SamplingParams(max_new_tokens=12, ignore_eos=True)
    cold = make_engine(tiny_lm, enable_prefix_caching=False).generate([prompt], greedy)[0].token_ids
    engine = make_engine(tiny_lm)
    first = engine.generate([prompt], greedy)[0].token_ids
    seq = engine.add_request(prompt, greedy)
    engine.step()  # admission: blocks allocated, the prefix found
    assert seq.num_cached_tokens == len(prompt) - 1
    while engine.has_work():
        engine.step()
    assert first == seq.output_ids == cold


def test_engine_without_tokenizer_gives_tokens_and_refuses_overlong_prompts(tiny_lm):
    cfg, weights, _ = tiny_lm
    engine = LLMEngine(cfg, weights, None, EngineConfig(max_model_len=32))
    out = engine.generate([[1, 2, 3], [1] * 40], SamplingParams(max_new_tokens=5, ignore_eos=True))
    assert len(out[0].token_ids) == 5 and out[0].text == ""
    assert out[1].finish_reason is FinishReason.ERROR and out[1].token_ids == []

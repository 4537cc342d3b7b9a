"""Many chats at once, as Gradio's handler threads make them: nothing one chat does reaches another.

8 threads chat at the same moment about 8 different images, 3 rounds, each on a fresh model: every chat's image
features (encoded by the engine loop's vision stage, CUDA-graphed on a GPU) and greedy tokens equal its run alone,
up to that run's first near-tie (a batch of other chats changes the rounding; at a near-tie either token is right).
A request with a bad parameter is refused by itself; a request that makes engine steps fail ends with a typed error
while the requests batched with it finish exactly as they would have alone.
"""
import threading

import pytest
import torch

from engine.chat import ChatImage, ChatModel, ChatTurn, Finished, GenerationSettings, TextDelta
from engine.families import load_model
from engine.paging.sequence import ErrorCode
from engine.sampling_params import InvalidParameter, SamplingParams
from tests.test_engine_parity import RecordingSampler
from tests.tiny_checkpoints import make_tiny_llava, random_png

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])
CHATS, ROUNDS, NEW_TOKENS = 8, 3, 24
GREEDY = GenerationSettings(max_new_tokens=NEW_TOKENS, temperature=0.0, ignore_eos=True)


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp("concurrency"), "llama-clip")


def fresh(checkpoint, device):
    return ChatModel(load_model(str(checkpoint), device, "float32"))


def ask(model: ChatModel, i: int):
    """One chat turn about image i, through the chat layer's plan and the engine loop's stream: (token ids, text,
    the features spliced for its image, finish reason)."""
    turn = ChatTurn("user", f"What is in picture {i}?", (ChatImage(random_png(seed=100 + i), f"p{i}.png"),))
    plan = model.plan("", [turn], NEW_TOKENS)
    assert plan.error is None, plan.error
    ids, spans = plan.prepared
    request = model.server.submit(ids, GREEDY.sampling_params(NEW_TOKENS), spans)
    text = "".join(delta.text for delta in request)
    return request.seq.output_ids, text, spans[0].embeds.float().cpu(), request.finish_reason.value


def clear_prefix(logits: torch.Tensor, tol: float = 1e-4) -> int:
    """How many leading greedy tokens are decided by more than the numerics' noise: the steps before the first one
    whose top two logits are closer than `tol` of the logits' range (other chats in a batch, or a recomputed
    prompt, change the rounding; at such a near-tie either token is right)."""
    top2 = logits.topk(2, dim=-1).values
    span = logits.max(-1).values - logits.min(-1).values
    ties = ((top2[:, 0] - top2[:, 1]) <= 2 * tol * span).nonzero()
    return int(ties[0]) if len(ties) else logits.shape[0]


def recorded(model: ChatModel, fn):
    """fn() on a model whose sampler keeps each step's logits (one request at a time: one row a step)."""
    engine = model.loaded.engine
    recorder = RecordingSampler(engine.runner.sampler)
    engine.runner.sampler = recorder
    try:
        return fn(), torch.stack(recorder.seen).float().cpu()
    finally:
        engine.runner.sampler = recorder.inner


def drained(stream):
    for _ in stream:
        pass
    return stream


def serial_runs(checkpoint, device):
    """Each chat alone, with the logits of each of its steps."""
    model = fresh(checkpoint, device)
    try:
        return [recorded(model, lambda: ask(model, i)) for i in range(CHATS)]
    finally:
        model.close()


def run_threads(fn, n):
    results, errors = [None] * n, []
    barrier = threading.Barrier(n)

    def worker(i):
        try:
            barrier.wait()
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 -- reported below
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(120)
    assert not errors, errors
    return results


@pytest.mark.slow
@pytest.mark.parametrize("device", DEVICES)
def test_eight_chats_at_once_each_see_only_their_own_image(checkpoint, device):
    serial = serial_runs(checkpoint, device)
    assert len({run[1] for run, _ in serial}) > 1  # the images lead to different answers: a swap would show
    compared = 0
    for _ in range(ROUNDS):
        model = fresh(checkpoint, device)
        together = run_threads(lambda i: ask(model, i), CHATS)
        model.close()
        for (tokens, text, feats, reason), ((alone, text_alone, feats_alone, reason_alone), logits) in \
                zip(together, serial):
            assert reason == reason_alone == "length"
            torch.testing.assert_close(feats, feats_alone, rtol=0, atol=1e-5)  # its own image's features
            clear = clear_prefix(logits)
            assert tokens[:clear] == alone[:clear]  # the same greedy tokens, up to a near-tie of its run alone
            assert clear < len(alone) or text == text_alone
            compared += clear
    assert compared >= ROUNDS * CHATS * NEW_TOKENS // 2  # never vacuous: most tokens are clear of any near-tie


def test_a_bad_parameter_is_refused_alone(checkpoint):
    with pytest.raises(InvalidParameter) as bad:
        GenerationSettings(seed=10**20)
    assert bad.value.param == "seed"
    for kw in (dict(top_k=-1), dict(temperature=float("nan")), dict(repetition_penalty=0), dict(top_p=2)):
        with pytest.raises(InvalidParameter):
            SamplingParams(**kw)
    model = fresh(checkpoint, "cpu")
    try:
        alone = ask(model, 0)

        def chat(i):
            if i == 2:
                with pytest.raises(InvalidParameter):
                    GenerationSettings(seed=-5)
                return None
            return ask(model, 0)

        results = run_threads(chat, 4)
        assert all(r[0] == alone[0] for i, r in enumerate(results) if i != 2)
    finally:
        model.close()


def test_a_request_that_breaks_steps_fails_alone(checkpoint):
    """The sampler raises whenever one poisoned request is in the batch: the engine retries the step's requests
    one at a time, the poisoned one ends with ERROR (code ENGINE), the others finish as they would alone."""
    loaded = load_model(str(checkpoint), "cpu", "float32")
    engine, model = loaded.engine, ChatModel(loaded)
    image = (ChatImage(random_png(seed=7), "x.png"),)
    params = GREEDY.sampling_params(NEW_TOKENS)

    def prepared(i):
        return model.plan("", [ChatTurn("user", f"Question {i}", image)], NEW_TOKENS).prepared

    def submit(i):
        ids, spans = prepared(i)
        return model.server.submit(ids, params, spans)

    try:
        alone = []
        for i in range(3):
            stream, logits = recorded(model, lambda: drained(submit(i)))
            alone.append((stream.seq.output_ids, clear_prefix(logits)))
        poison = prepared(1)[0]  # the poisoned request's prompt
        real = engine.runner.sampler

        class Poisoned:
            def __call__(self, logits, seqs, pending=None):
                if any(s.token_ids[:len(poison)] == poison for s in seqs):
                    raise RuntimeError("poisoned request")
                return real(logits, seqs, pending)

            def release(self, seq):
                real.release(seq)

        engine.runner.sampler = Poisoned()
        streams = [submit(i) for i in range(3)]
        for stream in streams:
            list(stream)
        assert streams[1].finish_reason.value == "error" and streams[1].error.code is ErrorCode.ENGINE
        for i in (0, 2):  # recomputed after the failed step: the same greedy tokens up to a near-tie
            tokens, (want, clear) = streams[i].seq.output_ids, alone[i]
            assert streams[i].finish_reason.value == "length" and tokens[:clear] == want[:clear]
        engine.runner.sampler = real
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        model.close()

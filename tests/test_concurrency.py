"""Many chats at once, as Gradio's handler threads make them: nothing one chat does reaches another.

8 threads chat at the same moment about 8 different images, 3 rounds, each on a fresh model: every chat's image
features (encoded by the engine loop's vision stage, CUDA-graphed on a GPU) and greedy text equal its run alone.
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
    """One chat turn about image i: (text, the features spliced for its image, finish reason)."""
    turn = ChatTurn("user", f"What is in picture {i}?", (ChatImage(random_png(seed=100 + i), f"p{i}.png"),))
    plan = model.plan("", [turn], NEW_TOKENS)
    assert plan.error is None, plan.error
    text, finished = [], None
    for event in model.stream(plan, GREEDY):
        if isinstance(event, TextDelta):
            text.append(event.text)
        elif isinstance(event, Finished):
            finished = event
    span = plan.prepared[1][0]
    return "".join(text), span.embeds.float().cpu(), finished.stats.finish_reason


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
    serial_model = fresh(checkpoint, device)
    serial = [ask(serial_model, i) for i in range(CHATS)]
    serial_model.close()
    assert len({t for t, _, _ in serial}) > 1  # the images lead to different answers: a swap would show
    for _ in range(ROUNDS):
        model = fresh(checkpoint, device)
        together = run_threads(lambda i: ask(model, i), CHATS)
        model.close()
        for (text, feats, reason), (text_alone, feats_alone, reason_alone) in zip(together, serial):
            assert reason == reason_alone == "length"
            torch.testing.assert_close(feats, feats_alone, rtol=0, atol=1e-5)
            assert text == text_alone


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
            stream = submit(i)
            list(stream)
            alone.append(stream.seq.output_ids)
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
        for i in (0, 2):
            assert streams[i].finish_reason.value == "length" and streams[i].seq.output_ids == alone[i]
        engine.runner.sampler = real
        assert engine.blocks.num_free == engine.blocks.num_blocks
    finally:
        model.close()

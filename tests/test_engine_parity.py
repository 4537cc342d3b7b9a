"""Our model code against transformers' LlavaForConditionalGeneration on tiny random checkpoints, in fp32.

The proof that the engine is right: the same prompt ids as LlavaProcessor, prefill logits within 1e-4, the same
48 greedy tokens, and prefill + cached decode equal to one full forward.
"""
import dataclasses

import pytest
import torch
from PIL import Image

from engine.paging.sequence import ErrorCode
from engine.sampling_params import SamplingParams
from tests.tiny_checkpoints import make_tiny_llava, random_png
from tests.triton_setup import DEVICE, needs_triton
from engine.chat import ChatImage, ChatModel, ChatTurn
from engine.families import load_model

FAMILIES = ["llama-clip", "qwen2-siglip"]
QUESTION = "What animal is in this picture?"


@pytest.fixture(scope="module", params=FAMILIES)
def checkpoint(request, tmp_path_factory):
    return make_tiny_llava(tmp_path_factory.mktemp(request.param), request.param)


@pytest.fixture(scope="module")
def image_bytes():
    return random_png()


def hf_inputs(path, image_bytes):
    import io

    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path)
    conversation = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": QUESTION}]}]
    text = processor.apply_chat_template(conversation, add_generation_prompt=True)
    image = Image.open(io.BytesIO(image_bytes)).convert("RGB")
    return processor(images=[image], text=text, return_tensors="pt")


def hf_model(path):
    from transformers import LlavaForConditionalGeneration

    model = LlavaForConditionalGeneration.from_pretrained(path, dtype=torch.float32).eval()
    model.generation_config.eos_token_id = None  # compare full 48-token runs
    return model


def our_plan(model: ChatModel, image_bytes):
    return model.plan("", [ChatTurn("user", QUESTION, (ChatImage(image_bytes, "x.png"),))], 48)


def run_prefill_logits(engine, ids, spans):
    """All-position logits of one prefill through the engine's own runner."""
    seq = engine.add_request(ids, SamplingParams(max_new_tokens=1), spans)
    assert engine.vision.run([seq]) == [] and seq.images_ready  # the engine's vision stage, run here by hand
    budget, engine.scheduler.max_num_batched_tokens = engine.scheduler.max_num_batched_tokens, len(ids)
    try:  # one step for the whole prompt, whatever the engine's step budget
        batch = engine.scheduler.schedule()
    finally:
        engine.scheduler.max_num_batched_tokens = budget
    assert [(c.seq, c.start, c.end) for c in batch.chunks] == [(seq, 0, len(ids))]  # the whole prompt, one step
    with torch.inference_mode():
        embeds, positions, md = engine.runner.prepare_prefill(batch.chunks)
        logits = engine.model.logits(engine.model(embeds, positions, engine.runner.cos_sin, md))
    engine.abort(seq)
    return logits


def test_prompt_ids_match_processor(checkpoint, image_bytes):
    model = ChatModel(load_model(str(checkpoint), "cpu", "float32"))
    plan = our_plan(model, image_bytes)
    assert plan.error is None, plan.error
    ids, spans = plan.prepared
    assert ids == hf_inputs(checkpoint, image_bytes)["input_ids"][0].tolist()
    assert len(spans) == 1 and spans[0].length == plan.image_tokens > 0


def test_prefill_logits_match(checkpoint, image_bytes):
    bundle = load_model(str(checkpoint), "cpu", "float32", enable_prefix_caching=False)
    ids, spans = our_plan(ChatModel(bundle), image_bytes).prepared
    ours = run_prefill_logits(bundle.engine, ids, spans)
    with torch.no_grad():
        theirs = hf_model(checkpoint)(**hf_inputs(checkpoint, image_bytes)).logits[0].float()
    assert ours.shape == theirs.shape
    assert (ours - theirs).abs().max().item() < 1e-4


def test_greedy_48_tokens_match(checkpoint, image_bytes):
    bundle = load_model(str(checkpoint), "cpu", "float32")
    ids, spans = our_plan(ChatModel(bundle), image_bytes).prepared
    ours = bundle.engine.generate([ids], SamplingParams(max_new_tokens=48, ignore_eos=True), [spans])[0]
    inputs = hf_inputs(checkpoint, image_bytes)
    with torch.no_grad():
        out = hf_model(checkpoint).generate(**inputs, max_new_tokens=48, do_sample=False)
    theirs = out[0, inputs["input_ids"].shape[1]:].tolist()
    assert len(ours.token_ids) == 48
    assert ours.token_ids == theirs
    tokenizer = bundle.engine.tokenizer
    assert ours.text == tokenizer.decode(theirs, skip_special_tokens=True)


class OpenAIPenalties:
    """OpenAI's presence and frequency penalties as a transformers logits processor, over the reply's tokens (those
    past the prompt): logit -= frequency * count + presence * (count > 0)."""

    def __init__(self, prompt_len: int, presence: float, frequency: float):
        self.prompt_len, self.presence, self.frequency = prompt_len, presence, frequency

    def __call__(self, input_ids, scores):
        for row, ids in enumerate(input_ids[:, self.prompt_len:].tolist()):
            for token in set(ids):
                scores[row, token] -= self.frequency * ids.count(token) + self.presence
        return scores


@pytest.mark.parametrize("overlap", [False, True])
def test_greedy_with_logit_bias_and_penalties_matches_hf(checkpoint, image_bytes, overlap):
    """Logit bias, repetition penalty, then presence / frequency penalties (vLLM's order), as transformers'
    SequenceBias and RepetitionPenalty processors and the formula above: the same 48 greedy tokens. With
    `overlap`, each step's penalties count the token the step in flight has sampled (still on the device)."""
    from transformers import LogitsProcessorList
    from transformers.generation.logits_process import RepetitionPenaltyLogitsProcessor, SequenceBiasLogitsProcessor

    bundle = load_model(str(checkpoint), "cpu", "float32", overlap_decode=overlap)
    ids, spans = our_plan(ChatModel(bundle), image_bytes).prepared
    inputs = hf_inputs(checkpoint, image_bytes)
    model = hf_model(checkpoint)
    with torch.no_grad():
        plain = model.generate(**inputs, max_new_tokens=8, do_sample=False)[0, inputs["input_ids"].shape[1]:]
    bias = {7: 1.5, 11: 3.0, int(plain[0]): -100.0}  # two tokens favoured, the first greedy token banned
    params = SamplingParams(max_new_tokens=48, ignore_eos=True, logit_bias=bias, repetition_penalty=1.2,
                            presence_penalty=0.6, frequency_penalty=0.9)
    ours = bundle.engine.generate([ids], params, [spans])[0]
    prompt_len = inputs["input_ids"].shape[1]
    processors = LogitsProcessorList([SequenceBiasLogitsProcessor({(t,): b for t, b in bias.items()}),
                                      RepetitionPenaltyLogitsProcessor(1.2), OpenAIPenalties(prompt_len, 0.6, 0.9)])
    with torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=48, do_sample=False, logits_processor=processors)
    theirs = out[0, prompt_len:].tolist()
    assert ours.token_ids == theirs
    assert theirs[0] != int(plain[0]) and theirs != plain.tolist()[:len(theirs)]


@pytest.mark.parametrize("overlap", [False, True])
def test_logprobs_match_hf_logits(checkpoint, image_bytes, overlap):
    """Each token's log-probability and its 5 likeliest alternatives are the log-softmax of transformers' own
    logits at that step (`output_logits`), within 1e-4, bias and penalties notwithstanding (the model's
    distribution, as vLLM reports by default)."""
    bundle = load_model(str(checkpoint), "cpu", "float32", overlap_decode=overlap)
    ids, spans = our_plan(ChatModel(bundle), image_bytes).prepared
    ours = bundle.engine.generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True, logprobs=5,
                                                        logit_bias={9: 4.0}, presence_penalty=0.5), [spans])[0]
    inputs = hf_inputs(checkpoint, image_bytes)
    with torch.no_grad():
        out = hf_model(checkpoint).generate(**inputs, max_new_tokens=1, do_sample=False, output_logits=True,
                                            return_dict_in_generate=True)
        first = torch.log_softmax(out.logits[0][0].float(), -1)
        forced = torch.tensor([ours.token_ids[:-1]])  # the rest: teacher-forced on our tokens, one forward
        full = hf_model(checkpoint)(**inputs | {"input_ids": torch.cat([inputs["input_ids"], forced], 1),
                                                "attention_mask": None}).logits[0, -len(ours.token_ids):]
    steps = [first] + list(torch.log_softmax(full[1:].float(), -1))
    assert len(ours.logprobs) == len(ours.token_ids) == 12
    for step, (lp, token, theirs) in enumerate(zip(ours.logprobs, ours.token_ids, steps)):
        assert lp.token_id == token and abs(lp.logprob - float(theirs[token])) < 1e-4, step
        values = [v for _, v in lp.top]
        assert len(lp.top) == 5 and values == sorted(values, reverse=True)
        assert all(abs(v - float(theirs[t])) < 1e-4 for t, v in lp.top), step
        assert torch.allclose(torch.tensor(values), theirs.topk(5).values, atol=1e-4), step


def test_logprobs_in_a_mixed_batch(checkpoint):
    """Requests with and without logprobs (and with different numbers of alternatives) batched together: each gets
    its own, the same as run alone."""
    engine = load_model(str(checkpoint), "cpu", "float32", max_num_seqs=4).engine
    prompts = [[1, 5, 9, 20], [3, 4, 5], [7, 8, 9, 10, 11]]
    params = [SamplingParams(max_new_tokens=6, ignore_eos=True, logprobs=k) for k in (2, None, 0)]
    together = engine.generate(prompts, params)
    assert [len(c.logprobs) for c in together] == [6, 0, 6]
    assert [len(lp.top) for lp in together[0].logprobs] == [2] * 6 and all(not lp.top for lp in together[2].logprobs)
    for prompt, p, batched in zip(prompts, params, together):
        alone = engine.generate([prompt], p)[0]
        assert alone.token_ids == batched.token_ids
        assert all(abs(a.logprob - b.logprob) < 1e-5 for a, b in zip(alone.logprobs, batched.logprobs))


def test_a_logit_bias_past_the_vocabulary_is_refused_and_the_engine_goes_on(checkpoint):
    engine = load_model(str(checkpoint), "cpu", "float32").engine
    seq = engine.add_request([1, 2, 3], SamplingParams(logit_bias={5: 1.0, engine.vocab_size: -3.0}))
    assert seq.is_finished and seq.error.code is ErrorCode.INVALID_PARAMETER and seq.error.param == "logit_bias"
    assert str(engine.vocab_size) in seq.error.detail and not engine.has_work()
    assert len(engine.generate([[1, 2, 3]], SamplingParams(max_new_tokens=4, ignore_eos=True))[0].token_ids) == 4


@pytest.mark.parametrize("overlap", [False, True])
def test_chunk_boundary_inside_the_image_span_gives_the_same_tokens(checkpoint, image_bytes, overlap):
    """Chunked prefill with a chunk ending in the middle of the image's placeholders: the next chunk splices the
    rest of its features, and the greedy tokens equal a prefill of the whole prompt in one step."""
    whole = load_model(str(checkpoint), "cpu", "float32", overlap_decode=overlap)
    ids, spans = our_plan(ChatModel(whole), image_bytes).prepared
    span = spans[0]
    budget = span.offset + span.length // 2  # the first chunk stops half-way through the image
    chunked = load_model(str(checkpoint), "cpu", "float32", overlap_decode=overlap, max_num_seqs=2,
                         max_num_batched_tokens=budget)
    assert whole.engine.cfg.max_num_batched_tokens >= len(ids) > budget
    params = SamplingParams(max_new_tokens=8, ignore_eos=True)
    want = whole.engine.generate([ids], params, [spans])[0]
    starts, launch = [], chunked.engine.runner.launch

    def spy(batch, after=None):
        starts.extend(c.start for c in batch.chunks)
        return launch(batch, after)

    chunked.engine.runner.launch = spy
    got = chunked.engine.generate([ids], params, [spans])[0]
    assert got.token_ids == want.token_ids and got.text == want.text
    assert span.offset < budget == starts[1] < span.offset + span.length


class RecordingSampler:
    """Wraps the engine's sampler and keeps the logits of each step: the first row (one-sequence tests), or with
    `all_rows` every row, as float32 on the CPU."""

    def __init__(self, inner, all_rows: bool = False):
        self.inner, self.seen, self.all_rows = inner, [], all_rows

    def __call__(self, logits, seqs, pending=None):
        self.seen.append(logits.float().cpu() if self.all_rows else logits[0].clone())
        return self.inner(logits, seqs, pending)

    def release(self, seq):
        self.inner.release(seq)


def test_cached_decode_equals_full_forward(checkpoint, image_bytes, monkeypatch):
    bundle = load_model(str(checkpoint), "cpu", "float32", enable_prefix_caching=False)
    engine = bundle.engine
    ids, spans = our_plan(ChatModel(bundle), image_bytes).prepared
    recorder = RecordingSampler(engine.runner.sampler)
    monkeypatch.setattr(engine.runner, "sampler", recorder)
    out = engine.generate([ids], SamplingParams(max_new_tokens=12, ignore_eos=True), [spans])[0]
    full = run_prefill_logits(engine, ids + out.token_ids[:-1], spans)
    stepwise = torch.stack(recorder.seen)  # (12, V): one prefill, then 11 cached decode steps
    assert (stepwise - full[len(ids) - 1:]).abs().max().item() < 1e-4
    assert stepwise.argmax(-1).tolist() == out.token_ids


@needs_triton
def test_triton_kernels_through_the_engine_match_hf(checkpoint, image_bytes):
    """The Triton path end to end (fused one-row GEMVs in decode, rope + KV store, paged attention) in fp32, run
    by TRITON_INTERPRET on CPU, or compiled on the GPU where there is one (with the prefill and decode CUDA
    graphs): the same 4 greedy tokens as HF `generate` on the CPU."""
    # The prompt and image features from the CPU path, as HF computes them: GPU resizing differs by up to 2/255.
    cpu = load_model(str(checkpoint), "cpu", "float32")
    ids, spans = our_plan(ChatModel(cpu), image_bytes).prepared
    feats = cpu.images.encode([s.source for s in spans])
    spans = tuple(dataclasses.replace(s, embeds=f.to(DEVICE)) for s, f in zip(spans, feats))
    bundle = load_model(str(checkpoint), DEVICE, "float32", use_triton=True)
    ours = bundle.engine.generate([ids], SamplingParams(max_new_tokens=4, ignore_eos=True), [spans])[0]
    inputs = hf_inputs(checkpoint, image_bytes)
    with torch.no_grad():
        out = hf_model(checkpoint).generate(**inputs, max_new_tokens=4, do_sample=False)
    assert ours.token_ids == out[0, inputs["input_ids"].shape[1]:].tolist()

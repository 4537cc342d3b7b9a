"""Our model code against transformers' LlavaForConditionalGeneration on tiny random checkpoints, in fp32.

The proof that the engine is right: the same prompt ids as LlavaProcessor, prefill logits within 1e-4, the same
48 greedy tokens, and prefill + cached decode equal to one full forward.
"""
import dataclasses

import pytest
import torch
from PIL import Image

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

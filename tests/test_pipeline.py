"""The Python API (engine/pipelines.py) on a tiny random llava and on the embedded default (real weights)."""
import pytest
from PIL import Image

from engine import GenerationConfig, Response, pipeline
from tests.tiny_checkpoints import make_tiny_llava, random_png

GREEDY = GenerationConfig(max_new_tokens=12, ignore_eos=True)


@pytest.fixture(scope="module")
def photo(tmp_path_factory):
    path = tmp_path_factory.mktemp("pipe_images") / "photo.png"
    path.write_bytes(random_png())
    return path


@pytest.fixture(scope="module")
def pipe(tmp_path_factory):
    folder = make_tiny_llava(tmp_path_factory.mktemp("pipe_tiny"), "qwen2-siglip")
    with pipeline(str(folder), device="cpu", dtype="float32") as p:
        yield p


def test_one_string_gives_one_response(pipe):
    r = pipe("Hello there", GREEDY)
    assert isinstance(r, Response) and r.text and r.generate_token_len == 12 and r.finish_reason == "length"
    assert r.input_token_len > 0 and r.index == 0


def test_a_list_gives_a_list_in_order_and_equal_to_single_runs(pipe, photo):
    prompts = ["Hello there", ("What is this?", str(photo)), "Another question"]
    batch = pipe(prompts, GREEDY)
    assert [r.index for r in batch] == [0, 1, 2]
    assert [r.text for r in batch] == [pipe(p, GREEDY).text for p in prompts]  # batching changes nothing


def test_conversation_with_images_as_path_pil_and_data_uri(pipe, photo):
    import base64

    uri = "data:image/png;base64," + base64.b64encode(photo.read_bytes()).decode()
    conversation = [
        {"role": "system", "content": "Be brief."},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": str(photo)}},
                                     {"type": "text", "text": "What is this?"}]},
        {"role": "assistant", "content": "A picture."},
        {"role": "user", "content": [{"type": "image", "image": Image.open(photo)},
                                     {"type": "image_url", "image_url": {"url": uri}},
                                     {"type": "text", "text": "And these?"}]},
    ]
    r = pipe(conversation, GREEDY)
    assert r.generate_token_len == 12 and r.input_token_len > 3 * 16  # three 16-token images, and the text
    assert [x.text for x in pipe([conversation, conversation], GREEDY)] == [r.text, r.text]


def test_n_answers_per_prompt_with_derived_seeds(pipe):
    config = GenerationConfig(max_new_tokens=10, n=2, do_sample=True, temperature=1.0, random_seed=5)
    one = pipe("Tell me a story", config)
    assert [r.index for r in one] == [0, 1] and one[0].text != one[1].text
    again = pipe(["Tell me a story", "Hi"], config)
    assert [r.index for r in again] == [0, 1, 2, 3] and [r.text for r in again[:2]] == [r.text for r in one]


def test_stream_infer_gives_pieces_that_add_up(pipe):
    whole = pipe(["Hello there", "Another question"], GREEDY)
    pieces = list(pipe.stream_infer(["Hello there", "Another question"], GREEDY))
    for i in (0, 1):
        mine = [p for p in pieces if p.index == i]
        assert "".join(p.text for p in mine) == whole[i].text
        assert mine[-1].finish_reason == "length" and mine[-1].generate_token_len == 12
        assert all(p.finish_reason is None for p in mine[:-1])


def test_logprobs_in_lmdeploys_shape(pipe):
    """GenerationConfig(logprobs=k): per token {id: log-probability} of the token and its k alternatives, whole and
    from stream_infer's pieces alike; none without it."""
    config = GenerationConfig(max_new_tokens=6, ignore_eos=True, logprobs=2)
    whole = pipe("Hello there", config)
    assert len(whole.logprobs) == 6
    assert all(2 <= len(d) <= 3 and all(v <= 0 for v in d.values()) for d in whole.logprobs)
    pieces = list(pipe.stream_infer("Hello there", config))
    streamed = [d for p in pieces for d in p.logprobs]
    assert [sorted(d) for d in streamed] == [sorted(d) for d in whole.logprobs]
    assert pipe("Hello there", GREEDY).logprobs is None


def test_leaving_stream_infer_early_aborts(pipe):
    stream = pipe.stream_infer("Hello there", GenerationConfig(max_new_tokens=400, ignore_eos=True))
    next(stream)
    stream.close()
    engine = pipe.model.loaded.engine
    import time

    deadline = time.monotonic() + 10
    while engine.has_work() and time.monotonic() < deadline:
        time.sleep(0.02)
    assert not engine.has_work()


@pytest.mark.parametrize("prompt, words", [
    ("cat " * 600, "context holds"), (("What?", "/no/such/file.png"), "could not be read"),
    (("What?", b"not an image"), "not an image we can read"), (("What?", "https://example.com/a.png"), "does not "
                                                                                                       "fetch"),
    ([], "non-empty list"), (42, "must be a string"),
])
def test_unanswerable_prompts_raise_before_anything_runs(pipe, prompt, words):
    with pytest.raises(ValueError, match=words):
        pipe(prompt, GREEDY)


def test_invalid_config_names_the_field():
    with pytest.raises(ValueError, match="top_p"):
        GenerationConfig(top_p=0)
    with pytest.raises(ValueError) as info:
        GenerationConfig(random_seed=-1)
    assert info.value.param == "random_seed"


@pytest.mark.slow
def test_default_model_sees_the_cat(tmp_path):
    from skimage import data

    cat = tmp_path / "chelsea.png"
    Image.fromarray(data.chelsea()).save(cat)
    config = GenerationConfig(max_new_tokens=40)
    with pipeline("default", device="cpu") as p:
        r = p(("What animal is in this picture?", str(cat)), config)
        assert "cat" in r.text.lower() and r.finish_reason in ("stop", "length")
        batch = p(["Name a colour.", ("What animal is in this picture?", str(cat))], config)
        assert batch[1].text == r.text and batch[0].text
        streamed = [x for x in p.stream_infer(("What animal is in this picture?", str(cat)), config)]
        assert "".join(x.text for x in streamed) == r.text
        two = p("Name an animal.", GenerationConfig(max_new_tokens=16, n=2, do_sample=True, random_seed=1))
        assert len(two) == 2 and all(x.text for x in two)

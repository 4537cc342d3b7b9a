"""Request parsing without a model: generation parameters (api/params.py), OpenAI-style messages
(engine/chat/messages.py) and the error shapes (api/errors.py)."""
import pytest

from api.errors import ApiError, context_exceeded
from api.params import check_logit_bias, parse
from engine.chat.messages import image_sources, to_turns
from engine.chat.types import ChatImage
from engine.sampling_params import SEED_MAX, InvalidParameter


def test_openai_defaults_and_extra_fields():
    p = parse({})
    assert p.n == 1 and p.max_tokens is None and not p.stream and not p.include_usage
    s = p.choices[0]
    assert (s.temperature, s.top_p, s.top_k, s.repetition_penalty, s.seed, s.stop) == (1.0, 1.0, 0, 1.0, None, ())
    p = parse({"top_k": 20, "repetition_penalty": 1.2, "stop": "END", "max_completion_tokens": 7, "stream": True,
               "stream_options": {"include_usage": True}, "ignore_eos": True})
    s = p.choices[0]
    assert (s.top_k, s.repetition_penalty, s.stop, s.ignore_eos) == (20, 1.2, ("END",), True)
    assert p.max_tokens == 7 and p.max_tokens_name == "max_completion_tokens" and p.include_usage


def test_n_choices_get_consecutive_seeds():
    assert [c.seed for c in parse({"n": 3, "seed": 5}).choices] == [5, 6, 7]
    assert [c.seed for c in parse({"n": 2, "seed": SEED_MAX}).choices] == [SEED_MAX, 0]
    assert [c.seed for c in parse({"n": 2}).choices] == [None, None]


@pytest.mark.parametrize("body, param", [
    ({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
    ({"max_tokens": 0}, "max_tokens"), ({"max_completion_tokens": -3}, "max_completion_tokens"),
    ({"n": 0}, "n"), ({"n": 100}, "n"), ({"seed": -1}, "seed"), ({"stop": ["ok", 3]}, "stop"), ({"stop": ""}, "stop"),
    ({"temperature": "hot"}, "temperature"), ({"stream": "yes"}, "stream"), ({"n": True}, "n"),
    ({"stream_options": {"include_usage": True}}, "stream_options"), ({"repetition_penalty": 0}, "repetition_penalty"),
])
def test_invalid_parameters_are_named(body, param):
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param, info.value.message


@pytest.mark.parametrize("body", [{"tools": [{"type": "function"}]}, {"response_format": {"type": "json_object"}},
                                  {"echo": True}, {"best_of": 3}, {"suffix": "end"}])
def test_unsupported_parameters_are_refused_not_ignored(body):
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.param == next(iter(body)) and info.value.code == "unsupported_parameter"


def test_defaults_of_unsupported_parameters_are_accepted():
    parse({"tools": [], "tool_choice": "none", "response_format": {"type": "text"}, "best_of": 1, "echo": False})


def test_logprobs_in_chat_and_completion_shapes():
    assert parse({}).logprobs is None and parse({"logprobs": False}).logprobs is None
    assert parse({"logprobs": True}).logprobs == 0 and parse({"logprobs": True, "top_logprobs": 5}).logprobs == 5
    assert parse({"logprobs": 3}, chat=False).logprobs == 3 and parse({"logprobs": 0}, chat=False).logprobs == 0
    assert parse({}, chat=False).logprobs is None
    assert parse({"logprobs": True, "top_logprobs": 4, "n": 2}).choices[1].logprobs == 4


@pytest.mark.parametrize("body, chat, param", [
    ({"top_logprobs": 2}, True, "top_logprobs"), ({"logprobs": True, "top_logprobs": 21}, True, "top_logprobs"),
    ({"logprobs": 2}, True, "logprobs"), ({"logprobs": True}, False, "logprobs"), ({"logprobs": -1}, False, "logprobs"),
])
def test_bad_logprobs_are_named(body, chat, param):
    with pytest.raises(ApiError) as info:
        parse(body, chat=chat)
    assert info.value.status == 400 and info.value.param == param, info.value.message


def test_openai_penalties_and_logit_bias():
    s = parse({"presence_penalty": 0.5, "frequency_penalty": -1, "logit_bias": {"50256": -100, "7": 2.5}}).choices[0]
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0.5, -1, ((7, 2.5), (50256, -100.0)))
    assert s.sampling_params().logit_bias == ((7, 2.5), (50256, -100.0))
    s = parse({"presence_penalty": 0, "frequency_penalty": None, "logit_bias": None}).choices[0]
    assert (s.presence_penalty, s.frequency_penalty, s.logit_bias) == (0, 0.0, ())


@pytest.mark.parametrize("body, param, words", [
    ({"presence_penalty": 2.5}, "presence_penalty", "between -2 and 2"),
    ({"frequency_penalty": "high"}, "frequency_penalty", "a number"),
    ({"logit_bias": {"7": 101}}, "logit_bias", "between -100 and 100"),
    ({"logit_bias": {"cat": 1}}, "logit_bias", "token ids"), ({"logit_bias": {"-3": 1}}, "logit_bias", "token ids"),
    ({"logit_bias": {"7": "up"}}, "logit_bias", "a number"), ({"logit_bias": [7, 1]}, "logit_bias", "an object"),
])
def test_bad_penalties_and_logit_bias_are_named(body, param, words):
    with pytest.raises(ApiError) as info:
        parse(body)
    assert info.value.status == 400 and info.value.param == param and words in info.value.message, info.value.message


def test_logit_bias_ids_are_checked_against_the_vocabulary():
    params = parse({"logit_bias": {"10": 1, "99": 1, "100": 1}})
    check_logit_bias(params, 101)
    check_logit_bias(params, None)  # a remote backend: its server checks
    with pytest.raises(ApiError) as info:
        check_logit_bias(params, 100)
    assert info.value.param == "logit_bias" and "(100)" in info.value.message and "0 to 99" in info.value.message


def test_context_error_carries_the_numbers():
    body = context_exceeded(500, 100, 512, "messages").body()["error"]
    assert body["code"] == "context_length_exceeded" and body["param"] == "messages"
    assert "512" in body["message"] and "600" in body["message"] and "500 in the messages" in body["message"]
    assert "resulted in 700 tokens" in context_exceeded(700, None, 512, "prompt").message


def loader(source, position):
    return ChatImage(source.encode(), f"image {position + 1}")


def test_messages_become_system_and_alternating_turns():
    messages = [
        {"role": "system", "content": "Be brief."},
        {"role": "developer", "content": [{"type": "text", "text": "Answer in English."}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": {"url": "A"}},
                                     {"type": "text", "text": "What is it?"}]},
        {"role": "user", "content": [{"type": "image_url", "image_url": "B"}, {"type": "text", "text": "And this?"}]},
        {"role": "assistant", "content": "A cat."},
        {"role": "assistant", "content": None},
        {"role": "user", "content": "Thanks"},
    ]
    assert image_sources(messages) == ["A", "B"]
    system, turns = to_turns(messages, loader)
    assert system == "Be brief.\n\nAnswer in English."
    assert [t.role for t in turns] == ["user", "assistant", "user"]
    assert turns[0].text == "What is it?\n\nAnd this?" and [i.data for i in turns[0].images] == [b"A", b"B"]
    assert turns[0].images[1].name == "image 2" and turns[2].text == "Thanks"


@pytest.mark.parametrize("messages, words", [
    ([], "non-empty list"), ("hi", "non-empty list"), ([{"role": "tool", "content": "x"}], "role 'tool'"),
    ([{"role": "user", "content": 5}], "string or a list"),
    ([{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}], "'input_audio' are not supported"),
    ([{"role": "assistant", "content": [{"type": "image_url", "image_url": {"url": "A"}}]}], "user messages only"),
    ([{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}], "has no image"),
    ([{"role": "user", "content": [{"type": "text"}]}], "text must be a string"),
])
def test_malformed_messages_name_the_problem(messages, words):
    with pytest.raises(InvalidParameter, match=words) as info:
        to_turns(messages, loader)
    assert info.value.param == "messages"

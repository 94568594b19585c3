"""Request parsing without a server: what OpenAI clients send is accepted, the rest is refused by name."""

import pytest

from gpt.serve_schema import Limits, RequestError, parse_request

LIMITS = Limits(max_tokens=100, max_choices=4)


def test_defaults_follow_openai():
    request = parse_request({"model": "m", "prompt": "Alice"}, LIMITS)
    assert (request.max_tokens, request.temperature, request.n, request.stream) == (16, 1.0, 1, False)
    assert request.prompts == ["Alice"] and request.stops is None


def test_neutral_values_of_unsupported_fields_are_accepted():
    """What LangChain and other OpenAI front ends send by default must not be refused."""
    body = {"model": "m", "prompt": ["a", "b"], "max_tokens": None, "temperature": None, "n": 2, "best_of": 2,
            "echo": False, "logprobs": None, "suffix": None, "frequency_penalty": 0, "presence_penalty": 0.0,
            "logit_bias": {}, "user": "someone", "stop": "\n", "stream_options": None}
    request = parse_request(body, LIMITS)
    assert request.prompts == ["a", "b"] and request.stops == ["\n"] and request.max_tokens == 16


def test_sampling_passes_every_knob_to_the_retriever():
    body = {"model": "m", "prompt": "a", "max_tokens": 7, "temperature": 0.5, "top_p": 0.9, "top_k": 20,
            "min_p": 0.05, "repetition_penalty": 1.2, "stop": ["x", "y"]}
    assert parse_request(body, LIMITS).sampling() == dict(
        max_new_tokens=7, temperature=0.5, top_p=0.9, top_k=20, min_p=0.05, repetition_penalty=1.2, stop=["x", "y"])


@pytest.mark.parametrize("change, param, words", [
    ({"presence_penalty": 0.5}, "presence_penalty", "repetition_penalty is supported"),
    ({"logprobs": 3}, "logprobs", "not supported"),
    ({"best_of": 3}, "best_of", "not supported"),
    ({"stream": "yes"}, "stream", "expected bool"),
    ({"stop": ["a", ""]}, "stop", "non-empty"),
    ({"n": 3, "prompt": ["a", "b"]}, "n", "at most 4"),
    ({"min_p": 1.5}, "min_p", "[0, 1]"),
    ({"stream_options": {"include_usage": True, "extra": 1}}, "stream_options.extra", "Unrecognized"),
])
def test_refusals_name_the_field(change, param, words):
    with pytest.raises(RequestError) as caught:
        parse_request({"model": "m", "prompt": "a", **change}, LIMITS)
    assert caught.value.status == 400 and caught.value.param == param and words in caught.value.message
    assert caught.value.body()["error"]["type"] == "invalid_request_error"

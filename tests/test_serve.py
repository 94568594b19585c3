"""The HTTP API, called the way users call it: the official openai client, and raw HTTP for what clients refuse."""

import json
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest

from gpt.checkpoint import load_checkpoint
from gpt.retriever import Retriever
from gpt.serve import background, create_app
from gpt.serve_schema import Limits

MAX_TOKENS = 2000  # the server's cap: room for the long generation the disconnect test cuts short
LIMITS = Limits(max_tokens=MAX_TOKENS, max_prompt_tokens=50, max_body_bytes=10_000)


@pytest.fixture(scope="module")
def checkpoint(tiny_run):
    return load_checkpoint(tiny_run)


@pytest.fixture(scope="module")
def url(checkpoint):
    with background(create_app(checkpoint, model_name="tiny", limits=LIMITS)) as address:
        yield address


@pytest.fixture(scope="module")
def client(url):
    return openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)


def greedy(client, prompt, max_tokens=40, **extra):
    return client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0, **extra)


def streamed_text(client, prompt, max_tokens=40, **extra) -> tuple[str, str]:
    text, finish = "", None
    for chunk in client.completions.create(model="tiny", prompt=prompt, max_tokens=max_tokens, temperature=0,
                                           stream=True, **extra):
        for choice in chunk.choices:
            text += choice.text
            finish = choice.finish_reason or finish
    return text, finish


def test_models_lists_the_served_model(client):
    assert [m.id for m in client.models.list().data] == ["tiny"]
    assert client.models.retrieve("tiny").id == "tiny"


def test_completion_matches_the_library_and_counts_tokens(client, checkpoint):
    reply = greedy(client, "Alice was")
    expected = Retriever(checkpoint.tokenizer, checkpoint.predictor).complete(["Alice was"], max_new_tokens=40,
                                                                               temperature=0)[0]
    assert reply.object == "text_completion" and reply.model == "tiny"
    assert reply.choices[0].text == expected.text
    assert reply.choices[0].finish_reason == expected.finish_reason
    assert reply.usage.prompt_tokens == expected.prompt_tokens
    assert reply.usage.completion_tokens == expected.completion_tokens
    assert reply.usage.total_tokens == reply.usage.prompt_tokens + reply.usage.completion_tokens


def test_streamed_and_plain_greedy_text_are_the_same(client):
    for prompt in ("Alice was", "The Queen said", ""):
        reply = greedy(client, prompt)
        assert streamed_text(client, prompt) == (reply.choices[0].text, reply.choices[0].finish_reason)


def test_length_and_stop_finish_reasons(client):
    long = greedy(client, "Alice", max_tokens=30).choices[0]
    assert long.finish_reason == "length"  # greedy on the tiny model runs on without an end-of-text
    stop = long.text[6:9]
    cut = greedy(client, "Alice", max_tokens=30, stop=[stop]).choices[0]
    assert (cut.text, cut.finish_reason) == (long.text[: long.text.index(stop)], "stop")
    assert streamed_text(client, "Alice", max_tokens=30, stop=stop) == (cut.text, "stop")


def test_several_prompts_and_n_give_one_choice_each_in_order(client):
    reply = client.completions.create(model="tiny", prompt=["Alice", "The King"], n=2, max_tokens=8, seed=3)
    assert [c.index for c in reply.choices] == [0, 1, 2, 3]
    again = client.completions.create(model="tiny", prompt=["Alice", "The King"], n=2, max_tokens=8, seed=3)
    assert [c.text for c in again.choices] == [c.text for c in reply.choices]
    assert reply.usage.completion_tokens <= 4 * 8


def test_stream_ends_with_usage_when_asked(client):
    chunks = list(client.completions.create(model="tiny", prompt="Alice", max_tokens=10, temperature=0, n=2,
                                            stream=True, stream_options={"include_usage": True}))
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens > 0
    assert sorted(c.choices[0].index for c in chunks if c.choices and c.choices[0].finish_reason) == [0, 1]


def test_raw_stream_is_server_sent_events_ending_with_done(url):
    body = {"model": "tiny", "prompt": "Alice", "max_tokens": 5, "stream": True}
    with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
        assert response.status_code == 200
        assert response.headers["content-type"].startswith("text/event-stream")
        lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines) and lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] in ("stop", "length")


BAD_REQUESTS = [
    ("not json", b"{model: tiny", 400, None),
    ("not an object", b"[1, 2]", 400, None),
    ("NaN temperature", b'{"model": "tiny", "prompt": "a", "temperature": NaN}', 400, None),
    ("missing prompt", {"model": "tiny"}, 400, "prompt"),
    ("unknown field", {"model": "tiny", "prompt": "a", "colour": "red"}, 400, "colour"),
    ("max_tokens as text", {"model": "tiny", "prompt": "a", "max_tokens": "5"}, 400, "max_tokens"),
    ("temperature as text", {"model": "tiny", "prompt": "a", "temperature": "hot"}, 400, "temperature"),
    ("prompt of numbers", {"model": "tiny", "prompt": [1, 2]}, 400, "prompt"),
    ("max_tokens 0", {"model": "tiny", "prompt": "a", "max_tokens": 0}, 400, "max_tokens"),
    ("max_tokens over the cap", {"model": "tiny", "prompt": "a", "max_tokens": MAX_TOKENS + 1}, 400, "max_tokens"),
    ("negative temperature", {"model": "tiny", "prompt": "a", "temperature": -1}, 400, "temperature"),
    ("top_p 0", {"model": "tiny", "prompt": "a", "top_p": 0}, 400, "top_p"),
    ("n 0", {"model": "tiny", "prompt": "a", "n": 0}, 400, "n"),
    ("too many choices", {"model": "tiny", "prompt": "a", "n": 99}, 400, "n"),
    ("empty prompt list", {"model": "tiny", "prompt": []}, 400, "prompt"),
    ("five stop strings", {"model": "tiny", "prompt": "a", "stop": list("abcde")}, 400, "stop"),
    ("seed too large", {"model": "tiny", "prompt": "a", "seed": 2**64}, 400, "seed"),
    ("echo", {"model": "tiny", "prompt": "a", "echo": True}, 400, "echo"),
    ("prompt too large", {"model": "tiny", "prompt": "Alice " * 60}, 400, "prompt"),
    ("unknown model", {"model": "gpt-4", "prompt": "a"}, 404, "model"),
    ("streamed and refused", {"model": "tiny", "prompt": "a", "stream": True, "top_p": 2}, 400, "top_p"),
    ("body too large", {"model": "tiny", "prompt": "a" * 20_000}, 413, None),
]


@pytest.mark.parametrize("what, body, status, param", BAD_REQUESTS, ids=[case[0] for case in BAD_REQUESTS])
def test_bad_requests_get_openai_style_4xx(url, what, body, status, param):
    content = body if isinstance(body, bytes) else json.dumps(body).encode()
    response = httpx.post(f"{url}/v1/completions", content=content, headers={"Content-Type": "application/json"})
    assert response.status_code == status, response.text
    assert response.headers["content-type"] == "application/json"
    error = response.json()["error"]
    assert error["message"] and error["type"] == "invalid_request_error" and error["param"] == param


def test_openai_client_raises_on_refusals(client):
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="gpt-4", prompt="a")
    with pytest.raises(openai.BadRequestError, match="max_tokens"):
        client.completions.create(model="tiny", prompt="a", max_tokens=0)


@pytest.mark.parametrize("method, path, status", [("GET", "/nowhere", 404), ("GET", "/v1/completions", 405)])
def test_unknown_routes_and_methods_get_json_errors(url, method, path, status):
    response = httpx.request(method, f"{url}{path}")
    assert response.status_code == status and response.json()["error"]["message"]


def test_api_key_is_required_when_set(checkpoint):
    with background(create_app(checkpoint, model_name="tiny", api_key="sesame")) as address:
        for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
            response = httpx.get(f"{address}/v1/models", headers=headers)
            assert response.status_code == 401 and response.json()["error"]["code"] == "invalid_api_key"
        with pytest.raises(openai.AuthenticationError):
            openai.OpenAI(base_url=f"{address}/v1", api_key="wrong", max_retries=0).models.list()
        keyed = openai.OpenAI(base_url=f"{address}/v1", api_key="sesame", max_retries=0)
        assert keyed.completions.create(model="tiny", prompt="a", max_tokens=3).choices[0].finish_reason
        assert httpx.get(f"{address}/health").json()["status"] == "ok"


def test_concurrent_clients_each_get_their_own_text(client):
    prompts = ["Alice", "The Queen", "The Hatter", "Down the", "Off with", "The Mock Turtle"]
    expected = {p: greedy(client, p, max_tokens=25).choices[0].text for p in prompts}
    results, errors = {}, []

    def call(prompt: str) -> None:
        try:
            results[prompt] = streamed_text(client, prompt, max_tokens=25)[0]
        except Exception as err:  # reported by the assertion below, with the others
            errors.append(err)

    threads = [threading.Thread(target=call, args=(p,)) for p in prompts]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors and results == expected


def test_health_answers_during_a_stream_and_a_disconnect_stops_it(url, client):
    body = {"model": "tiny", "prompt": "Alice", "max_tokens": MAX_TOKENS, "temperature": 0}
    assert greedy(client, "Alice", max_tokens=MAX_TOKENS).choices[0].finish_reason == "length"  # runs to the cap
    before = httpx.get(f"{url}/health").json()
    with httpx.stream("POST", f"{url}/v1/completions", json={**body, "stream": True}) as response:
        lines = response.iter_lines()  # kept: dropping the iterator would close the connection
        first_lines = [next(lines) for _ in range(3)]
        during = httpx.get(f"{url}/health").json()  # answered while the model generates, not after
    assert first_lines[0].startswith("data: ") and during["running"] == 1
    deadline = time.monotonic() + 300  # only a broken server gets near this; normally well under a second
    while (health := httpx.get(f"{url}/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (health["running"], health["queued"]) == (0, 0)
    assert health["cancelled_streams"] == before["cancelled_streams"] + 1
    assert health["completion_tokens"] - before["completion_tokens"] < MAX_TOKENS
    assert greedy(client, "Alice", max_tokens=5).choices[0].finish_reason  # the model is free again


def test_cli_serves_until_ctrl_c(tiny_run):
    process = subprocess.Popen([sys.executable, "-m", "gpt", "serve", "--checkpoint", str(tiny_run), "--port", "0"],
                               stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        banner = process.stdout.readline()
        address = banner.split(" at ")[1].split("/v1")[0]
        assert httpx.get(f"{address}/health").json()["model"] == tiny_run.name
        assert "<textarea" in httpx.get(f"{address}/").text
    finally:
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=60)
    assert process.returncode == 130 and "Traceback" not in stderr, stderr  # 130: stopped by Ctrl-C, like train


def test_cli_reports_a_missing_checkpoint(tmp_path):
    result = subprocess.run([sys.executable, "-m", "gpt", "serve", "--checkpoint", str(tmp_path / "none")],
                            capture_output=True, text=True)
    assert result.returncode == 2
    assert result.stderr.startswith("gpt: error: ") and len(result.stderr.strip().splitlines()) == 1


BAD_OPTIONS = [(["--port", "70000"], "--port"), (["--threads", "0"], "--threads"),
               (["--max-tokens", "0"], "--max-tokens"), (["--port", "BUSY"], "cannot listen")]


@pytest.mark.parametrize("flags, words", BAD_OPTIONS)
def test_cli_refuses_bad_options_in_one_line(tiny_run, capsys, flags, words):
    from gpt import cli

    with socket.create_server(("127.0.0.1", 0)) as busy:
        flags = [str(busy.getsockname()[1]) if flag == "BUSY" else flag for flag in flags]
        assert cli.main(["serve", "--checkpoint", str(tiny_run), *flags]) == 2
    err = capsys.readouterr().err
    assert err.startswith("gpt: error: ") and words in err and len(err.strip().splitlines()) == 1


def test_cli_says_how_to_install_fastapi(monkeypatch, capsys, tiny_run):
    from gpt import cli

    monkeypatch.setitem(sys.modules, "fastapi", None)
    assert cli.main(["serve", "--checkpoint", str(tiny_run)]) == 2
    assert "pip install 'wonderland-gpt[serve]'" in capsys.readouterr().err

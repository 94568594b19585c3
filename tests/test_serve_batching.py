"""Concurrent requests share one batch: each gets the text it gets alone, and one that leaves frees its row."""

import subprocess
import sys
import threading
import time

import httpx
import openai
import pytest
from cli_helpers import assert_one_clear_line, gpt

from gpt.checkpoint import load_checkpoint
from gpt.retriever import Retriever
from gpt.serve import background, create_app
from gpt.serve_schema import Limits

PROMPTS = ["Alice", "The Queen said", "", "Down, down, down.", "Oh my ears and whiskers", "Curiouser",
           "How doth the little crocodile", "The Hatter", "Who are you?", "said the Caterpillar", "Soup",
           "It was the White Rabbit", "Off with her head!", "the March Hare", "Twinkle, twinkle", "The Dormouse"]
SETTINGS = [dict(temperature=0), dict(temperature=1.0), dict(temperature=0.8, top_p=0.9),
            dict(temperature=1.1, extra_body={"top_k": 20}), dict(temperature=0.9, extra_body={"min_p": 0.05}),
            dict(temperature=1.0, extra_body={"repetition_penalty": 1.3}), dict(temperature=0.7, n=2),
            dict(temperature=1.0, stop=["the"])]


def spec(i: int) -> dict:
    """Request i of 16: its own prompt, length, settings and seed; every other one streamed."""
    return dict(prompt=PROMPTS[i], max_tokens=12 + 5 * i, seed=1000 + i, stream=i % 2 == 1, **SETTINGS[i % 8])


@pytest.fixture(scope="module")
def checkpoint(memory_run):
    return load_checkpoint(memory_run)  # a memory with an n-gram part: the mixture runs per row


@pytest.fixture(scope="module")
def url(checkpoint):
    with background(create_app(checkpoint, model_name="m", limits=Limits(max_tokens=500), max_batch=16)) as address:
        yield address


def ask(client: openai.OpenAI, request: dict) -> list[tuple[str, str]]:
    """Each choice's (text, finish_reason), streamed or not."""
    request = dict(request)
    if not request.pop("stream"):
        reply = client.completions.create(model="m", **request)
        return [(c.text, c.finish_reason) for c in reply.choices]
    texts: dict[int, list] = {}
    for chunk in client.completions.create(model="m", stream=True, **request):
        for c in chunk.choices:
            text, finish = texts.setdefault(c.index, ["", None])
            texts[c.index] = [text + c.text, c.finish_reason or finish]
    return [tuple(texts[i]) for i in sorted(texts)]


def concurrently(work: list) -> list:
    results, errors = [None] * len(work), []

    def run(i: int) -> None:
        try:
            results[i] = work[i]()
        except Exception as err:  # reported by the assertion below
            errors.append(err)

    threads = [threading.Thread(target=run, args=(i,)) for i in range(len(work))]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert not errors
    return results


def test_sixteen_concurrent_requests_get_the_text_each_gets_alone(url, checkpoint):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    alone = [ask(client, spec(i)) for i in range(16)]
    together = concurrently([lambda i=i: ask(client, spec(i)) for i in range(16)])
    assert together == alone
    assert len({text for choices in alone for text, _ in choices}) == 18  # 16 requests, two with n=2
    library = Retriever(checkpoint.tokenizer, checkpoint.predictor).complete(
        [PROMPTS[2]] * 2, max_new_tokens=spec(2)["max_tokens"], temperature=0.8, top_p=0.9, seed=1002)
    assert [(c.text, c.finish_reason) for c in library][:1] == alone[2]
    assert alone[6] == [(c.text, c.finish_reason) for c in Retriever(checkpoint.tokenizer, checkpoint.predictor)
                        .complete([PROMPTS[6]] * 2, max_new_tokens=spec(6)["max_tokens"], temperature=0.7,
                                  seed=1006)]


def test_a_seeded_request_is_what_gpt_generate_prints_with_that_seed(url, memory_run):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    reply = client.completions.create(model="m", prompt="Alice", max_tokens=40, seed=77, temperature=0.9,
                                      extra_body={"top_k": 30})
    printed = subprocess.run([sys.executable, "-m", "gpt", "generate", "Alice", "--checkpoint", str(memory_run),
                              "--seed", "77", "--temperature", "0.9", "--top-k", "30", "--max-new-tokens", "40"],
                             capture_output=True, text=True, check=True).stdout
    assert printed == "Alice" + reply.choices[0].text + "\n"


def test_a_client_that_leaves_mid_batch_frees_its_row_and_changes_no_other(url):
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0)
    long = [dict(prompt=p, max_tokens=300, seed=5, temperature=0.9, stream=True) for p in PROMPTS[:3]]
    alone = [ask(client, request) for request in long]
    before = httpx.get(f"{url}/health").json()

    def leave_early() -> int:
        body = {"model": "m", "prompt": "The Hatter", "max_tokens": 400, "stream": True}
        with httpx.stream("POST", f"{url}/v1/completions", json=body) as response:
            lines = response.iter_lines()
            return len([next(lines) for _ in range(5)])  # then the connection closes mid-generation

    results = concurrently([lambda r=r: ask(client, r) for r in long] + [leave_early])
    assert results[:3] == alone and results[3] == 5
    deadline = time.monotonic() + 60
    while (health := httpx.get(f"{url}/health").json())["running"] and time.monotonic() < deadline:
        time.sleep(0.05)
    assert (health["running"], health["queued"]) == (0, 0)
    assert health["cancelled_streams"] == before["cancelled_streams"] + 1


def test_requests_beyond_max_batch_wait_for_a_row(checkpoint):
    with background(create_app(checkpoint, model_name="m", max_batch=2)) as address:
        client = openai.OpenAI(base_url=f"{address}/v1", api_key="unused", max_retries=0)
        requests = [dict(prompt=p, max_tokens=150, seed=9, temperature=1.0, stream=False) for p in PROMPTS[:5]]
        alone = [ask(client, request) for request in requests]
        seen, running = [], True

        def watch() -> None:
            while running:
                seen.append(httpx.get(f"{address}/health").json())
                time.sleep(0.01)

        watcher = threading.Thread(target=watch)
        watcher.start()
        try:
            together = concurrently([lambda r=r: ask(client, r) for r in requests])
        finally:
            running = False
            watcher.join()
    assert together == alone
    assert max(h["running"] for h in seen) <= 2 and any(h["queued"] for h in seen)
    assert seen[-1]["max_batch"] == 2


def test_a_batch_that_cannot_fit_is_refused_before_serving(memory_run):
    result = gpt("serve", "--checkpoint", str(memory_run), "--port", "0", "--max-batch", "1000000000", timeout=60)
    line = assert_one_clear_line(result, "serving 1,000,000,000 rows", "the KV cache", "lower --max-batch")
    assert "GB" in line
    assert_one_clear_line(gpt("serve", "--checkpoint", str(memory_run), "--max-batch", "0"), "--max-batch")

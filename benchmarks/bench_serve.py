"""Load check for `gpt serve`: many concurrent streaming clients for a fixed time, then a health check.

    python benchmarks/bench_serve.py [--checkpoint DIR] [--clients 16] [--duration 30] [--max-tokens 64]
                                     [--threads N] [--json OUT.json]

Without --checkpoint it first trains the tiny preset for --train-steps steps into a temporary folder (a
small real model; needs the book, see GPT_DATA_DIR). The server runs as its own process (`python -m gpt
serve --port 0`), as users run it; the clients are the official `openai` package's AsyncOpenAI, one
asyncio task each, sending streamed completions back to back (temperature 0.8, a prompt drawn from a
short list, stream_options.include_usage for exact token counts) until the time is up. Requests still
running then are finished and counted.

Reported: requests, errors, time to first token and total time per request (p50 / p95, seconds),
completion tokens per second over the whole run (all clients together), and /health afterwards, which
must answer "ok" with nothing queued. Exit status 1 if any request failed or the server did not answer.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx
import openai
import torch

PROMPTS = ["Alice was", "The Queen said", "Down the rabbit", "The Hatter", "Off with her", "The Mock Turtle",
           "Curiouser and", "The King"]


@dataclass
class Result:
    requests: int = 0
    errors: list[str] = field(default_factory=list)
    first_token_s: list[float] = field(default_factory=list)
    total_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0


def percentile(values: list[float], q: float) -> float:
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


async def client_loop(client: openai.AsyncOpenAI, model: str, until: float, max_tokens: int, result: Result,
                      rng: random.Random) -> None:
    while time.monotonic() < until:
        start, first = time.monotonic(), None
        try:
            stream = await client.completions.create(model=model, prompt=rng.choice(PROMPTS), max_tokens=max_tokens,
                                                     temperature=0.8, stream=True,
                                                     stream_options={"include_usage": True})
            async for chunk in stream:
                if first is None and chunk.choices and chunk.choices[0].text:
                    first = time.monotonic() - start
                if chunk.usage:
                    result.completion_tokens += chunk.usage.completion_tokens
            result.first_token_s.append(first if first is not None else time.monotonic() - start)
            result.total_s.append(time.monotonic() - start)
        except Exception as err:  # counted and printed: the point of the check is that there are none
            result.errors.append(f"{type(err).__name__}: {err}")
        result.requests += 1


async def load(url: str, model: str, clients: int, duration: float, max_tokens: int) -> tuple[Result, float]:
    result = Result()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=clients + 4)))
    start = time.monotonic()
    await asyncio.gather(*(client_loop(client, model, start + duration, max_tokens, result, random.Random(i))
                           for i in range(clients)))
    elapsed = time.monotonic() - start
    await client.close()
    return result, elapsed


def train_tiny(steps: int, out: Path) -> Path:
    subprocess.run([sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--max-steps", str(steps), "--out",
                    str(out), "--quiet"], check=True)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained checkpoint folder (default: train the tiny preset)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--duration", type=float, default=30.0, help="seconds of load")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--threads", type=int, help="passed to gpt serve --threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else train_tiny(args.train_steps, Path(scratch) / "tiny")
        threads = ["--threads", str(args.threads)] if args.threads else []
        server = subprocess.Popen([sys.executable, "-m", "gpt", "serve", "--checkpoint", str(checkpoint),
                                   "--port", "0", *threads], stdout=subprocess.PIPE, text=True)
        try:
            url = server.stdout.readline().split(" at ")[1].split("/v1")[0]
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            result, elapsed = asyncio.run(load(url, model, args.clients, args.duration, args.max_tokens))
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            server.terminate()
            server.wait(timeout=60)

    figures = {
        "clients": args.clients, "duration_s": round(elapsed, 1), "max_tokens": args.max_tokens,
        "requests": result.requests, "errors": len(result.errors),
        "first_token_p50_s": round(percentile(result.first_token_s, 50), 3),
        "first_token_p95_s": round(percentile(result.first_token_s, 95), 3),
        "total_p50_s": round(percentile(result.total_s, 50), 3),
        "total_p95_s": round(percentile(result.total_s, 95), 3),
        "completion_tokens": result.completion_tokens,
        "tokens_per_s": round(result.completion_tokens / elapsed, 1),
        "health_after": health,
        "versions": {"python": platform.python_version(), "torch": torch.__version__, "openai": openai.__version__,
                     "server_threads": args.threads or f"torch default ({torch.get_num_threads()})"},
    }
    for error in result.errors[:10]:
        print(f"error: {error}")
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    healthy = health.get("status") == "ok" and health.get("queued") == 0
    return 0 if healthy and not result.errors and result.requests else 1


if __name__ == "__main__":
    sys.exit(main())

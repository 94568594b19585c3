"""Soak check for `gpt serve` under churn: 1,000 requests, a third of the streams cut off by their clients.

    python benchmarks/soak_serve.py --checkpoint runs/small [--requests 1000] [--clients 16] [--max-tokens 64]
        [--max-batch N] [--json OUT.json]

The server runs as its own process (`python -m gpt serve --port 0`). --clients tasks of the official
AsyncOpenAI client send --requests completions in all, back to back: three in four streamed, one in four
plain. Each streamed request is, with chance 1/3, closed by its client after a random number of chunks
(the connection goes away mid-generation, as a closed browser tab does). Every other request must complete.

Reported: requests completed, cut off and failed; the server's resident memory (VmRSS from /proc) after the
first and after the last hundred requests, and the largest seen; and /health once the load stops, which must
come back to nothing running or queued. Exit status 1 on a failed request, a row left running, or resident
memory that grew by more than 10% between the first and the last hundred requests.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import random
import subprocess
import sys
import time
from pathlib import Path

import httpx
import openai

PROMPTS = ["Alice was", "The Queen said", "Down the rabbit", "The Hatter", "Off with her", "The Mock Turtle",
           "Curiouser and", "The King", ""]


def resident_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS in /proc: this check needs Linux")


class Soak:
    def __init__(self, client: openai.AsyncOpenAI, model: str, pid: int, total: int, max_tokens: int):
        self.client, self.model, self.pid, self.max_tokens = client, model, pid, max_tokens
        self.next, self.total = 0, total
        self.completed, self.cut_off, self.errors, self.done = 0, 0, [], 0
        self.rss_first = self.rss_last = self.rss_peak = 0.0

    async def worker(self, rng: random.Random) -> None:
        while self.next < self.total:
            self.next += 1
            try:
                await self.one(rng)
            except Exception as err:  # counted and printed: the point of the check is that there are none
                self.errors.append(f"{type(err).__name__}: {err}")
            self.done += 1
            rss = resident_mb(self.pid)
            self.rss_peak = max(self.rss_peak, rss)
            if self.done == 100:
                self.rss_first = rss
            if self.done > self.total - 100:
                self.rss_last = rss

    async def one(self, rng: random.Random) -> None:
        common = dict(model=self.model, prompt=rng.choice(PROMPTS), max_tokens=self.max_tokens, temperature=0.8,
                      seed=rng.randrange(2**31))
        if rng.random() < 0.25:
            reply = await self.client.completions.create(**common)
            assert reply.choices[0].finish_reason in ("stop", "length")
            self.completed += 1
            return
        cut_after = rng.randrange(1, self.max_tokens) if rng.random() < 1 / 3 else None
        stream = await self.client.completions.create(stream=True, **common)
        chunks, finish = 0, None
        async for chunk in stream:
            chunks += 1
            finish = chunk.choices[0].finish_reason if chunk.choices else finish
            if cut_after is not None and chunks >= cut_after:
                await stream.close()  # the client goes away mid-generation
                self.cut_off += 1
                return
        assert finish in ("stop", "length"), f"a stream ended without a finish reason after {chunks} chunks"
        self.completed += 1


async def soak(url: str, model: str, pid: int, args: argparse.Namespace) -> Soak:
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=args.clients + 4)))
    run = Soak(client, model, pid, args.requests, args.max_tokens)
    await asyncio.gather(*(run.worker(random.Random(i)) for i in range(args.clients)))
    await client.close()
    return run


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", required=True, help="a trained checkpoint folder")
    parser.add_argument("--requests", type=int, default=1000)
    parser.add_argument("--clients", type=int, default=16)
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--max-batch", type=int, help="passed to gpt serve --max-batch (default: its own)")
    parser.add_argument("--json", help="also write the figures to this file")
    args = parser.parse_args()
    options = [f"--max-batch={args.max_batch}"] if args.max_batch else []
    server = subprocess.Popen([sys.executable, "-m", "gpt", "serve", "--checkpoint", args.checkpoint, "--port", "0",
                               *options], stdout=subprocess.PIPE, text=True)
    try:
        banner = server.stdout.readline()
        url = banner.split(" at ")[1].split("/v1")[0]
        model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
        started = time.monotonic()
        run = asyncio.run(soak(url, model, server.pid, args))
        elapsed = time.monotonic() - started
        deadline = time.monotonic() + 30
        while (health := httpx.get(f"{url}/health", timeout=10).json())["running"] and time.monotonic() < deadline:
            time.sleep(0.1)
    finally:
        server.terminate()
        server.wait(timeout=60)
    figures = {"server": banner.strip(), "requests": args.requests, "clients": args.clients,
               "max_tokens": args.max_tokens, "seconds": round(elapsed, 1), "completed": run.completed,
               "cut_off": run.cut_off, "failed": len(run.errors),
               "rss_mb_after_first_100": round(run.rss_first, 1), "rss_mb_over_last_100": round(run.rss_last, 1),
               "rss_mb_peak": round(run.rss_peak, 1), "health_after": health,
               "versions": {"python": platform.python_version(), "openai": openai.__version__}}
    for error in run.errors[:10]:
        print(f"error: {error}", file=sys.stderr)
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    flat = run.rss_last <= 1.10 * run.rss_first
    idle = health.get("running") == 0 and health.get("queued") == 0
    return 0 if flat and idle and not run.errors and run.completed + run.cut_off == args.requests else 1


if __name__ == "__main__":
    sys.exit(main())

"""Load check for `gpt serve`: 1 / 4 / 16 / 64 concurrent clients, with the official `openai` client.

    python benchmarks/bench_serve.py --checkpoint runs/small [--clients 1,4,16,64] [--requests 3]
        [--max-tokens 64] [--modes async-stream,async-plain,sync-stream,sync-plain] [--max-batch 16]
        [--json OUT.json] [--plot OUT.png]

Without --checkpoint it first trains the tiny preset for --train-steps steps into a temporary folder (a
small real model; needs the book, see GPT_DATA_DIR). The server runs as its own process (`python -m gpt
serve --port 0`), as users run it. For each mode and each number of clients, every client sends --requests
completions back to back (temperature 0.8, a prompt drawn from a short list, up to --max-tokens tokens: a
request ends early only where the model draws the end-of-text token). Modes: AsyncOpenAI with one asyncio task
per client, or OpenAI with one thread per client; streamed (`stream=True`, usage included) or not.

Reported per row: requests, errors, completion tokens per second over the row's wall time (all clients
together), the ratio to the first row's of the same mode (one client by default), time to first token
p50 / p95 (a streamed request's first text; for a plain request, the whole reply), and for streams the
time between tokens p50 / p95 (the gaps between text chunks: one token each, except where the server held
text back, e.g. half a character).
Then /health, which must show nothing running or queued. Exit status 1 if any request failed.
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
import threading
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
    between_tokens_s: list[float] = field(default_factory=list)
    completion_tokens: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)

    def add(self, started: float, chunk_times: list[float], tokens: int) -> None:
        with self.lock:
            self.requests += 1
            self.completion_tokens += tokens
            self.first_token_s.append(chunk_times[0] - started if chunk_times else time.monotonic() - started)
            self.between_tokens_s += [b - a for a, b in zip(chunk_times, chunk_times[1:])]


def percentile(values: list[float], q: int) -> float | None:
    if not values:
        return None
    return statistics.quantiles(values, n=100, method="inclusive")[q - 1] if len(values) > 1 else values[0]


def request_args(rng: random.Random, max_tokens: int, stream: bool) -> dict:
    extra = {"stream_options": {"include_usage": True}} if stream else {}
    return dict(prompt=rng.choice(PROMPTS), max_tokens=max_tokens, temperature=0.8, stream=stream, **extra)


def counted(chunk, times: list[float]) -> int:
    """A streamed chunk: the time of its text, if any, goes to `times`; returns the tokens its usage reports."""
    if chunk.choices and chunk.choices[0].text:
        times.append(time.monotonic())
    return chunk.usage.completion_tokens if chunk.usage else 0


async def async_client(client: openai.AsyncOpenAI, model: str, requests: int, max_tokens: int, stream: bool,
                       result: Result, rng: random.Random) -> None:
    for _ in range(requests):
        started, times, tokens = time.monotonic(), [], 0
        try:
            reply = await client.completions.create(model=model, **request_args(rng, max_tokens, stream))
            if stream:
                tokens = sum([counted(chunk, times) async for chunk in reply])
            else:
                times, tokens = [time.monotonic()], reply.usage.completion_tokens
            result.add(started, times, tokens)
        except Exception as err:  # counted and printed: the point of the check is that there are none
            result.errors.append(f"{type(err).__name__}: {err}")


def sync_client(client: openai.OpenAI, model: str, requests: int, max_tokens: int, stream: bool, result: Result,
                rng: random.Random) -> None:
    for _ in range(requests):
        started, times, tokens = time.monotonic(), [], 0
        try:
            reply = client.completions.create(model=model, **request_args(rng, max_tokens, stream))
            if stream:
                tokens = sum(counted(chunk, times) for chunk in reply)
            else:
                times, tokens = [time.monotonic()], reply.usage.completion_tokens
            result.add(started, times, tokens)
        except Exception as err:
            result.errors.append(f"{type(err).__name__}: {err}")


async def run_async(url: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool) -> Result:
    result = Result()
    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                                http_client=openai.DefaultAsyncHttpxClient(
                                    limits=httpx.Limits(max_connections=clients + 4)))
    await asyncio.gather(*(async_client(client, model, requests, max_tokens, stream, result, random.Random(i))
                           for i in range(clients)))
    await client.close()
    return result


def run_sync(url: str, model: str, clients: int, requests: int, max_tokens: int, stream: bool) -> Result:
    result = Result()
    client = openai.OpenAI(base_url=f"{url}/v1", api_key="unused", max_retries=0, timeout=600,
                           http_client=openai.DefaultHttpxClient(limits=httpx.Limits(max_connections=clients + 4)))
    threads = [threading.Thread(target=sync_client, args=(client, model, requests, max_tokens, stream, result,
                                                          random.Random(i))) for i in range(clients)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    client.close()
    return result


def measure(url: str, model: str, mode: str, clients: int, requests: int, max_tokens: int) -> dict:
    kind, stream = mode.split("-")[0], mode.endswith("stream")
    started = time.monotonic()
    if kind == "async":
        result = asyncio.run(run_async(url, model, clients, requests, max_tokens, stream))
    else:
        result = run_sync(url, model, clients, requests, max_tokens, stream)
    elapsed = time.monotonic() - started
    rounded = {f"{name}_p{q}_s": None if (v := percentile(values, q)) is None else round(v, 4)
               for name, values in (("first_token", result.first_token_s), ("between_tokens", result.between_tokens_s))
               for q in (50, 95)}
    for error in result.errors[:5]:
        print(f"error ({mode}, {clients} clients): {error}", file=sys.stderr)
    return {"mode": mode, "clients": clients, "requests": result.requests, "errors": len(result.errors),
            "seconds": round(elapsed, 2), "completion_tokens": result.completion_tokens,
            "tokens_per_s": round(result.completion_tokens / elapsed, 1), **rounded}


def plot(rows: list[dict], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for mode in dict.fromkeys(r["mode"] for r in rows):
        mine = [r for r in rows if r["mode"] == mode]
        clients = [r["clients"] for r in mine]
        left.plot(clients, [r["tokens_per_s"] for r in mine], marker="o", label=mode)
        right.plot(clients, [r["first_token_p95_s"] for r in mine], marker="o", label=f"{mode}: first token p95")
        if mine[0]["between_tokens_p95_s"] is not None:
            right.plot(clients, [r["between_tokens_p95_s"] for r in mine], marker="x", linestyle="--",
                       label=f"{mode}: between tokens p95")
    for axis, label in ((left, "completion tokens/s, all clients"), (right, "seconds")):
        axis.set_xscale("log", base=2)
        axis.set_xlabel("concurrent clients")
        axis.set_ylabel(label)
        axis.legend(fontsize=7)
    right.set_yscale("log")
    fig.tight_layout()
    fig.savefig(out, dpi=120)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--checkpoint", help="a trained checkpoint folder (default: train the tiny preset)")
    parser.add_argument("--train-steps", type=int, default=300)
    parser.add_argument("--clients", default="1,4,16,64")
    parser.add_argument("--requests", type=int, default=3, help="requests per client, back to back")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--modes", default="async-stream,async-plain,sync-stream,sync-plain")
    parser.add_argument("--max-batch", type=int, help="passed to gpt serve --max-batch (default: its own)")
    parser.add_argument("--threads", type=int, help="passed to gpt serve --threads (default: torch's choice)")
    parser.add_argument("--json", help="also write the figures to this file")
    parser.add_argument("--plot", help="also plot throughput and latency against clients to this PNG")
    args = parser.parse_args()

    with tempfile.TemporaryDirectory() as scratch:
        checkpoint = Path(args.checkpoint) if args.checkpoint else Path(scratch) / "tiny"
        if not args.checkpoint:
            subprocess.run([sys.executable, "-m", "gpt", "train", "--preset", "tiny", "--max-steps",
                            str(args.train_steps), "--out", str(checkpoint), "--quiet"], check=True)
        options = [f"--{name}={value}" for name, value in (("max-batch", args.max_batch), ("threads", args.threads))
                   if value]
        server = subprocess.Popen([sys.executable, "-m", "gpt", "serve", "--checkpoint", str(checkpoint),
                                   "--port", "0", *options], stdout=subprocess.PIPE, text=True)
        try:
            banner = server.stdout.readline()
            print(banner.strip(), file=sys.stderr)
            url = banner.split(" at ")[1].split("/v1")[0]
            model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
            rows = []
            for mode in args.modes.split(","):
                for clients in map(int, args.clients.split(",")):
                    rows.append(measure(url, model, mode, clients, args.requests, args.max_tokens))
                    first = next(r for r in rows if r["mode"] == mode)  # the fewest clients, in this mode
                    rows[-1]["vs_first_row"] = round(rows[-1]["tokens_per_s"] / max(first["tokens_per_s"], 1e-9), 2)
                    print(json.dumps(rows[-1]), file=sys.stderr)
            health = httpx.get(f"{url}/health", timeout=10).json()
        finally:
            server.terminate()
            server.wait(timeout=60)

    figures = {"checkpoint": str(checkpoint), "server": banner.strip(), "rows": rows, "health_after": health,
               "versions": {"python": platform.python_version(), "torch": torch.__version__,
                            "openai": openai.__version__, "cpu": platform.processor() or platform.machine()}}
    print(json.dumps(figures, indent=2))
    if args.json:
        Path(args.json).write_text(json.dumps(figures, indent=2) + "\n")
    if args.plot:
        plot(rows, Path(args.plot))
    healthy = health.get("status") == "ok" and health.get("running") == 0 and health.get("queued") == 0
    return 0 if healthy and not any(r["errors"] for r in rows) and all(r["requests"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())

"""`gpt serve`: a trained model behind OpenAI's completions API, plus a playground page.

OpenAI's /v1/completions is what llama.cpp, vLLM and Ollama serve too, so every client written
for those (the official `openai` package first) can call this model unchanged:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="small", prompt="Alice was", max_tokens=50)

Routes: GET /v1/models, POST /v1/completions (streamed as server-sent events with "stream": true),
GET /health, GET / (the page). Refusals use OpenAI's error body {"error": {"message", "type",
"param", "code"}} with a 4xx status. One worker thread decodes every request under way as one batch, a
token step at a time (see serve_engine).
"""

from __future__ import annotations

import asyncio
import hmac
import json
import socket
import sys
import threading
import time
import uuid
from collections.abc import AsyncIterator, Iterator
from contextlib import asynccontextmanager, contextmanager
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gpt.batching import MAX_SEED
from gpt.checkpoint import Checkpoint, load_checkpoint
from gpt.config import UsageError
from gpt.preflight import check_serving
from gpt.retriever import Retriever
from gpt.serve_engine import DEFAULT_MAX_BATCH, Choice, Engine, Finished, Piece
from gpt.serve_schema import CompletionRequest, Limits, RequestError, parse_request


def _constant(name: str):
    raise ValueError(f"{name} is not valid JSON")


async def read_json(request: Request, limit: int) -> object:
    """The body as JSON, refusing more than `limit` bytes before reading them all."""
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise RequestError(413, f"The request body is larger than {limit} bytes", code="request_too_large")
        chunks.append(chunk)
    try:
        return json.loads(b"".join(chunks), parse_constant=_constant)
    except (ValueError, UnicodeDecodeError) as err:
        raise RequestError(400, f"We could not parse the JSON body of your request ({err}); send valid JSON "
                                f"with Content-Type: application/json") from None


def _usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _choice(index: int, text: str, finish_reason: str | None) -> dict:
    return {"text": text, "index": index, "logprobs": None, "finish_reason": finish_reason}


def _sse(data: dict | str) -> str:
    return f"data: {data if isinstance(data, str) else json.dumps(data)}\n\n"


@dataclass
class Served:
    """What the routes share: the engine that owns the model, its name and the server's settings."""

    engine: Engine
    retriever: Retriever
    model_id: str
    max_model_len: int
    api_key: str | None
    limits: Limits
    created: int


def served(request: Request) -> Served:
    return request.app.state.served


def authorize(request: Request) -> Served:
    """The app's settings, once the request carries the API key (when the server needs one)."""
    settings = served(request)
    if settings.api_key is None:
        return settings
    scheme, _, token = request.headers.get("authorization", "").partition(" ")
    if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), settings.api_key.encode()):
        raise RequestError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'",
                           code="invalid_api_key")
    return settings


def model_card(settings: Served) -> dict:
    return {"id": settings.model_id, "object": "model", "created": settings.created, "owned_by": "wonderland-gpt",
            "max_model_len": settings.max_model_len}


def check_model(name: str, settings: Served) -> None:
    if name != settings.model_id:
        raise RequestError(404, f"The model '{name}' does not exist; this server has '{settings.model_id}'",
                           param="model", code="model_not_found")


async def refused(_: Request, err: RequestError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status)


async def http_error(_: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
    return JSONResponse(RequestError(err.status_code, str(err.detail)).body(), status_code=err.status_code)


async def crashed(_: Request, err: Exception) -> JSONResponse:  # a bug: still a JSON body, and logged
    body = RequestError(500, f"internal error: {type(err).__name__}", kind="server_error").body()
    return JSONResponse(body, status_code=500)


async def health(request: Request) -> dict:
    settings = served(request)
    return {"status": "ok", "model": settings.model_id, **settings.engine.stats()}


async def page(request: Request) -> str:
    settings = served(request)
    html = files("gpt").joinpath("serve_page.html").read_text(encoding="utf-8")
    page_settings = json.dumps({"model": settings.model_id, "needsKey": settings.api_key is not None,
                                "maxTokens": settings.limits.max_tokens})
    return html.replace("__SETTINGS__", page_settings.replace("<", "\\u003c"))


async def models(request: Request) -> dict:
    return {"object": "list", "data": [model_card(authorize(request))]}


async def one_model(name: str, request: Request) -> dict:
    settings = authorize(request)
    check_model(name, settings)
    return model_card(settings)


async def completions(request: Request):
    settings = authorize(request)
    limits = settings.limits
    body = parse_request(await read_json(request, limits.max_body_bytes), limits)
    check_model(body.model, settings)
    if body.seed is not None and not 0 <= body.seed < MAX_SEED:
        raise RequestError(400, f"seed must be between 0 and 2**63 - 1, got {body.seed}", param="seed")
    prompt_tokens = await asyncio.to_thread(lambda: [settings.retriever.count_tokens(p) for p in body.prompts])
    if max(prompt_tokens) > limits.max_prompt_tokens:
        raise RequestError(400, f"The prompt is {max(prompt_tokens)} tokens; this server accepts at most "
                                f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
    meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
            "model": settings.model_id}
    if body.stream:
        return await stream_response(settings.engine, body, meta, sum(prompt_tokens))
    try:
        done = await settings.engine.complete(choices_of(body), **body.sampling())
    except UsageError as err:
        raise RequestError(400, str(err)) from None
    choices = [_choice(i, c.text, c.finish_reason) for i, c in enumerate(done)]
    return {**meta, "choices": choices, "usage": _usage(sum(prompt_tokens), sum(c.completion_tokens for c in done))}


def choices_of(body: CompletionRequest) -> list[Choice]:
    """`n` choices per prompt; choice i of a seeded request draws from seed + i, as gpt generate's sample i."""
    return [Choice(i, prompt, None if body.seed is None else (body.seed + i) % MAX_SEED)
            for i, prompt in enumerate(p for p in body.prompts for _ in range(body.n))]


async def stream_response(engine: Engine, body: CompletionRequest, meta: dict,
                          prompt_tokens: int) -> StreamingResponse:
    """Waits for the first event so that a refused request still gets a 4xx, not a broken stream."""
    events = engine.stream(choices_of(body), **body.sampling())
    try:
        first = await anext(events)
    except UsageError as err:
        raise RequestError(400, str(err)) from None
    return StreamingResponse(sse_chunks(events, first, body, meta, prompt_tokens), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


async def sse_chunks(events: AsyncIterator[Piece | Finished], first: Piece | Finished, body: CompletionRequest,
                     meta: dict, prompt_tokens: int) -> AsyncIterator[str]:
    """The stream's server-sent events from `first` on; once they have started, a failure can only be told in-band."""
    completion_tokens, event = 0, first
    try:
        while True:
            if isinstance(event, Finished):
                completion_tokens += event.completion_tokens
                yield _sse({**meta, "choices": [_choice(event.index, "", event.finish_reason)]})
            else:
                yield _sse({**meta, "choices": [_choice(event.index, event.text, None)]})
            event = await anext(events, None)
            if event is None:
                break
        if body.stream_options and body.stream_options.include_usage:
            yield _sse({**meta, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
    except Exception as err:  # the stream has started: report in-band, as OpenAI does
        kind = "invalid_request_error" if isinstance(err, UsageError) else "server_error"
        yield _sse(RequestError(500, str(err), kind=kind).body())
    finally:
        await events.aclose()
    yield _sse("[DONE]")


@asynccontextmanager
async def lifespan(app: FastAPI):
    yield
    app.state.served.engine.shutdown()


def create_app(checkpoint: str | Path | Checkpoint, api_key: str | None = None, model_name: str | None = None,
               limits: Limits | None = None, device: str = "cpu", max_batch: int = DEFAULT_MAX_BATCH) -> FastAPI:
    """An ASGI app serving one model: a checkpoint folder, or a Checkpoint already loaded."""
    if not isinstance(checkpoint, Checkpoint):
        model_name = model_name or Path(checkpoint).resolve().name
        checkpoint = load_checkpoint(checkpoint, device)
    memory = checkpoint.predictor.memory
    check_serving(checkpoint.model_config, max_batch, len(memory) if memory else 0, checkpoint.predictor.device)
    retriever = Retriever(checkpoint.tokenizer, checkpoint.predictor)
    app = FastAPI(title="wonderland-gpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.served = Served(Engine(retriever, max_batch), retriever, model_name or "wonderland-gpt",
                              checkpoint.model_config.sequence_len, api_key, limits or Limits(), int(time.time()))
    app.add_exception_handler(RequestError, refused)
    app.add_exception_handler(HTTPException, http_error)
    app.add_exception_handler(Exception, crashed)
    app.add_api_route("/health", health, methods=["GET"])
    app.add_api_route("/", page, methods=["GET"], response_class=HTMLResponse)
    app.add_api_route("/v1/models", models, methods=["GET"])
    app.add_api_route("/v1/models/{name:path}", one_model, methods=["GET"])
    app.add_api_route("/v1/completions", completions, methods=["POST"])
    return app


def listen(host: str, port: int) -> socket.socket:
    """A listening socket, so that --port 0 works and the real address can be printed."""
    try:
        family = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM)[0][0]
        return socket.create_server((host, port), family=family)
    except OSError as err:
        raise UsageError(f"cannot listen on {host}:{port} ({err.strerror or err}); choose another --host or "
                         f"--port") from None


@contextmanager
def background(app: FastAPI, host: str = "127.0.0.1", port: int = 0) -> Iterator[str]:
    """Serve `app` from a thread for the length of a with-block (tests, benchmarks, notebooks); yields its URL."""
    import uvicorn

    sock = listen(host, port)
    server = uvicorn.Server(uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3))
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    try:
        while not server.started:
            if not thread.is_alive():
                raise RuntimeError("the server thread stopped before it started")
            time.sleep(0.01)
        yield f"http://{host}:{sock.getsockname()[1]}"
    finally:
        server.should_exit = True
        thread.join()
        sock.close()


def serve(checkpoint: str | Path, host: str = "127.0.0.1", port: int = 8000, api_key: str | None = None,
          model_name: str | None = None, limits: Limits | None = None, device: str = "cpu",
          max_batch: int = DEFAULT_MAX_BATCH) -> None:
    """Load the checkpoint and serve it until Ctrl-C or SIGTERM."""
    import uvicorn

    app = create_app(checkpoint, api_key=api_key, model_name=model_name, limits=limits, device=device,
                     max_batch=max_batch)
    sock = listen(host, port)
    address, port = sock.getsockname()[:2]
    url = f"http://{f'[{address}]' if ':' in address else address}:{port}"
    if api_key is None and address not in ("127.0.0.1", "::1"):
        print(f"gpt: warning: serving on {address} without --api-key: anyone who can reach this machine can "
              f"use the model", file=sys.stderr)
    print(f"serving model '{app.state.served.model_id}' at {url}/v1 (playground: {url}/, Ctrl-C stops); up to "
          f"{max_batch} requests decoded at once (--max-batch), more wait", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])

"""`gpt serve`: a trained model behind OpenAI's completions API, plus a playground page.

OpenAI's /v1/completions is what llama.cpp, vLLM and Ollama serve too, so every client written
for those (the official `openai` package first) can call this model unchanged:

    client = openai.OpenAI(base_url="http://127.0.0.1:8000/v1", api_key="unused")
    client.completions.create(model="small", prompt="Alice was", max_tokens=50)

Routes: GET /v1/models, POST /v1/completions (streamed as server-sent events with "stream": true),
GET /health, GET / (the page). Refusals use OpenAI's error body {"error": {"message", "type",
"param", "code"}} with a 4xx status. Generation runs in one worker thread (see serve_engine).
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
from collections.abc import Iterator
from contextlib import asynccontextmanager, contextmanager
from importlib.resources import files
from pathlib import Path

from fastapi import FastAPI, Request
from fastapi.responses import HTMLResponse, JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException

from gpt.checkpoint import Checkpoint, load_checkpoint
from gpt.config import UsageError
from gpt.retriever import Retriever
from gpt.serve_engine import Choice, Engine, Finished
from gpt.serve_schema import CompletionRequest, Limits, RequestError, parse_request

MAX_SEED = 2**63


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


def create_app(checkpoint: str | Path | Checkpoint, api_key: str | None = None, model_name: str | None = None,
               limits: Limits | None = None, device: str = "cpu") -> FastAPI:
    """An ASGI app serving one model: a checkpoint folder, or a Checkpoint already loaded."""
    if not isinstance(checkpoint, Checkpoint):
        model_name = model_name or Path(checkpoint).resolve().name
        checkpoint = load_checkpoint(checkpoint, device)
    model_id, limits, created = model_name or "wonderland-gpt", limits or Limits(), int(time.time())
    retriever = Retriever(checkpoint.tokenizer, checkpoint.model)
    engine = Engine(retriever)

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        yield
        engine.shutdown()

    app = FastAPI(title="wonderland-gpt", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.engine, app.state.model_id = engine, model_id

    @app.exception_handler(RequestError)
    async def refused(_: Request, err: RequestError) -> JSONResponse:
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(HTTPException)
    async def http_error(_: Request, err: HTTPException) -> JSONResponse:  # unknown route, wrong method
        return JSONResponse(RequestError(err.status_code, str(err.detail)).body(), status_code=err.status_code)

    @app.exception_handler(Exception)
    async def crashed(_: Request, err: Exception) -> JSONResponse:  # a bug: still a JSON body, and logged
        body = RequestError(500, f"internal error: {type(err).__name__}", kind="server_error").body()
        return JSONResponse(body, status_code=500)

    def authorize(request: Request) -> None:
        if api_key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), api_key.encode()):
            raise RequestError(401, "Incorrect or missing API key; send it as 'Authorization: Bearer KEY'",
                               code="invalid_api_key")

    def model_card() -> dict:
        return {"id": model_id, "object": "model", "created": created, "owned_by": "wonderland-gpt",
                "max_model_len": checkpoint.model_config.sequence_len}

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok", "model": model_id, **engine.stats()}

    @app.get("/", response_class=HTMLResponse)
    async def page() -> str:
        html = files("gpt").joinpath("serve_page.html").read_text(encoding="utf-8")
        settings = json.dumps({"model": model_id, "needsKey": api_key is not None, "maxTokens": limits.max_tokens})
        return html.replace("__SETTINGS__", settings.replace("<", "\\u003c"))

    @app.get("/v1/models")
    async def models(request: Request) -> dict:
        authorize(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{name:path}")
    async def one_model(name: str, request: Request) -> dict:
        authorize(request)
        if name != model_id:
            raise RequestError(404, f"The model '{name}' does not exist; this server has '{model_id}'",
                               param="model", code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        authorize(request)
        body = parse_request(await read_json(request, limits.max_body_bytes), limits)
        if body.model != model_id:
            raise RequestError(404, f"The model '{body.model}' does not exist; this server has '{model_id}'",
                               param="model", code="model_not_found")
        if body.seed is not None and not 0 <= body.seed < MAX_SEED:
            raise RequestError(400, f"seed must be between 0 and 2**63 - 1, got {body.seed}", param="seed")
        prompt_tokens = await asyncio.to_thread(lambda: [retriever.count_tokens(p) for p in body.prompts])
        if max(prompt_tokens) > limits.max_prompt_tokens:
            raise RequestError(400, f"The prompt is {max(prompt_tokens)} tokens; this server accepts at most "
                                    f"{limits.max_prompt_tokens}", param="prompt", code="context_length_exceeded")
        meta = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_id}
        if body.stream:
            return await stream_response(body, meta, sum(prompt_tokens))
        try:
            done = await engine.complete([p for p in body.prompts for _ in range(body.n)], seed=body.seed,
                                         **body.sampling())
        except UsageError as err:
            raise RequestError(400, str(err)) from None
        choices = [_choice(i, c.text, c.finish_reason) for i, c in enumerate(done)]
        return {**meta, "choices": choices, "usage": _usage(sum(prompt_tokens),
                                                             sum(c.completion_tokens for c in done))}

    async def stream_response(body: CompletionRequest, meta: dict, prompt_tokens: int) -> StreamingResponse:
        """Waits for the first event so that a refused request still gets a 4xx, not a broken stream."""
        choices = [Choice(i, prompt, None if body.seed is None else (body.seed + i) % MAX_SEED)
                   for i, prompt in enumerate(p for p in body.prompts for _ in range(body.n))]
        events = engine.stream(choices, **body.sampling())
        try:
            first = await anext(events)
        except UsageError as err:
            raise RequestError(400, str(err)) from None

        async def chunks():
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

        return StreamingResponse(chunks(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

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
          model_name: str | None = None, limits: Limits | None = None, device: str = "cpu") -> None:
    """Load the checkpoint and serve it until Ctrl-C or SIGTERM."""
    import uvicorn

    app = create_app(checkpoint, api_key=api_key, model_name=model_name, limits=limits, device=device)
    sock = listen(host, port)
    address, port = sock.getsockname()[:2]
    url = f"http://{f'[{address}]' if ':' in address else address}:{port}"
    if api_key is None and address not in ("127.0.0.1", "::1"):
        print(f"gpt: warning: serving on {address} without --api-key: anyone who can reach this machine can "
              f"use the model", file=sys.stderr)
    print(f"serving model '{app.state.model_id}' at {url}/v1 (playground: {url}/, Ctrl-C stops)", flush=True)
    config = uvicorn.Config(app, log_level="warning", timeout_graceful_shutdown=3)
    uvicorn.Server(config).run(sockets=[sock])

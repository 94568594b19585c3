"""The /v1/completions request: parsed strictly, checked against the server's limits, errors in OpenAI's shape.

Clients written for OpenAI (its Python client, LangChain, llama.cpp and vLLM front ends) send the
fields OpenAI defines, so every one of them is accepted; the few this server cannot honour are
accepted at their neutral value and refused otherwise, rather than silently ignored. A field
OpenAI does not define is refused as OpenAI refuses it ("Unrecognized request argument"), except
vLLM's sampling extras top_k, min_p and repetition_penalty, which the model supports.
"""

from __future__ import annotations

import json
from dataclasses import dataclass

from pydantic import BaseModel, ConfigDict, ValidationError

MAX_STOP_STRINGS = 4  # OpenAI's limit


class RequestError(Exception):
    """A request the server refuses: becomes {"error": {...}} with this HTTP status."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 kind: str = "invalid_request_error"):
        super().__init__(message)
        self.status, self.message, self.param, self.code, self.kind = status, message, param, code, kind

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


@dataclass
class Limits:
    """What one request may ask for: keeps a single client from holding the model for minutes."""

    max_tokens: int = 1024  # per choice
    max_prompt_tokens: int = 4096  # per prompt, as the tokenizer counts them
    max_choices: int = 16  # prompts x n
    max_body_bytes: int = 1 << 20


class StreamOptions(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")
    include_usage: bool = False


class CompletionRequest(BaseModel):
    model_config = ConfigDict(strict=True, extra="forbid")

    model: str
    prompt: str | list[str]
    max_tokens: int | None = 16  # OpenAI's default
    temperature: float | None = 1.0
    top_p: float | None = None
    n: int | None = 1
    stop: str | list[str] | None = None
    seed: int | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    user: str | None = None
    # OpenAI fields honoured only at their neutral value
    echo: bool | None = False
    logprobs: int | None = None
    best_of: int | None = None
    suffix: str | None = None
    frequency_penalty: float | None = 0.0
    presence_penalty: float | None = 0.0
    logit_bias: dict[str, float] | None = None
    # vLLM's sampling extras
    top_k: int | None = None
    min_p: float | None = None
    repetition_penalty: float | None = None

    @property
    def prompts(self) -> list[str]:
        return [self.prompt] if isinstance(self.prompt, str) else self.prompt

    @property
    def stops(self) -> list[str] | None:
        return [self.stop] if isinstance(self.stop, str) else self.stop

    def sampling(self) -> dict:
        """Keyword arguments for Retriever.stream / Retriever.complete."""
        return dict(max_new_tokens=self.max_tokens, temperature=self.temperature, top_p=self.top_p,
                    top_k=self.top_k, min_p=self.min_p, repetition_penalty=self.repetition_penalty,
                    stop=self.stops)


def _describe(error: dict) -> tuple[str, str]:
    """Pydantic's first error as (param, message) in the words an API user expects."""
    tags = ("str", "int", "float", "bool", "null")  # pydantic names the union member that failed; users don't care
    loc = [part for part in error["loc"] if isinstance(part, str) and part.isidentifier() and part not in tags]
    param = ".".join(loc) or None
    if error["type"] == "extra_forbidden":
        return param, f"Unrecognized request argument supplied: {param}"
    if error["type"] == "missing":
        return param, f"Missing required parameter: '{param}'"
    field = CompletionRequest.model_fields.get(param or "")
    expected = f"expected {field.annotation}".replace("NoneType", "null") if field else error["msg"].lower()
    return param, f"Invalid type for '{param}': {expected}, got {json.dumps(error['input'])[:200]}"


def parse_request(data: object, limits: Limits) -> CompletionRequest:
    """Decoded JSON -> a request within limits, or a RequestError (400) naming the offending field."""
    if not isinstance(data, dict):
        raise RequestError(400, "The request body must be a JSON object")
    try:
        request = CompletionRequest.model_validate(data)
    except ValidationError as err:
        param, message = _describe(err.errors()[0])
        raise RequestError(400, message, param) from None
    for field, default in (("max_tokens", 16), ("temperature", 1.0), ("n", 1), ("stream", False)):
        if getattr(request, field) is None:
            setattr(request, field, default)
    _check(request, limits)
    return request


def _check(request: CompletionRequest, limits: Limits) -> None:
    def refuse(param: str, message: str) -> None:
        raise RequestError(400, message, param)

    if not request.prompts:
        refuse("prompt", "prompt must be a string or a non-empty list of strings")
    if not 1 <= request.max_tokens <= limits.max_tokens:
        refuse("max_tokens", f"max_tokens must be between 1 and {limits.max_tokens}, got {request.max_tokens}")
    if not 0.0 <= request.temperature <= 2.0:
        refuse("temperature", f"temperature must be between 0 and 2, got {request.temperature}")
    if request.top_p is not None and not 0.0 < request.top_p <= 1.0:
        refuse("top_p", f"top_p must be in (0, 1], got {request.top_p}")
    if request.top_k is not None and request.top_k < 0:
        refuse("top_k", f"top_k must be >= 0 (0 turns it off), got {request.top_k}")
    if request.min_p is not None and not 0.0 <= request.min_p <= 1.0:
        refuse("min_p", f"min_p must be in [0, 1], got {request.min_p}")
    if request.repetition_penalty is not None and not request.repetition_penalty > 0:
        refuse("repetition_penalty", f"repetition_penalty must be > 0, got {request.repetition_penalty}")
    if request.n < 1:
        refuse("n", f"n must be at least 1, got {request.n}")
    if len(request.prompts) * request.n > limits.max_choices:
        refuse("n", f"prompts x n must be at most {limits.max_choices}, got {len(request.prompts) * request.n}")
    stops = request.stops or []
    if len(stops) > MAX_STOP_STRINGS or not all(stops):
        refuse("stop", f"stop must be at most {MAX_STOP_STRINGS} non-empty strings")
    unsupported = {"echo": not request.echo, "logprobs": request.logprobs is None, "suffix": request.suffix is None,
                   "best_of": request.best_of in (None, request.n), "logit_bias": not request.logit_bias,
                   "frequency_penalty": request.frequency_penalty == 0,
                   "presence_penalty": request.presence_penalty == 0}
    for param, neutral in unsupported.items():
        if not neutral:
            hint = " (repetition_penalty is supported)" if param.endswith("_penalty") else ""
            refuse(param, f"{param} is not supported by this server; leave it out{hint}")

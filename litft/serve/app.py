"""An OpenAI-compatible HTTP API over one model: FastAPI app, request/response schemas and errors.

Endpoints: ``GET /v1/models``, ``POST /v1/completions``, ``POST /v1/chat/completions`` (server-sent events with
``"stream": true``; OpenAI's ``logprobs``/``top_logprobs`` on chat, ``logprobs`` on completions, streamed too),
``GET /health`` (needs no key; ``{"status": "ok"}``, 503 while shutting down) and ``GET /metrics`` (the
scheduler's counters). Errors use OpenAI's shape ``{"error": {"message", "type", "param", "code"}}``: 400 bad
body or parameter (prompt too long for the context, more than 4 stop sequences, a chat template that cannot
render the messages included), 401 missing/wrong API key, 404 unknown model or route, 413 request body over
``max_request_bytes`` (refused before it is read whole), 503 queue full or shutting down.

Request bodies are parsed on the event loop (they are bounded), prompts are tokenized in worker threads, so
``/health`` and streaming keep answering while a long prompt is tokenized.

Beyond OpenAI's parameters, requests accept ``top_k``, ``min_p``, ``repetition_penalty`` and ``ignore_eos``
(as vLLM does).
"""

from __future__ import annotations

import asyncio
import hmac
import itertools
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, AsyncIterator, Callable, Literal, Optional, Sequence, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from litft.generate.engine import TokenLogprob
from litft.generate.sampling import SamplingParams
from litft.serve.cli import DEFAULT_MAX_REQUEST_BYTES
from litft.serve.scheduler import Event, Job, QueueFull, Scheduler, SchedulerStopped

if TYPE_CHECKING:
    from litft.api import LLM

log = logging.getLogger("litft.serve")

DEFAULT_COMPLETION_MAX_TOKENS = 16  # OpenAI's default for /v1/completions; chat defaults to the rest of the context
MAX_N = 16
MAX_STOP = 4  # OpenAI's limit on stop sequences
MAX_COMPLETION_LOGPROBS = 5  # OpenAI's limits on alternatives: /v1/completions' logprobs, chat's top_logprobs
MAX_TOP_LOGPROBS = 20
LOWEST_LOGPROB = -9999.0  # what OpenAI reports for a log-probability that is -inf (JSON has no infinity)
OPEN_PATHS = ("/health",)  # the only route that needs no API key when one is set
DISCONNECT_POLL_S = 0.25  # how often a non-streaming request checks that its client is still there

# ---------------------------------------------------------------------- errors


class APIError(Exception):
    """An error answered in OpenAI's JSON shape with ``status``."""

    def __init__(self, status: int, message: str, type: str = "invalid_request_error", param: Optional[str] = None,
                 code: Optional[str] = None) -> None:
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = status, message, type, param, code

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}

    def response(self) -> JSONResponse:
        headers = {"WWW-Authenticate": "Bearer"} if self.status == 401 else None
        return JSONResponse(self.body(), status_code=self.status, headers=headers)


def _validation_error(exc: RequestValidationError) -> APIError:
    errors = exc.errors()
    first = errors[0] if errors else {}
    loc = [str(x) for x in first.get("loc", ()) if x != "body"]
    if first.get("type") == "json_invalid":
        reason = first.get("ctx", {}).get("error", first.get("msg"))
        return APIError(400, f"the request body is not valid JSON: {reason}", code="invalid_json")
    if not loc:
        return APIError(400, f"the request body must be a JSON object: {first.get('msg', 'invalid')}",
                        code="invalid_body")
    param = loc[0]
    path = param + "".join(f"[{x}]" if x.isdigit() else f".{x}" for x in loc[1:])
    message = f"{path}: {first.get('msg', 'invalid value')}"
    if "input" in first and first.get("type") != "missing":
        message += f" (got {json.dumps(first['input'], default=str)[:100]})"
    if len(errors) > 1:
        message += f"; and {len(errors) - 1} more error(s)"
    return APIError(400, message, param=param, code="invalid_value")


class APIKeyMiddleware:
    """Require ``Authorization: Bearer <api_key>`` on every route but ``/health`` (``/v1/*``, ``/metrics``,
    ``/docs`` and ``/openapi.json`` included)."""

    def __init__(self, app: Any, api_key: str) -> None:
        self.app = app
        self.api_key = api_key.encode()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] == "http" and scope["path"] not in OPEN_PATHS:
            header = dict(scope.get("headers") or ()).get(b"authorization", b"")
            scheme, _, token = header.partition(b" ")
            if not header:
                error = APIError(401, "missing API key: send the header 'Authorization: Bearer <key>'",
                                 param=None, code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
            if scheme.lower() != b"bearer" or not hmac.compare_digest(token.strip(), self.api_key):
                error = APIError(401, "incorrect API key provided", code="invalid_api_key")
                await error.response()(scope, receive, send)
                return
        await self.app(scope, receive, send)


class BodySizeLimitMiddleware:
    """Answer 413 to a request whose body is larger than ``max_bytes``, before reading it: at once when its
    ``Content-Length`` says so, else (chunked upload) as soon as the bytes received pass the limit. A body that
    fits is read whole, then handed to the app."""

    def __init__(self, app: Any, max_bytes: int) -> None:
        self.app = app
        self.max_bytes = max_bytes

    def _too_large(self) -> JSONResponse:
        return APIError(413, f"the request body is larger than the server's limit of {self.max_bytes} bytes "
                             f"(litft serve --max_request_bytes)", code="request_too_large").response()

    async def __call__(self, scope: dict, receive: Callable, send: Callable) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        declared = dict(scope.get("headers") or ()).get(b"content-length", b"")
        if declared.isdigit() and int(declared) > self.max_bytes:
            await self._too_large()(scope, receive, send)
            return
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] != "http.request":  # the client went away mid-upload: nobody to answer
                return
            size += len(message.get("body", b""))
            if size > self.max_bytes:
                await self._too_large()(scope, receive, send)
                return
            chunks.append(message.get("body", b""))
            if not message.get("more_body", False):
                break
        body: Optional[bytes] = b"".join(chunks)

        async def replay() -> dict:
            nonlocal body
            if body is None:  # after the body: disconnect notices, as from the server
                return await receive()
            message, body = {"type": "http.request", "body": body, "more_body": False}, None
            return message

        await self.app(scope, replay, send)


# ---------------------------------------------------------------------- schemas


class _Body(BaseModel):
    # strict: no silent "5" -> 5 or true -> 1; unknown fields are ignored (clients add new ones over time)
    model_config = ConfigDict(strict=True, extra="ignore")


class StreamOptions(_Body):
    include_usage: bool = False


class _SamplingFields(_Body):
    model: str
    temperature: Optional[float] = Field(None, ge=0, le=2, description="0 = greedy; default 1")
    top_p: Optional[float] = Field(None, gt=0, le=1)
    n: Optional[int] = Field(None, ge=1, le=MAX_N)
    stream: Optional[bool] = False
    stream_options: Optional[StreamOptions] = None
    stop: Union[str, list[str], None] = None
    seed: Optional[int] = Field(None, ge=-(2**63), le=2**63 - 1)
    presence_penalty: Optional[float] = None
    frequency_penalty: Optional[float] = None
    logit_bias: Optional[dict[str, float]] = None
    user: Optional[str] = None
    # extensions (vLLM's names)
    top_k: Optional[int] = Field(None, ge=0)
    min_p: Optional[float] = Field(None, ge=0, le=1)
    repetition_penalty: Optional[float] = Field(None, gt=0)
    ignore_eos: Optional[bool] = False


class CompletionRequest(_SamplingFields):
    """``POST /v1/completions``."""

    prompt: Union[str, list[str], list[int], list[list[int]]]
    max_tokens: Optional[int] = Field(None, ge=1)
    echo: Optional[bool] = False
    logprobs: Optional[int] = Field(None, ge=0, le=MAX_COMPLETION_LOGPROBS,
                                    description="the sampled token's logprob and this many alternatives")
    best_of: Optional[int] = None
    suffix: Optional[str] = None


class TextPart(_Body):
    type: Literal["text"]
    text: str


class ChatMessage(_Body):
    role: str
    content: Union[str, list[TextPart], None] = None
    name: Optional[str] = None


class ResponseFormat(_Body):
    type: str


class ChatCompletionRequest(_SamplingFields):
    """``POST /v1/chat/completions``."""

    messages: list[ChatMessage] = Field(min_length=1)
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: Optional[bool] = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    tools: Optional[list[Any]] = None
    tool_choice: Optional[Any] = None
    response_format: Optional[ResponseFormat] = None


def _check_stop(body: _SamplingFields) -> None:
    if isinstance(body.stop, list) and len(body.stop) > MAX_STOP:
        raise APIError(400, f"stop: at most {MAX_STOP} stop sequences are allowed, got {len(body.stop)}",
                       param="stop", code="invalid_value")


def _unsupported(body: _SamplingFields, checks: dict[str, bool]) -> None:
    checks = {"presence_penalty": bool(body.presence_penalty), "frequency_penalty": bool(body.frequency_penalty),
              "logit_bias": bool(body.logit_bias), **checks}
    for name, used in checks.items():
        if used:
            raise APIError(400, f"{name} is not supported by this server", param=name, code="unsupported_parameter")


# ---------------------------------------------------------------------- the app


class _Server:
    """What the route handlers share: the model, its name, the scheduler."""

    def __init__(self, llm: "LLM", scheduler: Scheduler, model_name: str) -> None:
        self.llm = llm
        self.engine = llm.engine
        self.scheduler = scheduler
        self.model_name = model_name
        self.created = int(time.time())

    def public(self, message: str) -> str:
        """``message`` with the checkpoint's local path replaced by the model's name (errors go to clients)."""
        folder = self.llm.checkpoint_dir
        if folder is None:
            return message
        for path in sorted({str(folder.resolve()), str(folder)}, key=len, reverse=True):
            message = message.replace(path, self.model_name)
        return message

    def token_text(self, token_id: int) -> str:
        """The text of one token, as logprobs show it."""
        return self.llm.tokenizer.decode([token_id])

    def check_model(self, name: str) -> None:
        if name != self.model_name:
            raise APIError(404, f"the model {name!r} does not exist: this server serves {self.model_name!r}",
                           param="model", code="model_not_found")

    def params(self, body: _SamplingFields, max_tokens: int, n_index: int) -> SamplingParams:
        seed = None if body.seed is None else body.seed + n_index  # n choices with one seed: different samples
        try:
            return SamplingParams(
                max_new_tokens=max_tokens, temperature=1.0 if body.temperature is None else body.temperature,
                top_k=body.top_k, top_p=1.0 if body.top_p is None else body.top_p,
                min_p=body.min_p or 0.0, repetition_penalty=body.repetition_penalty or 1.0, seed=seed,
                stop=body.stop or (), stop_token_ids=[] if body.ignore_eos else None)
        except ValueError as e:
            param = str(e).split("=", 1)[0] if "=" in str(e) else None
            raise APIError(400, str(e), param={"max_new_tokens": "max_tokens"}.get(param, param),
                           code="invalid_value") from None

    def check_prompt(self, ids: list[int], max_tokens: Optional[int], default: Optional[int], param: str) -> int:
        """Validate prompt ids against the vocabulary and the context; returns max_tokens (its default filled)."""
        limit = self.engine.max_seq_length
        if not ids:
            raise APIError(400, f"{param} is empty", param=param, code="invalid_value")
        tokens = max_tokens if max_tokens is not None else (default if default is not None else limit - len(ids))
        tokens = max(tokens, 1)
        if len(ids) + tokens > limit:
            raise APIError(400, f"This model's maximum context length is {limit} tokens. However, you requested "
                                f"{len(ids) + tokens} tokens ({len(ids)} in the prompt, {tokens} for the completion). "
                                f"Please reduce the length of the prompt or of max_tokens.",
                           param=param, code="context_length_exceeded")
        try:
            self.engine.check_prompt(ids, SamplingParams(max_new_tokens=tokens, stop_token_ids=[]))
        except ValueError as e:
            raise APIError(400, f"{param}: {e}", param=param, code="invalid_value") from None
        return tokens

    def submit(self, prompts: Sequence[list[int]], params: Sequence[SamplingParams],
               logprobs: Optional[int] = None) -> tuple[list[Job], asyncio.Queue]:
        capacity = self.scheduler.max_batch_size + self.scheduler.max_queue
        if len(prompts) > capacity:
            raise APIError(400, f"this request asks for {len(prompts)} completions (prompts × n) but the server holds "
                                f"at most {capacity} (max_batch_size + max_queue): split it", param="prompt",
                           code="too_many_completions")
        try:
            return self.scheduler.submit(prompts, params, logprobs)
        except QueueFull as e:
            raise APIError(503, str(e), type="server_error", code="queue_full") from None
        except SchedulerStopped as e:
            raise APIError(503, str(e), type="server_error", code="shutting_down") from None


async def _events(queue: asyncio.Queue, count: int) -> AsyncIterator[list[Event]]:
    """Yield batches of events (everything already queued) until ``count`` jobs have ended."""
    ended = 0
    while ended < count:
        batch = [await queue.get()]
        while not queue.empty():
            batch.append(queue.get_nowait())
        ended += sum(e.last for e in batch)
        yield batch


async def _collect(server: _Server, request: Request, jobs: list[Job], queue: asyncio.Queue) -> Optional[list[Event]]:
    """Wait for every job of a non-streaming request. Returns one merged event per job (all text, the finish
    reason and counts), or None when the client went away (its jobs are cancelled at once)."""
    merged = [Event(job.index) for job in jobs]
    ended = 0
    getter: Optional[asyncio.Task] = None
    checked = time.monotonic()
    try:
        while ended < len(jobs):
            if time.monotonic() - checked >= DISCONNECT_POLL_S:  # events may arrive every step: check by the clock
                if await request.is_disconnected():
                    return None
                checked = time.monotonic()
            getter = getter or asyncio.ensure_future(queue.get())
            done, _ = await asyncio.wait({getter}, timeout=DISCONNECT_POLL_S)
            if not done:
                continue
            event, getter = getter.result(), None
            m = merged[event.index]
            m.text += event.text
            m.logprobs += event.logprobs
            if event.error is not None:
                raise APIError(500, event.error, type="server_error", code="generation_failed")
            if event.last:
                m.finish_reason, m.prompt_tokens, m.completion_tokens = (
                    event.finish_reason, event.prompt_tokens, event.completion_tokens)
                ended += 1
    finally:
        if getter is not None:
            getter.cancel()
        server.scheduler.cancel([j for j in jobs if not j.done])
    return merged


# answered to a client that disconnected before its completion was ready (nobody reads it)
def _gone() -> JSONResponse:
    return APIError(499, "client closed the request", code="client_closed_request").response()


def _usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def _stream(server: _Server, jobs: list[Job], queue: asyncio.Queue, make_chunk: Callable[[Event, bool], dict],
            base: dict, prompt_tokens: int, include_usage: bool, role_chunk: Optional[Callable[[int], dict]] = None,
            ) -> StreamingResponse:
    """Server-sent events: ``data: {chunk}`` per piece of text, an optional usage chunk, ``data: [DONE]``."""

    async def body() -> AsyncIterator[str]:
        completion_tokens = 0
        try:
            if role_chunk is not None:
                yield _sse({**base, "choices": [role_chunk(job.index) for job in jobs]})
            async for batch in _events(queue, len(jobs)):
                choices = []
                for event in batch:
                    if event.error is not None:
                        yield _sse(APIError(500, event.error, type="server_error", code="generation_failed").body())
                        return
                    if event.text or event.logprobs:
                        choices.append(make_chunk(Event(event.index, event.text, event.logprobs), False))
                    if event.last:
                        completion_tokens += event.completion_tokens
                        choices.append(make_chunk(Event(event.index, "", finish_reason=event.finish_reason), True))
                for choice in choices:  # one chunk per choice, as OpenAI sends them
                    yield _sse({**base, "choices": [choice]})
            if include_usage:
                yield _sse({**base, "choices": [], "usage": _usage(prompt_tokens, completion_tokens)})
            yield "data: [DONE]\n\n"
        finally:  # the client went away (the task is cancelled) or the stream ended: free the rows now
            server.scheduler.cancel([j for j in jobs if not j.done])

    return StreamingResponse(body(), media_type="text/event-stream",
                             headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})


def create_app(llm: "LLM", model_name: str, api_key: Optional[str] = None, max_batch_size: int = 32,
               max_queue: int = 256, max_request_bytes: int = DEFAULT_MAX_REQUEST_BYTES) -> FastAPI:
    """The FastAPI app serving ``llm`` under ``model_name``; its scheduler starts and stops with the app's lifespan
    (``app.state.scheduler``).

    Args:
        llm: the loaded model (:meth:`litft.LLM.load`); the app owns its engine while it runs.
        model_name: the ``model`` clients must name (``GET /v1/models`` lists it).
        api_key: when set, every route but ``/health`` (``/v1/*``, ``/metrics``, ``/docs``, ``/openapi.json``)
            requires ``Authorization: Bearer <api_key>``.
        max_batch_size: the most requests that decode together (KV cache rows).
        max_queue: the most requests waiting for a row; beyond it the server answers 503.
        max_request_bytes: the largest request body; a larger one gets 413 before it is read.
    """
    if max_request_bytes < 1:
        raise ValueError(f"max_request_bytes={max_request_bytes} is invalid: expected an integer >= 1")
    scheduler = Scheduler(llm.engine, max_batch_size=max_batch_size, max_queue=max_queue)
    server = _Server(llm, scheduler, model_name)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        # the KV cache is allocated and the engine warmed up before the server accepts its first connection
        # (connections made meanwhile wait in the listening socket's backlog)
        await asyncio.to_thread(scheduler.start)
        try:
            yield
        finally:
            await asyncio.to_thread(scheduler.stop)

    app = FastAPI(title="litft", summary=f"OpenAI-compatible API serving {model_name}", lifespan=lifespan)
    app.state.scheduler = scheduler
    app.state.model_name = model_name
    app.add_middleware(BodySizeLimitMiddleware, max_bytes=max_request_bytes)
    if api_key:  # added last: runs first, so that a request without the key is refused before its body is read
        app.add_middleware(APIKeyMiddleware, api_key=api_key)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        return _validation_error(exc).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "invalid_request_error" if exc.status_code < 500 else "server_error"
        message = f"{request.method} {request.url.path}: {exc.detail}"
        return APIError(exc.status_code, message, type=kind, code=str(exc.status_code)).response()

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error in %s %s", request.method, request.url.path)
        # the text of an unexpected exception may hold local paths or data: it goes to the log only
        return APIError(500, "internal server error (the server's log has the details)",
                        type="server_error").response()

    @app.get("/health", response_model=None)
    async def health() -> Union[dict[str, Any], JSONResponse]:
        if scheduler.running:
            return {"status": "ok"}
        return JSONResponse({"status": "stopping"}, status_code=503)

    @app.get("/metrics")
    async def metrics() -> dict[str, Any]:
        return {"model": model_name, **scheduler.stats()}

    @app.get("/v1/models")
    async def list_models() -> dict[str, Any]:
        return {"object": "list", "data": [_model_card(server)]}

    @app.get("/v1/models/{model:path}")
    async def get_model(model: str) -> dict[str, Any]:
        server.check_model(model)
        return _model_card(server)

    @app.post("/v1/completions", response_model=None)
    async def completions(body: CompletionRequest, request: Request) -> Union[dict[str, Any], StreamingResponse]:
        server.check_model(body.model)
        _unsupported(body, {"echo": bool(body.echo), "best_of": body.best_of not in (None, 1),
                            "suffix": bool(body.suffix)})
        _check_stop(body)
        ids_list, params, prompt_tokens = await asyncio.to_thread(_completion_jobs, server, body)
        jobs, queue = server.submit(ids_list, params, body.logprobs)
        base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion", "created": int(time.time()),
                "model": model_name}
        offsets = [0] * len(jobs)  # text_offset of each choice's next token

        def logprobs(event: Event) -> Optional[dict[str, Any]]:
            if body.logprobs is None:
                return None
            out = _completion_logprobs(server, event.logprobs, offsets[event.index])
            offsets[event.index] += sum(len(t) for t in out["tokens"])
            return out

        if body.stream:
            def chunk(event: Event, last: bool) -> dict:
                return {"index": event.index, "text": event.text, "logprobs": None if last else logprobs(event),
                        "finish_reason": event.finish_reason if last else None}
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(server, jobs, queue, chunk, base, prompt_tokens, include_usage)
        results = await _collect(server, request, jobs, queue)
        if results is None:
            return _gone()
        choices = [{"index": r.index, "text": r.text, "logprobs": logprobs(r), "finish_reason": r.finish_reason}
                   for r in results]
        return {**base, "choices": choices, "usage": _usage(prompt_tokens, sum(r.completion_tokens for r in results))}

    @app.post("/v1/chat/completions", response_model=None)
    async def chat_completions(body: ChatCompletionRequest,
                               request: Request) -> Union[dict[str, Any], StreamingResponse]:
        server.check_model(body.model)
        _unsupported(body, {"tools": bool(body.tools), "tool_choice": body.tool_choice not in (None, "none"),
                            "response_format": body.response_format is not None
                            and body.response_format.type != "text"})
        if body.top_logprobs is not None and not body.logprobs:
            raise APIError(400, "top_logprobs needs logprobs: true", param="top_logprobs", code="invalid_value")
        _check_stop(body)
        ids, max_tokens = await asyncio.to_thread(_chat_job, server, body)
        n = body.n or 1
        alternatives = (body.top_logprobs or 0) if body.logprobs else None
        jobs, queue = server.submit([ids] * n, [server.params(body, max_tokens, j) for j in range(n)], alternatives)

        def logprobs(event: Event) -> Optional[dict[str, Any]]:
            return _chat_logprobs(server, event.logprobs) if body.logprobs else None

        base = {"id": f"chatcmpl-{uuid.uuid4().hex}", "object": "chat.completion.chunk" if body.stream
                else "chat.completion", "created": int(time.time()), "model": model_name}
        if body.stream:
            def chunk(event: Event, last: bool) -> dict:
                delta = {} if last else {"content": event.text}
                return {"index": event.index, "delta": delta, "logprobs": None if last else logprobs(event),
                        "finish_reason": event.finish_reason if last else None}

            def role(index: int) -> dict:
                return {"index": index, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                        "finish_reason": None}
            include_usage = bool(body.stream_options and body.stream_options.include_usage)
            return _stream(server, jobs, queue, chunk, base, len(ids), include_usage, role_chunk=role)
        results = await _collect(server, request, jobs, queue)
        if results is None:
            return _gone()
        choices = [{"index": r.index, "message": {"role": "assistant", "content": r.text},
                    "logprobs": logprobs(r), "finish_reason": r.finish_reason} for r in results]
        return {**base, "choices": choices, "usage": _usage(len(ids), sum(r.completion_tokens for r in results))}

    return app


def _logprob(value: float) -> float:
    return max(value, LOWEST_LOGPROB)


def _completion_logprobs(server: _Server, entries: list[TokenLogprob], offset: int) -> dict[str, Any]:
    """``/v1/completions``' ``logprobs`` object for ``entries``, the first token at ``offset`` in the text."""
    tokens = [server.token_text(e.id) for e in entries]
    starts = list(itertools.accumulate((len(t) for t in tokens[:-1]), initial=offset))
    return {"tokens": tokens, "token_logprobs": [_logprob(e.logprob) for e in entries],
            "top_logprobs": [{server.token_text(i): _logprob(v) for i, v in e.top} for e in entries],
            "text_offset": starts if tokens else []}


def _chat_logprobs(server: _Server, entries: list[TokenLogprob]) -> dict[str, Any]:
    """Chat completions' ``logprobs`` object (``content``: one item per token) for ``entries``."""
    def item(token_id: int, value: float) -> dict[str, Any]:
        text = server.token_text(token_id)
        return {"token": text, "logprob": _logprob(value), "bytes": list(text.encode("utf-8"))}

    return {"content": [{**item(e.id, e.logprob), "top_logprobs": [item(i, v) for i, v in e.top]} for e in entries],
            "refusal": None}


def _model_card(server: _Server) -> dict[str, Any]:
    return {"id": server.model_name, "object": "model", "created": server.created, "owned_by": "litft",
            "max_model_len": server.engine.max_seq_length}


def _completion_jobs(server: _Server,
                     body: CompletionRequest) -> tuple[list[list[int]], list[SamplingParams], int]:
    """The prompts (tokenized: run in a worker thread) and sampling parameters of every choice of a completion
    request, and its prompt token count."""
    prompts = _completion_prompts(server, body.prompt)
    n = body.n or 1
    ids_list, params = [], []
    for ids in prompts:
        max_tokens = server.check_prompt(ids, body.max_tokens, DEFAULT_COMPLETION_MAX_TOKENS, "prompt")
        for j in range(n):
            ids_list.append(ids)
            params.append(server.params(body, max_tokens, j))
    return ids_list, params, sum(len(ids) for ids in prompts)


def _chat_job(server: _Server, body: ChatCompletionRequest) -> tuple[list[int], int]:
    """The rendered, tokenized conversation (run in a worker thread) and max_tokens with its default filled."""
    ids = _chat_prompt(server, body.messages)
    requested = body.max_completion_tokens if body.max_completion_tokens is not None else body.max_tokens
    return ids, server.check_prompt(ids, requested, None, "messages")


def _completion_prompts(server: _Server, prompt: Union[str, list[str], list[int], list[list[int]]]) -> list[list[int]]:
    """Token ids of each prompt: a string, a list of strings, a list of ids or a list of lists of ids."""
    if isinstance(prompt, str):
        prompt = [prompt]
    if not prompt:
        raise APIError(400, "prompt is an empty list: give a string or a list of strings", param="prompt",
                       code="invalid_value")
    if isinstance(prompt[0], int):
        return [list(prompt)]  # one prompt as token ids
    out = []
    for i, p in enumerate(prompt):
        if isinstance(p, str):
            if not p:
                raise APIError(400, f"prompt[{i}] is an empty string", param="prompt", code="invalid_value")
            out.append(server.llm.encode(p))
        else:
            out.append(list(p))
    return out


def _chat_prompt(server: _Server, messages: list[ChatMessage]) -> list[int]:
    """The conversation rendered with the checkpoint's chat template, as token ids."""
    if not server.llm.tokenizer.has_chat_template:
        raise APIError(400, "this model has no chat template (its tokenizer_config.json has no chat_template): use "
                            "/v1/completions", param="messages", code="no_chat_template")
    plain = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "".join(p.text for p in (m.content or []))
        plain.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    try:
        return server.llm.encode_chat(plain)
    except ValueError as e:  # bad roles, the template refused the conversation (e.g. roles must alternate) or failed
        raise APIError(400, server.public(str(e)), param="messages", code="invalid_value") from None
    except Exception as e:  # noqa: BLE001 - a template can fail in any way at render time (e.g. {% include %})
        log.warning("the chat template cannot render a request's messages: %s: %s", type(e).__name__, e)
        raise APIError(400, f"messages: the model's chat template cannot render them ({type(e).__name__}: "
                            f"{server.public(str(e))}); the template must be fixed on the server",
                       param="messages", code="chat_template_error") from None

"""The OpenAI-compatible HTTP API (FastAPI) in front of a `BatchWorker`.

Each generation request becomes one row of the running batch. Its tokens arrive on the worker thread and are
handed to the event loop; the handler turns them into text (stop strings cut, streamed as server-sent events in
OpenAI's chunk format when asked). A client that goes away, or a request that runs past the timeout, cancels
its row at the next step.
"""
from __future__ import annotations

import asyncio
import hmac
import json
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from starlette.exceptions import HTTPException

from ..engine import ContextLengthError, Sampling
from ..engine.batching import BatchRequest
from ..runtime import LLM
from . import protocol
from .protocol import APIError, ChatCompletionRequest, CompletionRequest
from .text import TextStream
from .worker import BatchWorker, Job, QueueFull

DISCONNECT_POLL_S = 0.5  # how often a non-streamed request checks that its client is still there
_NOTHING_YET = object()


class _WorkerMetrics:
    """Prometheus collector reading the worker's figures at scrape time."""

    def __init__(self, worker: BatchWorker):
        self.worker = worker

    def collect(self):
        worker = self.worker
        yield CounterMetricFamily("llmdrop_rt_prompt_tokens", "Prompt tokens prefilled", value=worker.prompt_tokens)
        yield CounterMetricFamily("llmdrop_rt_generated_tokens", "Tokens generated",
                                  value=worker.generated_tokens)
        yield CounterMetricFamily("llmdrop_rt_prefill_seconds", "Time spent prefilling joining requests",
                                  value=worker.prefill_seconds)
        yield CounterMetricFamily("llmdrop_rt_decode_seconds", "Time spent in decode steps",
                                  value=worker.decode_seconds)
        yield CounterMetricFamily("llmdrop_rt_decode_tokens", "Tokens made by decode steps (first tokens come "
                                  "from prefill)", value=worker.decode_tokens)
        finished = CounterMetricFamily("llmdrop_rt_finished_requests", "Generations ended, by finish reason",
                                       labels=["reason"])
        for reason, count in sorted(dict(worker.finished).items()):
            finished.add_metric([reason], count)
        yield finished
        yield GaugeMetricFamily("llmdrop_rt_queue_depth", "Requests waiting for a row", value=worker.queue_depth)
        yield GaugeMetricFamily("llmdrop_rt_running_requests", "Requests in the decode batch",
                                value=worker.running)
        yield GaugeMetricFamily("llmdrop_rt_tokens_per_second", "Tokens generated per second, last 10 s",
                                value=worker.tokens_per_second())


class _Generation:
    """One request's row: its tokens as they arrive, read until it finishes, fails, times out or is left."""

    def __init__(self, request: BatchRequest, deadline: float, http_request: Request):
        self.request, self.deadline, self.http_request = request, deadline, http_request
        self.loop = asyncio.get_running_loop()
        self.queue: asyncio.Queue = asyncio.Queue()
        self.job = Job(request, self._deliver)

    def _deliver(self, item):
        """Called on the worker thread."""
        try:
            self.loop.call_soon_threadsafe(self.queue.put_nowait, item)
        except RuntimeError:  # the event loop has closed: the server is shutting down, nobody is listening
            pass

    async def tokens(self, watch_client: bool):
        """The request's tokens; ends early (cancelling the row) when `watch_client` sees the client gone."""
        next_check = time.monotonic() + DISCONNECT_POLL_S
        try:
            while True:
                remaining = self.deadline - time.monotonic()
                if remaining <= 0:
                    raise APIError(504, "the request ran past the server's time limit", code="timeout",
                                   kind="server_error")
                try:
                    item = await asyncio.wait_for(self.queue.get(), min(remaining, DISCONNECT_POLL_S))
                except asyncio.TimeoutError:
                    item = _NOTHING_YET
                if watch_client and time.monotonic() >= next_check:
                    if await self.http_request.is_disconnected():
                        return
                    next_check = time.monotonic() + DISCONNECT_POLL_S
                if item is _NOTHING_YET:
                    continue
                if item is None:
                    return
                if isinstance(item, Exception):
                    raise APIError(500, f"generation failed: {item}", kind="server_error")
                yield item
        finally:
            self.request.cancel()  # a no-op once the row has finished


def create_app(llm: LLM, worker: BatchWorker, model_name: str, api_key: str | None = None,
               timeout_s: float = 600.0) -> FastAPI:
    app = FastAPI(title="llmdrop-rt", docs_url=None, redoc_url=None, openapi_url=None)
    registry = CollectorRegistry()
    registry.register(_WorkerMetrics(worker))
    requests_total = Counter("llmdrop_rt_requests", "HTTP requests answered", ["path", "status"],
                             registry=registry)
    batcher, tokenizer = worker.batcher, llm.tokenizer
    created = int(time.time())

    @app.middleware("http")
    async def check_key_and_count(request: Request, call_next):
        if api_key is not None and not _key_matches(request.headers.get("authorization", ""), api_key):
            response = _error(APIError(401, "missing or incorrect API key (send 'Authorization: Bearer KEY')",
                                       code="invalid_api_key"))
        else:
            response = await call_next(request)
        route = request.scope.get("route")
        requests_total.labels(route.path if route else "other", str(response.status_code)).inc()
        return response

    @app.exception_handler(APIError)
    async def api_error(request, error: APIError):
        return _error(error)

    @app.exception_handler(RequestValidationError)
    async def invalid_body(request, error: RequestValidationError):
        return _error(_validation_error(error))

    @app.exception_handler(HTTPException)
    async def http_error(request, error: HTTPException):
        return _error(APIError(error.status_code, str(error.detail)))

    @app.get("/health")
    async def health():
        return {"status": "ok", "running": worker.running, "waiting": worker.queue_depth}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(generate_latest(registry), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [_model_card(model_name, created)]}

    @app.get("/v1/models/{name}")
    async def model(name: str):
        if name != model_name:
            raise APIError(404, f"the model {name!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        return _model_card(model_name, created)

    def start(body, prompt: list[int], max_tokens: int | None, prompt_field: str, http_request: Request):
        """Queue the request as a row; its _Generation and TextStream."""
        if body.model not in (None, model_name):
            raise APIError(404, f"the model {body.model!r} does not exist; this server serves {model_name!r}",
                           param="model", code="model_not_found")
        max_tokens = max_tokens or max(1, batcher.max_len - len(prompt))
        try:
            batcher.check(len(prompt), max_tokens)
        except ContextLengthError:
            raise APIError(400, f"{prompt_field} of {len(prompt)} tokens + max_tokens={max_tokens} exceeds the "
                                f"context of {batcher.max_len} tokens", param=prompt_field,
                           code="context_length_exceeded") from None
        except ValueError as error:
            raise APIError(400, str(error), param=prompt_field) from None
        text = TextStream(tokenizer, body.stop)
        request = BatchRequest(prompt, max_tokens, Sampling(body.temperature, 0, body.top_p, body.seed),
                               frozenset(llm.eos_ids), text.stop_reached if body.stop else None)
        generation = _Generation(request, time.monotonic() + timeout_s, http_request)
        try:
            worker.submit(generation.job)
        except QueueFull as error:
            raise APIError(503, str(error), code="queue_full", kind="server_error") from None
        return generation, text

    async def answer(body, generation: _Generation, text: TextStream, chat: bool):
        id_ = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            return StreamingResponse(_events(body, generation, text, chat, id_, model_name),
                                     media_type="text/event-stream")
        async for token in generation.tokens(watch_client=True):
            text.push(token)
        request = generation.request
        if request.finish_reason in (None, "cancelled"):
            return _error(APIError(499, "the client closed the request"))
        counts = protocol.usage(len(request.prompt), len(request.tokens))
        build = protocol.chat_completion if chat else protocol.completion
        return build(id_, model_name, text.text(), request.finish_reason, counts)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, http_request: Request):
        prompt = body.prompt if isinstance(body.prompt, list) else tokenizer.encode(body.prompt)
        vocab = llm.cfg.vocab_size
        if any(not 0 <= token < vocab for token in prompt):
            raise APIError(400, f"prompt: token ids must be in [0, {vocab}), the model's vocabulary",
                           param="prompt")
        generation, text = start(body, prompt, body.max_tokens, "prompt", http_request)
        return await answer(body, generation, text, chat=False)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, http_request: Request):
        try:
            rendered = llm.chat_prompt([{"role": m.role, "content": m.text()} for m in body.messages])
        except Exception as error:  # the model's own template may raise on a conversation it does not accept
            raise APIError(400, f"the model's chat template refused these messages: {error}",
                           param="messages") from None
        generation, text = start(body, tokenizer.encode(rendered), body.token_limit(), "messages", http_request)
        return await answer(body, generation, text, chat=True)

    return app


async def _events(body, generation: _Generation, text: TextStream, chat: bool, id_: str, model_name: str):
    """The server-sent events of a streamed answer, ending with `data: [DONE]`."""
    def chunk(piece: str | None, finish_reason: str | None = None) -> str:
        if chat:
            delta = {} if piece is None else {"content": piece}
            return _sse(protocol.chat_chunk(id_, model_name, delta, finish_reason))
        return _sse(protocol.completion_chunk(id_, model_name, piece or "", finish_reason))

    if chat:
        yield _sse(protocol.chat_chunk(id_, model_name, {"role": "assistant", "content": ""}, None))
    try:
        async for token in generation.tokens(watch_client=False):
            piece = text.push(token)
            if piece:
                yield chunk(piece)
    except APIError as error:
        yield _sse(error.body())
        yield "data: [DONE]\n\n"
        return
    request = generation.request
    rest = text.finish()
    if rest:
        yield chunk(rest)
    yield chunk(None, request.finish_reason)
    if body.stream_options is not None and body.stream_options.include_usage:
        kind = "chat.completion.chunk" if chat else "text_completion"
        counts = protocol.usage(len(request.prompt), len(request.tokens))
        yield _sse(protocol.usage_chunk(id_, model_name, kind, counts))
    yield "data: [DONE]\n\n"


def _sse(payload: dict) -> str:
    return f"data: {json.dumps(payload, ensure_ascii=False)}\n\n"


def _error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _key_matches(header: str, api_key: str) -> bool:
    scheme, _, given = header.partition(" ")
    return scheme.lower() == "bearer" and hmac.compare_digest(given.strip().encode(), api_key.encode())


def _model_card(name: str, created: int) -> dict:
    return {"id": name, "object": "model", "created": created, "owned_by": "llmdrop-rt"}


def _validation_error(error: RequestValidationError) -> APIError:
    """The first problem pydantic found, naming the field (as `messages.0.role`)."""
    first = error.errors()[0]
    if first.get("type") == "json_invalid":
        return APIError(400, "the request body is not valid JSON")
    # Tried members of a union add their type to the location (`prompt`, `str`): keep field names and indices.
    path = ".".join(str(part) for part in first.get("loc", ()) if isinstance(part, int) or part in protocol.FIELDS)
    message = first.get("msg", "invalid value")
    return APIError(400, f"{path}: {message}" if path else message, param=path or None)

"""The FastAPI app of ``distil serve``: OpenAI's ``/v1/models``, ``/v1/completions`` and
``/v1/chat/completions`` over any ``Teacher`` engine, plus ``/health``.

Every error is OpenAI's body {"error": {message, type, param, code}}: a request FastAPI
would answer 422 is answered 400, an unknown model 404, a ``DistilError`` of the engine (a
cascade cannot score) 400, a request over ``max_concurrency`` in flight 429 at once with
``Retry-After: 1``. ``/health`` counts the engine calls, so batching can be seen.
"""

from __future__ import annotations

import contextlib
import time
import uuid

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException
from starlette.responses import StreamingResponse

from stages.config import ServeConfig
from stages.errors import DistilError
from stages.lm.serve.answers import Answers
from stages.lm.serve.batching import Batcher
from stages.lm.serve.protocol import APIError, ChatRequest, CompletionRequest, error_body, validation_message
from stages.lm.serve.render import JSON, chat_choice, chat_chunks, completion_choice, completion_chunks, envelope, sse, usage
from stages.lm.teachers.vocabulary import tokenizer_fingerprint

ROUTES = "GET /health, GET /v1/models, POST /v1/completions and POST /v1/chat/completions"


def build_app(engine, cfg: ServeConfig, name: str) -> FastAPI:
    """The app serving ``engine`` (any ``Teacher``: a model, or a cascade whose completions
    carry ``extra["distil"]``) as the model ``name``. It does not close the engine."""
    batcher = Batcher(engine, max_batch=cfg.max_batch, wait_s=cfg.batch_wait_ms / 1000)
    answers = Answers(engine, batcher, cfg, name)
    started = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app):
        yield
        batcher.close()

    app = FastAPI(title="distil serve", lifespan=lifespan, default_response_class=JSON, docs_url=None, redoc_url=None)
    app.state.batcher = batcher
    _errors(app)
    app.add_middleware(InFlightLimit, limit=cfg.max_concurrency)

    @app.get("/health")
    async def health() -> JSON:
        b = batcher
        return JSON({"status": "ok", "requests": b.requests, "batches": b.batches, "prompts": b.prompts, "scores": b.scores})

    @app.get("/v1/models")
    async def models() -> JSON:
        card = {"id": name, "object": "model", "created": started, "owned_by": "distil"}
        if engine.context is not None:
            card["max_model_len"] = engine.context  # vLLM's extension
        if engine.tokenizer is not None:
            card["tokenizer"] = tokenizer_fingerprint(engine.tokenizer)
        return JSON({"object": "list", "data": [card]})

    async def respond(ask, req, chat: bool) -> JSON | StreamingResponse:
        """One completion or chat response (or its SSE stream) for the parsed request ``ask``."""
        choices, prompt_tokens = await answers.answer(ask)
        names, used = answers.names(bool(req.return_tokens_as_token_ids)), usage(prompt_tokens, sum(c.count for c in choices))
        rid, now = f"{'chatcmpl' if chat else 'cmpl'}-{uuid.uuid4().hex}", int(time.time())
        if req.stream:
            chunks = chat_chunks if chat else completion_chunks
            parts = (part for c in choices for part in chunks(c, names))
            return _stream("chat.completion.chunk" if chat else "text_completion", rid, now, name, parts, used, req.stream_options)
        render = chat_choice if chat else completion_choice
        return JSON(envelope("chat.completion" if chat else "text_completion", rid, now, name, [render(c, names) for c in choices], used))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await respond(answers.completion(req), req, chat=False)

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        return await respond(answers.chat(req), req, chat=True)

    return app


def _stream(kind: str, rid: str, created: int, model: str, parts, used: dict, options) -> StreamingResponse:
    """Server-sent events, one choice delta per chunk; with ``stream_options.include_usage``
    every chunk has ``usage: null`` and a last chunk with no choices carries the usage."""
    with_usage = bool(options and options.include_usage)

    def events():
        for part in parts:
            yield envelope(kind, rid, created, model, [part], None if with_usage else False)
        if with_usage:
            yield envelope(kind, rid, created, model, [], used)

    return StreamingResponse(sse(events()), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})


def _errors(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def api_error(_request: Request, exc: APIError) -> JSON:
        return JSON(error_body(exc.message, exc.type, exc.param, exc.code), status_code=exc.status, headers=exc.headers)

    @app.exception_handler(RequestValidationError)
    async def invalid(_request: Request, exc: RequestValidationError) -> JSON:
        message, param = validation_message(list(exc.errors()))
        return JSON(error_body(message, param=param), status_code=400)

    @app.exception_handler(DistilError)
    async def refused(_request: Request, exc: DistilError) -> JSON:
        return JSON(error_body(str(exc)), status_code=400)

    @app.exception_handler(HTTPException)
    async def http(request: Request, exc: HTTPException) -> JSON:
        message = (
            f"no route {request.method} {request.url.path}; this server answers {ROUTES}"
            if exc.status_code in (404, 405)
            else str(exc.detail)
        )
        return JSON(
            error_body(message, code=str(exc.status_code)), status_code=exc.status_code, headers=getattr(exc, "headers", None)
        )

    @app.exception_handler(Exception)
    async def failed(_request: Request, exc: Exception) -> JSON:  # logged by uvicorn too
        return JSON(error_body(f"the engine failed: {type(exc).__name__}: {exc}", "server_error"), status_code=500)


class InFlightLimit:
    """At most ``limit`` POST requests in flight (a stream until its last chunk); one more is
    answered 429 at once, as OpenAI's rate limit is, with ``Retry-After: 1``."""

    def __init__(self, app, limit: int):
        self.app, self.limit, self.active = app, limit, 0

    async def __call__(self, scope, receive, send) -> None:
        if scope["type"] != "http" or scope["method"] != "POST":
            return await self.app(scope, receive, send)
        if self.active >= self.limit:
            message = f"the server has {self.active} requests in flight, its limit (serve.max_concurrency); retry in a second"
            body = error_body(message, "rate_limit_exceeded", None, "rate_limit_exceeded")
            return await JSON(body, status_code=429, headers={"Retry-After": "1"})(scope, receive, send)
        self.active += 1
        try:
            await self.app(scope, receive, send)
        finally:
            self.active -= 1

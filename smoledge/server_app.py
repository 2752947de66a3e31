"""The HTTP face of ``smoledge serve``: a Starlette app over a :class:`~smoledge.server_worker.Service`.

Routes: ``POST /v1/chat/completions`` (JSON or SSE), ``GET /v1/models``, ``GET /v1/models/{id}``,
``GET /health``, and the chat page at ``GET /`` (``/chat.js``, ``/chat.css``: static package data in
``smoledge/web/`` that talks to the same ``/v1`` API).  Every error is an OpenAI error body.  This module imports the web stack (the
``[serve]`` extra); nothing in the light runtime imports it.  :func:`run_server` runs the app with
uvicorn on a socket bound by the caller, so tests can use an ephemeral port.
"""

from __future__ import annotations

import asyncio
import contextlib
import hmac
import logging
import math
import socket
from collections.abc import AsyncIterator
from dataclasses import dataclass, field

import uvicorn
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException
from starlette.requests import ClientDisconnect, Request
from starlette.responses import JSONResponse, Response, StreamingResponse
from starlette.routing import Route as HttpRoute

from smoledge.errors import SmolEdgeError
from smoledge.redact import install_log_filter
from smoledge.server_access import SCOPE_KEY, AccessLog, AccessRecord
from smoledge.runtime.server_conn import ConnectionLimits, protocol_class
from smoledge.runtime.server_errors import ApiError, error_for
from smoledge.runtime.server_guard import AccessRules, Guard
from smoledge.runtime.server_images import MB, ImageLimits
from smoledge.runtime.server_protocol import (
    MAX_JSON_DEPTH,
    ParsedChat,
    chunk,
    completion,
    new_id,
    parse_chat,
    sse,
    usage_chunk,
)
from smoledge.runtime.types import SamplingConfig
from smoledge.server_worker import Job, Service

log = logging.getLogger("smoledge.serve")


@dataclass(frozen=True)
class ServerSettings:
    api_key: str | None = field(default=None, repr=False)
    max_body_bytes: int = 32 * MB
    images: ImageLimits = field(default_factory=ImageLimits)
    default_max_tokens: int = 256
    # where a request is silent: `smoledge serve` passes the checkpoint's generation_config, else OpenAI's
    # defaults (smoledge.runtime.defaults.SERVER); the library default stays greedy, as SamplingConfig() does
    sampling: SamplingConfig = field(default_factory=SamplingConfig)
    shutdown_grace_s: float = 10.0  # in-flight requests may finish within this, then they are cancelled
    created: int = 0  # the model's "created" time in /v1/models
    access: AccessRules = field(default_factory=AccessRules)  # Host / Origin / content type
    connections: ConnectionLimits = field(default_factory=ConnectionLimits)  # deadlines, connection budget
    max_json_depth: int = MAX_JSON_DEPTH


def _error_response(err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    status = getattr(exc, "status_code", 500)
    message = {404: f"no route {request.url.path}; this server offers /v1/chat/completions, /v1/models, /health "
                    "and its chat page at /",
               405: f"{request.method} is not allowed on {request.url.path}"}.get(status, str(exc))
    code = {404: "not_found", 405: "method_not_allowed"}.get(status)
    return _error_response(ApiError(status, message, code=code, headers=getattr(exc, "headers", None)))


class _Handlers:
    def __init__(self, service: Service, settings: ServerSettings, fetcher=None):
        self.service, self.settings, self.fetcher = service, settings, fetcher

    def _authorize(self, request: Request) -> None:
        key = self.settings.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.strip().encode(), key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key", headers={"WWW-Authenticate": "Bearer"})

    async def health(self, request: Request) -> Response:
        status = self.service.status()
        return JSONResponse(status, status_code=503 if self.service.draining else 200)

    async def models(self, request: Request) -> Response:
        try:
            self._authorize(request)
        except ApiError as err:
            return _error_response(err)
        return JSONResponse({"object": "list", "data": [self._model_card()]})

    async def model(self, request: Request) -> Response:
        try:
            self._authorize(request)
            if request.path_params["model"] != self.service.model_id:
                raise ApiError(404, f"model {request.path_params['model']!r} is not served here; this server "
                                    f"serves {self.service.model_id!r}", code="model_not_found")
        except ApiError as err:
            return _error_response(err)
        return JSONResponse(self._model_card())

    def _model_card(self) -> dict:
        return {"id": self.service.model_id, "object": "model", "created": self.settings.created,
                "owned_by": "smoledge"}

    async def chat(self, request: Request) -> Response:
        try:
            self._authorize(request)
            self._check_capacity()  # before reading images: a full server turns requests away cheaply
            body = await _read_body(request, self.settings.max_body_bytes)
            parsed = await run_in_threadpool(parse_chat, body, self.settings.images, fetcher=self.fetcher,
                                             default_max_tokens=self.settings.default_max_tokens,
                                             defaults=self.settings.sampling,
                                             max_depth=self.settings.max_json_depth)
            job = self.service.admit(parsed.request, asyncio.get_running_loop())
            if job is None:
                self._check_capacity()
                raise self._busy()
            return await self._answer(request, job, parsed)
        except ApiError as err:
            return _error_response(err)
        except Exception as err:  # a bug: an OpenAI-style 500, the traceback only in the server's log
            return _error_response(_failure("error", err))

    def _check_capacity(self) -> None:
        if self.service.draining:
            raise ApiError(503, "the server is shutting down", type="server_error", code="shutting_down")
        if self.service.admission.in_flight >= self.service.admission.capacity:
            raise self._busy()

    def _busy(self) -> ApiError:
        wait = self.service.admission.retry_after_s()
        return ApiError(429, f"the server is at capacity ({self.service.admission.capacity} requests in flight); "
                             f"retry in {wait} s", type="rate_limit_error", code="server_busy",
                        headers={"Retry-After": str(wait)})

    async def _answer(self, request: Request, job: Job, parsed: ParsedChat) -> Response:
        watcher = asyncio.create_task(_cancel_on_disconnect(request, job))
        handed_over = False
        try:
            first = await job.events.get()  # the route is final once the first chunk (or the end) is here
            _raise_if_failed(first)
            cid, route = new_id(), job.route
            headers = route.headers() if route is not None else {}
            record = request.scope.get(SCOPE_KEY) or AccessRecord()
            record.route = route.route if route is not None else None
            if job.tiles is not None and record.route == "local":
                record.note = f"{job.tiles[0]} of {job.tiles[1]} tiles"
            if parsed.stream:
                stream = self._sse(job, parsed, first, cid, watcher, record)
                handed_over = True
                return StreamingResponse(stream, media_type="text/event-stream",
                                         headers={**headers, "Cache-Control": "no-cache"})
            text, finish, usage = await _collect(job, first)
            record.prompt_tokens, record.completion_tokens = usage.prompt_tokens, usage.completion_tokens
            return JSONResponse(completion(cid, self.service.model_id, text, finish, usage, job.route), headers=headers)
        finally:
            if not handed_over:
                job.cancel()
                watcher.cancel()

    async def _sse(self, job: Job, parsed: ParsedChat, first: tuple, cid: str, watcher,
                   record: AccessRecord) -> AsyncIterator[bytes]:
        model = self.service.model_id
        try:
            yield sse(chunk(cid, model, {"role": "assistant", "content": ""}, route=job.route))
            kind, payload, finish = *first, None
            while kind == "chunk":
                finish = payload.finish_reason or finish
                if payload.text:
                    yield sse(chunk(cid, model, {"content": payload.text}))
                kind, payload = await job.events.get()
            if kind != "end":
                yield sse(_failure(kind, payload).body())
                return
            record.prompt_tokens, record.completion_tokens = payload.prompt_tokens, payload.completion_tokens
            yield sse(chunk(cid, model, {}, finish or "stop", route=job.route))
            if parsed.include_usage:
                yield sse(usage_chunk(cid, model, payload))
            yield sse("[DONE]")
        finally:
            job.cancel()
            watcher.cancel()


def _failure(kind: str, payload) -> ApiError:
    if kind == "error":
        if not isinstance(payload, (SmolEdgeError, MemoryError)):
            log.error("request failed", exc_info=payload)
        return error_for(payload)
    return ApiError(503, "the request was cancelled (the server is shutting down)", type="server_error",
                    code="cancelled")


def _raise_if_failed(event: tuple) -> None:
    if event[0] in ("error", "cancelled"):
        raise _failure(*event)


async def _collect(job: Job, first: tuple):
    pieces, finish = [], None
    kind, payload = first
    while kind == "chunk":
        pieces.append(payload.text)
        finish = payload.finish_reason or finish
        kind, payload = await job.events.get()
    _raise_if_failed((kind, payload))
    return "".join(pieces), finish, payload


async def _read_body(request: Request, limit: int) -> bytes:
    declared = request.headers.get("content-length", "")
    too_big = ApiError(413, f"the request body is over this server's limit of {limit / MB:.1f} MiB",
                       code="request_too_large")
    if declared.isdigit() and int(declared) > limit:
        raise too_big
    buf = bytearray()
    try:
        async for piece in request.stream():
            buf += piece
            if len(buf) > limit:
                raise too_big
    except ClientDisconnect:
        raise ApiError(400, "the client went away while sending the request", code="client_disconnected") from None
    return bytes(buf)


async def _cancel_on_disconnect(request: Request, job: Job) -> None:
    """Cancel ``job`` when the client goes away (the body is read, so the next message is the disconnect)."""
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            job.cancel()
            return


# The chat page (package data in smoledge/web/): static files that talk to this server's own /v1 API.
PAGE_FILES = {"/": "index.html", "/chat.js": "chat.js", "/chat.css": "chat.css"}
_PAGE_TYPES = {".html": "text/html; charset=utf-8", ".js": "text/javascript; charset=utf-8",
               ".css": "text/css; charset=utf-8"}
# Its own scripts and styles only; images as data: / blob: URLs (the picked file); fetches to this server only.
_PAGE_POLICY = ("default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data: blob:; "
                "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'")


def _page_file(name: str):
    from importlib.resources import files

    body = (files("smoledge") / "web" / name).read_bytes()
    kind = _PAGE_TYPES[name[name.rindex("."):]]
    headers = {"Content-Security-Policy": _PAGE_POLICY, "X-Content-Type-Options": "nosniff",
               "Cache-Control": "no-cache", "Referrer-Policy": "no-referrer"}

    async def page(request: Request) -> Response:
        return Response(body, media_type=kind, headers=headers)

    return page


def create_app(service: Service, settings: ServerSettings, *, fetcher=None) -> Starlette:
    """The ASGI app; ``fetcher(url, limits, where) -> bytes`` replaces the remote image fetch (tests)."""
    h = _Handlers(service, settings, fetcher)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        await run_in_threadpool(service.shutdown, 5.0)

    routes = [*(HttpRoute(path, _page_file(name), methods=["GET"]) for path, name in PAGE_FILES.items()),
              HttpRoute("/v1/chat/completions", h.chat, methods=["POST"]),
              HttpRoute("/v1/models", h.models, methods=["GET"]),
              HttpRoute("/v1/models/{model:path}", h.model, methods=["GET"]),
              HttpRoute("/health", h.health, methods=["GET"])]
    return Starlette(routes=routes, exception_handlers={HTTPException: _http_error}, lifespan=lifespan)


class SmolServer(uvicorn.Server):
    """uvicorn's server, draining before it stops: on SIGINT/SIGTERM it keeps listening for the grace period
    (``/health`` answers 503, new requests 503), lets in-flight requests finish, then cancels the rest so
    each open stream ends with its final SSE error event, and only then closes."""

    def __init__(self, config: uvicorn.Config, service: Service, grace_s: float = 10.0):
        super().__init__(config)
        self.service, self.grace_s = service, grace_s

    async def shutdown(self, sockets=None) -> None:
        self.service.draining = True
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.grace_s
        while self.service.jobs and loop.time() < deadline:
            await asyncio.sleep(0.05)
        for job in list(self.service.jobs):
            job.cancel()  # the stream sees ("cancelled", None) and sends its error event
        settle = loop.time() + 2.0
        while (self.service.jobs or len(self.server_state.tasks) > 0) and loop.time() < settle:
            await asyncio.sleep(0.05)
        self.config.timeout_graceful_shutdown = 1.0
        await super().shutdown(sockets)


def make_server(service: Service, settings: ServerSettings, *, log_level: str = "warning",
                access_log: bool = False, fetcher=None) -> SmolServer:
    """The server; ``access_log``: one line per request on stderr (:mod:`smoledge.server_access`)."""
    app = Guard(create_app(service, settings, fetcher=fetcher), settings.access)
    if access_log:
        app = AccessLog(app)  # outside the guard: refused requests are logged too
    limits = settings.connections
    config = uvicorn.Config(app, log_level=log_level, access_log=False, http=protocol_class(limits),
                            timeout_keep_alive=max(1, math.ceil(limits.idle_timeout_s)), limit_concurrency=None,
                            ws="none", lifespan="on", server_header=False)
    install_log_filter("smoledge.serve", "uvicorn", "uvicorn.error", "uvicorn.access")
    return SmolServer(config, service, settings.shutdown_grace_s)


def run_server(server: SmolServer, sock: socket.socket) -> None:
    """Serve on ``sock`` until SIGINT/SIGTERM (or ``server.should_exit``); in-flight requests get the grace."""
    server.run(sockets=[sock])

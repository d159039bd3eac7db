"""The ASGI app: OpenAI's ``/v1/chat/completions`` over one :class:`MavenPipeline` (docs/serving.md).

    from maven_edge.serving.app import create_app
    app = create_app(ServerConfig(pipeline=PipelineOptions(artifacts="artifacts/tiny")))
    # uvicorn.run(app) -- or `maven-edge serve`, or Ray Serve's serve.ingress (serving/ray_serve.py)

Routes: ``POST /v1/chat/completions``, ``GET /v1/models`` (and ``/v1/models/{id}``), ``GET /health``
(200 once the model is loaded and warmed up, 503 before), ``GET /metrics`` (Prometheus).

One request: body size check (413) -> auth (401) -> ready? (503) -> schema (400) -> model name
(404) -> chat template (400) -> image fetch + decode in a thread (400) -> prompt and context
check (400) -> admission: a slot, a place in the queue or 429 -> the generation in a worker thread
-> the answer (JSON, or server-sent events). A per-request time limit covers the queue wait (503)
and the generation (504, or an error event on a stream). A client that disconnects -- while
queued or while generating, streaming or not -- cancels its generation through the pipeline's
``cancel`` event; the slot is free once the worker thread stops, within one decode step.

The pipeline is opened by the app's lifespan: in a background thread (``background_load=True``,
uvicorn: the port answers ``/health`` with 503 while loading) or before startup completes
(``False``, Ray Serve: the replica is ready once loaded).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import socket
import threading
import time
import uuid
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from PIL import Image
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from maven_edge import __version__
from maven_edge.core.errors import GenerationCancelled, ImageError, InputError, MavenError, PromptError
from maven_edge.core.tokenizer import IMAGE_TOKEN
from maven_edge.runtime.backends import load_backend
from maven_edge.runtime.options import PipelineLimits
from maven_edge.runtime.pipeline import GenerateOptions, GenerationResult, MavenPipeline
from maven_edge.serving import images as image_urls
from maven_edge.serving import template
from maven_edge.serving.admission import Admission, Overloaded
from maven_edge.serving.config import ServerConfig
from maven_edge.serving.metrics import CONTENT_TYPE, ServerMetrics
from maven_edge.serving.protocol import APIError, ChatCompletionRequest, parse_request

log = logging.getLogger("maven_edge.serving")

FINISH_REASONS = {"eos": "stop", "stop_token": "stop", "stop_string": "stop", "length": "length"}
REPLICA_HEADER = "X-Maven-Replica"


# ---- the pipeline the server runs ------------------------------------------------------------


def open_server_pipeline(config: ServerConfig) -> MavenPipeline:
    """The pipeline of `config`, with the server's image limits (PNG/JPEG/WebP, its byte and
    pixel limits) applied to the decoded images as well."""
    opts = config.pipeline
    backend = load_backend(opts)
    base = opts.limits(backend.config.max_images)
    limits = PipelineLimits(max_images=base.max_images, image=config.images.limits,
                            max_prompt_chars=base.max_prompt_chars)
    return MavenPipeline(backend, limits, opts.caching())


# ---- per-request state -------------------------------------------------------------------------


@dataclass(eq=False)
class Job:
    """One generation: its worker thread pushes pieces and the outcome; the request reads them
    on the event loop (``push``/``finish`` run there, via ``call_soon_threadsafe``)."""

    images: list[Image.Image]
    prompt: str
    options: GenerateOptions
    cancel: threading.Event
    pieces: list[str] = field(default_factory=list)
    outcome: tuple[str, Any] | None = None  # ("done", result) | ("cancelled", result|None) | ("error", exc)
    changed: asyncio.Event = field(default_factory=asyncio.Event)
    client_gone: bool = False
    timed_out: bool = False

    def push(self, piece: str) -> None:
        self.pieces.append(piece)
        self.changed.set()

    def finish(self, kind: str, payload: Any) -> None:
        self.outcome = (kind, payload)
        self.changed.set()


class _ClientGone(Exception):
    pass


class _TimedOut(Exception):
    pass


class ServerState:
    """Everything one server process (or replica) holds: the pipeline, admission, metrics."""

    def __init__(self, config: ServerConfig, on_load_error: Callable[[BaseException], None] | None = None):
        self.config = config
        self.pipe: MavenPipeline | None = None
        self.status = "loading"
        self.error: str | None = None
        self.model_name = config.model_name
        self.metrics = ServerMetrics(lambda: self.pipe.cache_stats() if self.pipe is not None else None)
        self.admission = Admission(config.max_concurrency, config.max_queue)
        self.executor = ThreadPoolExecutor(max_workers=config.max_concurrency, thread_name_prefix="maven-gen")
        self.created = int(time.time())
        self.replica = f"{socket.gethostname()}:{os.getpid()}"
        self.jobs: set[Job] = set()
        self.loop: asyncio.AbstractEventLoop | None = None
        self._on_load_error = on_load_error

    # -- loading --------------------------------------------------------------------------------
    def load(self) -> None:
        t0 = time.perf_counter()
        pipe = open_server_pipeline(self.config)
        if self.config.warmup and pipe.limits.max_images:
            size = pipe.config.preprocess.image_size
            pipe.generate([Image.new("RGB", (size, size), "white")],
                          f"{IMAGE_TOKEN}\nDescribe the image.\nAnswer:", max_new_tokens=1)
        self.pipe = pipe
        self.model_name = self.model_name or pipe.config.name
        self.status = "ready"
        self.metrics.ready.set(1)
        log.info("model %s loaded (%s backend) in %.1f s; ready", self.model_name, pipe.backend.name,
                 time.perf_counter() - t0)

    def load_in_background(self) -> None:
        def run() -> None:
            try:
                self.load()
            except BaseException as exc:  # noqa: BLE001 - reported on /health and to the runner
                self.status = "failed"
                self.error = str(exc) if isinstance(exc, MavenError) else f"{type(exc).__name__}: {exc}"
                log.error("loading the model failed: %s", self.error)
                if self._on_load_error is not None:
                    self._on_load_error(exc)

        threading.Thread(target=run, name="maven-load", daemon=True).start()

    def close(self) -> None:
        for job in list(self.jobs):
            job.cancel.set()
        self.executor.shutdown(wait=True, cancel_futures=True)
        if self.pipe is not None:
            self.pipe.close()

    # -- generations ----------------------------------------------------------------------------
    def ready_pipe(self) -> MavenPipeline:
        if self.status == "ready" and self.pipe is not None:
            return self.pipe
        if self.status == "failed":
            raise APIError(503, f"the model failed to load: {self.error}", type="server_error",
                           code="model_load_failed")
        raise APIError(503, "the model is still loading; retry shortly (GET /health says when it is ready)",
                       type="server_error", code="model_loading", headers={"Retry-After": "2"})

    def start(self, job: Job) -> None:
        """Run `job` in a worker thread (the caller holds a slot; the thread gives it back)."""
        loop = self.loop
        assert loop is not None and self.pipe is not None
        pipe = self.pipe
        self.jobs.add(job)
        self.metrics.active.set(self.admission.active)
        started = time.perf_counter()

        def work() -> None:
            kind: str
            payload: Any
            try:
                stream = pipe.stream(job.images, job.prompt, job.options)
                for piece in stream:
                    loop.call_soon_threadsafe(job.push, piece)
                kind, payload = "done", stream.result
            except GenerationCancelled as exc:
                kind, payload = "cancelled", getattr(exc, "result", None)
            except BaseException as exc:  # noqa: BLE001 - handed to the request, which answers it
                kind, payload = "error", exc
            loop.call_soon_threadsafe(self._finished, job, kind, payload, time.perf_counter() - started)

        try:
            self.executor.submit(work)
        except BaseException:
            self._finished(job, "error", RuntimeError("the server is shutting down"), 0.0)
            raise

    def _finished(self, job: Job, kind: str, payload: Any, held_s: float) -> None:
        self.jobs.discard(job)
        self.admission.release(held_s)
        self.metrics.active.set(self.admission.active)
        self.metrics.queue_depth.set(self.admission.waiting)
        if kind == "done":
            self.metrics.observe(payload)
            self.metrics.generations.labels(outcome="completed").inc()
        elif kind == "cancelled":
            self.metrics.generations.labels(outcome="timeout" if job.timed_out else "cancelled").inc()
        else:
            self.metrics.generations.labels(outcome="error").inc()
        job.finish(kind, payload)


# ---- helpers -------------------------------------------------------------------------------------


def _error_response(err: APIError, replica: str | None = None) -> JSONResponse:
    headers = dict(err.headers)
    if replica:
        headers[REPLICA_HEADER] = replica
    return JSONResponse(err.body(), status_code=err.status, headers=headers)


def _maven_error(exc: MavenError) -> APIError:
    code = "invalid_image" if isinstance(exc, ImageError) else "invalid_prompt" if isinstance(exc, PromptError) \
        else "invalid_value"
    if isinstance(exc, InputError):
        return APIError(400, str(exc), code=code)
    return APIError(500, str(exc), type="server_error", code="internal_error")


async def _wait_disconnect(receive: Receive) -> None:
    """Returns when the client has gone (``http.disconnect``)."""
    while True:
        message = await receive()
        if message["type"] == "http.disconnect":
            return


def _timings(result: GenerationResult | None, queue_s: float, decode_s: float) -> dict[str, Any]:
    d: dict[str, Any] = result.timings.to_dict() if result is not None else {}
    d["queue_ms"] = queue_s * 1e3
    d["image_decode_ms"] = decode_s * 1e3
    return d


def _usage(result: GenerationResult, queue_s: float, decode_s: float) -> dict[str, Any]:
    n = len(result.visual_tokens_per_image)
    visual = sum(result.visual_tokens_per_image) + 2 * n  # <img_start> ... <img_end> per image
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": len(result.token_ids),
        "total_tokens": result.prompt_tokens + len(result.token_ids),
        "visual_tokens": visual,  # of prompt_tokens: the images' positions, markers included
        "visual_tokens_per_image": list(result.visual_tokens_per_image),
        "timings": _timings(result, queue_s, decode_s),  # milliseconds per stage (extension)
        "cache": result.cache.to_dict(),  # what the runtime's caches and batching did for this request
    }


# ---- ASGI middleware ------------------------------------------------------------------------------


class BodyLimitMiddleware:
    """Refuses a request body over `max_bytes` with 413 before the app sees it (by Content-Length,
    or while reading a chunked body), then replays the body it read."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope["method"] in ("GET", "HEAD", "OPTIONS"):
            await self.app(scope, receive, send)
            return
        headers = dict(scope.get("headers") or [])
        length = headers.get(b"content-length", b"").decode("latin-1")
        if length.isdigit() and int(length) > self.max_bytes:
            await self._too_large(scope, send, int(length))
            return
        chunks: list[bytes] = []
        total = 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            chunk = message.get("body", b"")
            total += len(chunk)
            if total > self.max_bytes:
                await self._too_large(scope, send, None)
                return
            chunks.append(chunk)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay() -> Message:
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()

        await self.app(scope, replay, send)

    async def _too_large(self, scope: Scope, send: Send, size: int | None) -> None:
        got = f" ({size / 2**20:.1f} MiB)" if size is not None else ""
        err = APIError(413, f"the request body is too large{got}; the limit is {self.max_bytes / 2**20:.1f} MiB. "
                       "Send smaller images", code="request_too_large")
        await _error_response(err)(scope, _null_receive, send)


async def _null_receive() -> Message:
    return {"type": "http.disconnect"}


class MetricsMiddleware:
    """Counts requests by path and status (``maven_http_requests_total``); outermost, so it sees
    413s too. A request whose client left before any response is counted as 499."""

    def __init__(self, app: ASGIApp):
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        status = {"code": 499}

        async def capture(message: Message) -> None:
            if message["type"] == "http.response.start":
                status["code"] = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, capture)
        finally:
            state: ServerState | None = getattr(scope["app"].state, "maven", None) if "app" in scope else None
            path = scope.get("path", "")
            if state is not None and path.startswith(("/v1/", "/health", "/metrics")):
                label = path if not path.startswith("/v1/models/") else "/v1/models/{id}"
                if label not in ("/v1/chat/completions", "/v1/models", "/v1/models/{id}", "/health", "/metrics"):
                    label = "other"
                state.metrics.http.labels(path=label, status=str(status["code"])).inc()


# ---- the app ------------------------------------------------------------------------------------------


def create_app(config: ServerConfig, background_load: bool = True,
               on_load_error: Callable[[BaseException], None] | None = None) -> FastAPI:
    """The server as an ASGI app. The pipeline is opened by the app's lifespan (see the module docstring)."""

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        state = ServerState(config, on_load_error)
        state.loop = asyncio.get_running_loop()
        app.state.maven = state
        if background_load:
            state.load_in_background()
        else:
            await asyncio.to_thread(state.load)
        try:
            yield
        finally:
            await asyncio.to_thread(state.close)

    app = FastAPI(title="maven-edge", version=__version__, lifespan=lifespan,
                  summary="OpenAI-compatible multi-image chat completions over a MaVEn-style model")
    app.add_middleware(BodyLimitMiddleware, max_bytes=config.max_body_bytes)
    app.add_middleware(MetricsMiddleware)

    def state_of(request: Request) -> ServerState:
        return request.app.state.maven

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError) -> JSONResponse:
        return _error_response(exc, state_of(request).replica)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        kind = "not_found_error" if exc.status_code == 404 else "invalid_request_error"
        return _error_response(APIError(exc.status_code, f"{exc.detail}: {request.method} {request.url.path}",
                                        type=kind, headers=dict(exc.headers or {})))

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        log.exception("unexpected error")
        return _error_response(APIError(500, f"internal error ({type(exc).__name__}); see the server log",
                                        type="server_error", code="internal_error"))

    def authorize(request: Request) -> None:
        key = config.api_key
        if key is None:
            return
        scheme, _, token = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() != "bearer" or not secrets.compare_digest(token.strip().encode(), key.encode()):
            raise APIError(401, "invalid or missing API key; send the header 'Authorization: Bearer <key>'",
                           type="authentication_error", code="invalid_api_key",
                           headers={"WWW-Authenticate": "Bearer"})

    # -- plain routes ------------------------------------------------------------------------------
    @app.get("/health")
    async def health(request: Request) -> JSONResponse:
        state = state_of(request)
        body: dict[str, Any] = {"status": state.status, "model": state.model_name, "replica": state.replica}
        if state.status == "ready":
            body.update(active=state.admission.active, queued=state.admission.waiting)
            return JSONResponse(body)
        if state.error:
            body["error"] = state.error
        return JSONResponse(body, status_code=503, headers={"Retry-After": "2"})

    @app.get("/metrics")
    async def metrics(request: Request) -> Response:
        state = state_of(request)
        state.metrics.queue_depth.set(state.admission.waiting)
        state.metrics.active.set(state.admission.active)
        return Response(state.metrics.render(), media_type=CONTENT_TYPE)

    def model_card(state: ServerState) -> dict[str, Any]:
        return {"id": state.model_name, "object": "model", "created": state.created, "owned_by": "maven-edge"}

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        authorize(request)
        state = state_of(request)
        state.ready_pipe()
        return JSONResponse({"object": "list", "data": [model_card(state)]},
                            headers={REPLICA_HEADER: state.replica})

    @app.get("/v1/models/{model_id}")
    async def model(model_id: str, request: Request) -> JSONResponse:
        authorize(request)
        state = state_of(request)
        state.ready_pipe()
        if model_id != state.model_name:
            raise _unknown_model(model_id, state)
        return JSONResponse(model_card(state))

    # -- chat completions --------------------------------------------------------------------------
    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request) -> Response:
        arrived = time.monotonic()
        authorize(request)
        state = state_of(request)
        pipe = state.ready_pipe()
        req = parse_request(await request.body())
        if req.model != state.model_name:
            raise _unknown_model(req.model, state)
        try:
            chat = template.render(req.messages)
            t0 = time.perf_counter()
            prompt = chat.prompt
            if chat.video_url is not None:
                images = await asyncio.to_thread(_video_frames, pipe, chat.video_url, config.images)
                prompt = chat.with_frames(len(images))
            else:
                images = await asyncio.to_thread(image_urls.load_all, chat.image_urls, config.images)
            decode_s = time.perf_counter() - t0
            options = _options(req, pipe, prompt, len(images), config.default_max_tokens, config.h_eos)
        except MavenError as exc:
            raise _maven_error(exc) from None
        job = Job(images, prompt, options, options.cancel)  # type: ignore[arg-type]
        watch = asyncio.ensure_future(_wait_disconnect(request.receive))
        watch.add_done_callback(lambda f: f.cancelled() or _client_left(job))
        deadline = arrived + config.request_timeout_s
        handed_off = False
        try:
            queue_s = await _admit(state, watch, deadline)
            state.start(job)
            if req.stream:
                handed_off = True
                return StreamingResponse(
                    _sse(state, req, job, watch, deadline, queue_s, decode_s),
                    media_type="text/event-stream",
                    headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no", REPLICA_HEADER: state.replica})
            try:
                async for _ in _events(job, watch, deadline):
                    pass
            except _TimedOut:
                job.timed_out = True
                job.cancel.set()
                raise _timeout_error(config) from None
            return _complete(state, req, job, queue_s, decode_s)
        except _ClientGone:
            return Response(status_code=499)
        finally:
            if not handed_off:
                watch.cancel()

    return app


def _video_frames(pipe: Any, url: str, policy: Any) -> list[Any]:
    """A request's video: fetched under the image policy, decoded frame by frame by the pipeline."""
    data = image_urls.load_video_bytes(url, policy)
    return pipe.load_video(data, "the question", fps=policy.video_fps, max_frames=policy.video_max_frames).frames


def _unknown_model(name: str, state: ServerState) -> APIError:
    return APIError(404, f"the model '{name}' is not served here; this server serves '{state.model_name}' "
                    "(GET /v1/models)", type="not_found_error", code="model_not_found", param="model")


def _timeout_error(config: ServerConfig) -> APIError:
    return APIError(504, f"the request took longer than this server's limit of {config.request_timeout_s:g} s; "
                    "ask for fewer tokens or retry later", type="server_error", code="timeout")


def _client_left(job: Job) -> None:
    """The client went away: cancel the generation (a no-op once it has finished)."""
    if job.outcome is None:
        job.client_gone = True
        job.cancel.set()
        job.changed.set()


def _options(req: ChatCompletionRequest, pipe: MavenPipeline, prompt: str, num_images: int,
             default_max_tokens: int, h_eos: str = "separate") -> GenerateOptions:
    """GenerateOptions for a request; checks the prompt and the context length (PromptError: 400)."""
    temperature = req.temperature
    options = GenerateOptions(
        max_new_tokens=1,
        temperature=temperature if temperature else None,  # omitted or 0: greedy
        top_p=req.top_p,
        seed=0 if req.seed is None else req.seed,
        stop=tuple(req.stop_list),
        visual_token_budget=req.visual_token_budget,
        min_patches=req.min_patches,
        h_eos=req.h_eos or h_eos,
        cancel=threading.Event(),
    )
    prompt_tokens = pipe.prepare_prompt(prompt, num_images, options)
    limit = req.token_limit
    if limit is None:
        room = pipe.config.llm.max_position_embeddings - prompt_tokens
        limit = max(1, min(default_max_tokens, room))
    options.max_new_tokens = limit
    pipe.prepare_prompt(prompt, num_images, options)  # the context check with the real limit
    return options


async def _admit(state: ServerState, watch: asyncio.Future[None], deadline: float) -> float:
    """A generation slot for this request (waiting in the queue), or 429 / 503 / client gone."""
    admission, metrics = state.admission, state.metrics
    acquire = asyncio.ensure_future(admission.acquire(max(0.0, deadline - time.monotonic())))
    metrics.queue_depth.set(admission.waiting)
    try:
        done, _ = await asyncio.wait({acquire, watch}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        if not acquire.done():
            acquire.cancel()
            with contextlib.suppress(BaseException):
                await acquire
    metrics.queue_depth.set(admission.waiting)
    if acquire not in done or acquire.cancelled():
        if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
            admission.release()  # granted as the client left
        raise _ClientGone()
    exc = acquire.exception()
    if isinstance(exc, Overloaded):
        raise APIError(429, f"the server is busy: {admission.active} generation(s) running and {admission.waiting} "
                       f"waiting (limits {admission.max_concurrency} and {admission.max_queue}); retry after "
                       f"{exc.retry_after_s} s", type="rate_limit_error", code="rate_limit_exceeded",
                       headers={"Retry-After": str(exc.retry_after_s)})
    if isinstance(exc, (TimeoutError, asyncio.TimeoutError)):
        raise APIError(503, "no generation slot became free within this server's time limit; retry later",
                       type="server_error", code="queue_timeout",
                       headers={"Retry-After": str(admission.retry_after())})
    if exc is not None:
        raise exc
    waited = acquire.result()
    metrics.queue_wait.observe(waited)
    return waited


async def _events(job: Job, watch: asyncio.Future[None], deadline: float) -> AsyncIterator[str]:
    """The job's text pieces as they come; returns at its outcome. Raises _ClientGone / _TimedOut."""
    while True:
        if job.pieces:
            pieces, job.pieces = job.pieces, []
            for p in pieces:
                yield p
            continue
        if job.outcome is not None:
            return
        if job.client_gone:
            raise _ClientGone()
        job.changed.clear()
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise _TimedOut()
        waiter = asyncio.ensure_future(job.changed.wait())
        try:
            await asyncio.wait({waiter, watch}, timeout=remaining, return_when=asyncio.FIRST_COMPLETED)
        finally:
            waiter.cancel()


def _outcome_result(job: Job) -> GenerationResult:
    assert job.outcome is not None
    kind, payload = job.outcome
    if kind == "done":
        return payload
    if kind == "error":
        if isinstance(payload, MavenError):
            raise _maven_error(payload)
        log.error("generation failed", exc_info=payload)
        raise APIError(500, f"the generation failed ({type(payload).__name__}: {payload})", type="server_error",
                       code="internal_error")
    raise _ClientGone()  # cancelled: only ever by the client leaving or the time limit


def _head(state: ServerState, req_id: str, created: int) -> dict[str, Any]:
    return {"id": req_id, "created": created, "model": state.model_name,
            "system_fingerprint": f"maven-edge-{__version__}"}


def _complete(state: ServerState, req: ChatCompletionRequest, job: Job, queue_s: float, decode_s: float
              ) -> JSONResponse:
    result = _outcome_result(job)
    body = {
        **_head(state, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())),
        "object": "chat.completion",
        "choices": [{"index": 0, "message": {"role": "assistant", "content": result.text},
                     "logprobs": None, "finish_reason": FINISH_REASONS.get(result.finish_reason, "stop")}],
        "usage": _usage(result, queue_s, decode_s),
    }
    return JSONResponse(body, headers={REPLICA_HEADER: state.replica})


def _sse_event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data, separators=(',', ':'))}\n\n"


async def _sse(state: ServerState, req: ChatCompletionRequest, job: Job, watch: asyncio.Future[None],
               deadline: float, queue_s: float, decode_s: float) -> AsyncIterator[str]:
    """OpenAI's chunk stream: a role chunk, content chunks, a finish chunk, the usage chunk when
    ``stream_options.include_usage``, then ``[DONE]``; an error after the headers went out is an
    ``{"error": ...}`` event (the openai client raises it)."""
    head = {**_head(state, f"chatcmpl-{uuid.uuid4().hex}", int(time.time())), "object": "chat.completion.chunk"}

    def chunk(delta: dict[str, Any], finish: str | None = None) -> str:
        return _sse_event({**head, "choices": [{"index": 0, "delta": delta, "logprobs": None,
                                                "finish_reason": finish}]})

    try:
        yield chunk({"role": "assistant", "content": ""})
        try:
            async for piece in _events(job, watch, deadline):
                yield chunk({"content": piece})
            result = _outcome_result(job)
        except _TimedOut:
            job.timed_out = True
            job.cancel.set()
            yield _sse_event(_timeout_error(state.config).body())
            return
        except APIError as err:
            yield _sse_event(err.body())
            return
        except _ClientGone:
            return
        yield chunk({}, FINISH_REASONS.get(result.finish_reason, "stop"))
        if req.stream_options is not None and req.stream_options.include_usage:
            yield _sse_event({**head, "choices": [], "usage": _usage(result, queue_s, decode_s)})
        yield "data: [DONE]\n\n"
    finally:
        job.cancel.set()  # a no-op once finished; stops the generation if the stream was dropped
        watch.cancel()

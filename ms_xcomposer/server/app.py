"""The OpenAI-compatible HTTP API over a `scheduler.BatchingEngine` (FastAPI; run by `ms-xcomposer serve`).

Routes: `POST /v1/chat/completions` (JSON, or server-sent events with `stream: true`, ending with
`data: [DONE]`), `GET /v1/models`, `GET /health`. Errors are OpenAI's JSON error object with the status:
400 bad input, 401 a wrong or missing API key, 404 an unknown model or route, 413 a body over the limit,
429 the queue full, 503 shutting down, 500 an internal failure; the server keeps serving after each.

The model runs only on the engine thread; handlers parse, decode images (in the thread pool), queue the turn
and await its events, so HTTP handling never waits on the model. A client that disconnects (mid-stream, or
while waiting for a whole answer) cancels its row, which leaves the batch at the next step.
"""
from __future__ import annotations

import asyncio
import contextlib
import hmac
import json
import time
from typing import Any, AsyncIterator, Dict, Optional

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from starlette.concurrency import run_in_threadpool
from starlette.exceptions import HTTPException as StarletteHTTPException

from ms_xcomposer.conversation import IncrementalDecoder, split_options, generation_config
from ms_xcomposer.images import MAX_IMAGE_PIXELS
from ms_xcomposer.scheduler import BatchingEngine, EngineStopped, QueueFull
from ms_xcomposer.server.media import load_image_url
from ms_xcomposer.server.protocol import (
    ApiError, as_api_error, bad, chunk, completion, completion_id, parse_chat_request, system_options, usage,
)

DISCONNECT_POLL_S = 0.5
CLIENT_GONE = 499  # nginx's "client closed request": logged only, nobody reads it


class _Events:
    """The engine's `Listener` for one request: its events handed to the request's event loop."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop, self.queue = loop, asyncio.Queue()

    def _put(self, kind: str, value: Any) -> None:
        with contextlib.suppress(RuntimeError):  # the loop is closed: nobody is listening any more
            self.loop.call_soon_threadsafe(self.queue.put_nowait, (kind, value))

    def started(self, prompt_tokens: int) -> None:
        self._put("started", prompt_tokens)

    def token(self, token_id: int) -> None:
        self._put("token", token_id)

    def finished(self, result, finish_reason: str, prompt_tokens: int) -> None:
        self._put("finished", (result, finish_reason, prompt_tokens))

    def failed(self, error: BaseException) -> None:
        self._put("failed", error)


def create_app(engine: BatchingEngine, model_id: str, api_key: Optional[str] = None,
               allowed_local_media: Optional[str] = None, max_body_bytes: int = 32 << 20, max_images: int = 8,
               max_pixels: int = MAX_IMAGE_PIXELS) -> FastAPI:
    """The FastAPI app serving `engine` (already started; stopped, draining, when the app shuts down)."""
    model, processor = engine.model, engine.processor
    created = int(time.time())

    @contextlib.asynccontextmanager
    async def lifespan(_app: FastAPI) -> AsyncIterator[None]:
        yield
        await run_in_threadpool(engine.stop, True)  # uvicorn has waited for the in-flight requests

    app = FastAPI(title="ms-xcomposer", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)

    @app.exception_handler(ApiError)
    async def _api_error(_request: Request, error: ApiError) -> JSONResponse:
        return JSONResponse(error.body(), status_code=error.status)

    @app.exception_handler(StarletteHTTPException)
    async def _http_error(_request: Request, error: StarletteHTTPException) -> JSONResponse:
        return JSONResponse(ApiError(error.status_code, str(error.detail)).body(), status_code=error.status_code)

    def check_key(request: Request) -> None:
        if api_key is None:
            return
        header = request.headers.get("authorization", "")
        given = header[len("Bearer "):] if header.startswith("Bearer ") else ""
        if not hmac.compare_digest(given.encode(), api_key.encode()):
            raise ApiError(401, "missing or wrong API key (send `Authorization: Bearer KEY`)", code="invalid_api_key")

    @app.get("/health")
    async def health() -> JSONResponse:
        return JSONResponse({"status": "ok", "model": model_id, **engine.stats()})

    @app.get("/v1/models")
    async def models(request: Request) -> JSONResponse:
        check_key(request)
        return JSONResponse({"object": "list", "data": [
            {"id": model_id, "object": "model", "created": created, "owned_by": "ms-xcomposer"}]})

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        check_key(request)
        req = parse_chat_request(await _json_body(request, max_body_bytes), model_id, max_images)
        options = dict(req.options)
        if req.system is not None:
            options.update(system_options(processor, req.system))
        overrides, _ = split_options(options)
        try:
            cfg = generation_config(model, processor, **overrides)
        except (ValueError, TypeError) as e:
            raise bad(str(e)) from None
        images = None
        if req.image_urls:
            images = await run_in_threadpool(
                lambda: [load_image_url(u, allowed_local_media, max_pixels) for u in req.image_urls])
        events = _Events(asyncio.get_running_loop())
        try:
            ticket = engine.submit(req.query, images, req.history, events, **options)
        except QueueFull as e:
            raise ApiError(429, str(e), code="queue_full") from None
        except EngineStopped as e:
            raise ApiError(503, str(e), code="shutting_down") from None
        try:
            kind, value = await _next_event(events, request, ticket)
            if kind == "failed":
                raise as_api_error(value)
        except BaseException:
            ticket.cancel()
            raise
        if kind == "gone":
            return Response(status_code=CLIENT_GONE)
        prompt_tokens, cid = value, completion_id()
        if req.stream:
            return StreamingResponse(_stream(events, ticket, cid, req.model, cfg.stop, req.include_usage,
                                             prompt_tokens),
                                     media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            while True:
                kind, value = await _next_event(events, request, ticket)
                if kind == "finished":
                    result, reason, prompt_tokens = value
                    return JSONResponse(completion(cid, req.model, result.response, reason, prompt_tokens,
                                                   len(result.ids)))
                if kind == "failed":
                    raise as_api_error(value)
                if kind == "gone":
                    return Response(status_code=CLIENT_GONE)
        finally:
            ticket.cancel()  # nothing when it finished; a disconnected client's row leaves the batch

    async def _stream(events: _Events, ticket, cid: str, model_name: str, stops, include_usage: bool,
                      prompt_tokens: int) -> AsyncIterator[str]:
        decoder = IncrementalDecoder(processor, stops)
        try:
            yield _sse(chunk(cid, model_name, {"role": "assistant", "content": ""}))
            while True:
                kind, value = await events.queue.get()
                if kind == "token":
                    text = decoder.push([value])
                    if text:
                        yield _sse(chunk(cid, model_name, {"content": text}))
                elif kind == "finished":
                    result, reason, prompt_tokens = value
                    rest = decoder.finish()
                    if rest:
                        yield _sse(chunk(cid, model_name, {"content": rest}))
                    yield _sse(chunk(cid, model_name, {}, reason))
                    if include_usage:
                        yield _sse(chunk(cid, model_name, None, usage_=usage(prompt_tokens, len(result.ids))))
                    break
                elif kind == "failed":
                    yield _sse(as_api_error(value).body())
                    break
            yield "data: [DONE]\n\n"
        finally:
            ticket.cancel()  # a client gone mid-stream cancels the generator here: its row leaves the batch

    return app


async def _json_body(request: Request, limit: int) -> Any:
    length = request.headers.get("content-length")
    if length is not None and length.isdigit() and int(length) > limit:
        raise ApiError(413, f"the request body has {int(length)} bytes, over the server's limit of {limit} "
                            "(--max-body-mb)", code="request_too_large")
    body = bytearray()
    async for piece in request.stream():
        body += piece
        if len(body) > limit:
            raise ApiError(413, f"the request body is over the server's limit of {limit} bytes (--max-body-mb)",
                           code="request_too_large")
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError) as e:
        raise bad(f"the request body is not valid JSON: {e}") from None


async def _next_event(events: _Events, request: Request, ticket) -> tuple:
    """The next (kind, value) event of the request, or ("gone", None) after cancelling it when the client has
    disconnected meanwhile."""
    while True:
        try:
            return await asyncio.wait_for(events.queue.get(), DISCONNECT_POLL_S)
        except asyncio.TimeoutError:
            if await request.is_disconnected():
                ticket.cancel()
                return "gone", None


def _sse(data: Dict[str, Any]) -> str:
    return f"data: {json.dumps(data, ensure_ascii=False)}\n\n"

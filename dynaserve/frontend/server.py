"""The HTTP front end: a thin aiohttp shell that turns OpenAI API calls into DynaServe requests.

Every request goes through one shared :class:`DynaServeClient` (one ZeroMQ socket for the process).
Text in: the prompt (or the chat messages through the chat template) is tokenized here and sent as ids.
Text out: tokens are detokenized incrementally and written as they arrive; per token the front end only
detokenizes and JSON-encodes the new text. A stream's HTTP status is decided by its first token or
error, so a rejected request gets a real 4xx/5xx status, not an error inside a 200 stream.

Lifecycle of one request: parse and validate (400/404) -> submit -> first token or error reply
(status line) -> tokens -> finish (stop / length) -> usage. A client that disconnects cancels its
handler, which aborts the request on the broker (and so on both instances). A background task asks the
broker for its status every ``monitor_interval_s``; while it does not answer, new requests get 503 and
running ones end with a broker_unavailable error.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import orjson
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST

from dynaserve import protocol as P
from dynaserve.client import DynaServeClient, RequestStream
from dynaserve.errors import BrokerUnavailableError, DynaServeError
from dynaserve.frontend.config import FrontendConfig
from dynaserve.frontend.errors import INVALID, NOT_FOUND, SERVER, UNAVAILABLE, ApiError, from_dynaserve
from dynaserve.frontend.metrics import FrontendMetrics
from dynaserve.frontend.params import GenParams, check_body, check_model, parse_chat, parse_completion
from dynaserve.frontend.responses import (
    CHAT,
    COMPLETION,
    DONE,
    StreamEncoder,
    chat_body,
    completion_body,
    error_event,
    usage,
)
from dynaserve.frontend.text import Detokenizer, TextCodec, TextStops
from dynaserve.tokenizer import Tokenizer, load_tokenizer

log = logging.getLogger("dynaserve.frontend")

_FINISH = {P.FINISH_STOP: "stop", P.FINISH_LENGTH: "length", P.FINISH_ABORT: "abort"}
_SSE_HEADERS = {"Content-Type": "text/event-stream", "Cache-Control": "no-cache", "X-Accel-Buffering": "no"}
_CLIENT_GONE = 499  # status recorded for requests whose HTTP client disconnected


class _ClientGone(Exception):
    """The HTTP client disconnected while its stream was being written."""

    def __init__(self, resp: web.StreamResponse) -> None:
        super().__init__("client disconnected")
        self.resp = resp


def _json(obj: Any, status: int = 200) -> web.Response:
    return web.Response(body=orjson.dumps(obj), status=status, content_type="application/json")


def _error(err: ApiError) -> web.Response:
    return _json(err.body(), err.status)


class _Generation:
    """The text of one request's token stream: ``pieces()`` yields one text piece per token; afterwards
    ``tail`` holds the text still buffered, ``finish`` the finish reason and ``tokens`` the count."""

    __slots__ = ("stream", "detok", "stops", "tokens", "finish", "tail")

    def __init__(self, stream: RequestStream, detok: Detokenizer, stops: TextStops | None) -> None:
        self.stream = stream
        self.detok = detok
        self.stops = stops
        self.tokens = 0
        self.finish: str | None = None
        self.tail = ""

    async def pieces(self) -> AsyncIterator[str]:
        push = self.detok.push
        stops = self.stops
        async for tok in self.stream:
            self.tokens += 1
            text = push(tok.token)
            if stops is not None:
                text, hit = stops.feed(text)
                if hit:  # cut at the stop string and end the request
                    self.finish = "stop"
                    self.tail = text
                    await self.stream.abort()
                    return
            yield text
        tail = self.detok.flush()
        if stops is not None:
            tail, hit = stops.feed(tail)
            if not hit:
                tail += stops.flush()
            else:
                self.finish = "stop"
        self.tail = tail
        if self.finish is None:
            self.finish = _FINISH.get(self.stream.finish_reason or "", self.stream.finish_reason)


class Frontend:
    """The front end shell. ``await Frontend(cfg).start()`` serves until ``stop()``."""

    def __init__(self, config: FrontendConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = config
        self.codec = TextCodec(tokenizer or load_tokenizer(config.tokenizer or config.model, config.vocab_size))
        self.metrics = FrontendMetrics()
        self.client = DynaServeClient(config.broker, curve_dir=config.curve_dir, curve_name=config.curve_name)
        self.broker_error: str | None = None
        self.active: dict[str, RequestStream] = {}  # request id -> stream of every running request
        self.created = int(time.time())
        self.port = config.port
        self._runner: web.AppRunner | None = None
        self._monitor: asyncio.Task | None = None

    # ------------------------------------------------------------------ lifecycle

    def make_app(self) -> web.Application:
        app = web.Application(client_max_size=self.cfg.max_body_bytes, middlewares=[self._errors])
        app.router.add_post("/v1/completions", self.completions)
        app.router.add_post("/v1/chat/completions", self.chat)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.prometheus)
        return app

    async def start(self) -> None:
        await self.client.connect()
        self._runner = web.AppRunner(self.make_app(), handler_cancellation=True, access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.cfg.host, self.cfg.port)
        await site.start()
        server = site._server  # the bound port when 0 was asked for
        if server is not None and getattr(server, "sockets", None):
            self.port = server.sockets[0].getsockname()[1]  # type: ignore[union-attr]
        self._monitor = asyncio.create_task(self._monitor_loop())
        log.info("front end up: http://%s:%d, broker %s, model %s", self.cfg.host, self.port, self.cfg.broker,
                 self.cfg.model)

    async def stop(self) -> None:
        if self._monitor is not None:
            self._monitor.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._monitor
        if self._runner is not None:
            await self._runner.cleanup()
        await self.client.close()

    async def _monitor_loop(self) -> None:
        while True:
            try:
                await self.client.status(timeout=self.cfg.broker_timeout_s)
                if self.broker_error is not None:
                    log.info("broker answers again")
                self.broker_error = None
            except DynaServeError as exc:
                if self.broker_error is None:
                    log.warning("broker unavailable: %s", exc)
                self.broker_error = str(exc)
                err = BrokerUnavailableError(f"broker_unavailable: {exc}")
                for stream in list(self.active.values()):
                    stream._push(err)  # type: ignore[arg-type]  # wakes the request's reader with the error
            await asyncio.sleep(self.cfg.monitor_interval_s)

    # ------------------------------------------------------------------ plain endpoints

    @web.middleware
    async def _errors(self, request: web.Request,
                      handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except ApiError as err:
            return _error(err)
        except web.HTTPException as exc:
            if exc.status < 400:
                raise
            type_ = NOT_FOUND if exc.status == 404 else INVALID if exc.status < 500 else SERVER
            return _error(ApiError(exc.status, f"{exc.reason}: {request.method} {request.path}", type_))
        except Exception:
            log.exception("%s %s failed", request.method, request.path)
            return _error(ApiError(500, "internal error", SERVER, None, "internal_error"))

    async def models(self, request: web.Request) -> web.Response:
        card = {"id": self.cfg.model, "object": "model", "created": self.created, "owned_by": "dynaserve",
                "root": self.cfg.model, "max_model_len": self.cfg.max_model_len or None}
        return _json({"object": "list", "data": [card]})

    async def health(self, request: web.Request) -> web.Response:
        try:
            st = await self.client.status(timeout=self.cfg.health_timeout_s)
        except DynaServeError as exc:
            return _error(ApiError(503, str(exc), UNAVAILABLE, None, "broker_unavailable"))
        if not st.instances:
            return _error(ApiError(503, "no worker is registered", UNAVAILABLE, None, "no_workers"))
        return _json({"status": "ok", "workers": len(st.instances), "active": st.active, "queued": st.queued})

    async def prometheus(self, request: web.Request) -> web.Response:
        return web.Response(body=self.metrics.render(), headers={"Content-Type": CONTENT_TYPE_LATEST})

    # ------------------------------------------------------------------ generation

    async def completions(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, COMPLETION)

    async def chat(self, request: web.Request) -> web.StreamResponse:
        return await self._serve(request, CHAT)

    async def _serve(self, request: web.Request, kind: str) -> web.StreamResponse:
        t0 = time.monotonic()
        endpoint = "completions" if kind == COMPLETION else "chat"
        status, nprompt, gen = _CLIENT_GONE, 0, None
        self.metrics.inflight.inc()
        try:
            params = await self._parse(request, kind)
            nprompt = len(params.prompt)
            rid = ("cmpl-" if kind == COMPLETION else "chatcmpl-") + uuid.uuid4().hex
            try:
                stream = self.client.generate(
                    params.prompt, max_tokens=params.max_tokens, temperature=params.temperature,
                    top_p=params.top_p, seed=params.seed, stop_token_ids=list(params.stop_token_ids),
                    ignore_eos=params.ignore_eos, req_id=rid)
            except DynaServeError as exc:
                raise from_dynaserve(exc) from None
            gen = _Generation(stream, self.codec.detokenizer(params.prompt),
                              TextStops(params.stop) if params.stop else None)
            try:
                async with stream:
                    self.active[rid] = stream
                    if params.stream:
                        resp = await self._stream(request, kind, rid, params, gen, endpoint, t0)
                    else:
                        resp = await self._whole(kind, rid, params, gen, endpoint, t0)
            finally:
                self.active.pop(rid, None)
            status = resp.status
            return resp
        except ApiError as err:
            status = err.status
            return _error(err)
        except _ClientGone as gone:  # the request was aborted when its stream block was left
            self.metrics.disconnects.inc()
            return gone.resp
        except asyncio.CancelledError:
            self.metrics.disconnects.inc()
            raise
        except web.HTTPException as exc:  # e.g. 413 from reading an oversized body
            status = exc.status
            raise
        except Exception:
            status = 500
            raise
        finally:
            self.metrics.inflight.dec()
            self.metrics.on_done(endpoint, status, time.monotonic() - t0, nprompt, gen.tokens if gen else 0)

    async def _parse(self, request: web.Request, kind: str) -> GenParams:
        raw = await request.read()
        try:
            body = check_body(orjson.loads(raw))
        except orjson.JSONDecodeError as exc:
            raise ApiError(400, f"the request body is not valid JSON: {exc}", INVALID, None, "invalid_json") from None
        check_model(body, self.cfg.model)
        params = (parse_completion if kind == COMPLETION else parse_chat)(body, self.codec, self.cfg)
        if self.broker_error is not None:
            raise ApiError(503, f"broker unavailable: {self.broker_error}", UNAVAILABLE, None, "broker_unavailable")
        return params

    async def _whole(self, kind: str, rid: str, params: GenParams, gen: _Generation, endpoint: str,
                     t0: float) -> web.Response:
        parts: list[str] = []
        try:
            async with contextlib.aclosing(gen.pieces()) as pieces:
                async for piece in pieces:
                    if not parts:
                        self.metrics.on_first_token(endpoint, time.monotonic() - t0)
                    parts.append(piece)
        except DynaServeError as exc:
            raise from_dynaserve(exc, "prompt" if kind == COMPLETION else "messages") from None
        parts.append(gen.tail)
        build = completion_body if kind == COMPLETION else chat_body
        return _json(build(rid, self.created_now(), self.cfg.model, "".join(parts), gen.finish,
                           usage(len(params.prompt), gen.tokens)))

    async def _stream(self, request: web.Request, kind: str, rid: str, params: GenParams, gen: _Generation,
                      endpoint: str, t0: float) -> web.StreamResponse:
        enc = StreamEncoder(kind, rid, self.created_now(), self.cfg.model, params.include_usage)
        async with contextlib.aclosing(gen.pieces()) as pieces:
            return await self._write_stream(request, kind, params, gen, endpoint, t0, enc, pieces)

    async def _write_stream(self, request: web.Request, kind: str, params: GenParams, gen: _Generation,
                            endpoint: str, t0: float, enc: StreamEncoder,
                            pieces: AsyncIterator[str]) -> web.StreamResponse:
        first: str | None
        try:  # the first token (or the error) decides the status line
            first = await pieces.__anext__()
        except StopAsyncIteration:
            first = None
        except DynaServeError as exc:
            raise from_dynaserve(exc, "prompt" if kind == COMPLETION else "messages") from None
        self.metrics.on_first_token(endpoint, time.monotonic() - t0)
        resp = web.StreamResponse(headers=_SSE_HEADERS)
        await resp.prepare(request)
        write = resp.write
        try:
            try:
                if first is not None:
                    await write(enc.first(first))
                    delta = enc.delta
                    async for piece in pieces:
                        await write(delta(piece))
                await write(enc.finish(gen.tail, gen.finish))
                if params.include_usage:
                    await write(enc.usage(usage(len(params.prompt), gen.tokens)))
            except DynaServeError as exc:
                await write(error_event(from_dynaserve(exc)))
            await write(DONE)
            await resp.write_eof()
        except ConnectionResetError:
            raise _ClientGone(resp) from None
        return resp

    def created_now(self) -> int:
        return int(time.time())

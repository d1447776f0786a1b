"""Client SDK: an asyncio ZeroMQ client and a small synchronous wrapper.

    async with DynaServeClient("tcp://127.0.0.1:5555") as client:
        async with client.generate([1, 2, 3], max_tokens=32) as stream:
            async for tok in stream:
                print(tok.token, tok.ts)

Leaving the ``async with`` block, cancelling the task that iterates, or ``await stream.abort()`` before
the request finishes aborts it on the broker (and so on both instances). Error replies raise the typed
exceptions of :mod:`dynaserve.errors`.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import zmq

from dynaserve import protocol as P
from dynaserve import security
from dynaserve.errors import BrokerUnavailableError, DynaServeError, error_from_wire
from dynaserve.sockets import Channel, CurveOptions, make_socket


@dataclass(frozen=True, slots=True)
class Token:
    """One streamed token and the monotonic time (seconds) the client received it."""

    token: int
    ts: float


@dataclass(slots=True)
class _Batch:
    tokens: list[int]
    finish: str | None
    ts: float


@dataclass
class RequestStream:
    """The token stream of one request: ``async for tok in stream`` yields Token objects."""

    client: DynaServeClient
    req_id: str
    submit_ts: float
    admitted: P.Admitted | None = None
    tokens: list[int] = field(default_factory=list)
    token_ts: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: DynaServeError | None = None
    _queue: asyncio.Queue = field(default_factory=asyncio.Queue)
    _pending: list[Token] = field(default_factory=list)
    _done: bool = False

    @property
    def finished(self) -> bool:
        return self._done

    def _push(self, batch: _Batch) -> None:
        self._queue.put_nowait(batch)

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> Token:
        while not self._pending:
            if self._done:
                if self.error is not None:
                    raise self.error
                raise StopAsyncIteration
            try:
                item = await self._queue.get()
            except asyncio.CancelledError:
                await self.abort()
                raise
            if isinstance(item, DynaServeError):
                self.error = item
                self._done = True
                self.client._forget(self.req_id)
                continue
            for t in item.tokens:
                self.tokens.append(t)
                self.token_ts.append(item.ts)
                self._pending.append(Token(t, item.ts))
            if item.finish is not None:
                self.finish_reason = item.finish
                self._done = True
                self.client._forget(self.req_id)
        return self._pending.pop(0)

    async def collect(self) -> list[int]:
        """Read the stream to its end; returns all tokens."""
        async for _ in self:
            pass
        return self.tokens

    async def abort(self) -> None:
        """Abort the request if it is still running."""
        if not self._done:
            self._done = True
            self.finish_reason = P.FINISH_ABORT
            self.client._forget(self.req_id)
            with contextlib.suppress(BrokerUnavailableError):  # nothing to abort on a broker we cannot reach
                self.client._send(P.AbortRequest(self.req_id))

    async def __aenter__(self) -> RequestStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.abort()


_PING = "liveness"  # nonce of the client's own liveness pings
_CONNECTION_ERRORS = ("protocol_version", "forbidden")  # error codes without a request id that end everything


class DynaServeClient:
    """Async client of a DynaServe broker. Use as ``async with DynaServeClient(addr) as c``."""

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        identity: bytes | None = None,
        curve_dir: str = "",
        curve_name: str = "client",
        curve: CurveOptions | None = None,
        liveness_s: float = 5.0,
    ) -> None:
        """``curve_dir`` (keys from scripts/keygen.py: ``clients/<curve_name>.key_secret`` and ``broker.key``)
        or explicit ``curve`` keys turn on CURVE authentication and encryption. While requests are running
        the client pings the broker; when it hears nothing for ``liveness_s`` seconds, or the broker
        restarted (and so forgot them), the running requests end with BrokerUnavailableError."""
        self.address = address
        self.identity = identity or uuid.uuid4().bytes
        if curve is None and curve_dir:
            curve = security.client_options(curve_dir, curve_name)
        self.curve = curve
        self._ctx: zmq.Context | None = None
        self._chan: Channel | None = None
        self._streams: dict[str, RequestStream] = {}
        self._ids = itertools.count(1)
        self._prefix = uuid.uuid4().hex[:8]
        self.connection_error: DynaServeError | None = None
        self._status_waiters: dict[str, asyncio.Future] = {}
        self.liveness_s = liveness_s
        self._last_heard = time.monotonic()
        self._boot_id: str | None = None
        self._watchdog: asyncio.Task | None = None

    async def __aenter__(self) -> DynaServeClient:
        await self.connect()
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.close()

    async def connect(self) -> None:
        self._ctx = zmq.Context()
        sock = make_socket(self._ctx, zmq.DEALER, connect=self.address, identity=self.identity, curve=self.curve)
        self._chan = Channel(sock, self._on_frames, "client")
        self._chan.attach()
        self._last_heard = time.monotonic()
        self._watchdog = asyncio.create_task(self._watch_broker())
        with contextlib.suppress(DynaServeError):
            self._send(P.StatusRequest(_PING))  # learn the broker's boot id before any request runs

    async def _watch_broker(self) -> None:
        """Ping while requests run; end them when the broker is silent or has restarted."""
        period = max(0.05, self.liveness_s / 5)
        while True:
            await asyncio.sleep(period)
            now = time.monotonic()
            if not self._streams:
                self._last_heard = now
                continue
            with contextlib.suppress(DynaServeError):
                self._send(P.StatusRequest(_PING))
            if now - self._last_heard > self.liveness_s:
                self._fail_all(BrokerUnavailableError(
                    f"no answer from the broker at {self.address} for {self.liveness_s} s; retry the request"))
                self._last_heard = now

    def _fail_all(self, err: DynaServeError) -> None:
        for stream in list(self._streams.values()):
            stream._push(err)  # type: ignore[arg-type]

    async def close(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        for stream in list(self._streams.values()):
            await stream.abort()
        if self._chan is not None:
            self._chan.close(200)  # let final aborts leave
        if self._ctx is not None:
            self._ctx.term()
        self._chan = None
        self._ctx = None

    def _send(self, msg: P.Message) -> None:
        if self._chan is None:
            raise BrokerUnavailableError("client is not connected")
        try:
            self._chan.send([P.encode(msg)])
        except zmq.Again:  # no connection to send on (e.g. refused by CURVE authentication) or queue full
            raise BrokerUnavailableError(f"cannot send to {self.address}: not connected or queue full") from None

    def send_raw(self, frames: list[bytes]) -> None:
        """Send raw frames (tests and diagnostics)."""
        assert self._chan is not None
        self._chan.send(frames)

    def _forget(self, req_id: str) -> None:
        self._streams.pop(req_id, None)

    def generate(
        self,
        prompt: list[int] | str,
        *,
        max_tokens: int = 16,
        temperature: float = 0.0,
        top_p: float = 1.0,
        seed: int | None = None,
        stop_token_ids: list[int] | None = None,
        ignore_eos: bool = False,
        slo_class: str = "default",
        req_id: str | None = None,
        force_split: int | None = None,
    ) -> RequestStream:
        """Submit a request; returns its stream at once (errors surface while iterating)."""
        rid = req_id or f"{self._prefix}-{next(self._ids)}"
        if rid in self._streams:
            raise ValueError(f"request id {rid!r} is already in use")
        sp = P.SamplingParams(max_tokens, temperature, top_p, seed, list(stop_token_ids or []), ignore_eos)
        if isinstance(prompt, str):
            msg = P.SubmitRequest(rid, [], sp, slo_class, prompt, force_split)
        else:
            msg = P.SubmitRequest(rid, list(prompt), sp, slo_class, None, force_split)
        stream = RequestStream(self, rid, time.monotonic())
        self._streams[rid] = stream
        if self.connection_error is not None:
            stream._push(self.connection_error)  # type: ignore[arg-type]
        else:
            try:
                self._send(msg)
            except BrokerUnavailableError as exc:
                stream._push(exc)  # type: ignore[arg-type]
        return stream

    async def status(self, timeout: float = 5.0) -> P.StatusReply:
        """The broker's view of the cluster; raises BrokerUnavailableError if it does not answer."""
        nonce = uuid.uuid4().hex
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        self._status_waiters[nonce] = fut
        self._send(P.StatusRequest(nonce))
        try:
            return await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise BrokerUnavailableError(f"no status reply from {self.address} within {timeout} s") from None
        finally:
            self._status_waiters.pop(nonce, None)

    def _on_frames(self, frames: list[bytes]) -> None:
        ts = time.monotonic()
        if len(frames) != 1:
            return
        try:
            msg = P.decode(frames[0], P.BROKER_TO_CLIENT)
        except P.ProtocolError:
            return
        self._last_heard = ts
        if isinstance(msg, P.TokenStream):
            for entry in msg.entries:  # [req_id, tokens, finish, ...]: fields are only ever appended
                rid, toks, finish = entry[0], entry[1], entry[2]
                stream = self._streams.get(rid)
                if stream is not None:
                    stream._push(_Batch(toks, finish, ts))
        elif isinstance(msg, P.StatusReply):
            boot = msg.stats.get("boot_id")
            if boot is not None:
                if self._boot_id is not None and boot != self._boot_id:
                    self._fail_all(BrokerUnavailableError(
                        "the broker restarted and lost the running requests; retry them"))
                self._boot_id = boot
            fut = self._status_waiters.get(msg.nonce)
            if fut is not None and not fut.done():
                fut.set_result(msg)
        elif isinstance(msg, P.Admitted):
            stream = self._streams.get(msg.req_id)
            if stream is not None:
                stream.admitted = msg
        elif isinstance(msg, P.ErrorReply):
            err = error_from_wire(msg.code, msg.message, msg.req_id)
            if msg.req_id is not None:
                stream = self._streams.get(msg.req_id)
                if stream is not None:
                    stream._push(err)  # type: ignore[arg-type]
            elif msg.code in _CONNECTION_ERRORS:  # the broker refuses this connection, not one request
                self.connection_error = err
                for stream in list(self._streams.values()):
                    stream._push(err)  # type: ignore[arg-type]
                for fut in self._status_waiters.values():
                    if not fut.done():
                        fut.set_exception(err)


class SyncClient:
    """Blocking wrapper: runs a DynaServeClient on a private event loop thread.

    The options are DynaServeClient's (``curve_dir``/``curve_name`` or ``curve`` for a CURVE-secured broker).
    """

    def __init__(
        self,
        address: str = "tcp://127.0.0.1:5555",
        *,
        identity: bytes | None = None,
        curve_dir: str = "",
        curve_name: str = "client",
        curve: CurveOptions | None = None,
        liveness_s: float = 5.0,
    ) -> None:
        # keys are read before the loop thread starts: a missing key file raises here, leaving nothing behind
        self._client = DynaServeClient(address, identity=identity, curve_dir=curve_dir, curve_name=curve_name,
                                       curve=curve, liveness_s=liveness_s)
        self._loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self._loop.run_forever, daemon=True, name="dynaserve-client")
        self._thread.start()
        self._call(self._client.connect())

    def status(self, timeout: float = 5.0) -> P.StatusReply:
        """The broker's view of the cluster; raises BrokerUnavailableError if it does not answer."""
        return self._call(self._client.status(timeout))

    def _call(self, coro: Any, timeout: float | None = None) -> Any:
        return asyncio.run_coroutine_threadsafe(coro, self._loop).result(timeout)

    def generate(self, prompt: list[int] | str, timeout: float | None = None, **kwargs: Any) -> list[int]:
        """Run one request to completion and return its tokens."""

        async def _run() -> list[int]:
            async with self._client.generate(prompt, **kwargs) as stream:
                return await stream.collect()

        return self._call(_run(), timeout)

    def stream(self, prompt: list[int] | str, **kwargs: Any) -> Iterator[Token]:
        """Yield tokens as they arrive."""
        q: Any = __import__("queue").Queue()
        done = object()

        async def _run() -> None:
            try:
                async with self._client.generate(prompt, **kwargs) as stream:
                    async for tok in stream:
                        q.put(tok)
            except DynaServeError as exc:
                q.put(exc)
            finally:
                q.put(done)

        asyncio.run_coroutine_threadsafe(_run(), self._loop)
        while True:
            item = q.get()
            if item is done:
                return
            if isinstance(item, Exception):
                raise item
            yield item

    def close(self) -> None:
        self._call(self._client.close())
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(5)

    def __enter__(self) -> SyncClient:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

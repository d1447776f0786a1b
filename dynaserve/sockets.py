"""The one place ZeroMQ sockets are built: type, bind/connect, identity, linger, HWM, size limit."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

import zmq

from dynaserve.protocol import MAX_FRAME_BYTES

log = logging.getLogger("dynaserve.sockets")


@dataclass(frozen=True)
class CurveOptions:
    """CURVE keys of one socket (z85-encoded, as in pyzmq certificates).

    A server socket sets ``server_key=None`` and a ``zap_domain`` (the ZAP authenticator's allow-list for
    that socket); a client socket sets ``server_key`` to the server's public key.
    """

    public_key: bytes
    secret_key: bytes
    server_key: bytes | None = None
    zap_domain: str = ""


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    bind: str | None = None,
    connect: str | None = None,
    identity: bytes | None = None,
    hwm: int = 100_000,
    max_msg_bytes: int = MAX_FRAME_BYTES,
    linger_ms: int = 0,
    curve: CurveOptions | None = None,
) -> zmq.Socket:
    """Create a socket with DynaServe's defaults. ROUTER sockets report unroutable peers as errors.

    With ``curve`` the socket authenticates and encrypts with CURVE: as the server when
    ``curve.server_key`` is None (peers are checked by the ZAP handler of ``curve.zap_domain``), else as a
    client of the server with that public key.
    """
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, linger_ms)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_msg_bytes)
    if identity is not None:
        sock.setsockopt(zmq.IDENTITY, identity)
    if kind == zmq.ROUTER:
        sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
    if curve is not None:
        sock.setsockopt(zmq.CURVE_PUBLICKEY, curve.public_key)
        sock.setsockopt(zmq.CURVE_SECRETKEY, curve.secret_key)
        if curve.server_key is None:
            sock.setsockopt(zmq.ZAP_DOMAIN, curve.zap_domain.encode())
            sock.setsockopt(zmq.CURVE_SERVER, 1)
        else:
            sock.setsockopt(zmq.CURVE_SERVERKEY, curve.server_key)
    if bind:
        sock.bind(bind)
    if connect:
        sock.connect(connect)
    return sock


class Channel:
    """A plain (non-asyncio) ZeroMQ socket driven by an asyncio loop.

    Incoming messages are drained into ``handler(frames)`` whenever the socket's FD signals; sends never
    block (``zmq.Again`` or ``zmq.ZMQError`` raise at once to the caller). ZeroMQ's FD is edge-triggered
    and a send can consume the edge of an incoming message, so every send re-checks for input.
    Handler exceptions are logged and never stop the channel.
    """

    def __init__(
        self, sock: zmq.Socket, handler: Callable[[list[bytes]], None], name: str = "", user_ids: bool = False,
        threadsafe: bool = False,
    ) -> None:
        self.sock = sock
        self.handler = handler
        self.name = name
        # user_ids: record the ZAP User-Id of each incoming message in ``last_user_id`` (read by the handler)
        self.user_ids = user_ids
        self.last_user_id: str | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._loop_thread = 0
        self._scheduled = False
        self._closed = False
        # threadsafe: other threads may call send() too (a worker's engine thread ships its steps' tokens
        # itself); every use of the socket then holds one lock, and a send from another thread that finds
        # input waiting hands the drain to the loop
        self._lock: contextlib.AbstractContextManager = threading.Lock() if threadsafe else contextlib.nullcontext()

    def attach(self, loop: asyncio.AbstractEventLoop | None = None) -> None:
        self._loop = loop or asyncio.get_running_loop()
        self._loop_thread = threading.get_ident()
        self._loop.add_reader(self.sock.FD, self._drain)
        self._schedule()

    def _schedule(self) -> None:
        if not self._scheduled and self._loop is not None and not self._closed:
            self._scheduled = True
            self._loop.call_soon(self._drain)

    def _drain(self, budget: int = 2000) -> None:
        self._scheduled = False
        sock = self.sock
        for _ in range(budget):
            with self._lock:
                if self._closed or not (sock.getsockopt(zmq.EVENTS) & zmq.POLLIN):
                    return
                if self.user_ids:
                    parts = sock.recv_multipart(zmq.NOBLOCK, copy=False)
                    self.last_user_id = _user_id(parts[-1])
                    frames = [p.bytes for p in parts]
                else:
                    frames = sock.recv_multipart(zmq.NOBLOCK)
            try:
                self.handler(frames)
            except Exception:
                log.exception("%s: handler failed", self.name)
        self._schedule()  # more waiting: let other tasks run first

    def send(self, frames: list[bytes]) -> None:
        """Send now or raise (zmq.Again when the peer's queue is full, ZMQError when unroutable)."""
        pending = False
        try:
            with self._lock:
                try:
                    self.sock.send_multipart(frames, zmq.NOBLOCK, copy=False)
                finally:
                    pending = not self._closed and bool(self.sock.getsockopt(zmq.EVENTS) & zmq.POLLIN)
        finally:
            if pending:
                if threading.get_ident() == self._loop_thread:
                    self._schedule()
                elif self._loop is not None:
                    self._loop.call_soon_threadsafe(self._schedule)

    def close(self, linger_ms: int = 0) -> None:
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._loop is not None:
                self._loop.remove_reader(self.sock.FD)
            self.sock.close(linger_ms)


def _user_id(frame: zmq.Frame) -> str | None:
    """The ZAP User-Id the authenticator gave the frame's peer (None when there is none)."""
    try:
        uid = frame.get("User-Id")
    except zmq.ZMQError:
        return None
    return uid if isinstance(uid, str) else None

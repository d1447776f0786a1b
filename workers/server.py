"""The worker process: a thin asyncio/ZeroMQ shell that drives one engine.

A DEALER socket (identity = instance id) talks to the broker's worker ROUTER. One task receives broker
messages and hands them to the engine; the main loop runs engine steps, ships every step's tokens (one
TokenBatch), handoffs and failures in one message (``protocol.MAX_WORKER_FRAMES``), and reports load every
heartbeat. The worker re-registers when the broker says it does not know it (e.g. after a broker restart).

Direct handoffs: the worker binds a PULL socket, its handoff inbox (``handoff_bind``), and names it when
it registers. As A, it sends every handoff's StartDecode to B's inbox (the descriptor's ``peer_addr``,
through one PUSH socket per peer) right before the message with its HandoffReady to the broker, which
relays a second copy. As B, it starts on the first copy and drops the other (``_direct``). A copy for a
request this worker does not hold as a waiting B (aborted, or the broker's dispatch not yet here) is
dropped: the broker's copy, which follows that dispatch on the same socket, is the one that counts.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import threading
import time
from dataclasses import dataclass

import zmq

from dynaserve import protocol as P
from dynaserve import security
from dynaserve.calibration import format_step, open_step_log
from dynaserve.sockets import Channel, make_socket
from workers.engine import Engine, EngineError, StepOutput
from workers.kv import TRANSPORT_KINDS
from workers.local_scheduler import PREFILL_ORDERS
from workers.metrics import WorkerMetrics

log = logging.getLogger("dynaserve.worker")


@dataclass(frozen=True)
class WorkerConfig:
    """Worker settings (flags: --broker-addr etc.; TOML section [worker])."""

    broker_addr: str = "tcp://127.0.0.1:5556"  # the broker's worker address
    instance_id: str = "w0"  # unique name of this instance in the cluster
    engine: str = "sim"  # engine backend: sim or vllm
    kv_transport: str = "nixl"  # KV transfer between instances: nixl
    pool: str = "any"  # pool for the disagg policy: any, prefill or decode
    tbt_slo_ms: float = 100.0  # TBT SLO the local scheduler keeps every step under
    margin: float = 0.1  # safety margin under the TBT SLO
    max_batched_tokens: int = 8192  # tokens per step at most
    max_num_seqs: int = 256  # decode sequences per step at most
    prefill_order: str = "deadline"  # prefill chunks by TTFT deadline, or "fcfs" (arrival order)
    demote_late: bool = True  # deadline order: prefills past their TTFT deadline go behind the others
    step_model: str = ""  # step-model file (python -m workers.calibrate); empty: cost tables (sim), CPU default (vllm)
    idle_poll_ms: float = 1.0  # poll period for transfers and confirmations while idle
    metrics_port: int = 0  # Prometheus metrics on http://127.0.0.1:PORT/metrics; 0 = off
    curve_dir: str = ""  # CURVE key directory: uses workers/<instance_id>.key_secret and broker.key; empty = off
    step_log: str = ""  # append every engine step (time, measured ms, batch composition) to this file; empty = off
    handoff_bind: str = "tcp://127.0.0.1:*"  # handoff inbox: peers send StartDecode here directly (port * = any free; the host must be one peers reach); empty = through the broker only (also with CURVE on)
    allow_remote_bind: bool = False  # permit a handoff inbox off loopback (a trusted network between workers)

    def __post_init__(self) -> None:
        if not self.instance_id or len(self.instance_id) > 64:
            raise ValueError("instance_id must be 1..64 characters")
        if self.kv_transport not in TRANSPORT_KINDS:
            raise ValueError(f"kv_transport must be one of {', '.join(TRANSPORT_KINDS)}")
        if self.pool not in ("any", "prefill", "decode"):
            raise ValueError("pool must be any, prefill or decode")
        if self.prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"prefill_order must be one of {PREFILL_ORDERS}")
        if self.handoff_bind and not self.handoff_bind.startswith(("tcp://", "ipc://")):
            raise ValueError(f"handoff_bind must be a tcp:// or ipc:// address, got {self.handoff_bind!r}")
        host = self.handoff_bind[6:].rsplit(":", 1)[0] if self.handoff_bind.startswith("tcp://") else "127.0.0.1"
        if host not in ("127.0.0.1", "localhost", "[::1]") and not self.allow_remote_bind:
            raise ValueError(f"refusing to bind the handoff inbox {self.handoff_bind} off loopback without "
                             "--allow-remote-bind (it takes StartDecode from any peer that reaches it)")


BURST_REPORT_FALLBACK = 10  # during a burst the loop reports only after this many heartbeats without one,
BURST_REPORT_FALLBACK_MAX_S = 0.25  # and at most this long (never less than a heartbeat) after the last


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine) -> None:
        self.cfg = config
        self.engine = engine
        self.ctx = zmq.Context()
        self.chan: Channel | None = None
        self.heartbeat_s = 0.02
        self.registered = asyncio.Event()
        self._wake = asyncio.Event()
        self._stop = asyncio.Event()
        self._seq = 0
        self._last_report = 0.0  # monotonic time of the last LoadReport (the loop's or the engine thread's)
        self._report_lock = threading.Lock()  # _seq and _last_report: the engine thread reports during bursts
        self._burst = False  # the engine thread is running a burst and ships (and reports) itself
        self._shipper = False  # the engine ships its own steps (Engine.set_shipper)
        self._registering = False  # a RegisterWorker is out and not yet acknowledged
        self.steps = 0
        self.metrics = WorkerMetrics(config.instance_id)
        self._step_log = open_step_log(config.step_log) if config.step_log else None
        self._step_log_lock = threading.Lock()
        self.inbox: Channel | None = None  # handoff inbox (PULL), None when off
        self.handoff_addr = ""  # its address as peers connect to it
        # B instance -> (its handoff inbox, a PUSH socket connected to it); used by the engine thread and the loop
        self._peers: dict[str, tuple[str, zmq.Socket]] = {}
        self._peers_lock = threading.Lock()
        self._handoff_to: dict[str, tuple[str, str]] = {}  # A's req_id -> (B's instance, B's handoff inbox)
        self._direct: set[str] = set()  # B requests started by A's direct StartDecode (the broker's copy follows)

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()

    def _send(self, msg: P.Message) -> None:
        self._send_frames([P.encode(msg)], False)

    def _send_frames(self, frames: list[bytes], tokens: bool) -> None:
        """One message to the broker. With ``tokens`` (it carries a TokenBatch) a full queue raises zmq.Again;
        otherwise the message is dropped with a warning."""
        assert self.chan is not None
        try:
            self.chan.send(frames)
        except zmq.Again:
            if tokens:
                raise
            log.warning("broker queue full; dropped %d message(s)", len(frames))

    def _register(self) -> None:
        self._registering = True
        info = self.engine.info
        self._send(P.RegisterWorker(
            self.cfg.instance_id, info.kind, info.model, info.kv_capacity_tokens, info.block_size,
            info.max_model_len, self.cfg.kv_transport, info.vocab_size, info.eos_token_id,
            info.kv_bytes_per_token, self.cfg.pool, info.max_num_seqs, self.handoff_addr,
            info.early_pull_tail_tokens if self.handoff_addr else 0,  # chunks travel through the inbox only
            list(info.step_model),
        ))

    async def run(self) -> None:
        curve = security.worker_options(self.cfg.curve_dir, self.cfg.instance_id) if self.cfg.curve_dir else None
        sock = make_socket(self.ctx, zmq.DEALER, connect=self.cfg.broker_addr, identity=self.cfg.instance_id.encode(),
                           curve=curve)
        # the vLLM engine's thread ships its steps' outputs itself (through _ship, on this socket)
        shipper = self._shipper = self.engine.set_shipper(self._ship)
        self.chan = Channel(sock, self._on_frames, "broker", threadsafe=shipper)
        self.chan.attach()
        if self.cfg.handoff_bind and not self.cfg.curve_dir:
            inbox = make_socket(self.ctx, zmq.PULL, bind=self.cfg.handoff_bind)
            self.handoff_addr = inbox.getsockopt_string(zmq.LAST_ENDPOINT)
            self.inbox = Channel(inbox, self._on_peer_frames, "handoff inbox")
            self.inbox.attach()
        self.metrics.serve(self.cfg.metrics_port)
        try:
            self._register()
            while not self.registered.is_set() and not self._stop.is_set():
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self.registered.wait(), 1.0)
                if not self.registered.is_set():
                    self._register()
            await self._main_loop()
        finally:
            self.engine.close()
            self.metrics.close()
            if self._step_log is not None:
                self._step_log.close()
            if self.inbox is not None:
                self.inbox.close()
            with self._peers_lock:
                for _, peer in self._peers.values():
                    peer.close(0)
                self._peers.clear()
            self.chan.close(100)
            self.ctx.term()

    def _on_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 1:
            log.warning("dropping a %d-frame message from the broker", len(frames))
            return
        frame = frames[0]
        try:
            msg = P.decode(frame, P.BROKER_TO_WORKER + (P.ErrorReply,))
        except P.ProtocolError as exc:
            log.warning("bad frame from broker: %s", exc)
            return
        now = time.monotonic()
        if isinstance(msg, P.DispatchMicro):
            desc = msg.desc
            if desc.role == P.ROLE_A and desc.peer_addr and desc.peer:
                self._handoff_to[desc.req_id] = (desc.peer, desc.peer_addr)  # before the engine can hand off
                self._peer_socket(desc.peer, desc.peer_addr)  # connect now, not on the handoff's critical path
            try:
                self.engine.add(desc, now)
            except EngineError as exc:
                self._handoff_to.pop(desc.req_id, None)
                self._send(P.MicroFailed(desc.req_id, exc.code, str(exc)))
        elif isinstance(msg, P.StartDecode):
            if msg.req_id in self._direct:  # started on A's direct copy already
                self._direct.discard(msg.req_id)
                return
            try:
                self.engine.start_decode(msg.req_id, msg.kv, msg.num_tokens, msg.tokens, now)
            except EngineError as exc:
                self._send(P.MicroFailed(msg.req_id, exc.code, str(exc)))
            else:
                self.metrics.handoffs_started["relay"].inc()
        elif isinstance(msg, P.AbortMicro):
            self._direct.discard(msg.req_id)
            self._handoff_to.pop(msg.req_id, None)
            self.engine.abort(msg.req_id)
        elif isinstance(msg, P.RegisterAck):
            self._registering = False
            if msg.ok:
                self.heartbeat_s = max(0.001, msg.heartbeat_ms / 1000.0)
                self.registered.set()
                log.info("registered as %s", msg.instance_id)
            else:
                log.error("registration refused: %s", msg.reason)
                self.stop()
        elif isinstance(msg, P.ErrorReply):
            if msg.code == "not_registered" and not self._registering:
                # a restarted broker (or one that declared this worker dead) has re-planned or failed
                # whatever this worker was running: drop it all, then join again
                stale = self.engine.active_ids()
                for rid in stale:
                    self.engine.abort(rid)
                self._direct.clear()
                self._handoff_to.clear()
                if stale:
                    log.warning("broker does not know this worker: dropped %d micro-requests", len(stale))
                self.registered.clear()
                self._register()
            elif msg.code != "not_registered":
                log.warning("broker error: %s %s", msg.code, msg.message)
        elif isinstance(msg, P.Shutdown):
            log.info("shutdown: %s", msg.reason)
            self.stop()
        self._wake.set()

    def _on_peer_frames(self, frames: list[bytes]) -> None:
        """A StartDecode straight from A (its copy through the broker follows and is then dropped), or a
        KvChunk (blocks A has finished while it still runs)."""
        try:
            if len(frames) != 1:
                raise P.ProtocolError("malformed", f"a {len(frames)}-frame message")
            msg = P.decode(frames[0], P.WORKER_TO_WORKER)
        except P.ProtocolError as exc:
            log.warning("bad frame on the handoff inbox: %s", exc)
            return
        if isinstance(msg, P.KvChunk):
            self.engine.kv_chunk(msg.req_id, msg.kv, msg.num_tokens)
            return
        assert isinstance(msg, P.StartDecode)
        try:
            self.engine.start_decode(msg.req_id, msg.kv, msg.num_tokens, msg.tokens, time.monotonic())
        except EngineError as exc:  # not a waiting B here (aborted, or its dispatch not yet here)
            log.debug("direct StartDecode for %s dropped: %s", msg.req_id, exc)
            return
        self._direct.add(msg.req_id)
        self.metrics.handoffs_started["direct"].inc()

    def _peer_socket(self, instance: str, addr: str) -> zmq.Socket | None:
        """The PUSH socket to ``instance``'s handoff inbox at ``addr`` (connected on first use; a new one when
        the instance came back at another address); None when it cannot be made."""
        with self._peers_lock:
            known = self._peers.get(instance)
            if known is not None and known[0] == addr:
                return known[1]
            if known is not None:
                known[1].close(0)
                del self._peers[instance]
            try:
                sock = make_socket(self.ctx, zmq.PUSH, connect=addr, hwm=1000)
            except zmq.ZMQError as exc:
                log.warning("cannot connect to the handoff inbox %s of %s: %s", addr, instance, exc)
                return None
            self._peers[instance] = (addr, sock)
            return sock

    def _send_direct(self, instance: str, addr: str, msg: P.StartDecode | P.KvChunk) -> None:
        """Send A's StartDecode or KvChunk to B's handoff inbox (engine thread or loop); a failure only loses
        this message (the broker relays every StartDecode; a chunk is advisory)."""
        frame = P.encode(msg)
        sock = self._peer_socket(instance, addr)
        if sock is None:
            return
        with self._peers_lock:
            try:
                sock.send(frame, zmq.NOBLOCK)
            except zmq.ZMQError as exc:  # full queue (B not reading) or closed: the broker's copy still goes
                log.warning("direct %s of %s to %s not sent (%s)", type(msg).__name__, msg.req_id, addr, exc)

    def _ship(self, out: StepOutput) -> None:
        """Send a step's tokens, handoffs and failures; called on the loop, and on the engine's own thread by an
        engine that ships its steps itself (Engine.set_shipper)."""
        if out.step_ms > 0:
            self.steps += 1
        if self._step_log is not None:
            self._log_step(out)
        # one message to the broker: the step's tokens, then its handoffs and failures, so that they arrive
        # together (a worker that dies after A's last tokens left has also sent their HandoffReady)
        frames = [P.encode_token_entries(P.TokenBatch.TYPE, out.entries)] if out.entries else []
        if self._handoff_to:  # an A that ends without a handoff (a stop token) forgets its B
            for entry in out.entries:
                if entry[2] is not None and entry[2] != P.FINISH_HANDOFF:
                    self._handoff_to.pop(entry[0], None)
        for c in out.chunks:
            to = self._handoff_to.get(c.req_id)
            if to is not None:
                self._send_direct(*to, P.KvChunk(c.req_id, c.kv, c.num_tokens))
        for h in out.handoffs:
            to = self._handoff_to.pop(h.req_id, None)
            if to is not None:
                self._send_direct(*to, P.StartDecode(h.req_id, h.kv, h.num_tokens, h.tokens))
            frames.append(P.encode(P.HandoffReady(h.req_id, h.kv, h.num_tokens, h.tokens)))
        frames += [P.encode(P.MicroFailed(rid, code, message)) for rid, code, message in out.failures]
        if self._burst and time.monotonic() >= self._last_report + self.heartbeat_s:
            # the engine thread's heartbeat during a burst (_report_loop) rides with the step: one send, not two
            with self._report_lock:
                frames.append(self._load_report())
                self._send_step(frames, bool(out.entries))
        elif frames:
            self._send_step(frames, bool(out.entries))
        self.metrics.on_output(out)

    def _send_step(self, frames: list[bytes], tokens: bool) -> None:
        """A step's frames as one message (several when there are more than a message may hold)."""
        for i in range(0, len(frames), P.MAX_WORKER_FRAMES):
            self._send_frames(frames[i : i + P.MAX_WORKER_FRAMES], i == 0 and tokens)

    def _log_step(self, out: StepOutput) -> None:
        """Log a step (buffered), and flush the log before the tokens or the handoff of a step that ends a
        micro-request leave: a reader that saw a request end on this worker finds every step that ran for it."""
        assert self._step_log is not None
        with self._step_log_lock:  # the engine's thread and the loop both ship
            if out.step_ms > 0:
                self._step_log.write(format_step(time.monotonic(), out.step_ms, out.prefill_tokens, out.decode_seqs,
                                                 out.decode_ctx_tokens, out.prefill_attn))
            if out.handoffs or any(entry[2] is not None for entry in out.entries):
                self._step_log.flush()

    def _report(self) -> None:
        """Send a LoadReport now (the loop's heartbeat)."""
        with self._report_lock:
            self._send_frames([self._load_report()], False)

    def _load_report(self) -> bytes:
        """The next LoadReport, encoded. The caller holds ``_report_lock`` until it is sent, so reports leave
        in number order: the loop sends them alone, and during bursts the engine thread adds them to a step's
        message (``_ship``)."""
        ld = self.engine.load()
        self._seq += 1
        self._last_report = time.monotonic()
        self.metrics.on_load(ld)
        return P.encode(P.LoadReport(
            self.cfg.instance_id, self._seq, ld.queued_prefill_tokens, ld.running_seqs, ld.decode_ctx_tokens,
            ld.pending_decode_tokens, ld.kv_used_tokens, ld.kv_capacity_tokens, ld.step_ms, ld.token_budget,
            ld.held_blocks, ld.active_requests, ld.step_scale,
        ))

    async def _report_loop(self) -> None:
        """Heartbeats with load, on their own timer: a long engine step (it runs off the event loop) must
        not make the broker think this worker died. During a burst the engine thread sends them after its
        steps (``_ship``), so the loop does not wake every heartbeat to take the GIL from it; the loop still
        sends one when the engine thread has not for ``BURST_REPORT_FALLBACK`` heartbeats (a long step)."""
        while not self._stop.is_set():
            period = self.heartbeat_s
            if self._burst:
                period = max(period, min(period * BURST_REPORT_FALLBACK, BURST_REPORT_FALLBACK_MAX_S))
            due = self._last_report + period
            now = time.monotonic()
            if now >= due:
                self._report()
                due = now + period
            await asyncio.sleep(due - now)

    async def _main_loop(self) -> None:
        reporter = asyncio.create_task(self._report_loop())
        idle = self.cfg.idle_poll_ms / 1000.0
        try:
            while not self._stop.is_set():
                now = time.monotonic()
                if now >= self._last_report + self.heartbeat_s:
                    self._report()  # due: e.g. right after a burst, while the report loop sleeps its longer period
                if self.engine.has_work():
                    self._burst = self._shipper
                    try:
                        out = await self.engine.step(now)
                    finally:
                        self._burst = False
                    self._ship(out)
                    if out.step_ms > 0:
                        continue
                else:
                    self._ship(self.engine.housekeeping(now))
                # nothing ran: wait for a message or the next poll
                self._wake.clear()
                timeout = idle if self.engine.load().active_requests else self.heartbeat_s
                with contextlib.suppress(asyncio.TimeoutError):
                    await asyncio.wait_for(self._wake.wait(), timeout)
        finally:
            reporter.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await reporter

"""The broker process: a thin asyncio/ZeroMQ shell around the global scheduler.

Sockets: a client-facing ROUTER (SubmitRequest / AbortRequest in; Admitted / TokenStream / ErrorReply out)
and a worker-facing ROUTER (RegisterWorker / LoadReport / TokenBatch / HandoffReady / MicroFailed in;
RegisterAck / DispatchMicro / StartDecode / AbortMicro out). Every decision is made by the pure policy in
broker.scheduler; this module only moves messages and keeps the request table.

Handoffs: A's descriptor names B's handoff inbox (``peer_addr``, from B's registration), so A sends its
StartDecode to B directly, and its HandoffReady here, which the broker relays to B as before (B acts on
the first copy). B may therefore start before the broker has seen the handoff: B's tokens are held until
A's HandoffReady arrives, which A sends after its own last tokens, so the client's stream stays in order.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import math
import time
import uuid
from collections import deque
from dataclasses import dataclass

import zmq

from broker.cluster_state import ClusterState, InstanceState, Pricing, RequestInfo
from broker.metrics import BrokerMetrics
from broker.requests import BrokerRequest, RequestTable
from broker.scheduler import commit, forced_plan, make_policy
from dynaserve import protocol as P
from dynaserve import security
from dynaserve.calibration import choose_step_model
from dynaserve.costmodel import StepLatencyModel
from dynaserve.predictor import make_predictor
from dynaserve.sockets import Channel, make_socket
from dynaserve.split import tokens_emitted_by_a
from dynaserve.tokenizer import ByteTokenizer, Tokenizer

log = logging.getLogger("dynaserve.broker")


@dataclass(frozen=True)
class BrokerConfig:
    """Broker settings (flags: --client-addr etc.; TOML section [broker])."""

    client_addr: str = "tcp://127.0.0.1:5555"  # ZeroMQ address clients connect to
    worker_addr: str = "tcp://127.0.0.1:5556"  # ZeroMQ address workers connect to
    policy: str = "dynaserve"  # global scheduling policy: colocate, disagg, dynaserve or balance
    prefill_instances: int = 1  # disagg policy: number of instances in the prefill pool
    concentrate: str = "auto"  # dynaserve policy: decode concentration, off, on or auto (docs/study.md)
    predictor: str = "max_tokens"  # output-length predictor: max_tokens or history
    ttft_slo_ms: float = 2000.0  # TTFT SLO of the default SLO class
    ttft_prefill_factor: float = 0.0  # TTFT SLO = ttft_slo_ms + this x the prompt's prefill time alone on an
    # idle instance (priced with the step model); 0 = the same TTFT SLO for every prompt length
    tbt_slo_ms: float = 100.0  # TBT SLO (P99) of the default SLO class
    model: str = "llama3-8b"  # model the scheduler prices work for: a cost-model preset or an HF model directory
    step_model: str = ""  # step-model file (python -m workers.calibrate) to price work with instead of model/gpu/tp
    gpu: str = "a100"  # GPU of the cost tables: a100 or h100
    tp: int = 1  # tensor-parallel degree of each instance
    transfer_gbps: float = 25.0  # KV link bandwidth the scheduler assumes, GB/s
    heartbeat_ms: int = 20  # how often workers report load
    worker_timeout_ms: int = 5000  # a worker silent this long is declared dead
    max_queued: int = 4096  # requests waiting for capacity before new ones are rejected
    max_active: int = 65536  # admitted requests in flight at most
    slo_reject_factor: float = 0.0  # reject requests whose best predicted TTFT exceeds this x the TTFT SLO; 0 = off
    max_prompt_tokens: int = 0  # longest prompt accepted; 0 = smallest worker max_model_len
    allow_remote_bind: bool = False  # permit binding to non-loopback addresses
    max_replans: int = 3  # times a request may be re-planned after losing an instance before it fails
    allow_forced_splits: bool = False  # honour SubmitRequest.force_split (debugging, split experiments)
    direct_handoff: bool = True  # A sends StartDecode to B's handoff inbox as well as through the broker
    early_tail_auto: bool = True  # early pulls: pick each split's tail for the link and A's load (Pricing.early_tail),
    # priced with each instance's own step model (docs/vllm_engine.md); off: every A uses its worker's own tail
    metrics_port: int = 0  # Prometheus metrics on http://127.0.0.1:PORT/metrics; 0 = off
    curve_dir: str = ""  # CURVE key directory (scripts/keygen.py): authenticate and encrypt; empty = off

    def __post_init__(self) -> None:
        for addr in (self.client_addr, self.worker_addr):
            if not addr.startswith(("tcp://", "ipc://", "inproc://")):
                raise ValueError(f"unsupported address {addr!r}: use tcp://, ipc:// or inproc://")
            if addr.startswith("tcp://") and not self.allow_remote_bind and not self.curve_dir:
                host = addr[6:].rsplit(":", 1)[0]
                if host not in ("127.0.0.1", "localhost", "[::1]"):
                    raise ValueError(f"refusing to bind {addr} off loopback without --allow-remote-bind")
        if self.heartbeat_ms <= 0 or self.worker_timeout_ms <= self.heartbeat_ms:
            raise ValueError("need 0 < heartbeat_ms < worker_timeout_ms")
        if self.ttft_slo_ms <= 0 or self.ttft_prefill_factor < 0:
            raise ValueError("need ttft_slo_ms > 0 and ttft_prefill_factor >= 0")
        if self.prefill_instances < 1:
            raise ValueError(f"prefill_instances must be 1 or more, got {self.prefill_instances}")


@dataclass
class BrokerStats:
    admitted: int = 0
    rejected: int = 0
    finished: int = 0
    aborted: int = 0
    failed: int = 0
    tokens_relayed: int = 0
    bad_frames: int = 0
    kv_recomputes: int = 0
    replanned: int = 0


class Broker:
    """The broker shell. ``await Broker(cfg).run()``; ``stop()`` ends it."""

    def __init__(self, config: BrokerConfig, tokenizer: Tokenizer | None = None) -> None:
        self.cfg = config
        self.ctx = zmq.Context()
        self.cluster = ClusterState()
        self.pricing = Pricing(
            choose_step_model(config.step_model, config.model, config.gpu, config.tp)[0],
            transfer_gbps=config.transfer_gbps, early_tail_auto=config.early_tail_auto,
        )
        opts: dict[str, object] = {}
        if config.policy == "disagg":
            opts["prefill_instances"] = config.prefill_instances
        elif config.policy == "dynaserve":
            opts["concentrate"] = config.concentrate
        self.policy = make_policy(config.policy, self.pricing, **opts)
        self.predictor = make_predictor(config.predictor)
        self.table = RequestTable()
        self.queue: deque[BrokerRequest] = deque()  # admitted but waiting for capacity
        self.tokenizer = tokenizer
        self.stats = BrokerStats()
        self.metrics = BrokerMetrics(self)
        self.last_seen: dict[str, float] = {}
        self.vocabs: dict[str, int] = {}
        self.handoff_addrs: dict[str, str] = {}  # instance -> its handoff inbox (RegisterWorker.handoff_addr)
        self.reports: dict[str, P.LoadReport] = {}
        self.boot_id = uuid.uuid4().hex
        self._stop = asyncio.Event()
        self.clients: Channel | None = None
        self.workers: Channel | None = None
        self.auth: security.KeyAuthenticator | None = None

    # ------------------------------------------------------------------ lifecycle

    def stop(self) -> None:
        self._stop.set()

    async def run(self, ready: asyncio.Event | None = None) -> None:
        curve_c = curve_w = None
        if self.cfg.curve_dir:  # ZAP handler first: sockets bound before it would accept anyone
            self.auth = security.start_authenticator(self.ctx, self.cfg.curve_dir)
            curve_c = security.server_options(self.cfg.curve_dir, security.CLIENTS)
            curve_w = security.server_options(self.cfg.curve_dir, security.WORKERS)
        self.clients = Channel(make_socket(self.ctx, zmq.ROUTER, bind=self.cfg.client_addr, curve=curve_c),
                               self._on_client_frames, "clients", user_ids=bool(self.cfg.curve_dir))
        self.workers = Channel(make_socket(self.ctx, zmq.ROUTER, bind=self.cfg.worker_addr, curve=curve_w),
                               self._on_worker_frames, "workers", user_ids=bool(self.cfg.curve_dir))
        self.clients.attach()
        self.workers.attach()
        self.metrics.serve(self.cfg.metrics_port)
        log.info("broker up: clients %s, workers %s, policy %s", self.cfg.client_addr, self.cfg.worker_addr,
                 self.cfg.policy)
        if ready is not None:
            ready.set()
        tasks = [asyncio.create_task(self._monitor_loop())]
        try:
            await self._stop.wait()
        finally:
            for t in tasks:
                t.cancel()
            for t in tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await t
            for inst_id in list(self.cluster.instances):
                self._send_worker(inst_id, P.Shutdown("broker stopping"))
            self.clients.close(0)
            self.workers.close(100)
            self.metrics.close()
            if self.auth is not None:
                self.auth.stop()
            self.ctx.term()

    # ------------------------------------------------------------------ sending

    def _send_client(self, client: bytes, msg: P.Message) -> None:
        self._send_client_raw(client, P.encode(msg))

    def _send_client_raw(self, client: bytes, frame: bytes) -> None:
        assert self.clients is not None
        try:
            self.clients.send([client, frame])
        except zmq.ZMQError as exc:  # client gone (unroutable) or its queue is full
            log.warning("dropping client %s: %s", client.hex(), exc)
            for req in self.table.of_client(client):
                self._finish(req, abort_workers=True)
                self.stats.aborted += 1

    def _send_worker(self, instance_id: str, msg: P.Message) -> bool:
        assert self.workers is not None
        try:
            self.workers.send([instance_id.encode(), P.encode(msg)])
            return True
        except zmq.ZMQError as exc:
            log.warning("cannot reach worker %s: %s", instance_id, exc)
            return False

    def _client_error(self, client: bytes, code: str, message: str, req_id: str | None) -> None:
        self._send_client(client, P.ErrorReply(code, message, req_id))

    # ------------------------------------------------------------------ clients

    def _on_client_frames(self, frames: list[bytes]) -> None:
        if len(frames) != 2:
            self.stats.bad_frames += 1
            if frames:
                self._client_error(frames[0], "malformed", f"expected 1 frame, got {len(frames) - 1}", None)
            return
        client, frame = frames
        try:
            msg = P.decode(frame, P.CLIENT_TO_BROKER)
        except P.ProtocolError as exc:
            self.stats.bad_frames += 1
            self._client_error(client, exc.code, str(exc), exc.req_id)
            return
        owner = ""
        if self.cfg.curve_dir and self.clients is not None:
            owner = self.clients.last_user_id or ""
            if not self._client_key_matches(client, owner, msg):
                return
        if isinstance(msg, P.SubmitRequest):
            self._on_submit(client, msg, time.monotonic(), owner)
        elif isinstance(msg, P.StatusRequest):
            self._send_client(client, P.StatusReply(
                msg.nonce, [i.id for i in self.cluster.alive()], self.cfg.policy,
                len(self.table) - len(self.queue), len(self.queue), self._status_stats()))
        elif isinstance(msg, P.AbortRequest):
            req = self.table.find(client, msg.req_id)
            if req is None:
                self._client_error(client, "unknown_id", f"no active request {msg.req_id!r}", msg.req_id)
            else:
                self._send_client(client, P.TokenStream([[req.client_req_id, [], P.FINISH_ABORT]]))
                self._finish(req, abort_workers=True)
                self.stats.aborted += 1

    def _client_key_matches(self, client: bytes, key: str, msg: P.Message) -> bool:
        """CURVE on: a socket identity's running requests belong to the client key that submitted them.

        ZeroMQ lets one connection at a time hold an identity, so a message under it from another key means
        the owner is gone and another key took the identity over: the owner's requests end (their tokens
        would reach the new holder) and the message is refused with ``forbidden``."""
        owner = self.table.owner(client)
        if owner is None or owner == key:
            return True
        ended = self.table.of_client(client)
        for req in ended:
            self._finish(req, abort_workers=True)
            self.stats.aborted += 1
        self.stats.bad_frames += 1
        log.warning("client key %r used the socket identity %s of key %r: refused; %d requests of %r ended",
                    key, client.hex(), owner, len(ended), owner)
        self._client_error(client, "forbidden", "this client identity belongs to another key's requests; "
                           "they were ended (use a distinct identity per client)", getattr(msg, "req_id", None))
        return False

    def _status_stats(self) -> dict:
        stats: dict = dataclasses.asdict(self.stats)
        stats["boot_id"] = self.boot_id  # changes on every broker start: clients detect a restart
        stats["vocab_size"] = self._vocab()
        stats["max_model_len"] = self._max_prompt()
        stats["instances"] = {
            iid: {**{k: v for k, v in dataclasses.asdict(r).items() if k not in ("instance_id", "seq")},
                  "max_num_seqs": self.cluster.instances[iid].max_num_seqs,
                  "early_pull_tail_tokens": self.cluster.instances[iid].early_pull_tail_tokens,
                  "priced_step_model": list(self.pricing.model_of(self.cluster.instances[iid]).coefficients()),
                  "handoff_addr": self.handoff_addrs.get(iid, "")}
            for iid, r in self.reports.items() if iid in self.cluster.instances
        }
        return stats

    def _slo(self, slo_class: str) -> tuple[float, float] | None:
        if slo_class in ("default", ""):
            return self.cfg.ttft_slo_ms, self.cfg.tbt_slo_ms
        return None

    def _ttft_slo_ms(self, slo_class: str, prompt_len: int) -> float:
        """The request's TTFT SLO: its class's, plus ``ttft_prefill_factor`` x its prefill time alone (on the
        live instance that prefills it fastest)."""
        base = self._slo(slo_class)[0]  # type: ignore[index]
        if self.cfg.ttft_prefill_factor > 0:
            pr = self.pricing
            models = {id(m): m for m in (pr.model_of(i) for i in self.cluster.alive())} or {0: pr.model}
            base += self.cfg.ttft_prefill_factor * min(
                m.prefill_alone_ms(prompt_len, pr.max_batched_tokens) for m in models.values())
        return base

    def _max_prompt(self) -> int:
        if self.cfg.max_prompt_tokens > 0:
            return self.cfg.max_prompt_tokens
        lens = [i.max_model_len for i in self.cluster.instances.values() if i.alive]
        return min(lens) if lens else 0

    def _on_submit(self, client: bytes, msg: P.SubmitRequest, now: float, owner: str = "") -> None:
        rid = msg.req_id
        err = None
        prompt = msg.prompt
        sp = msg.sampling
        if not rid or len(rid) > 256:
            err = ("invalid_request", "req_id must be 1..256 characters")
        elif self.table.find(client, rid) is not None:
            err = ("duplicate_id", f"request {rid!r} is already active")
        elif msg.text is not None and prompt:
            err = ("invalid_request", "give prompt token ids or text, not both")
        elif sp.max_tokens < 1:
            err = ("invalid_request", "max_tokens must be >= 1")
        elif not (0.0 <= sp.temperature <= 100.0) or not (0.0 < sp.top_p <= 1.0):
            err = ("invalid_request", "temperature must be in [0, 100] and top_p in (0, 1]")
        elif self._slo(msg.slo_class) is None:
            err = ("invalid_request", f"unknown SLO class {msg.slo_class!r}")
        elif msg.force_split is not None and not self.cfg.allow_forced_splits:
            err = ("invalid_request", "force_split is disabled on this broker (allow_forced_splits)")
        elif not self.cluster.alive():
            err = ("no_workers", "no worker is registered")
        if err is None and msg.text is not None:
            tok = self.tokenizer or ByteTokenizer(self._vocab())
            prompt = tok.encode(msg.text)
        if err is None:
            vocab = self._vocab()
            max_len = self._max_prompt()
            if not prompt:
                err = ("invalid_request", "empty prompt")
            elif len(prompt) + sp.max_tokens > max_len:
                err = ("prompt_too_long", f"prompt ({len(prompt)}) + max_tokens ({sp.max_tokens}) exceeds {max_len}")
            elif min(prompt) < 0 or max(prompt) >= vocab:
                err = ("invalid_request", f"token ids must be in [0, {vocab})")
            elif len(self.table) >= self.cfg.max_active:
                err = ("queue_full", f"{len(self.table)} requests in flight (limit {self.cfg.max_active})")
            elif self.cfg.slo_reject_factor > 0:
                ttft = self._best_ttft_ms(len(prompt), self._slo(msg.slo_class))
                limit = self.cfg.slo_reject_factor * self._ttft_slo_ms(msg.slo_class, len(prompt))
                if ttft > limit:
                    err = ("slo_infeasible", f"predicted time to first token {ttft:.0f} ms exceeds {limit:.0f} ms "
                                             f"({self.cfg.slo_reject_factor} x the TTFT SLO) on every instance")
        if err is not None:
            self.stats.rejected += 1
            self.metrics.on_reject(err[0])
            self._client_error(client, err[0], err[1], rid)
            return
        tbt = self._slo(msg.slo_class)[1]  # type: ignore[index]
        ttft = self._ttft_slo_ms(msg.slo_class, len(prompt))
        predicted = self.predictor.predict(len(prompt), sp.max_tokens)
        req = BrokerRequest(
            iid=self.table.new_iid(), client=client, client_req_id=rid, prompt=prompt, sampling=sp,
            plan=None, arrival=now, ttft_slo_ms=ttft, tbt_slo_ms=tbt, predicted_output=predicted,
            force_split=msg.force_split, owner=owner,
        )
        if not self._admit(req, now):
            self.stats.rejected += 1
            self.metrics.on_reject("queue_full")
            self._client_error(client, "queue_full", f"{len(self.queue)} requests waiting for capacity", rid)

    def _admit(self, req: BrokerRequest, now: float) -> bool:
        """Dispatch now, or queue for capacity; False when the queue is full."""
        if self.queue or not self._try_dispatch(req, now):
            if len(self.queue) >= self.cfg.max_queued:
                return False
            self.queue.append(req)
            self.table.add(req)  # visible to aborts while queued
        return True

    def _declare_dead(self, inst_id: str, why: str, now: float) -> None:
        """Forget a worker (it re-registers if it was only slow) and re-plan what it was running."""
        if inst_id not in self.cluster.instances:
            return
        log.warning("worker %s %s: removed", inst_id, why)
        self.cluster.remove(inst_id)
        self.last_seen.pop(inst_id, None)
        self.vocabs.pop(inst_id, None)
        self.handoff_addrs.pop(inst_id, None)
        self.reports.pop(inst_id, None)
        self._lose_instance(inst_id, why, now)

    def _lose_instance(self, inst_id: str, why: str, now: float) -> None:
        """Every request that still needs ``inst_id`` is re-planned on the live instances."""
        for req in self.table.on_instance(inst_id):
            if not req.survives_loss_of(inst_id):
                self._replan(req, inst_id, why, now)

    def _replan(self, req: BrokerRequest, lost: str, why: str, now: float) -> None:
        """Continue ``req`` elsewhere from the tokens its client already has (no duplicate, no gap)."""
        remaining = req.sampling.max_tokens - len(req.generated)
        if req.replans >= self.cfg.max_replans or remaining <= 0:
            self._fail(req, "worker_lost", f"instance {lost} {why}")
            return
        self.table.pop(req.iid)
        for inst in req.instances():
            if inst != lost:
                self._send_worker(inst, P.AbortMicro(req.iid))  # the surviving half frees its blocks
        self.stats.replanned += 1
        log.warning("request %s: instance %s %s; re-planning after %d tokens", req.client_req_id, lost, why,
                    len(req.generated))
        new = BrokerRequest(
            iid=self.table.new_iid(), client=req.client, client_req_id=req.client_req_id,
            prompt=req.prompt + req.generated, sampling=dataclasses.replace(req.sampling, max_tokens=remaining),
            plan=None, arrival=req.arrival, ttft_slo_ms=req.ttft_slo_ms, tbt_slo_ms=req.tbt_slo_ms,
            predicted_output=min(req.predicted_output, remaining), replans=req.replans + 1, owner=req.owner,
        )
        if not self._admit(new, now):
            self.stats.failed += 1
            self._client_error(req.client, "queue_full", f"instance {lost} {why} and no capacity is left",
                               req.client_req_id)

    def _best_ttft_ms(self, prompt_len: int, slo: tuple[float, float] | None) -> float:
        """Projected time to first token of a new prompt on the instance that would finish it first."""
        tbt = slo[1] if slo else self.cfg.tbt_slo_ms
        best = float("inf")
        for inst in self.cluster.alive():
            best = min(best, (inst.queued_prefill_tokens + prompt_len) * self.pricing.prefill_ms_per_token(inst, tbt))
        return best

    def _vocab(self) -> int:
        return min(self.vocabs.values()) if self.vocabs else 32000

    def _try_dispatch(self, req: BrokerRequest, now: float) -> bool:
        info = RequestInfo(req.iid, len(req.prompt), req.sampling.max_tokens, req.predicted_output,
                           req.ttft_slo_ms, req.tbt_slo_ms)
        if req.force_split is not None:
            plan = forced_plan(info, self.cluster, req.force_split)
        else:
            plan = self.policy.plan(info, self.cluster, now)
        if plan is None:
            return False
        tail = 0
        if plan.b is not None:  # the early-pull tail for this link and A's load, before commit adds this request
            a, b = self.cluster.instances[plan.a], self.cluster.instances[plan.b]
            tail = self.pricing.early_tail(a, b, plan.split, info.prompt_len, req.tbt_slo_ms)[0]
        commit(plan, info, self.cluster)
        req.plan = plan
        self.table.add(req)
        p, o = len(req.prompt), req.sampling.max_tokens
        if plan.b is None:
            descs = [(plan.a, P.MicroDescriptor(req.iid, P.ROLE_FULL, req.prompt, p + o, 0, p + o, o, None,
                                                req.sampling, req.ttft_slo_ms, req.tbt_slo_ms, req.arrival))]
        else:
            s, ea = plan.split, tokens_emitted_by_a(p, o, plan.split)
            inbox = self.handoff_addrs.get(plan.b, "") if self.cfg.direct_handoff else ""
            descs = [
                (plan.a, P.MicroDescriptor(req.iid, P.ROLE_A, req.prompt, s, 0, s, ea, plan.b, req.sampling,
                                           req.ttft_slo_ms, req.tbt_slo_ms, req.arrival, inbox, tail)),
                (plan.b, P.MicroDescriptor(req.iid, P.ROLE_B, req.prompt, s, s, p + o, o - ea, plan.a,
                                           req.sampling, req.ttft_slo_ms, req.tbt_slo_ms, req.arrival)),
            ]
        self.stats.admitted += 1
        self.metrics.on_admit(plan.kind)
        self._send_client(req.client, P.Admitted(req.client_req_id, plan.a, plan.b, plan.split, plan.kind, p))
        for inst, desc in descs:
            if not self._send_worker(inst, P.DispatchMicro(desc)):
                # dead before its heartbeats stopped counting: drop it now; this request is re-planned
                self._declare_dead(inst, "is unreachable", now)
                return True
        return True

    def _drain_queue(self, now: float) -> None:
        while self.queue:
            req = self.queue[0]
            if req.iid not in self.table.by_iid:  # aborted while queued
                self.queue.popleft()
                continue
            if not self._try_dispatch(req, now):
                return
            self.queue.popleft()

    # ------------------------------------------------------------------ request ends

    def _finish(self, req: BrokerRequest, abort_workers: bool) -> None:
        self.table.pop(req.iid)
        self.metrics.on_end(req.iid)
        if abort_workers and req.plan is not None:
            for inst in req.instances():
                self._send_worker(inst, P.AbortMicro(req.iid))

    def _fail(self, req: BrokerRequest, code: str, message: str) -> None:
        self.stats.failed += 1
        self._client_error(req.client, code, message, req.client_req_id)
        self._finish(req, abort_workers=True)

    # ------------------------------------------------------------------ workers

    def _to_ident(self, ident: bytes, msg: P.Message) -> None:
        assert self.workers is not None
        with contextlib.suppress(zmq.ZMQError):
            self.workers.send([ident, P.encode(msg)])

    def _on_worker_frames(self, frames: list[bytes]) -> None:
        """One ZeroMQ message from a worker: its identity, then one or more protocol frames, handled in order.
        A worker puts a step's tokens and its handoffs into one message, so that they arrive together."""
        if not 2 <= len(frames) <= P.MAX_WORKER_FRAMES + 1:
            self.stats.bad_frames += 1
            return
        ident = frames[0]
        for frame in frames[1:]:
            self._on_worker_frame(ident, frame)

    def _on_worker_frame(self, ident: bytes, frame: bytes) -> None:
        try:
            msg = P.decode(frame, P.WORKER_TO_BROKER)
        except P.ProtocolError as exc:
            self.stats.bad_frames += 1
            log.warning("bad frame from worker %r: %s", ident, exc)
            self._to_ident(ident, P.ErrorReply(exc.code, str(exc)))
            return
        if self.cfg.curve_dir and self.workers is not None and self.workers.last_user_id != ident.decode(
                errors="replace"):
            # CURVE on: a worker speaks only under the instance id its certificate names
            self.stats.bad_frames += 1
            reason = f"certificate of {self.workers.last_user_id!r} cannot act as instance {ident!r}"
            log.warning("refused worker message: %s", reason)
            if isinstance(msg, P.RegisterWorker):
                self._to_ident(ident, P.RegisterAck(msg.instance_id, False, reason, 0))
            else:
                self._to_ident(ident, P.ErrorReply("forbidden", reason))
            return
        now = time.monotonic()
        inst_id = ident.decode(errors="replace")
        if isinstance(msg, P.RegisterWorker):
            self._on_register(ident, msg, now)
            return
        if inst_id not in self.cluster.instances:
            self._to_ident(ident, P.ErrorReply("not_registered", "register first"))
            return
        self.last_seen[inst_id] = now
        if isinstance(msg, P.TokenBatch):
            self._on_tokens(msg.entries, inst_id)
        elif isinstance(msg, P.LoadReport):
            if not (math.isfinite(msg.step_scale) and msg.step_scale > 0):  # the load still counts; the scale not
                self._to_ident(ident, P.ErrorReply("bad_field", f"LoadReport.step_scale must be a finite number > 0, "
                                                                f"got {msg.step_scale!r}; the instance keeps its price"))
                msg.step_scale = self.cluster.instances[inst_id].step_scale
            self.cluster.report(
                inst_id, now, queued_prefill_tokens=msg.queued_prefill_tokens, running_seqs=msg.running_seqs,
                decode_ctx_tokens=msg.decode_ctx_tokens, pending_decode_tokens=msg.pending_decode_tokens,
                kv_used_tokens=msg.kv_used_tokens, step_ms=msg.step_ms, step_scale=msg.step_scale,
            )
            self.reports[inst_id] = msg
            self._drain_queue(now)
        elif isinstance(msg, P.HandoffReady):
            req = self.table.get(msg.req_id)
            if req is None or req.plan is None or req.plan.b is None:
                self._send_worker(inst_id, P.AbortMicro(msg.req_id))  # A frees its held blocks
                return
            req.handed_off = True
            if not self._send_worker(req.plan.b, P.StartDecode(msg.req_id, msg.kv, msg.num_tokens, msg.tokens)):
                self._declare_dead(req.plan.b, "is unreachable", now)
            elif req.held_b:  # B started from A's direct StartDecode: its tokens follow A's now
                held, req.held_b = req.held_b, []
                self._on_tokens(held, req.plan.b)
        elif isinstance(msg, P.MicroFailed):
            if msg.code == "kv_transfer_recompute":
                self.stats.kv_recomputes += 1
                log.warning("request %s: KV pull failed on %s, recomputing: %s", msg.req_id, inst_id,
                            msg.message)
                return
            req = self.table.get(msg.req_id)
            if req is not None:
                self._fail(req, "request_failed", f"{inst_id}: {msg.code}: {msg.message}")

    def _on_register(self, ident: bytes, msg: P.RegisterWorker, now: float) -> None:
        inst_id = msg.instance_id
        if ident != inst_id.encode():
            self._to_ident(ident, P.RegisterAck(inst_id, False, "socket identity must equal instance_id", 0))
            return
        if msg.early_pull_tail_tokens < 0:
            self._to_ident(ident, P.RegisterAck(inst_id, False, "early_pull_tail_tokens must be >= 0", 0))
            return
        step_model = None
        if msg.step_model:
            try:
                if len(msg.step_model) != 5:
                    raise ValueError(f"step_model must hold 5 coefficients (a, b, c, d, e), got {len(msg.step_model)}")
                step_model = StepLatencyModel(*msg.step_model)
            except ValueError as e:
                self._to_ident(ident, P.RegisterAck(inst_id, False, str(e), 0))
                return
        if inst_id in self.cluster.instances:  # a restarted worker: whatever it held is gone
            self.cluster.remove(inst_id)
            self._lose_instance(inst_id, "restarted", now)
        self.cluster.add(InstanceState(
            id=inst_id, kv_capacity_tokens=msg.kv_capacity_tokens, max_model_len=msg.max_model_len,
            kv_bytes_per_token=msg.kv_bytes_per_token, pool=msg.pool, max_num_seqs=msg.max_num_seqs, last_report=now,
            early_pull_tail_tokens=msg.early_pull_tail_tokens, block_size=msg.block_size, step_model=step_model,
        ))
        self.vocabs[inst_id] = msg.vocab_size
        if msg.handoff_addr:
            self.handoff_addrs[inst_id] = msg.handoff_addr
        else:
            self.handoff_addrs.pop(inst_id, None)
        self.last_seen[inst_id] = now
        log.info("worker %s registered (%s, %s, %d KV tokens)", inst_id, msg.engine, msg.model,
                 msg.kv_capacity_tokens)
        self._send_worker(inst_id, P.RegisterAck(inst_id, True, "", self.cfg.heartbeat_ms))
        self._drain_queue(now)

    def _on_tokens(self, entries: list[list], sender: str) -> None:
        out: dict[bytes, list[list]] = {}
        table = self.table.by_iid
        relayed, now = self.metrics.on_relay, time.monotonic()
        for entry in entries:  # [req_id, tokens, finish, ...]: fields are only ever appended
            iid, toks, finish = entry[0], entry[1], entry[2]
            req = table.get(iid)
            if req is None:
                continue
            if not req.handed_off and req.plan is not None and req.plan.b == sender:
                req.held_b.append(entry)  # B ahead of A's HandoffReady (direct handoff): keep the order
                continue
            if toks:
                relayed(iid, req.arrival, now)
            req.generated += toks
            self.stats.tokens_relayed += len(toks)
            if finish == P.FINISH_HANDOFF:
                finish = None
            bucket = out.get(req.client)
            if bucket is None:
                bucket = out[req.client] = []
            bucket.append([req.client_req_id, toks, finish])
            if finish is not None:
                self.stats.finished += 1
                self.predictor.observe(len(req.prompt), req.tokens_relayed)
                # a stop during A's part ends the request: B (still waiting) is aborted
                self._finish(req, abort_workers=req.plan is not None and req.plan.b is not None)
        for client, ents in out.items():
            self._send_client_raw(client, P.encode_token_entries(P.TokenStream.TYPE, ents))

    async def _monitor_loop(self) -> None:
        period = self.cfg.heartbeat_ms / 1000.0
        timeout = self.cfg.worker_timeout_ms / 1000.0
        while True:
            await asyncio.sleep(max(period, 0.01))
            now = time.monotonic()
            for inst_id in list(self.cluster.instances):
                if now - self.last_seen.get(inst_id, now) > timeout:
                    self._declare_dead(inst_id, f"stopped responding for {now - self.last_seen[inst_id]:.1f} s", now)
            self._drain_queue(now)

"""The event loop and the simulated broker.

Events (a heap ordered by virtual time, ties by insertion order): request arrival, step end of an
instance, end of a KV transfer, and the load-report tick. The broker side mirrors the live broker
(``broker/server.py``): on arrival it asks the output-length predictor, builds a
:class:`~broker.cluster_state.RequestInfo`, asks the global policy for a plan and commits it; a request
the policy cannot place waits in a FIFO queue that is drained after every report tick and every finished
request. Every ``report_interval_ms`` each instance whose load changed reports the same fields the live
worker reports; between reports the policy sees its own optimistic ``commit`` accounting
(``SimConfig.exact_state``: every changed instance also reports right before each placement).
"""

from __future__ import annotations

import heapq
import math
import random
from collections import deque
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any, Protocol

from bench.sim.config import SimConfig
from bench.sim.instance import (
    DECODE,
    DONE,
    QUEUED,
    ROLE_A,
    ROLE_B,
    ROLE_FULL,
    WAIT_KV,
    MicroSeq,
    SimInstance,
    SimRequest,
    StepTime,
)
from bench.sim.migration import KIND_MOVED, Decoding, Move
from bench.traces import TraceRequest
from broker.cluster_state import ClusterState, InstanceState, RequestInfo
from broker.scheduler import GlobalPolicy, commit
from dynaserve.costtables import detailed_step_ms
from dynaserve.metrics import RequestRecord
from dynaserve.predictor import MaxTokensPredictor, OutputPredictor
from dynaserve.split import Plan, tokens_emitted_by_a
from workers.local_scheduler import LocalScheduler

ARRIVE, STEP_END, XFER_DONE, TICK = 0, 1, 2, 3


class TruthAwarePredictor(Protocol):
    """A predictor that is told the true output length (for error studies; never used by real policies)."""

    name: str

    def predict_with_truth(self, prompt_len: int, max_tokens: int, true_output: int) -> int: ...

    def observe(self, prompt_len: int, output_len: int) -> None: ...


@dataclass
class SimResult:
    """Records of one run (as a live replay writes them) and the simulator's own statistics."""

    records: list[RequestRecord]
    span_s: float  # first to last arrival of the trace (the offered-load window)
    end_s: float  # virtual time of the last event
    stats: dict[str, Any] = field(default_factory=dict)
    samples: list[tuple[float, list[tuple[int, int, int, int]]]] = field(default_factory=list)


def linear_truth(cfg: SimConfig, gpu: str | None = None) -> StepTime:
    """The schedulers' own linear model of ``gpu`` (default the first) as step times."""
    m = cfg.step_models[gpu or cfg.gpus[0]]
    a, b, c, d, e = m.a, m.b, m.c, m.d, m.e

    def step(chunks: list[tuple[int, int]], n: int, dctx: int, attn: float) -> float:
        pre = 0
        for t, _ in chunks:
            pre += t
        return a + b * pre + c * n + d * dctx + e * attn

    return step


def detailed_truth(cfg: SimConfig, gpu: str | None = None) -> StepTime:
    """Kernel-table step times on ``gpu`` (default the first; cached on the batch shape, decode context
    rounded to 64 tokens)."""
    shape, gpu, tp = cfg.shape, gpu or cfg.gpus[0], cfg.tp

    @lru_cache(maxsize=1 << 18)
    def cached(chunks: tuple[tuple[int, int], ...], n: int, ctx_bucket: int) -> float:
        return detailed_step_ms(shape, gpu, tp, chunks, [ctx_bucket * 64 + 32] * n)

    def step(chunks: list[tuple[int, int]], n: int, dctx: int, attn: float) -> float:
        key = tuple((t, p // 64 * 64) for t, p in chunks)
        return cached(key, n, (dctx // n) // 64 if n else 0)

    return step


def live_truth(truth: StepTime, cfg: SimConfig, seed: int) -> StepTime:
    """``truth`` with what a live engine adds: each step's time times a draw from ``cfg.step_noise`` (linear
    between its quantiles; ``cfg.step_noise_prefill`` instead for steps with prefill chunks, when set), plus
    ``cfg.step_overhead_ms``, ``cfg.step_overhead_per_seq_ms`` per sequence in the step and
    ``cfg.step_overhead_prefill_ms`` when it has prefill chunks. ``truth`` itself without any of them."""
    noise, extra, per_seq = cfg.step_noise, cfg.step_overhead_ms, cfg.step_overhead_per_seq_ms
    extra_p = extra + cfg.step_overhead_prefill_ms
    noise_p = cfg.step_noise_prefill or noise
    if not noise and not extra and not per_seq and not extra_p:
        return truth
    rng = random.Random(seed)

    def draw(q: tuple[float, ...]) -> float:
        pos = rng.random() * (len(q) - 1)
        i = int(pos)
        return q[i] + (q[i + 1] - q[i]) * (pos - i)

    def step(chunks: list[tuple[int, int]], n: int, dctx: int, attn: float) -> float:
        ms = truth(chunks, n, dctx, attn)
        if noise:
            ms *= draw(noise_p if chunks else noise)
        return ms + (extra_p if chunks else extra) + per_seq * (n + len(chunks))

    return step


class Simulator:
    """A cluster of :class:`SimInstance` behind the simulated broker; ``run`` replays one trace."""

    def __init__(
        self,
        config: SimConfig,
        policy: GlobalPolicy,
        predictor: OutputPredictor | TruthAwarePredictor | None = None,
        *,
        sample_interval_s: float | None = None,
    ) -> None:
        self.cfg = config
        self.path_s = config.path_latency_ms / 1000.0
        self.path_tok_s = config.path_latency_per_prompt_token_ms / 1000.0
        self.policy = policy
        self.predictor = predictor if predictor is not None else MaxTokensPredictor()
        self.sample_interval_s = sample_interval_s
        truths = {g: detailed_truth(config, g) if config.ground_truth == "detailed" else linear_truth(config, g)
                  for g in config.step_models}
        self.cluster = ClusterState()
        self.instances: list[SimInstance] = []
        cap = config.kv_capacity_tokens
        for i in range(config.instances):
            iid = f"i{i}"
            gpu = config.gpu_of(i)
            sched = LocalScheduler(config.step_models[gpu], config.local_config())
            inst_truth = live_truth(truths[gpu], config, config.noise_seed * 1000 + i)
            self.instances.append(SimInstance(iid, self, sched, cap, config.block_size, inst_truth))
            self.cluster.add(InstanceState(id=iid, kv_capacity_tokens=cap, kv_bytes_per_token=config.kv_bytes_per_token,
                                           max_num_seqs=config.max_num_seqs,
                                           early_pull_tail_tokens=config.early_pull_tail_tokens,
                                           block_size=config.block_size,
                                           step_model=sched.model if config.advertise_step_models else None))
        self.by_id = {inst.id: inst for inst in self.instances}
        self.pricing = config.pricing()  # the early-pull tail of each split, as the live broker picks it
        self._heap: list[tuple[float, int, int, Any]] = []
        self._tie = 0
        self.now = 0.0
        self.queue: deque[SimRequest] = deque()
        self.requests: list[SimRequest] = []
        self.active = 0
        self.link_free: dict[str, float] = {}
        self.stats: dict[str, Any] = {"plans": 0, "queued": 0, "transfers": 0, "transfer_ms": 0.0, "steps": 0,
                                      "moves": 0, "early_pulls": 0}
        # run-time decode handoffs (bench.sim.migration), when the policy makes them
        self._moves = getattr(policy, "moves", None)
        bind = getattr(policy, "bind", None)
        if callable(bind):
            bind(self)

    # ------------------------------------------------------------------ events

    def _push(self, t: float, kind: int, obj: Any) -> None:
        self._tie += 1
        heapq.heappush(self._heap, (t, self._tie, kind, obj))

    def schedule_step_end(self, inst: SimInstance, t: float) -> None:
        self._push(t, STEP_END, inst)

    def start_transfer(self, seq: MicroSeq, now: float) -> None:
        """Role B was admitted: pull A's KV of positions [0, split) over B's link.

        With early pulls (``early_pull_tail_tokens``), B has read A's blocks before the tail step by step
        while A computed (``MicroSeq.early_pos``, ``early_end``; they took B's link in turn with other
        transfers into B) and pulls only the rest now, once those reads have ended.
        """
        tokens = seq.split
        start = now
        a = seq.req.seq_a
        if a is not None and a.early_pos > 0:
            start = max(now, a.early_end)
            tokens -= a.early_pos
            self.stats["early_pulls"] += 1
        dur = self.cfg.transfer_ms(tokens) / 1000.0
        if self.cfg.serialize_transfers:
            start = max(start, self.link_free.get(seq.inst.id, 0.0))
            self.link_free[seq.inst.id] = start + dur
        self.stats["transfers"] += 1
        self.stats["transfer_ms"] += (start + dur - now) * 1000.0
        self._push(start + dur, XFER_DONE, seq)

    def handoff(self, seq_a: MicroSeq, now: float) -> None:
        """A finished its part: B may now admit the request and pull the KV."""
        seq_b = seq_a.req.seq_b
        if seq_b is None:
            raise RuntimeError(f"request {seq_a.req.req_id} handed off without a B")
        seq_b.inst.handoff_ready(seq_b, now)

    def finish(self, req: SimRequest, now: float) -> None:
        req.finish = "length" if req.emitted >= req.max_tokens else "stop"
        if req.emitted != req.output:
            raise RuntimeError(f"request {req.req_id}: emitted {req.emitted} tokens, expected {req.output}")
        seq_b = req.seq_b
        if seq_b is not None and seq_b.state == WAIT_KV:  # the output ended on A: B is aborted
            seq_b.inst.drop(seq_b)
        self.predictor.observe(req.prompt, req.emitted)
        self.active -= 1
        if self.queue:
            self._drain(now)

    # ------------------------------------------------------------------ broker

    def _predict(self, req: SimRequest) -> int:
        pr = self.predictor
        if hasattr(pr, "predict_with_truth"):
            return int(pr.predict_with_truth(req.prompt, req.max_tokens, req.output))
        return int(pr.predict(req.prompt, req.max_tokens))  # type: ignore[union-attr]

    def _try_dispatch(self, req: SimRequest, now: float) -> bool:
        info = RequestInfo(req.req_id, req.prompt, req.max_tokens, req.predicted, req.ttft_slo_ms, req.tbt_slo_ms)
        if self.cfg.exact_state:
            self._report(now)
        plan = self.policy.plan(info, self.cluster, now)
        self.stats["plans"] += 1
        if plan is None:
            return False
        tail = 0
        if plan.b is not None and self.cfg.early_pull_tail_tokens:  # as the live broker: before commit
            a, b = self.cluster.instances[plan.a], self.cluster.instances[plan.b]
            tail = self.pricing.early_tail(a, b, plan.split, req.prompt, req.tbt_slo_ms)[0]
        commit(plan, info, self.cluster)
        self._dispatch(req, plan, now, tail)
        return True

    def _dispatch(self, req: SimRequest, plan: Plan, now: float, tail: int = 0) -> None:
        """Start the plan's micro-requests; ``tail`` is A's early-pull tail (MicroDescriptor.early_tail)."""
        req.plan = plan
        self.active += 1
        p, mt, o = req.prompt, req.max_tokens, req.output
        a = self.by_id[plan.a]
        a.dirty = True
        if plan.b is None:
            seq = MicroSeq(req, a, ROLE_FULL, p, True, 0, mt, o, p + mt, QUEUED, split=p + mt)
            req.seq_a = seq
            a.add(seq, now)
            return
        b = self.by_id[plan.b]
        b.dirty = True
        s = plan.split
        ea = tokens_emitted_by_a(p, mt, s)
        seq_a = MicroSeq(req, a, ROLE_A, min(s, p), s >= p, 0, ea, min(ea, o), s, QUEUED, split=s,
                         tail_start=self.cfg.early_pull_end(s, tail))
        seq_b = MicroSeq(req, b, ROLE_B, max(s, p), s < p, 0, mt - ea, max(0, o - ea), p + mt, WAIT_KV, split=s)
        req.seq_a, req.seq_b = seq_a, seq_b
        b.add(seq_b, now)
        a.add(seq_a, now)

    def _drain(self, now: float) -> None:
        q = self.queue
        while q:
            if not self._try_dispatch(q[0], now):
                return
            q.popleft()

    def _report(self, now: float) -> None:
        report = self.cluster.report
        for inst in self.instances:
            if inst.dirty:
                inst.dirty = False
                report(
                    inst.id,
                    now,
                    queued_prefill_tokens=inst.qp,
                    running_seqs=len(inst.decoding),
                    decode_ctx_tokens=inst.dctx,
                    pending_decode_tokens=inst.pd,
                    kv_used_tokens=inst.kv_used_tokens,
                    step_ms=inst.last_step_ms,
                    step_scale=inst.sched.correction,  # as a worker reports it: the broker prices it with it
                )

    # ------------------------------------------------------------------ run-time decode handoffs

    def _decoding_on(self, inst_id: str) -> list[Decoding]:
        """The unsplit requests decoding on ``inst_id``, as the broker sees them (predicted lengths)."""
        inst = self.by_id[inst_id]
        j = len(inst.step_ends) + (1 if inst.busy else 0)
        out = []
        for seq in inst.decoding:
            req = seq.req
            if seq.role != ROLE_FULL or req.seq_b is not None:
                continue
            done = j - seq.i0 if j > seq.i0 else 0
            generated = req.emitted + done
            out.append(Decoding(req.req_id, inst_id, seq.ctx0 + done, generated, req.predicted - generated,
                                req.tbt_slo_ms))
        return out

    def _move(self, m: Move, now: float) -> bool:
        """Carry out a move: A stops after the step it is running and hands off; B waits for the KV."""
        req = self.requests[int(m.req_id[1:])]
        seq = req.seq_a
        if seq is None or req.seq_b is not None or seq.state != DECODE or seq.role != ROLE_FULL:
            return False
        src, dst = seq.inst, self.by_id[m.dst]
        if src.id != m.src:
            return False
        cut = src.cut_decode(seq)
        if cut is None:
            return False
        s, planned, moved = cut
        seq_b = MicroSeq(req, dst, ROLE_B, s, False, 0, planned, moved, req.prompt + req.max_tokens, WAIT_KV,
                         split=s)
        req.seq_b = seq_b
        req.plan = Plan(src.id, dst.id, s, KIND_MOVED)
        dst.add(seq_b, now)
        self.stats["moves"] += 1
        return True

    # ------------------------------------------------------------------ run

    def run(
        self,
        trace: Sequence[TraceRequest],
        ttft_slo_ms: float | Callable[[TraceRequest], float],
        tbt_slo_ms: float = 100.0,
        max_tokens: int | None = None,
    ) -> SimResult:
        """Replay ``trace``: each request's true output is its ``output_tokens``; the client's ``max_tokens`` is
        ``max_tokens`` (None: the true output, as the live replay sends it with ignore_eos)."""
        if self.requests:
            raise RuntimeError("a Simulator runs one trace; build a new one")
        slo = ttft_slo_ms if callable(ttft_slo_ms) else (lambda _r, v=float(ttft_slo_ms): v)
        for i, r in enumerate(trace):
            mt = r.output_tokens if max_tokens is None else max_tokens
            out = min(r.output_tokens, mt)
            req = SimRequest(i, f"r{i}", r.arrival_s, r.input_tokens, out, mt, slo(r), tbt_slo_ms)
            self.requests.append(req)
            self._push(r.arrival_s, ARRIVE, req)
        interval = self.cfg.report_interval_ms / 1000.0
        first = trace[0].arrival_s if trace else 0.0
        self._push(first, TICK, None)
        pending_arrivals = len(trace)
        next_sample = first if self.sample_interval_s else math.inf
        samples: list[tuple[float, list[tuple[int, int, int, int]]]] = []
        heap = self._heap
        pop = heapq.heappop
        horizon = self.cfg.max_sim_s
        events = 0
        while heap:
            t, _, kind, obj = pop(heap)
            if t > horizon:
                break
            self.now = t
            events += 1
            if kind == STEP_END:
                obj.end_step(t)
            elif kind == ARRIVE:
                pending_arrivals -= 1
                obj.predicted = self._predict(obj)
                if self.queue or not self._try_dispatch(obj, t):
                    self.queue.append(obj)
                    self.stats["queued"] += 1
            elif kind == XFER_DONE:
                seq = obj
                req = seq.req
                a = req.seq_a
                a.state = DONE  # B confirmed the pull: A frees the held blocks
                a.inst.free(a)
                a.inst.kick(t)
                seq.inst.transfer_done(seq, t)
            else:  # TICK
                self._report(t)
                if self._moves is not None:
                    for m in self._moves(self.cluster, self._decoding_on, t):
                        self._move(m, t)
                if self.queue:
                    self._drain(t)
                if t >= next_sample:
                    samples.append((t, [(i.qp, len(i.decoding), i.kv_used_tokens, len(i.waiting)) for i in self.instances]))
                    next_sample += self.sample_interval_s or math.inf
                if pending_arrivals or self.active:
                    self._push(t + interval, TICK, None)
                elif self.queue:  # nothing runs and the policy still cannot place them: they fail
                    for req in self.queue:
                        req.error = "no_capacity"
                    self.queue.clear()
        for inst in self.instances:
            self.stats["steps"] += len(inst.step_ends)
        self.stats["events"] = events
        self.stats["preemptions"] = sum(i.preemptions for i in self.instances)
        self.stats["min_free_kv_tokens"] = min(i.min_free_blocks for i in self.instances) * self.cfg.block_size
        self.stats["busy_s"] = {i.id: i.busy_ms / 1000.0 for i in self.instances}
        span = (trace[-1].arrival_s - trace[0].arrival_s) if len(trace) > 1 else 0.0
        return SimResult([self._record(r) for r in self.requests], span, self.now, self.stats, samples)

    def _at_client(self, req: SimRequest) -> list[float]:
        """The request's token times as its client sees them: after the message path, and, with
        ``cfg.delivery_jitter_ms``, each token's extra delay from one measured run of them (a token never
        arrives before it was made, nor before the one ahead of it: the path is first in, first out)."""
        shift = self.path_s + self.path_tok_s * req.prompt
        runs = self.cfg.delivery_jitter_ms
        if not runs:
            return [t + shift for t in req.token_ts] if shift else req.token_ts
        rng = random.Random(f"{self.cfg.noise_seed}:{req.req_id}")
        run = runs[rng.randrange(len(runs))]
        start = rng.randrange(len(run))
        out: list[float] = []
        prev = -math.inf
        for j, t in enumerate(req.token_ts):
            prev = max(prev, t + max(0.0, shift + run[(start + j) % len(run)] / 1000.0))
            out.append(prev)
        return out

    def _record(self, req: SimRequest) -> RequestRecord:
        plan = req.plan
        return RequestRecord(
            req_id=req.req_id,
            arrival_s=req.arrival,
            submit_ts=req.arrival,
            prompt_tokens=req.prompt,
            max_tokens=req.max_tokens,
            token_ts=self._at_client(req),
            finish_reason=req.finish,
            error=req.error if req.error or req.finish else "unfinished",
            ttft_slo_ms=req.ttft_slo_ms,
            tbt_slo_ms=req.tbt_slo_ms,
            kind=plan.kind if plan else None,
            split=plan.split if plan else None,
            instance_a=plan.a if plan else None,
            instance_b=plan.b if plan else None,
        )

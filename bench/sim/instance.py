"""One simulated unified instance: the real local scheduler forms each step; the step model prices it.

Lifecycle of a micro-request (a :class:`MicroSeq`) on an instance::

    WAIT_KV (role B, until A hands off) -> QUEUED -> admitted (KV blocks allocated, FCFS by arrival,
    at most ``max_num_seqs`` running) -> [XFER (role B pulls A's KV)] -> PREFILL (chunks) -> DECODE
    (one token per step) -> DONE | HELD (role A: blocks kept until B's pull completes) -> DONE

KV blocks (``SimConfig.kv_alloc``): "on_demand" allocates like vLLM: the prompt's blocks at admission,
one more block whenever a decode crosses a block boundary; when none is free, the running sequence
ranked last (prefills by latest deadline, then the newest decode) is preempted: its blocks are freed and
it goes back to the queue to recompute everything it had (PREFILL/DECODE -> QUEUED). "reserve" takes
the prompt plus ``max_tokens`` at admission (what the live simulated engine does) and never preempts.

Decode-phase sequences are not touched on every step. A sequence that enters the decode phase at step
index ``i0`` with ``n`` tokens to emit emits one token at the end of every step ``i0 .. i0+n-1`` (every
running decode is in every step), so its token times are a slice of the instance's step end times,
copied once when it leaves; its end step sits in a heap. The load counters the instance reports are
kept incrementally, so a step with only decodes costs O(1) plus the sequences that end in it.
"""

from __future__ import annotations

import heapq
from bisect import insort
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from dynaserve.split import Plan
from workers.local_scheduler import DecodeItem, LocalScheduler, PrefillItem, StepPlan

if TYPE_CHECKING:
    from bench.sim.simulator import Simulator

ROLE_FULL, ROLE_A, ROLE_B = 0, 1, 2
WAIT_KV, QUEUED, XFER, PREFILL, DECODE, HELD, DONE = range(7)

# ground-truth step time: (prefill chunks as (tokens, ctx before), decode seqs, decode ctx sum, StepPlan) -> ms
StepTime = Callable[[list[tuple[int, int]], int, int, float], float]


@dataclass(slots=True, eq=False)
class SimRequest:
    """A client request as the simulated broker sees it, plus its true output length."""

    idx: int
    req_id: str
    arrival: float
    prompt: int
    output: int  # true output length (the request stops there)
    max_tokens: int  # the client's limit; what the broker plans and the engines reserve KV for
    ttft_slo_ms: float
    tbt_slo_ms: float
    predicted: int = 0
    plan: Plan | None = None
    token_ts: list[float] = field(default_factory=list)
    emitted: int = 0
    finish: str | None = None
    error: str | None = None
    seq_a: MicroSeq | None = None
    seq_b: MicroSeq | None = None


@dataclass(slots=True, eq=False)
class MicroSeq:
    """The part of a request one instance computes (see the module docstring for its states)."""

    req: SimRequest
    inst: SimInstance
    role: int
    prefill_end: int  # positions computed when the prefill phase ends
    emits_at_prefill: bool  # the last prefill chunk produces a token (False: A of a prompt split)
    computed: int  # positions computed (B starts at the split point once the pull is done)
    emit_plan: int  # tokens the descriptor asks for (what the instance reports as pending)
    emit_true: int  # tokens it really emits (fewer when the true output ends first)
    kv_tokens: int  # positions reserved at admission (kv_alloc="reserve")
    state: int
    split: int = 0
    blocks: int = 0
    pulled: bool = False  # role B: A's KV arrived (a preempted B recomputes instead of pulling again)
    entry: int = 0  # tie of its live finish/grow heap entries (stale entries are skipped)
    i0: int = 0  # first decode step index
    ctx0: int = 0  # context at the first decode step
    dsteps: int = 0  # decode steps (tokens emitted in the decode phase)
    early_pos: int = 0  # role A of a split with early pulls: positions B has read (or is reading)
    early_end: float = 0.0  # and when those reads end (B reads each step's new whole blocks, one read at a time)
    tail_start: int = 0  # role A with early pulls: where its tail begins (SimConfig.early_pull_end; 0: none)

    @property
    def pre_left(self) -> int:
        """Prefill positions still to compute."""
        return self.prefill_end - self.computed if self.prefill_end > self.computed else 0


def _arrival_key(s: MicroSeq) -> tuple[float, int]:
    return (s.req.arrival, s.req.idx)


class SimInstance:
    """A simulated engine: its queues, its local scheduler, its KV blocks and its reported load."""

    def __init__(
        self, iid: str, sim: Simulator, sched: LocalScheduler, kv_tokens: int, block_size: int, truth: StepTime
    ) -> None:
        self.id = iid
        self.sim = sim
        self.sched = sched
        self.block_size = block_size
        self.total_blocks = kv_tokens // block_size
        self.free_blocks = self.total_blocks
        self.truth = truth
        self.max_seqs = sched.config.max_num_seqs
        self.eager_pull = sim.cfg.eager_pull
        self.early_tail = sim.cfg.early_pull_tail_tokens
        self.on_demand = sim.cfg.kv_alloc == "on_demand"
        rank = sched.prefill_rank
        self._rank: Callable[[MicroSeq], float] = lambda s: rank(s.req.arrival, s.req.ttft_slo_ms)
        self.prefill_key: Callable[[MicroSeq], tuple[float, int]] = lambda s: (self._rank(s), s.req.idx)
        self.waiting: list[MicroSeq] = []  # QUEUED, by arrival
        self.prefilling: list[MicroSeq] = []  # PREFILL, by arrival
        self.decoding: dict[MicroSeq, None] = {}  # DECODE, insertion-ordered
        self.n_xfer = 0
        self.finish_heap: list[tuple[int, int, MicroSeq]] = []
        self.grow_heap: list[tuple[int, int, MicroSeq]] = []  # (step that needs one more block, tie, seq)
        # (step whose end publishes an A's decode blocks before its tail, tie, seq): decode handoffs, early pulls
        self.publish_heap: list[tuple[int, int, MicroSeq]] = []
        self.preemptions = 0
        self.step_ends: list[float] = []
        self.busy = False
        self.cur_n = 0
        self.cur_end = 0.0
        self.cur_prefills: list[tuple[MicroSeq, int]] = []
        self.cur_plan: StepPlan | None = None
        # reported load (what the live worker's EngineLoad holds)
        self.qp = 0  # queued_prefill_tokens
        self.dctx = 0  # decode_ctx_tokens
        self.pd = 0  # pending_decode_tokens
        self.last_step_ms = 0.0
        self.dirty = True
        self.min_free_blocks = self.total_blocks
        self.busy_ms = 0.0
        self._tie = 0

    # ------------------------------------------------------------------ reported load

    @property
    def running_seqs(self) -> int:
        return len(self.decoding)

    @property
    def kv_used_tokens(self) -> int:
        return (self.total_blocks - self.free_blocks) * self.block_size

    @property
    def active(self) -> int:
        return len(self.waiting) + len(self.prefilling) + len(self.decoding) + self.n_xfer

    # ------------------------------------------------------------------ intake

    def add(self, seq: MicroSeq, now: float) -> None:
        """A dispatched micro-request arrives (role B waits for A's handoff)."""
        self.qp += seq.pre_left if seq.role != ROLE_B else max(0, seq.prefill_end - seq.split)
        self.pd += seq.emit_plan
        self.dirty = True
        if seq.state == QUEUED:
            insort(self.waiting, seq, key=_arrival_key)
            self.kick(now)

    def handoff_ready(self, seq: MicroSeq, now: float) -> None:
        """Role B: A finished its part; queue for admission (then pull)."""
        seq.state = QUEUED
        insort(self.waiting, seq, key=_arrival_key)
        if self.busy and self.eager_pull:
            self._admit(now)
        self.kick(now)

    def drop(self, seq: MicroSeq) -> None:
        """Abort a role-B micro-request still waiting for its handoff (the request ended on A)."""
        if seq.state != WAIT_KV:
            raise RuntimeError(f"can only drop a waiting micro-request, {seq.req.req_id} is in state {seq.state}")
        self.qp -= max(0, seq.prefill_end - seq.split)
        self.pd -= seq.emit_plan
        seq.state = DONE
        self.dirty = True

    def kick(self, now: float) -> None:
        if not self.busy:
            self.start_step(now)

    def _admit(self, now: float) -> None:
        bs = self.block_size
        waiting = self.waiting
        k = 0
        running = len(self.prefilling) + len(self.decoding) + self.n_xfer
        while k < len(waiting) and running < self.max_seqs:
            seq = waiting[k]
            need = -(-(seq.prefill_end if self.on_demand else seq.kv_tokens) // bs)
            if need > self.free_blocks:
                break
            self.free_blocks -= need
            if self.free_blocks < self.min_free_blocks:
                self.min_free_blocks = self.free_blocks
            seq.blocks = need
            running += 1
            k += 1
            if seq.role == ROLE_B and not seq.pulled:
                seq.state = XFER
                self.n_xfer += 1
                self.sim.start_transfer(seq, now)
            else:
                seq.state = PREFILL
                insort(self.prefilling, seq, key=self.prefill_key)
        if k:
            del waiting[:k]
            self.dirty = True

    def free(self, seq: MicroSeq) -> None:
        self.free_blocks += seq.blocks
        seq.blocks = 0
        self.dirty = True

    # ------------------------------------------------------------------ steps

    def start_step(self, now: float) -> None:
        """Form the next step with the local scheduler and schedule its end; idle when there is no work."""
        grow = self.grow_heap
        preempted = bool(grow) and grow[0][0] <= len(self.step_ends) and self._grow(len(self.step_ends))
        if self.waiting and not preempted:  # as in vLLM: no admissions in a step that preempted
            self._admit(now)
        n = len(self.decoding)
        if not self.prefilling:
            if n == 0:
                self.busy = False
                return
            self.cur_prefills = []
            self.cur_plan = None
            ms = self.truth([], n, self.dctx, 0.0)
        else:
            j = len(self.step_ends)
            pref = self.prefilling  # sorted by rank
            is_late = self.sched.is_late
            if len(pref) > 1 and is_late(self._rank(pref[0]), now):
                # prefills past their TTFT deadline go behind the others, for this step (a stable sort keeps
                # deadline order within each group)
                pref = sorted(pref, key=lambda s: is_late(self._rank(s), now))
            decodes = [DecodeItem(s.req.req_id, s.ctx0 + j - s.i0) for s in self.decoding]
            prefills = [PrefillItem(s.req.req_id, s.prefill_end - s.computed, s.computed) for s in pref]
            plan = self.sched.schedule(decodes, prefills)
            chunks = [(c, s.computed) for s, (_, c) in zip(pref, plan.prefills, strict=False)]
            self.cur_prefills = [(s, c) for s, (_, c) in zip(pref, plan.prefills, strict=False)]
            self.cur_plan = plan
            ms = self.truth(chunks, n, plan.decode_ctx_tokens, plan.prefill_attn)
            if len(plan.decodes) != n:
                raise RuntimeError("the local scheduler left decodes out of a step (max_num_seqs exceeded)")
        self.cur_n = n
        self.busy = True
        self.last_step_ms = ms
        self.busy_ms += ms
        self.cur_end = now + ms / 1000.0
        self.sim.schedule_step_end(self, self.cur_end)

    def end_step(self, now: float) -> None:
        """Apply the step that just ended: emit tokens, finish sequences, then start the next step."""
        j = len(self.step_ends)
        self.step_ends.append(now)
        n = self.cur_n
        self.dctx += n
        self.pd -= n
        if self.cur_plan is not None:
            self.sched.observe(self.cur_plan, self.last_step_ms)
        pub = self.publish_heap
        while pub and pub[0][0] <= j:
            _, tie, seq = heapq.heappop(pub)
            if seq.entry == tie and seq.state == DECODE:  # else stale: preempted (its KV is recomputed)
                self._early_read(seq, now, seq.tail_start)
        heap = self.finish_heap
        while heap and heap[0][0] <= j:
            _, tie, seq = heapq.heappop(heap)
            if seq.entry == tie and seq.state == DECODE:  # else stale: the sequence was preempted
                self._end_decode(seq, j, now)
        for seq, c in self.cur_prefills:
            seq.computed += c
            self.qp -= c
            if self.early_tail and seq.role == ROLE_A:
                self._publish(seq, c, now)
            if seq.computed >= seq.prefill_end:
                self.prefilling.remove(seq)
                self._end_prefill(seq, j, now)
        self.dirty = True
        self.busy = False
        self.start_step(now)

    def _publish(self, seq: MicroSeq, c: int, now: float) -> None:
        """Role A with early pulls, after a prefill step (``c`` positions, ending ``now``): B reads the whole
        blocks it completed (the live A's KvChunks and B's early READs). As the live scheduler does, A's
        prefill (s <= p) is split where the tail begins only when A is the step's one prefill: that share of
        the step publishes the blocks before the tail, and the rest waits for the handoff. Otherwise (other
        prefills, or a decode handoff) every whole block of a step that does not reach the split goes."""
        s = seq.split
        if s <= seq.req.prompt and len(self.cur_prefills) == 1:
            limit = seq.tail_start
            t = now
            if seq.computed > limit:  # the live A splits this step at the boundary: that share of it
                start = now - self.last_step_ms / 1000.0
                t = start + (limit - (seq.computed - c)) / c * (now - start)
            self._early_read(seq, t, min(seq.computed, limit))
        elif seq.computed < s:
            self._early_read(seq, now, seq.computed)

    def _early_read(self, seq: MicroSeq, t: float, upto: int) -> None:
        """B of A's (``seq``) request reads A's whole blocks before position ``upto`` it has not read yet, from
        time ``t`` on, after its earlier early reads and (``serialize_transfers``) other transfers into B."""
        done = upto // self.block_size * self.block_size
        if done <= seq.early_pos:
            return
        sim = self.sim
        dur = sim.cfg.transfer_ms(done - seq.early_pos) / 1000.0
        start = max(t, seq.early_end)
        b = seq.req.seq_b
        if sim.cfg.serialize_transfers and b is not None:
            start = max(start, sim.link_free.get(b.inst.id, 0.0))
            sim.link_free[b.inst.id] = start + dur
        seq.early_end = start + dur
        seq.early_pos = done

    def _grow(self, j: int) -> bool:
        """KV blocks for the decodes of step ``j`` (on demand); preempt when none is free. True if it did."""
        grow = self.grow_heap
        bs = self.block_size
        preempted = False
        while grow and grow[0][0] <= j:
            at, tie, seq = heapq.heappop(grow)
            if seq.entry != tie or seq.state != DECODE:
                continue  # stale: the sequence ended or was preempted
            while self.free_blocks == 0 and seq.state == DECODE:
                self._preempt(j)
                preempted = True
            if seq.state != DECODE:
                continue  # it was the victim itself
            self.free_blocks -= 1
            seq.blocks += 1
            if self.free_blocks < self.min_free_blocks:
                self.min_free_blocks = self.free_blocks
            heapq.heappush(grow, (at + bs, tie, seq))
        return preempted

    def _preempt(self, j: int) -> None:
        """Free the blocks of the running sequence ranked last and queue it to recompute (vLLM's policy)."""
        if self.prefilling:
            seq = self.prefilling.pop()
            self.qp += seq.computed
        else:
            seq = next(reversed(self.decoding))
            del self.decoding[seq]
            done = j - seq.i0  # decode tokens already emitted (steps i0 .. j-1 have ended)
            req = seq.req
            req.token_ts.extend(self.step_ends[seq.i0 : j])
            req.emitted += done
            ctx = seq.ctx0 + done
            self.dctx -= ctx
            # recompute everything it has, emit its next token at the end of that prefill, then decode
            seq.emit_plan -= seq.emit_true - (seq.dsteps - done)
            seq.emit_true = seq.dsteps - done
            seq.prefill_end = ctx
            seq.emits_at_prefill = True
            self.qp += ctx
        seq.computed = 0
        seq.early_pos, seq.early_end = 0, 0.0  # blocks B may have read early are stale now
        seq.pulled = True  # what it had is recomputed here, never pulled again
        seq.entry = 0
        seq.state = QUEUED
        self.free(seq)
        self.preemptions += 1
        insort(self.waiting, seq, key=_arrival_key)

    def _enter_decode(self, seq: MicroSeq, i0: int, tokens: int) -> None:
        seq.state = DECODE
        seq.i0 = i0
        seq.ctx0 = seq.computed
        seq.dsteps = tokens
        self.decoding[seq] = None
        self.dctx += seq.computed
        self._tie += 1
        seq.entry = self._tie
        heapq.heappush(self.finish_heap, (i0 + tokens - 1, self._tie, seq))
        if self.early_tail and seq.role == ROLE_A and seq.split > seq.req.prompt:
            # a decode handoff: the step that reaches the tail's start publishes the blocks before it
            k = seq.tail_start - seq.ctx0
            if 0 < k < tokens:
                heapq.heappush(self.publish_heap, (i0 + k - 1, self._tie, seq))
        if self.on_demand:  # the step that writes position blocks * block_size needs one more block
            heapq.heappush(self.grow_heap, (i0 + seq.blocks * self.block_size - seq.ctx0, self._tie, seq))

    def _end_prefill(self, seq: MicroSeq, j: int, now: float) -> None:
        if not seq.emits_at_prefill:
            self._part_done(seq, now)
            return
        req = seq.req
        req.token_ts.append(now)
        req.emitted += 1
        self.pd -= 1
        left = seq.emit_true - 1
        if left <= 0:
            self._part_done(seq, now)
        else:
            self._enter_decode(seq, j + 1, left)

    def _end_decode(self, seq: MicroSeq, j: int, now: float) -> None:
        req = seq.req
        req.token_ts.extend(self.step_ends[seq.i0 : j + 1])
        req.emitted += seq.dsteps
        seq.computed = seq.ctx0 + seq.dsteps
        del self.decoding[seq]
        self.dctx -= seq.computed
        self._part_done(seq, now)

    def _part_done(self, seq: MicroSeq, now: float) -> None:
        """The micro-request computed its part: hand off (role A) or finish the request."""
        self.pd -= seq.emit_plan - seq.emit_true  # planned tokens it will never emit (the output ended)
        req = seq.req
        if seq.role == ROLE_A and req.emitted < req.output:
            seq.state = HELD
            self.sim.handoff(seq, now)
            return
        seq.state = DONE
        self.free(seq)
        self.sim.finish(req, now)

    def transfer_done(self, seq: MicroSeq, now: float) -> None:
        """Role B: A's KV arrived; continue with the rest of the prompt or with decoding."""
        self.n_xfer -= 1
        seq.computed = seq.split
        seq.pulled = True
        self.dirty = True
        if seq.prefill_end > seq.computed:
            seq.state = PREFILL
            insort(self.prefilling, seq, key=self.prefill_key)
        else:
            self._enter_decode(seq, len(self.step_ends) + (1 if self.busy else 0), seq.emit_true)
        self.kick(now)

    def cut_decode(self, seq: MicroSeq) -> tuple[int, int, int] | None:
        """Make a decoding unsplit sequence role A, ending after the step running now (a run-time handoff,
        bench.sim.migration): returns (positions it will have computed, tokens planned and tokens emitted
        beyond the cut, for B), or None when it cannot be cut (not in the running step, or it ends there)."""
        if not self.busy or seq not in self.decoding or seq.role != ROLE_FULL:
            return None
        cut = len(self.step_ends)  # the step running now is its last
        keep = cut - seq.i0 + 1
        if keep < 1 or keep >= seq.dsteps:
            return None
        moved = seq.dsteps - keep
        seq.dsteps = keep
        seq.emit_true -= moved
        planned = seq.emit_plan - seq.emit_true  # it now plans exactly what it emits
        self.pd -= planned
        seq.emit_plan = seq.emit_true
        seq.role = ROLE_A
        self._tie += 1
        seq.entry = self._tie  # its old finish and grow entries go stale
        heapq.heappush(self.finish_heap, (cut, seq.entry, seq))
        if self.on_demand:
            heapq.heappush(self.grow_heap, (seq.i0 + seq.blocks * self.block_size - seq.ctx0, seq.entry, seq))
        self.dirty = True
        return seq.ctx0 + keep, planned, moved

    # ------------------------------------------------------------------ inspection

    def decode_ctx_now(self, seq: MicroSeq) -> int:
        """Context of a decode-phase sequence at the next step to be formed."""
        j = len(self.step_ends) + (1 if self.busy else 0)
        return seq.ctx0 + max(0, j - seq.i0)

    def decode_left(self, seq: MicroSeq) -> int:
        """Decode tokens a decode-phase sequence still has to emit (true lengths)."""
        j = len(self.step_ends) + (1 if self.busy else 0)
        return seq.dsteps - max(0, j - seq.i0)

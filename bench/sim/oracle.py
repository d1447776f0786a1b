"""Oracle global policy: true output lengths, exact instance state, exhaustive split search.

The reference point DynaServe is measured against. It sees what no live broker can: the simulator's
exact, current state of every instance (not 20 ms old reports) and the true output length of every
request (the new one and all in flight). For each instance it forward-simulates the queue with the
instance's own local scheduler budget and step model:

* ``F(y)``: the time at which the first ``y`` queued prefill tokens (FCFS, the new request last) are done,
  stepping the real token budget next to the decodes that are running (which finish at their true
  lengths, and are joined by the requests whose prefill completes);
* ``D``: the time at which all the instance's current work is done (the prefill backlog, then the decode
  drain with the true remaining lengths).

Then, for every unsplit placement and for A/B pairs among the best ``pairs`` instances per role (A: earliest
first token; B: prefill-idle, shortest steps) and split points on a grid over [1, p+o] (every kind: prompt
splits, s = p, decode handoffs), it computes the request's TTFT, the handoff gap (a gap longer than the TBT
SLO is tolerated only when the request has 101 or more gaps, where one outlier does not move its P99, and
never beyond ``STALL_FACTOR`` x the SLO; a B without a free slot, where the request would wait, is no
candidate) and
each side's projected completion. Among the plans that meet both SLOs it takes the earliest first token
and, among plans within 5 % of it, the one with the smaller larger completion (no split on ties): the
objective of ``dynaserve_slo`` (bench.sim.policies) with exact information and a wider search. When no
plan meets the SLOs, the earliest first token.
"""

from __future__ import annotations

import bisect
import heapq
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

from broker.cluster_state import ClusterState, Pricing, RequestInfo
from dynaserve.metrics import STALL_FACTOR
from dynaserve.split import Plan, tokens_emitted_by_a

if TYPE_CHECKING:
    from bench.sim.instance import SimInstance
    from bench.sim.simulator import Simulator

_INF = float("inf")


@dataclass
class _Forecast:
    """Forward simulation of one instance from now: prefill progress curve and drain time (seconds)."""

    qp: int  # queued prefill tokens (the new request's part comes after them)
    ys: list[int]  # cumulative prefill tokens done at the end of each simulated step
    ts: list[float]  # end time of each simulated step
    tail_rate: float  # ms per prefill token after the last simulated step
    drain: float  # time all current work is done
    n_dec: int  # decodes running after the prefill backlog
    step_ms: float  # duration of a decode step with the current batch
    dec_tok_ms: float  # marginal ms of one more decode token (batch share of the fixed cost included)
    kv_free: int
    busy_step_ms: float  # length of the instance's steps while it has prefill work (else decode steps)
    ts0: float  # the forecast's start (now)
    b_ms: float  # the instance's step model's ms per prefill token (its GPU's, on a mixed cluster)

    def prefill_done(self, y: int) -> float:
        """Time when the first ``y`` backlog tokens are prefilled."""
        if y <= 0:
            return self.ts0
        i = bisect.bisect_left(self.ys, y)
        if i < len(self.ys):
            return self.ts[i]
        last_y, last_t = (self.ys[-1], self.ts[-1]) if self.ys else (0, self.ts0)
        return last_t + (y - last_y) * self.tail_rate / 1000.0


@dataclass
class OraclePolicy:
    """Upper-bound policy for DynaServe (see the module docstring); needs ``bind(simulator)``."""

    pricing: Pricing
    grid: int = 24  # split points tried per pair (plus p, p+1 and no split)
    pairs: int = 4  # best instances per role whose pairs are searched
    full_step_ms: float = 90.0  # a step with prefill work: (1 - margin) * TBT SLO
    name: str = "oracle"
    _sim: Simulator | None = field(default=None, init=False, repr=False)

    def bind(self, sim: Simulator) -> None:
        self._sim = sim

    # ------------------------------------------------------------------ forecasts

    def _forecast(self, inst: SimInstance, now: float, horizon_tokens: int) -> _Forecast:
        model = inst.sched.model
        sched = inst.sched
        # running decodes: (remaining tokens, ctx)
        rem: list[int] = []
        ctx_sum = 0
        for s in inst.decoding:
            left = inst.decode_left(s)
            if left > 0:
                rem.append(left)
                ctx_sum += inst.decode_ctx_now(s)
        # prefill backlog in FCFS order: (tokens, ctx before, tokens to emit afterwards, waiting for handoff)
        backlog: list[tuple[int, int, int]] = []
        for s in inst.prefilling:
            backlog.append((s.pre_left, s.computed, s.emit_true - 1 if s.emits_at_prefill else 0))
        for s in inst.waiting:
            if s.pre_left > 0:
                backlog.append((s.pre_left, s.split if s.role == 2 else 0, s.emit_true - 1 if s.emits_at_prefill else 0))
        qp = sum(b[0] for b in backlog)
        ctx0 = ctx_sum
        t = max(now, inst.cur_end) if inst.busy else now  # the running step ends first
        fin = list(rem)  # heap of step indices at which decodes finish
        heapq.heapify(fin)
        k = 0
        n = len(fin)
        ys: list[int] = []
        ts: list[float] = []
        done = 0
        bi = 0
        b_left = backlog[0][0] if backlog else 0
        target = qp + horizon_tokens
        limit_steps = 4096
        while done < target and k < limit_steps:
            ctx_first = backlog[bi][1] if bi < len(backlog) else 0
            budget = sched.token_budget(n, ctx_sum, ctx_first)
            tokens = budget
            attn = 0.0
            # consume backlog chunks
            left = budget
            while left > 0 and bi < len(backlog):
                c = min(left, b_left)
                attn += c * (backlog[bi][1] + c / 2.0)
                left -= c
                b_left -= c
                if b_left == 0:
                    emits = backlog[bi][2]
                    if emits > 0:
                        heapq.heappush(fin, k + 1 + emits)
                        n += 1
                        ctx_sum += backlog[bi][0] + backlog[bi][1]
                    bi += 1
                    b_left = backlog[bi][0] if bi < len(backlog) else 0
            if bi >= len(backlog):
                attn += left * (left / 2.0)  # the new request's part, from ctx 0 (approximation)
            ms = model.step_ms(tokens, n, ctx_sum, attn) * sched.correction
            t += ms / 1000.0
            done += tokens
            k += 1
            ys.append(done)
            ts.append(t)
            ctx_sum += n
            while fin and fin[0] <= k:
                heapq.heappop(fin)
                n -= 1
            if n == 0:
                ctx_sum = 0
        tail_rate = (ts[-1] - (ts[-2] if len(ts) > 1 else now)) * 1000.0 / max(1, ys[-1] - (ys[-2] if len(ys) > 1 else 0)) if ys else model.b
        # drain: the rest of the decodes after the backlog
        t_q = now if not ys else next((tt for yy, tt in zip(ys, ts, strict=True) if yy >= qp), ts[-1])
        rest = sorted(fin)
        drain = t_q
        prev = 0
        cnt = len(rest)
        avg_ctx = ctx_sum / n if n else 0.0
        for i, r in enumerate(rest):
            steps = max(0, r - max(prev, k))
            if steps:
                alive = cnt - i
                drain += steps * model.step_ms(0, alive, int(alive * avg_ctx)) / 1000.0
            prev = max(prev, r)
        step = model.step_ms(0, max(1, n), int(ctx_sum)) if n else model.a
        dec_tok = model.c + model.d * avg_ctx + model.a / max(1, n)
        busy_step = inst.last_step_ms if qp > 0 else model.step_ms(0, len(rem), ctx0)
        kv_free = inst.free_blocks * inst.block_size
        return _Forecast(qp, ys, ts, tail_rate, max(drain, t_q), n, step, dec_tok, kv_free, busy_step, now, model.b)

    # ------------------------------------------------------------------ plan

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        sim = self._sim
        if sim is None:
            raise RuntimeError("OraclePolicy needs bind(simulator) before planning")
        true = sim.requests[int(req.req_id[1:])]
        p, mt = req.prompt_len, req.max_tokens
        o = true.output
        fc = {inst.id: self._forecast(inst, now, p) for inst in sim.instances}
        pr = self.pricing
        slo_ttft = req.ttft_slo_ms / 1000.0
        slo_tbt = req.tbt_slo_ms / 1000.0
        # one outlier gap does not move the P99 of 101 or more gaps (linear interpolation between ranks), but
        # no gap may be a stall
        max_gap = STALL_FACTOR * slo_tbt if o - 1 >= 101 else slo_tbt
        cands: list[tuple[bool, float, float, Plan]] = []  # (meets the SLOs, TTFT, larger completion, plan)
        ttft_first = {i.id: fc[i.id].prefill_done(fc[i.id].qp + p) for i in sim.instances}
        fits = [i for i in sim.instances if fc[i.id].kv_free >= p + mt]
        for inst in fits:  # no split
            f = fc[inst.id]
            t1 = ttft_first[inst.id]
            end = max(f.drain + (p * f.b_ms + (o - 1) * f.dec_tok_ms) / 1000.0, t1 + (o - 1) * f.step_ms / 1000.0)
            ok = t1 - now <= slo_ttft and f.step_ms <= req.tbt_slo_ms
            cands.append((ok, t1 - now, end - now, Plan.whole(inst.id, p, mt)))
        if mt > 1 and o > 1:
            total = p + o
            grid = {max(1, min(total - 1, round(total * i / self.grid))) for i in range(1, self.grid)}
            grid |= {p, min(total - 1, p + 1), max(1, p // 2)}
            splits = sorted(grid)
            handoff = pr.handoff_ms / 1000.0
            a_cands = sorted(sim.instances, key=lambda i: ttft_first[i.id])[: self.pairs]
            free = [i for i in fits if i.active < i.max_seqs]  # a full B: the request would wait for a slot
            b_cands = sorted(free, key=lambda i: (fc[i.id].qp > 0, fc[i.id].busy_step_ms))[: self.pairs]
            for a in a_cands:
                fa = fc[a.id]
                for b in b_cands:
                    if a is not b:
                        cands += self._splits(fa, fc[b.id], p, o, mt, splits, a.id, b.id, now, handoff,
                                              slo_ttft, slo_tbt, max_gap)
        if not cands:
            return None
        ok = [c for c in cands if c[0]]
        if not ok:
            return min(cands, key=lambda c: c[1])[3]
        # the earliest first token, then, among plans within 5 % (20 ms at least) of it, the best balance
        t_min = min(c[1] for c in ok)
        near = [c for c in ok if c[1] <= t_min + max(0.02, 0.05 * t_min)]
        return min(near, key=lambda c: (c[2], c[3].b is not None))[3]

    def _splits(self, fa: _Forecast, fb: _Forecast, p: int, o: int, mt: int, splits: list[int], a_id: str,
                b_id: str, now: float, handoff: float, slo_ttft: float, slo_tbt: float,
                max_gap: float) -> list[tuple[bool, float, float, Plan]]:
        sim = self._sim
        assert sim is not None
        b_step = fb.busy_step_ms / 1000.0
        out = []
        for s in splits:
            if fa.kv_free < s:
                continue
            ea = tokens_emitted_by_a(p, o, s)
            xfer = sim.cfg.transfer_ms(s) / 1000.0
            if s < p:
                t_h = fa.prefill_done(fa.qp + s)
                own = fb.prefill_done(fb.qp + p - s) - fb.prefill_done(fb.qp)
                t1 = max(t_h + xfer + 1.5 * b_step, fb.prefill_done(fb.qp)) + own
                gap = 0.0
                end_a = fa.drain + s * fa.b_ms / 1000.0
                end_b = max(fb.drain + ((p - s) * fb.b_ms + (o - 1) * fb.dec_tok_ms) / 1000.0,
                            t1 + (o - 1) * fb.step_ms / 1000.0)
            else:
                t1 = fa.prefill_done(fa.qp + p)
                t_h = t1 + (ea - 1) * fa.step_ms / 1000.0
                # the pull waits for B's next step boundary, runs, then B's next step emits; B's steps at
                # that time are not known (later arrivals may give it prefill): assume full steps
                gap = xfer + 2.0 * max(b_step, self.full_step_ms / 1000.0)
                end_a = max(fa.drain + (p * fa.b_ms + (ea - 1) * fa.dec_tok_ms) / 1000.0, t_h)
                end_b = max(fb.drain + (o - ea) * fb.dec_tok_ms / 1000.0,
                            t_h + gap + (o - ea) * fb.step_ms / 1000.0)
            ttft = t1 - now
            ok = (ttft <= slo_ttft and gap <= max_gap
                  and max(fa.step_ms, fb.step_ms) / 1000.0 <= slo_tbt)
            out.append((ok, ttft, max(end_a, end_b) - now + handoff, Plan.make(a_id, b_id, p, mt, s)))
        return out

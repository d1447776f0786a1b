"""The global scheduler: per request, pick (A, B, s).

Pure: ``plan(request, cluster, now) -> Plan | None``; no sockets, no clock reads. The live broker and the
simulator run this same code. ``None`` means no instance can take the request now (the caller queues or
rejects it). After planning, ``commit`` adds the planned work to the cluster view optimistically.

Policies (registry ``POLICIES``):
* ``colocate``: the whole request on the instance with the least projected work.
* ``disagg``: static pools; A from the prefill pool, B from the decode pool, split at s = p.
* ``dynaserve``: TTFT-first placement of A and a prefill/decode handoff (s = p) to a prefill-idle
  instance when one can take the decode with a short gap (see :class:`DynaServePolicy`).
* ``balance``: per request, A = best TTFT instance, B = least loaded decode host, and the split point
  s that minimizes the larger of the two instances' projected work, with a no-split fallback when the
  handoff costs more than it saves (the starting formulation of the design; it splits far more and
  serves less under SLOs, see docs/study.md).
"""

from __future__ import annotations

from bisect import insort
from dataclasses import dataclass, field
from operator import itemgetter
from typing import Any, Protocol

from broker.cluster_state import ClusterState, InstanceState, Pricing, RequestInfo, exposed_transfer_ms
from dynaserve.costmodel import StepLatencyModel
from dynaserve.split import Plan, normalize_split, tokens_emitted_by_a


class GlobalPolicy(Protocol):
    name: str

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None: ...


def commit(plan: Plan, req: RequestInfo, cluster: ClusterState) -> None:
    """Add the planned work to the instances' loads until their next report overwrites it."""
    p, o = req.prompt_len, req.predicted_output
    a = cluster.instances.get(plan.a)
    if plan.b is None:
        if a is not None:
            a.queued_prefill_tokens += p
            a.pending_decode_tokens += o
            a.kv_used_tokens += p + o
        return
    b = cluster.instances.get(plan.b)
    s = min(plan.split, p + o)
    emitted_a = tokens_emitted_by_a(p, max(o, 1), s) if o >= 1 else 0
    if a is not None:
        a.queued_prefill_tokens += min(s, p)
        a.pending_decode_tokens += max(0, emitted_a - 1)
        a.kv_used_tokens += s
    if b is not None:
        b.queued_prefill_tokens += max(0, p - s)
        b.pending_decode_tokens += max(0, o - emitted_a)
        b.kv_used_tokens += p + o


def _fits(inst: InstanceState, tokens: int) -> bool:
    return inst.kv_free_tokens >= tokens and tokens <= inst.max_model_len


@dataclass
class ColocatePolicy:
    """Whole request on the instance that finishes it soonest."""

    pricing: Pricing
    name: str = "colocate"

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        best, best_cost = None, float("inf")
        need = req.prompt_len + req.predicted_output
        for inst in cluster.instances.values():
            if not inst.alive or not _fits(inst, need):
                continue
            cost = self.pricing.work_ms(inst, req.tbt_slo_ms) + req.prompt_len * self.pricing.prefill_ms_per_token(
                inst, req.tbt_slo_ms
            )
            if cost < best_cost:
                best, best_cost = inst, cost
        if best is None:
            return None
        return Plan.whole(best.id, req.prompt_len, req.max_tokens)


@dataclass
class DisaggPolicy:
    """Static prefill/decode pools: the first ``prefill_instances`` registered (or those registered with
    pool="prefill") prefill, the rest decode; every request splits at s = p."""

    pricing: Pricing
    prefill_instances: int = 1
    name: str = "disagg"

    def pools(self, cluster: ClusterState) -> tuple[list[InstanceState], list[InstanceState]]:
        insts = list(cluster.instances.values())
        explicit = [i for i in insts if i.pool != "any"]
        if explicit:
            pre = [i for i in insts if i.pool == "prefill"]
            dec = [i for i in insts if i.pool == "decode"]
        else:
            k = max(1, min(self.prefill_instances, len(insts) - 1))
            pre, dec = insts[:k], insts[k:]
        return [i for i in pre if i.alive], [i for i in dec if i.alive]

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        p, o = req.prompt_len, req.max_tokens
        pre, dec = self.pools(cluster)
        pre = [i for i in pre if _fits(i, p)]
        if not pre:
            return None
        a = min(pre, key=lambda i: self.pricing.work_ms(i, req.tbt_slo_ms))
        dec = [i for i in dec if _fits(i, p + req.predicted_output)]
        if o <= 1 or not dec:
            return Plan.whole(a.id, p, o) if (o <= 1 or not cluster.alive()) else None
        b = min(dec, key=lambda i: self.pricing.work_ms(i, req.tbt_slo_ms))
        return Plan.make(a.id, b.id, p, o, p)


_Row = tuple[InstanceState, float, float, float]  # instance, projected work, prefill ms/token, decode ms/token
_KEY = itemgetter(0)
_INF = float("inf")


def _push_best(top: list[tuple[float, _Row]], key: float, row: _Row, k: int) -> float | None:
    """Keep ``top`` equal to ``sorted(everything pushed, key=key)[:k]`` (stable: ties keep push order);
    ``k < 1`` keeps everything (the caller slices). Returns the key a later push must be below to enter
    (None while every push enters).
    """
    insort(top, (key, row), key=_KEY)
    if 0 < k < len(top):
        top.pop()
    return top[-1][0] if 0 < k <= len(top) else None


@dataclass
class _PriceCache:
    """Per-instance prices that depend only on ``(running_seqs, decode_ctx_tokens)``, the instance's step
    model, the TBT SLO and the pricing: slo -> instance id -> a tuple whose first two fields are the inputs
    it was priced at. Load reports change those inputs a few times per second, while every plan reads every
    instance, so a policy recomputes an entry only when its inputs changed. A change of any instance's step
    model (``ClusterState.models``), a new pricing or more than 8 SLOs clear it, and a table with far more
    ids than live instances starts over."""

    tables: dict[float, dict[str, tuple]] = field(default_factory=dict)
    of: Pricing | None = None
    models: int = -1  # ClusterState.models the tables were priced at

    def table(self, pricing: Pricing, slo: float, cluster: ClusterState) -> dict[str, Any]:
        n_instances = len(cluster.instances)
        if self.of is not pricing or len(self.tables) > 8 or self.models != cluster.models:
            self.tables.clear()
            self.of = pricing
            self.models = cluster.models
        t = self.tables.get(slo)
        if t is None or len(t) > 2 * n_instances + 64:
            t = self.tables[slo] = {}
        return t


@dataclass
class BalancePolicy:
    """Adaptive split: balance the projected work of A and B (the design's starting formulation)."""

    pricing: Pricing
    candidates: int = 2  # best-k instances considered for each role
    min_gain_frac: float = 0.05  # split only if it saves this share of the request's cost, beyond the handoff
    name: str = "balance"
    # id -> (running_seqs, decode_ctx_tokens, prefill ms/token, decode ms/token at the average context,
    # average context, its decode price as a function of the context)
    _prices: _PriceCache = field(default_factory=_PriceCache, init=False, repr=False, compare=False)

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        p, o_plan = req.prompt_len, req.max_tokens
        o = max(1, min(req.predicted_output, o_plan))
        pr = self.pricing
        slo = req.tbt_slo_ms
        k = self.candidates
        prices = self._prices.table(pr, slo, cluster)
        need = p + o
        half_o = o // 2
        # One pass over the alive instances prices each one (work, prefill and decode rate), tracks the
        # cheapest rates, the best unsplit placement and the best-k A and B candidates.
        n_rows = 0
        min_m = min_d = 0.0
        whole_cost, whole_inst = _INF, None
        a_top: list[tuple[float, _Row]] = []
        b_top: list[tuple[float, _Row]] = []
        a_lim: float | None = None  # key of the k-th candidate once there are k (a new one must be smaller)
        b_lim: float | None = None
        for inst in cluster.instances.values():
            if not inst.alive:
                continue
            running = inst.running_seqs
            ctx = inst.decode_ctx_tokens
            cached = prices.get(inst.id)
            if cached is None or cached[0] != running or cached[1] != ctx:
                avg_ctx = ctx // running if running else 0
                decode_ms = pr.decode_ms_fn(inst)  # decode_ms(ctx) == pr.decode_ms_per_token(inst, ctx)
                cached = (running, ctx, pr.prefill_ms_per_token(inst, slo), decode_ms(avg_ctx), avg_ctx, decode_ms)
                prices[inst.id] = cached
            ms_tok = cached[2]
            dtok = cached[5](cached[4] + p + half_o)
            work = inst.queued_prefill_tokens * ms_tok + inst.pending_decode_tokens * cached[3]
            if n_rows:
                if ms_tok < min_m:
                    min_m = ms_tok
                if dtok < min_d:
                    min_d = dtok
            else:
                min_m, min_d = ms_tok, dtok
            n_rows += 1
            free = inst.kv_capacity_tokens - inst.kv_used_tokens
            mml = inst.max_model_len
            if free >= need and need <= mml:  # holds the whole request, so it can be A or B (p < need)
                row = None
                key_a = work + p * ms_tok
                if a_lim is None or key_a < a_lim:
                    row = (inst, work, ms_tok, dtok)
                    a_lim = _push_best(a_top, key_a, row, k)
                c = key_a + o * dtok
                if whole_inst is None or c < whole_cost:
                    whole_cost, whole_inst = c, inst
                key = work + o * dtok
                if b_lim is None or key < b_lim:
                    b_lim = _push_best(b_top, key, row or (inst, work, ms_tok, dtok), k)
            elif free >= p and p <= mml:  # room for the prompt only: A
                key = work + p * ms_tok
                if a_lim is None or key < a_lim:
                    a_lim = _push_best(a_top, key, (inst, work, ms_tok, dtok), k)
        if n_rows == 0:
            return None
        best_whole = None if whole_inst is None else (whole_cost, whole_inst)
        # No split: the instance where the whole request ends its work soonest.
        if n_rows == 1 or o_plan <= 1:
            return Plan.whole(best_whole[1].id, p, o_plan) if best_whole else None
        a_cands = [r for _, r in (a_top if k >= 1 else a_top[:k])]
        b_cands = [r for _, r in (b_top if k >= 1 else b_top[:k])]
        best_split: tuple[float, str, str, int] | None = None
        for a, wa, ma, da in a_cands:
            for b, wb, mb, db in b_cands:
                if a is b:
                    continue
                x = pr.transfer_ms_per_token(b)
                tail = a.early_pull_tail_tokens if b.early_pull_tail_tokens > 0 else 0
                first = pr.prefill_budget(a, slo) if tail else 0
                a_step = pr.decode_step_ms(a, p) if tail else 0.0
                s, cost = _balance(p, o, wa, ma, da, wb, mb, db, x, tail, first, a_step)
                if best_split is None or cost < best_split[0]:
                    best_split = (cost, a.id, b.id, s)
        if best_split is None:
            return Plan.whole(best_whole[1].id, p, o_plan) if best_whole else None
        cost, a_id, b_id, s = best_split
        if best_whole is not None:
            full_cost = p * min_m + o * min_d
            if cost + pr.handoff_ms + self.min_gain_frac * full_cost >= best_whole[0]:
                return Plan.whole(best_whole[1].id, p, o_plan)
        plan = Plan.make(a_id, b_id, p, o_plan, s)
        if plan.b is None:  # the balance point means no split: only an instance with room for it all
            return Plan.whole(best_whole[1].id, p, o_plan) if best_whole else None
        return plan


def _balance(
    p: int, o: int, wa: float, ma: float, da: float, wb: float, mb: float, db: float, x: float,
    tail: int = 0, first: int = 0, a_step: float = 0.0,
) -> tuple[int, float]:
    """Split point s minimizing max(A's work, B's work), closed form on each linear segment.

    A: wa + ma*min(s, p) + da*max(0, s-p). B: wb + mb*(p - min(s, p)) + db*(o - emitted_by_A) + x*s, where
    with early pulls (``tail`` > 0, A's first chunk at most ``first`` positions, A's decode step ``a_step``
    ms; see :func:`exposed_transfer_ms`) x*s is only the transfer A's part does not cover (s > tail).
    """
    cands = {1, p, min(p + o - 1, p + 1)}
    # Segment 1 (s <= p): wa + ma s = wb + mb (p - s) + db o + x s
    den = ma + mb - x
    if den > 0:
        cands.add(int((wb + mb * p + db * o - wa) / den))
    if tail:  # the same with the transfer fully covered
        cands.add(int((wb + mb * p + db * o - wa) / (ma + mb)))
    # Segment 2 (s = p + u, u >= 0): wa + ma p + da u = wb + db (o - 1 - u) + x (p + u)
    den = da + db + x
    if den > 0:
        u = (wb + db * (o - 1) + x * p - wa - ma * p) / den
        cands.add(p + int(u))
    if tail and da + db > 0:  # the same with all but the tail's transfer covered
        cands.add(p + int((wb + db * (o - 1) + x * tail - wa - ma * p) / (da + db)))
    total = p + o
    last = total - 1
    valid = p >= 1 and o >= 1
    best_s, best_c = total, _INF
    seen: set[int] = set()
    for s in cands:
        if total > 1:  # s = min(max(1, s), last)
            if s < 1:
                s = 1
            elif s > last:
                s = last
        else:
            s = 1
        for t in (s, s + 1):
            if 1 <= t < total and t not in seen:
                seen.add(t)
                # the cost of split t: normalize_split and tokens_emitted_by_a inlined
                if not valid:
                    normalize_split(p, o, t)  # raises ValueError
                if t >= last:  # no split: A computes and emits everything
                    sn, lo, ea = total, p, o
                elif t < p:
                    sn, lo, ea = t, t, 0
                else:
                    sn, lo = t, p
                    ea = t - p + 1  # < o here
                fa = wa + ma * lo + da * (sn - p if sn > p else 0)
                if tail and sn < total and (sn > p or sn > tail):
                    xfer = exposed_transfer_ms(sn, x, tail, first, ma, p, a_step)
                else:
                    xfer = x * sn
                fb = wb + mb * (p - lo) + db * (o - ea) + xfer
                c = fb if fb > fa else fa  # max(fa, fb)
                if c < best_c:
                    best_s, best_c = t, c
    return best_s, best_c


CONCENTRATE = ("off", "on", "auto")


def _full(inst: InstanceState, headroom: int) -> bool:
    """The instance runs within ``headroom`` sequences of its engine's cap (never, when the cap is unknown)."""
    return 0 < inst.max_num_seqs <= inst.running_seqs + headroom


@dataclass
class DynaServePolicy:
    """TTFT-first placement with prefill/decode handoffs to prefill-idle instances.

    * A: the instance where the prompt's prefill is projected to finish first, pricing only the prefill
      queue ahead of it at its TBT-limited prefill rate, ``(queued_prefill + p) * ms_per_token``. Pending
      decode work does not delay a prefill (decodes and prefill chunks share every step); it only lowers
      the prefill rate, which the rate already reflects. Ties go to the instance with fewer running
      sequences. An instance whose running decodes are within ``full_headroom`` of its engine's cap of
      running sequences (``InstanceState.max_num_seqs``) is A only when every instance is: a new prompt
      there waits for a decode to finish before its prefill can start.
    * Split at s = p when A has prefill queued and another instance B has none (B lost the placement
      because its decodes slow its prefill rate), has a free slot (it runs fewer than its engine's cap of
      sequences less ``full_headroom``) and room for the request's KV, and the handoff gap (the transfer
      left after A's prefill, :meth:`Pricing.handoff_transfer_ms`, which early pulls shorten, + the wait
      for B's step boundary + B's step) stays under ``gap_frac`` of the TBT SLO; among such instances
      B runs the shortest decode step. The request's decode then runs where it delays no prefill, instead
      of taking step time from A's prefill queue: the prefill:decode split of the cluster follows the load.
      A full B is never chosen: the request would wait there for a slot, seconds when B's decodes are long,
      and a stream that stalls that long mid-answer misses its TBT SLO (``dynaserve.metrics.STALL_FACTOR``).
    * Only outputs predicted at ``min_output`` tokens or more are split: with 101 or more gaps, the
      one handoff gap does not move the request's P99 TBT.

    Decode concentration (``concentrate``: "off", "on", or "auto"): on a model whose fixed step cost is
    large next to its per-token cost (Qwen2.5-32B on two A100s: 25 ms of an 8,192-token step's 1.28 s),
    the first decode on an instance slows its prefill 1.37x, because from then on every
    step must end within the TBT SLO (chunks of ~450 tokens instead of 8,192). With concentration every
    request predicted to decode ``host_min_output`` tokens or more (lower than ``min_output``: B emits
    the first token, so the client sees no handoff gap, and a decode of a few dozen tokens already slows a
    prefilling instance; but very short outputs, such as code completions, are cheaper left where they are
    than the TTFT the tail handoff costs them) goes to the instance that already decodes
    the most (more than A, its decode-only step under ``host_frac`` of the TBT budget, ``host_kv_frac``
    of its KV still free after the request): a prompt split
    that leaves B the last ``tail`` prompt tokens, so that B emits the first token and the client sees
    no handoff gap. Instances without decodes keep prefilling in full chunks, the hosts fill up with
    decodes, and the number of hosts follows the decode load. The price is TTFT: the tail handoff adds
    about two host steps. "auto" concentrates when (a) the first decode slows an instance's prefill by
    ``min_gain`` or more (:func:`first_decode_cost`) and (b) most recent requests have TTFT slack: the
    tail handoff costs at most ``slack_frac`` of their TTFT SLO (the mean over the first 256 requests,
    then an EWMA over ~256; on at ``auto_on``, off below ``auto_off``).
    """

    pricing: Pricing
    gap_frac: float = 0.8  # handoff gap allowed, as a share of the TBT SLO
    full_headroom: int = 6  # an instance running max_num_seqs - full_headroom decodes or more is full
    min_output: int = 102  # split only outputs predicted to have this many tokens or more
    concentrate: str = "auto"  # decode concentration: "off", "on" or "auto" (see the class docstring)
    min_gain: float = 1.25  # auto: the first decode must slow an instance's prefill by this factor or more
    slack_frac: float = 0.1  # auto: a request has slack when the tail handoff costs <= this share of its TTFT SLO
    auto_on: float = 0.6  # auto: on when this share of recent requests has slack (EWMA over ~256 requests)
    auto_off: float = 0.5  # auto: off again below this share
    host_frac: float = 0.6  # concentration: a host's decode-only step stays under this share of the TBT budget
    host_kv_frac: float = 0.3  # concentration: a host keeps this share of its KV free after taking the request
    tail: int = 64  # concentration: prompt tokens B computes (B emits the first token)
    host_min_output: int = 32  # concentration: only outputs predicted at this many tokens or more go to a host
    name: str = "dynaserve"
    # (slo, id(model)) -> (model, first_decode_cost): the entry holds its model, so the id stays its own
    _gains: dict[tuple[float, int], tuple[StepLatencyModel, float]] = field(
        default_factory=dict, init=False, repr=False, compare=False)
    _slack_share: float = field(default=0.0, init=False, repr=False, compare=False)
    _seen: int = field(default=0, init=False, repr=False, compare=False)
    _auto_state: bool = field(default=False, init=False, repr=False, compare=False)
    # id -> (running_seqs, decode_ctx_tokens, prefill ms/token)
    _rates: _PriceCache = field(default_factory=_PriceCache, init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.concentrate not in CONCENTRATE:
            raise ValueError(f"concentrate must be one of {CONCENTRATE}, got {self.concentrate!r}")

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        p, mt = req.prompt_len, req.max_tokens
        o = max(1, min(req.predicted_output, mt))
        pr = self.pricing
        slo = req.tbt_slo_ms
        rates = self._rates.table(pr, slo, cluster)
        need = p + mt
        headroom = self.full_headroom
        a: InstanceState | None = None
        best_t = _INF
        a_full = True
        idle: list[InstanceState] = []  # B candidates: no prefill queued
        for inst in cluster.instances.values():
            if not inst.alive or inst.kv_capacity_tokens - inst.kv_used_tokens < need or need > inst.max_model_len:
                continue
            qp = inst.queued_prefill_tokens
            if qp <= 0:
                idle.append(inst)
            running, ctx = inst.running_seqs, inst.decode_ctx_tokens
            full = _full(inst, headroom)
            if full and not a_full:
                continue
            cached = rates.get(inst.id)
            if cached is None or cached[0] != running or cached[1] != ctx:
                cached = rates[inst.id] = (running, ctx, pr.prefill_ms_per_token(inst, slo))
            t = (qp + p) * cached[2]
            if (a_full and not full) or t < best_t or (t == best_t and a is not None and running < a.running_seqs):
                a, best_t, a_full = inst, t, full
        if a is None:
            return None
        if self.concentrate != "off" and self._concentrating(req, a) and o >= self.host_min_output and mt > 1:
            host = self._decode_host(a, cluster, p, need, slo)
            if host is not None:
                if p <= self.tail:  # too short to be worth a handoff: all of it on the host
                    return Plan.whole(host.id, p, mt)
                return Plan.make(a.id, host.id, p, mt, p - self.tail)
        if o < self.min_output or mt <= 1 or a.queued_prefill_tokens <= 0 or not idle:
            return Plan.whole(a.id, p, mt)
        b: InstanceState | None = None
        b_step = _INF
        for inst in idle:
            if inst is a or _full(inst, headroom):
                continue
            step = pr.model_of(inst).step_ms(0, inst.running_seqs + 1, inst.decode_ctx_tokens + p)  # decode_step_ms
            if step < b_step:
                b, b_step = inst, step
        if b is None:
            return Plan.whole(a.id, p, mt)
        gap = pr.handoff_ms + pr.handoff_transfer_ms(a, b, p, p, slo) + 2.0 * max(b_step, b.step_ms)
        if gap > self.gap_frac * slo:
            return Plan.whole(a.id, p, mt)
        return Plan.make(a.id, b.id, p, mt, p)


    def _concentrating(self, req: RequestInfo, a: InstanceState) -> bool:
        """Whether decode concentration is on for this request (``concentrate``; "auto": see the class
        docstring). Every call in "auto" mode updates the share of recent requests with TTFT slack."""
        if self.concentrate == "on":
            return True
        if self.concentrate != "auto":
            return False
        pr = self.pricing
        slo = req.tbt_slo_ms
        model = pr.model_of(a)
        hit = self._gains.get((slo, id(model)))
        if hit is None:
            if len(self._gains) > 64:  # instances' models move with their reported corrections
                self._gains.clear()
            hit = self._gains[(slo, id(model))] = (model, first_decode_cost(pr, slo, model=model))
        if hit[1] < self.min_gain:
            return False
        # the tail handoff's transfer, priced as if the host were like A (it is not chosen yet)
        p = req.prompt_len
        xfer = pr.handoff_transfer_ms(a, a, p - self.tail, p, slo) if p > self.tail else 0.0
        extra = pr.handoff_ms + xfer + 2.0 * self.host_frac * slo * (1.0 - pr.tbt_margin)
        self._seen += 1
        w = max(_SLACK_EWMA, 1.0 / self._seen)  # a plain mean until there are 256 requests
        share = self._slack_share = (1.0 - w) * self._slack_share + w * (extra <= self.slack_frac * req.ttft_slo_ms)
        if self._auto_state:
            self._auto_state = share > self.auto_off
        else:
            self._auto_state = share >= self.auto_on
        return self._auto_state

    def _decode_host(
        self, a: InstanceState, cluster: ClusterState, p: int, need: int, slo: float
    ) -> InstanceState | None:
        """Decode concentration: the instance other than A that runs more decodes than A and the most of
        all, whose decode-only step with this request stays under ``host_frac`` of the TBT budget and which
        keeps ``host_kv_frac`` of its KV free after taking it (its decodes grow their blocks on demand; a
        host that runs out preempts, and a host that cannot admit the request delays its first token)."""
        pr = self.pricing
        cap = self.host_frac * slo * (1.0 - pr.tbt_margin)
        host: InstanceState | None = None
        most = a.running_seqs
        for inst in cluster.instances.values():
            running = inst.running_seqs
            if (running <= most or inst is a or not inst.alive or _full(inst, self.full_headroom)
                    or inst.kv_capacity_tokens - inst.kv_used_tokens < need or need > inst.max_model_len):
                continue
            if inst.kv_capacity_tokens - inst.kv_used_tokens - need < self.host_kv_frac * inst.kv_capacity_tokens:
                continue
            if pr.model_of(inst).step_ms(0, running + 1, inst.decode_ctx_tokens + p) <= cap:  # decode_step_ms
                host, most = inst, running
        return host


_SLACK_EWMA = 1.0 / 256  # weight of one request in the share of requests with TTFT slack


def first_decode_cost(
    pricing: Pricing, tbt_slo_ms: float, ctx: int = 1024, model: StepLatencyModel | None = None,
) -> float:
    """How much one running decode (``ctx`` tokens of context) slows an instance's prefill: its prefill
    ms per token under the TBT SLO with that decode over its rate without decodes (full chunks), on an
    instance of step model ``model`` (default: the pricing's)."""
    m = pricing.model if model is None else model
    mbt = pricing.max_batched_tokens
    one = pricing.prefill_budget(InstanceState("", 0, running_seqs=1, decode_ctx_tokens=ctx, model=m), tbt_slo_ms)
    return (m.step_ms(one, 1, ctx) / one) / (m.step_ms(mbt) / mbt)


def forced_plan(req: RequestInfo, cluster: ClusterState, split: int) -> Plan | None:
    """A plan with a pinned split point: A is the instance with the least work, B the next one."""
    alive = sorted(cluster.alive(), key=lambda i: (i.queued_prefill_tokens + i.pending_decode_tokens, i.id))
    if not alive:
        return None
    if len(alive) == 1:
        return Plan.whole(alive[0].id, req.prompt_len, req.max_tokens)
    return Plan.make(alive[0].id, alive[1].id, req.prompt_len, req.max_tokens, split)


POLICIES = {"colocate": ColocatePolicy, "disagg": DisaggPolicy, "dynaserve": DynaServePolicy, "balance": BalancePolicy}


def make_policy(name: str, pricing: Pricing, **options: object) -> GlobalPolicy:
    """Build a policy by name; unknown names raise ValueError listing the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(pricing=pricing, **options)  # type: ignore[arg-type]

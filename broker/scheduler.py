"""The global scheduler: per request, pick (A, B, s).

Pure: ``plan(request, cluster, now) -> Plan | None``; no sockets, no clock reads. The live broker and the
simulator run this same code. ``None`` means no instance can take the request now (the caller queues or
rejects it). After planning, ``commit`` adds the planned work to the cluster view optimistically.

Policies (registry ``POLICIES``):
* ``colocate``: the whole request on the instance with the least projected work.
* ``disagg``: static pools; A from the prefill pool, B from the decode pool, split at s = p.
* ``dynaserve``: per request, A = best TTFT instance, B = least loaded decode host, and the split point
  s that minimizes the larger of the two instances' projected work, with a no-split fallback when the
  handoff costs more than it saves.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

from broker.cluster_state import ClusterState, InstanceState, Pricing, RequestInfo
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


@dataclass
class DynaServePolicy:
    """Adaptive split: balance the projected work of A and B (DESIGN section 3)."""

    pricing: Pricing
    candidates: int = 2  # best-k instances considered for each role
    min_gain_frac: float = 0.05  # split only if it saves this share of the request's cost, beyond the handoff
    name: str = "dynaserve"

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        p, o_plan = req.prompt_len, req.max_tokens
        o = max(1, min(req.predicted_output, o_plan))
        pr = self.pricing
        slo = req.tbt_slo_ms
        alive = [i for i in cluster.instances.values() if i.alive]
        if not alive:
            return None
        # Per-instance prices, computed once.
        rows = []
        for inst in alive:
            ms_tok = pr.prefill_ms_per_token(inst, slo)
            avg_ctx = inst.decode_ctx_tokens // inst.running_seqs if inst.running_seqs else 0
            dtok = pr.decode_ms_per_token(inst, avg_ctx + p + o // 2)
            work = inst.queued_prefill_tokens * ms_tok + inst.pending_decode_tokens * pr.decode_ms_per_token(
                inst, avg_ctx
            )
            rows.append((inst, work, ms_tok, dtok))
        # No split: the instance where the whole request ends its work soonest.
        need = p + o
        whole = [(w + p * m + o * d, inst) for inst, w, m, d in rows if _fits(inst, need)]
        best_whole = min(whole, key=lambda t: t[0]) if whole else None
        if len(rows) == 1 or o_plan <= 1:
            return Plan.whole(best_whole[1].id, p, o_plan) if best_whole else None
        k = self.candidates
        a_cands = sorted((r for r in rows if _fits(r[0], p)), key=lambda r: r[1] + p * r[2])[:k]
        b_cands = sorted((r for r in rows if _fits(r[0], need)), key=lambda r: r[1] + o * r[3])[:k]
        best_split: tuple[float, str, str, int] | None = None
        for a, wa, ma, da in a_cands:
            for b, wb, mb, db in b_cands:
                if a is b:
                    continue
                x = pr.transfer_ms_per_token(b)
                s, cost = _balance(p, o, wa, ma, da, wb, mb, db, x)
                if best_split is None or cost < best_split[0]:
                    best_split = (cost, a.id, b.id, s)
        if best_split is None:
            return Plan.whole(best_whole[1].id, p, o_plan) if best_whole else None
        cost, a_id, b_id, s = best_split
        if best_whole is not None:
            full_cost = p * min(r[2] for r in rows) + o * min(r[3] for r in rows)
            if cost + pr.handoff_ms + self.min_gain_frac * full_cost >= best_whole[0]:
                return Plan.whole(best_whole[1].id, p, o_plan)
        if s >= p + o:
            return Plan.whole(a_id, p, o_plan)
        return Plan.make(a_id, b_id, p, o_plan, s)


def _balance(
    p: int, o: int, wa: float, ma: float, da: float, wb: float, mb: float, db: float, x: float
) -> tuple[int, float]:
    """Split point s minimizing max(A's work, B's work), closed form on each linear segment.

    A: wa + ma*min(s, p) + da*max(0, s-p). B: wb + mb*(p - min(s, p)) + db*(o - emitted_by_A) + x*s.
    """

    def cost(s: int) -> float:
        s = normalize_split(p, o, s)
        ea = tokens_emitted_by_a(p, o, s)
        fa = wa + ma * min(s, p) + da * max(0, s - p)
        fb = wb + mb * (p - min(s, p)) + db * (o - ea) + x * s
        return max(fa, fb)

    cands = {1, p, min(p + o - 1, p + 1)}
    # Segment 1 (s <= p): wa + ma s = wb + mb (p - s) + db o + x s
    den = ma + mb - x
    if den > 0:
        cands.add(int((wb + mb * p + db * o - wa) / den))
    # Segment 2 (s = p + u, u >= 0): wa + ma p + da u = wb + db (o - 1 - u) + x (p + u)
    den = da + db + x
    if den > 0:
        u = (wb + db * (o - 1) + x * p - wa - ma * p) / den
        cands.add(p + int(u))
    best_s, best_c = p + o, float("inf")
    for s in cands:
        s = min(max(1, s), p + o - 1) if p + o > 1 else 1
        for t in (s, s + 1):
            if 1 <= t < p + o:
                c = cost(t)
                if c < best_c:
                    best_s, best_c = t, c
    return best_s, best_c


def forced_plan(req: RequestInfo, cluster: ClusterState, split: int) -> Plan | None:
    """A plan with a pinned split point: A is the instance with the least work, B the next one."""
    alive = sorted(cluster.alive(), key=lambda i: (i.queued_prefill_tokens + i.pending_decode_tokens, i.id))
    if not alive:
        return None
    if len(alive) == 1:
        return Plan.whole(alive[0].id, req.prompt_len, req.max_tokens)
    return Plan.make(alive[0].id, alive[1].id, req.prompt_len, req.max_tokens, split)


POLICIES = {"colocate": ColocatePolicy, "disagg": DisaggPolicy, "dynaserve": DynaServePolicy}


def make_policy(name: str, pricing: Pricing, **options: object) -> GlobalPolicy:
    """Build a policy by name; unknown names raise ValueError listing the known ones."""
    try:
        cls = POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted(POLICIES)}") from None
    return cls(pricing=pricing, **options)  # type: ignore[arg-type]

"""Global policies under study in the simulator, next to the broker's own registry.

``build_policy`` knows the broker's policies (:data:`broker.scheduler.POLICIES`), the oracle and the
variants defined here. Every policy implements ``plan(req, cluster, now) -> Plan | None`` and is pure
apart from the oracle (which reads the simulator it is bound to).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bench.sim.oracle import OraclePolicy
from broker.cluster_state import ClusterState, InstanceState, Pricing, RequestInfo
from broker.scheduler import POLICIES, GlobalPolicy, make_policy
from dynaserve.split import Plan

_INF = float("inf")

SIM_POLICIES: dict[str, Any] = {"oracle": OraclePolicy}


def build_policy(name: str, pricing: Pricing, **options: Any) -> GlobalPolicy:
    """A broker policy by name, or one of :data:`SIM_POLICIES`."""
    if name in POLICIES:
        return make_policy(name, pricing, **options)
    try:
        cls = SIM_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {sorted({*POLICIES, *SIM_POLICIES})}") from None
    return cls(pricing=pricing, **options)  # type: ignore[no-any-return]


@dataclass
class SloAwarePolicy:
    """DynaServe with a TTFT-first placement and decode offloading to prefill-idle instances.

    * A: the instance where the prompt's prefill is projected to finish first, pricing only the prefill
      queue ahead of it at its TBT-limited prefill rate (``(queued_prefill + p) * ms_per_token``): pending
      decode work does not delay a prefill, it only slows the rate, which the rate already reflects.
    * Split at s = p (PD) when A has prefill queued and an instance B has none (its steps are short, so
      the handoff gap, transfer + the wait for B's step boundary + B's step, stays under the TBT SLO),
      B has room for the request's KV and fewer than ``max_decode_seqs`` running, and the decode step B
      runs is no slower than A's. Decodes so collect on prefill-idle instances and prefills run where few
      decodes slow them: the prefill:decode split of the cluster follows the load.
    * Otherwise no split (the whole request on A).
    """

    pricing: Pricing
    gap_frac: float = 0.8  # handoff gap allowed, as a share of the TBT SLO
    max_decode_seqs: int = 224  # B must run fewer decodes than this (admission cap headroom)
    min_output: int = 102  # split only outputs predicted to have >= 101 gaps (one handoff gap then does not
    # move the request's P99 TBT; a gap under the SLO cannot be guaranteed: B may get prefill meanwhile)
    name: str = "dynaserve_slo"

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        p, mt = req.prompt_len, req.max_tokens
        o = max(1, min(req.predicted_output, mt))
        pr = self.pricing
        model = pr.model
        slo = req.tbt_slo_ms
        need = p + mt
        best_a: InstanceState | None = None
        best_t = _INF
        for inst in cluster.instances.values():
            if not inst.alive or inst.kv_capacity_tokens - inst.kv_used_tokens < need or need > inst.max_model_len:
                continue
            t = (inst.queued_prefill_tokens + p) * pr.prefill_ms_per_token(inst, slo)
            if t < best_t or (t == best_t and best_a is not None and inst.running_seqs < best_a.running_seqs):
                best_a, best_t = inst, t
        if best_a is None:
            return None
        a = best_a
        if o < self.min_output or mt <= 1 or a.queued_prefill_tokens <= 0:
            return Plan.whole(a.id, p, mt)
        a_step = model.step_ms(0, a.running_seqs, a.decode_ctx_tokens)
        best_b: InstanceState | None = None
        best_step = _INF
        for inst in cluster.instances.values():
            if inst is a or not inst.alive or inst.queued_prefill_tokens > 0:
                continue
            if inst.kv_capacity_tokens - inst.kv_used_tokens < need or inst.running_seqs >= self.max_decode_seqs:
                continue
            step = model.step_ms(0, inst.running_seqs + 1, inst.decode_ctx_tokens + p)
            if step < best_step:
                best_b, best_step = inst, step
        if best_b is None or best_step > max(a_step, model.a) + model.c + model.d * p:
            return Plan.whole(a.id, p, mt)
        gap = pr.handoff_ms + p * pr.transfer_ms_per_token(best_b) + 2.0 * max(best_step, best_b.step_ms)
        if gap > self.gap_frac * slo:
            return Plan.whole(a.id, p, mt)
        return Plan.make(a.id, best_b.id, p, mt, p)


SIM_POLICIES["dynaserve_slo"] = SloAwarePolicy

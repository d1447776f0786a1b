"""Global policies under study in the simulator, next to the broker's own registry.

``build_policy`` knows the broker's policies (:data:`broker.scheduler.POLICIES`), the oracle and the
run-time decode handoff experiment (``dynaserve-migrate``, bench.sim.migration), which only the simulator
can run. Every policy implements ``plan(req, cluster, now) -> Plan | None`` and is pure
apart from the oracle (which reads the simulator it is bound to).
"""

from __future__ import annotations

from typing import Any

from bench.sim.migration import MigratingPolicy
from bench.sim.oracle import OraclePolicy
from broker.cluster_state import Pricing
from broker.scheduler import POLICIES, GlobalPolicy, make_policy

SIM_POLICIES: dict[str, Any] = {"oracle": OraclePolicy, "dynaserve-migrate": MigratingPolicy}


def policy_names() -> list[str]:
    """Every name :func:`build_policy` knows, sorted."""
    return sorted({*POLICIES, *SIM_POLICIES})


def build_policy(name: str, pricing: Pricing, **options: Any) -> GlobalPolicy:
    """A broker policy by name, or one of :data:`SIM_POLICIES`."""
    if name in POLICIES:
        return make_policy(name, pricing, **options)
    try:
        cls = SIM_POLICIES[name]
    except KeyError:
        raise ValueError(f"unknown policy {name!r}; choose one of {policy_names()}") from None
    return cls(pricing=pricing, **options)  # type: ignore[no-any-return]

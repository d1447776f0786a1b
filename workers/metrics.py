"""Prometheus metrics of one worker (prefix ``dynaserve:``, label ``worker``), served on
127.0.0.1:``metrics_port``.

The engine never touches Prometheus: the shell hands every StepOutput (step time, token budget, KV pulls
completed, KV pull failures) and every heartbeat's EngineLoad to the hooks here. Label children are bound
once, so a hook is a few attribute updates.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

from dynaserve.prom import MetricsExporter
from workers.engine import EngineLoad, StepOutput

STEP_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.015, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.25, 0.5, 1.0)
XFER_BUCKETS = (0.0001, 0.00025, 0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 5.0)
KV_RECOMPUTE = "kv_transfer_recompute"  # failure code the engine reports for a failed KV pull

_LOAD_GAUGES = (
    ("running_seqs", "Sequences decoding"),
    ("queued_prefill_tokens", "Prompt tokens waiting for prefill"),
    ("kv_used_tokens", "KV cache in use, tokens"),
    ("kv_capacity_tokens", "KV cache size, tokens"),
    ("held_blocks", "KV blocks held for a handoff"),
    ("active_requests", "Micro-requests on this instance"),
)


class WorkerMetrics(MetricsExporter):
    """A worker's metrics and their hooks; ``serve(port)`` exposes them over HTTP."""

    def __init__(self, instance_id: str, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r, w = self.registry, [instance_id]
        lab = ["worker"]
        self.step = Histogram("dynaserve:worker_step_seconds", "Engine step time (of the modeled GPU)", lab,
                              buckets=STEP_BUCKETS, registry=r).labels(*w)
        self.budget = Gauge("dynaserve:worker_token_budget", "Token budget of the current step", lab,
                            registry=r).labels(*w)
        self.steps = Counter("dynaserve:worker_steps", "Engine steps run", lab, registry=r).labels(*w)
        self.prefill_tokens = Counter("dynaserve:worker_prefill_tokens", "Prompt tokens computed", lab,
                                      registry=r).labels(*w)
        self.decode_tokens = Counter("dynaserve:worker_decode_tokens", "Decode tokens computed", lab,
                                     registry=r).labels(*w)
        self.kv_bytes = Counter("dynaserve:worker_kv_transfer_bytes", "KV bytes pulled from peers", lab,
                                registry=r).labels(*w)
        self.kv_seconds = Histogram("dynaserve:worker_kv_transfer_seconds", "KV pull latency, start to done",
                                    lab, buckets=XFER_BUCKETS, registry=r).labels(*w)
        self.kv_failures = Counter("dynaserve:worker_kv_transfer_failures",
                                   "KV pulls that failed (the request was recomputed)", lab, registry=r).labels(*w)
        self.kv_early_blocks = Counter("dynaserve:worker_kv_early_blocks",
                                       "KV blocks pulled from A while it still prefilled (KvChunk) and kept at "
                                       "the handoff", lab, registry=r).labels(*w)
        started = Counter("dynaserve:worker_handoffs_started",
                          "B micro-requests started, by the StartDecode copy that came first: direct from A, "
                          "or relayed by the broker", ["worker", "path"], registry=r)
        self.handoffs_started = {path: started.labels(instance_id, path) for path in ("direct", "relay")}
        self._load = [(name, Gauge(f"dynaserve:worker_{name}", help_, lab, registry=r).labels(*w))
                      for name, help_ in _LOAD_GAUGES]

    def on_output(self, out: StepOutput) -> None:
        """Every StepOutput the shell ships (engine steps and housekeeping)."""
        if out.step_ms > 0:
            self.step.observe(out.step_ms / 1000.0)
            self.steps.inc()
            self.budget.set(out.token_budget)
            if out.prefill_tokens:
                self.prefill_tokens.inc(out.prefill_tokens)
            if out.decode_seqs:
                self.decode_tokens.inc(out.decode_seqs)
        for nbytes, seconds in out.kv_transfers:
            self.kv_bytes.inc(nbytes)
            self.kv_seconds.observe(seconds)
        if out.kv_early_blocks:
            self.kv_early_blocks.inc(out.kv_early_blocks)
        for failure in out.failures:
            if failure[1] == KV_RECOMPUTE:
                self.kv_failures.inc()

    def on_load(self, load: EngineLoad) -> None:
        """Every heartbeat's load report."""
        self.budget.set(load.token_budget)
        for name, gauge in self._load:
            gauge.set(getattr(load, name))

"""Prometheus metrics of the broker (prefix ``dynaserve:``), served on 127.0.0.1:``metrics_port``.

Request outcome counts, queue lengths and the worker count are read from the broker's own stats when
scraped (no work on the request path). Hooks observe what the stats do not hold: rejections by code,
split decisions by kind, and TTFT / TBT as the broker relays tokens. TTFT runs from the request's arrival
at the broker to its first relayed token; TBT is every gap between two relays of one request (tokens
relayed together count once). The relay hook is the only hot one: one dict lookup and one histogram
observation per relayed entry, with no label lookups.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from dynaserve.prom import MetricsExporter

SPLIT_KINDS = ("none", "prompt", "pd", "decode")
TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0)
TBT_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.03, 0.04, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.5, 1.0, 2.5)
_OUTCOMES = ("admitted", "finished", "aborted", "failed", "rejected")


class _StatsCollector(Collector):
    """Counters and gauges computed from the broker object at scrape time."""

    def __init__(self, broker: Any) -> None:
        self.broker = broker

    def collect(self) -> Iterator[Any]:
        b = self.broker
        stats = dataclasses.asdict(b.stats)
        req = CounterMetricFamily("dynaserve:broker_requests", "Requests by outcome", labels=["outcome"])
        for outcome in _OUTCOMES:
            req.add_metric([outcome], stats.get(outcome, 0))
        yield req
        for key, help_ in (("tokens_relayed", "Tokens relayed to clients"),
                           ("kv_recomputes", "Split requests whose KV pull failed and were recomputed"),
                           ("bad_frames", "Frames that could not be decoded")):
            yield CounterMetricFamily(f"dynaserve:broker_{key}", help_, value=stats.get(key, 0))
        queued = len(b.queue)
        yield GaugeMetricFamily("dynaserve:broker_requests_queued", "Requests waiting for capacity", value=queued)
        yield GaugeMetricFamily("dynaserve:broker_requests_active", "Requests dispatched and not finished",
                                value=len(b.table) - queued)
        insts = list(b.cluster.instances.values())
        yield GaugeMetricFamily("dynaserve:broker_workers", "Registered live workers",
                                value=sum(1 for inst in insts if inst.alive))
        scale = GaugeMetricFamily("dynaserve:broker_instance_step_scale",
                                  "Correction the instance is priced at: measured / its advertised step model "
                                  "(1 when it advertises none)", labels=["instance"])
        rate = GaugeMetricFamily("dynaserve:broker_instance_prefill_seconds_per_token",
                                 "Prefill time per token the broker prices the instance at, idle, in full chunks",
                                 labels=["instance"])
        pr = b.pricing
        for inst in insts:
            scale.add_metric([inst.id], inst.step_scale)
            rate.add_metric([inst.id], pr.model_of(inst).step_ms(pr.max_batched_tokens) / pr.max_batched_tokens / 1e3)
        yield scale
        yield rate


class BrokerMetrics(MetricsExporter):
    """The broker's metrics and their hooks; ``serve(port)`` exposes them over HTTP."""

    def __init__(self, broker: Any, registry: CollectorRegistry | None = None) -> None:
        super().__init__(registry)
        r = self.registry
        self.rejected = Counter("dynaserve:broker_rejected_requests", "Requests refused, by error code",
                                ["code"], registry=r)
        splits = Counter("dynaserve:broker_split_decisions", "Dispatch decisions by split kind", ["kind"],
                         registry=r)
        self._splits = {k: splits.labels(k) for k in SPLIT_KINDS}
        self._split_counter = splits
        self.ttft = Histogram("dynaserve:broker_time_to_first_token_seconds",
                              "From arrival at the broker to the first relayed token", buckets=TTFT_BUCKETS,
                              registry=r)
        self.tbt = Histogram("dynaserve:broker_time_between_tokens_seconds",
                             "Gaps between two token relays of one request", buckets=TBT_BUCKETS, registry=r)
        self._ttft_observe = self.ttft.observe
        self._tbt_observe = self.tbt.observe
        self._last: dict[str, float] = {}  # internal request id -> time of its last relay
        r.register(_StatsCollector(broker))

    def on_reject(self, code: str) -> None:
        self.rejected.labels(code).inc()

    def on_admit(self, kind: str) -> None:
        child = self._splits.get(kind)
        if child is None:
            child = self._splits[kind] = self._split_counter.labels(kind)
        child.inc()

    def on_relay(self, iid: str, arrival: float, now: float) -> None:
        last = self._last.get(iid)
        if last is None:
            self._ttft_observe(now - arrival)
        else:
            self._tbt_observe(now - last)
        self._last[iid] = now

    def on_end(self, iid: str) -> None:
        self._last.pop(iid, None)

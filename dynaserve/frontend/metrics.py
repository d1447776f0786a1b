"""The front end's own Prometheus metrics (served on its GET /metrics). Observed once per request, never
per token."""

from __future__ import annotations

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

ENDPOINTS = ("completions", "chat")

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0)


class FrontendMetrics:
    """Requests by endpoint and status, TTFT and request latency as the HTTP client sees them, tokens."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter("dynaserve:frontend_requests", "HTTP generation requests by endpoint and status",
                                ["endpoint", "status"], registry=r)
        self.inflight = Gauge("dynaserve:frontend_requests_in_flight", "Generation requests being served",
                              registry=r)
        ttft = Histogram("dynaserve:frontend_time_to_first_token_seconds",
                         "From the request's arrival to its first token, at the front end", ["endpoint"],
                         buckets=_LATENCY_BUCKETS, registry=r)
        e2e = Histogram("dynaserve:frontend_request_seconds", "From arrival to the last byte of the response",
                        ["endpoint"], buckets=_LATENCY_BUCKETS, registry=r)
        prompt = Counter("dynaserve:frontend_prompt_tokens", "Prompt tokens of served requests", ["endpoint"],
                         registry=r)
        gen = Counter("dynaserve:frontend_generation_tokens", "Tokens generated for served requests",
                      ["endpoint"], registry=r)
        self.disconnects = Counter("dynaserve:frontend_client_disconnects",
                                   "Requests aborted because the HTTP client went away", registry=r)
        self._ttft = {e: ttft.labels(e) for e in ENDPOINTS}
        self._e2e = {e: e2e.labels(e) for e in ENDPOINTS}
        self._prompt = {e: prompt.labels(e) for e in ENDPOINTS}
        self._gen = {e: gen.labels(e) for e in ENDPOINTS}

    def on_first_token(self, endpoint: str, seconds: float) -> None:
        self._ttft[endpoint].observe(seconds)

    def on_done(self, endpoint: str, status: int, seconds: float, prompt_tokens: int,
                completion_tokens: int) -> None:
        self.requests.labels(endpoint, str(status)).inc()
        if status == 200:
            self._e2e[endpoint].observe(seconds)
            self._prompt[endpoint].inc(prompt_tokens)
            self._gen[endpoint].inc(completion_tokens)

    def render(self) -> bytes:
        return generate_latest(self.registry)

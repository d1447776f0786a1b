"""Workloads of the goodput study: base traces, the client's max_tokens and the per-request SLOs.

Every workload is a base trace (arrivals and true lengths) that the study rescales to each request rate with
:func:`bench.traces.scale`. Clients send ``max_tokens = MAX_TOKENS`` (true outputs above it are clipped);
requests stop at their true output length, so a policy only knows the output through a predictor.

SLOs: TBT 100 ms as each request's own P99 gap (``tbt_form="p99"``); TTFT ``250 ms + 4 x`` the prompt's
isolated prefill time (the prompt alone on an idle instance, in chunks of 8,192 tokens, with the model's
step-latency model), so a 1k-token prompt on Llama-3-8B gets ~0.52 s and a 8k-token one ~2.6 s.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np

from bench.traces import TraceRequest, load_trace, poisson_from_lengths, scale
from dynaserve.costmodel import StepLatencyModel

DATA_DIR = Path(__file__).resolve().parent / "data"
ARXIV_LENGTHS = DATA_DIR / "arxiv_summarization_llama2_lengths.csv"
MAX_TOKENS = 2048
TBT_SLO_MS = 100.0
TTFT_BASE_MS = 250.0
TTFT_PREFILL_FACTOR = 4.0
POISSON_REQUESTS = 6000
CONV_REPEATS = 3
POISSON_SEED = 7


@dataclass(frozen=True)
class Workload:
    name: str
    title: str
    source: str  # how the base trace is made (for the report)
    build: Callable[[], list[TraceRequest]]


def _superpose(a: list[TraceRequest], b: list[TraceRequest]) -> list[TraceRequest]:
    """Both traces on the same time span, merged by arrival (each keeps its own burstiness)."""
    span_a, span_b = a[-1].arrival_s, b[-1].arrival_s
    b2 = scale(b, time_scale=span_a / span_b)
    return sorted([*a, *b2], key=lambda r: r.arrival_s)


def _repeat(reqs: list[TraceRequest], times: int) -> list[TraceRequest]:
    """The trace played ``times`` times back to back (one mean inter-arrival gap between copies)."""
    span = reqs[-1].arrival_s
    gap = span / max(1, len(reqs) - 1)
    return [TraceRequest(r.arrival_s + k * (span + gap), r.input_tokens, r.output_tokens)
            for k in range(times) for r in reqs]


def _clip(reqs: list[TraceRequest]) -> list[TraceRequest]:
    return scale(reqs, max_output=MAX_TOKENS)


WORKLOADS: dict[str, Workload] = {
    w.name: w
    for w in (
        Workload("azure_conv", "Azure conversation",
                 f"bench/traces azure_llm_2023_conv.csv, all 2,000 requests, played {CONV_REPEATS} times back to back",
                 lambda: _clip(_repeat(load_trace("azure_conv"), CONV_REPEATS))),
        Workload("azure_code", "Azure code", "bench/traces azure_llm_2023_code.csv, all 2,000 requests",
                 lambda: _clip(load_trace("azure_code"))),
        Workload("mooncake_conv", "Mooncake conversation",
                 "bench/traces mooncake_fast25_conversation.csv, all 1,000 requests",
                 lambda: _clip(load_trace("mooncake_conv"))),
        Workload("sharegpt", "ShareGPT (Poisson)", f"{POISSON_REQUESTS} Poisson arrivals, ShareGPT v3 lengths",
                 lambda: _clip(poisson_from_lengths("sharegpt", 1.0, POISSON_REQUESTS, POISSON_SEED))),
        Workload("arxiv", "arXiv summarization (Poisson)",
                 f"{POISSON_REQUESTS} Poisson arrivals, arXiv summarization lengths",
                 lambda: _clip(poisson_from_lengths(ARXIV_LENGTHS, 1.0, POISSON_REQUESTS, POISSON_SEED))),
        Workload("hybrid", "Hybrid code + conversation",
                 "Azure code and Azure conversation (all 4,000 requests) superposed on one time span",
                 lambda: _clip(_superpose(load_trace("azure_conv"), load_trace("azure_code")))),
    )
}


@lru_cache(maxsize=64)
def base_trace(name: str, limit: int | None = None) -> tuple[TraceRequest, ...]:
    """The workload's base trace (its first ``limit`` requests in quick mode)."""
    reqs = WORKLOADS[name].build()
    return tuple(reqs[:limit] if limit else reqs)


def prefill_alone_ms(model: StepLatencyModel, prompt: int, chunk: int = 8192) -> float:
    """Time to prefill ``prompt`` tokens alone on an idle instance (:meth:`StepLatencyModel.prefill_alone_ms`)."""
    return model.prefill_alone_ms(prompt, chunk)


def ttft_slo(model: StepLatencyModel) -> Callable[[TraceRequest], float]:
    """The study's TTFT SLO rule for a model."""

    def slo(r: TraceRequest) -> float:
        return TTFT_BASE_MS + TTFT_PREFILL_FACTOR * prefill_alone_ms(model, r.input_tokens)

    return slo


def work_estimate_ms(model: StepLatencyModel, reqs: tuple[TraceRequest, ...], batch: int = 32) -> float:
    """Mean instance time one request needs (prefill alone + decode tokens in a batch of ``batch``)."""
    tot = 0.0
    for r in reqs:
        ctx = r.input_tokens + r.output_tokens // 2
        tot += prefill_alone_ms(model, r.input_tokens) - model.a
        tot += r.output_tokens * (model.a / batch + model.c + model.d * ctx)
    return tot / max(1, len(reqs))


def jittered(reqs: Sequence[TraceRequest], ms: float, seed: int) -> list[TraceRequest]:
    """Every arrival moved by its own uniform draw from [-ms, +ms] (seeded), order restored, none before 0.

    With ``ms`` of a millisecond or so this is the same workload to any reader (the mean rate moves by
    less than a part in ten thousand); what a measured capacity does under it is the resolution of the
    measurement (``python -m bench.sim.extras resolution``)."""
    rng = np.random.default_rng(seed)
    shift = rng.uniform(-ms / 1000.0, ms / 1000.0, len(reqs))
    moved = [TraceRequest(max(0.0, r.arrival_s + float(d)), r.input_tokens, r.output_tokens)
             for r, d in zip(reqs, shift, strict=True)]
    return sorted(moved, key=lambda r: r.arrival_s)

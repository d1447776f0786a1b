"""Serving metrics: the one place where TTFT, TBT, SLO attainment, goodput and capacity are defined.

Benchmarks record one :class:`RequestRecord` per request (raw client-side timestamps, written as JSON lines)
and summarize offline with the functions here. Everything is pure: no I/O, no clock reads.

Definitions (all times are client-side, from a monotonic clock):

- TTFT: from ``submit_ts`` (the request is sent, i.e. arrives at the system) to the first token received.
- TBT: every gap between consecutive tokens of one request. Tokens are delivered batched per engine step,
  so several tokens may share a timestamp; those zero gaps are kept (they are what the client sees).
- Completed: no error, a finish reason other than ``"abort"``/``"error"``, and at least one token.
- Meets SLO: completed, TTFT <= ``ttft_slo_ms``, and the request's TBT <= ``tbt_slo_ms``, where the request's TBT
  is its own P99 gap (``tbt_form="p99"``) or its largest gap (``tbt_form="max"``, stricter). A request with a
  single token has no gap and meets the TBT part. In the P99 form no single gap may exceed
  ``STALL_FACTOR`` x ``tbt_slo_ms`` either: a P99 over 101 or more gaps ignores the largest one, however
  long, and a stream that freezes for seconds mid-answer has not met a 100 ms TBT SLO.
- Attainment: requests meeting their SLO / all requests (failed and unfinished ones count as misses).
- Goodput: requests meeting their SLO / duration (req/s).
- Serving capacity: the highest request rate whose attainment is still >= a threshold (90 % by default).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

TBT_FORMS = ("p99", "max")
"""Accepted ``tbt_form`` values: the request's own P99 gap, or its largest gap."""

STALL_FACTOR = 5.0
"""P99 form: the longest single gap a request may have, as a multiple of its TBT SLO (a stall)."""

FAILED_FINISH_REASONS = frozenset({"abort", "error"})
"""Finish reasons that mark a request as not completed."""


@dataclass(kw_only=True)
class RequestRecord:
    """Raw client-side record of one request, written as one JSON line per request by the replay client.

    ``arrival_s`` is the scheduled offset in the trace; ``submit_ts`` and ``token_ts`` are monotonic seconds
    at the client (send time, and receipt of each output token). ``kind`` is the split the global scheduler
    chose (``"none"``, ``"prompt"``, ``"pd"``, ``"decode"``), ``split`` the token index where the request moved
    from ``instance_a`` to ``instance_b``.
    """

    req_id: str
    arrival_s: float
    submit_ts: float
    prompt_tokens: int
    max_tokens: int
    token_ts: list[float] = field(default_factory=list)
    finish_reason: str | None = None
    error: str | None = None
    ttft_slo_ms: float
    tbt_slo_ms: float
    kind: str | None = None
    split: int | None = None
    instance_a: str | None = None
    instance_b: str | None = None

    def to_dict(self) -> dict[str, Any]:
        """Plain JSON-ready dict (field names as keys)."""
        d = asdict(self)
        d["token_ts"] = list(self.token_ts)
        return d

    @classmethod
    def from_dict(cls, d: Mapping[str, Any]) -> RequestRecord:
        """Build a record from :meth:`to_dict` output; unknown keys are ignored, optional keys may be absent.

        Raises ``ValueError`` when a required key is missing or a value has the wrong type.
        """
        missing = [k for k in _REQUIRED if k not in d]
        if missing:
            raise ValueError(f"request record misses key(s) {', '.join(missing)}")
        try:
            return cls(
                req_id=str(d["req_id"]),
                arrival_s=float(d["arrival_s"]),
                submit_ts=float(d["submit_ts"]),
                prompt_tokens=int(d["prompt_tokens"]),
                max_tokens=int(d["max_tokens"]),
                token_ts=[float(t) for t in d.get("token_ts") or ()],
                finish_reason=_opt_str(d.get("finish_reason")),
                error=_opt_str(d.get("error")),
                ttft_slo_ms=float(d["ttft_slo_ms"]),
                tbt_slo_ms=float(d["tbt_slo_ms"]),
                kind=_opt_str(d.get("kind")),
                split=None if d.get("split") is None else int(d["split"]),
                instance_a=_opt_str(d.get("instance_a")),
                instance_b=_opt_str(d.get("instance_b")),
            )
        except (TypeError, ValueError) as e:
            raise ValueError(f"request record {d.get('req_id')!r}: bad value: {e}") from None


_REQUIRED = ("req_id", "arrival_s", "submit_ts", "prompt_tokens", "max_tokens", "ttft_slo_ms", "tbt_slo_ms")


def _opt_str(v: object) -> str | None:
    return None if v is None else str(v)


# ---------------------------------------------------------------------------------------- per request


def is_completed(rec: RequestRecord) -> bool:
    """True if the request finished normally: no error, a non-failure finish reason, at least one token."""
    return (
        rec.error is None
        and rec.finish_reason is not None
        and rec.finish_reason not in FAILED_FINISH_REASONS
        and len(rec.token_ts) > 0
    )


def ttft_ms(rec: RequestRecord) -> float | None:
    """Time to first token in ms (first token receipt minus submit time); None if no token arrived."""
    if not rec.token_ts:
        return None
    return (rec.token_ts[0] - rec.submit_ts) * 1000.0


def tbt_gaps_ms(rec: RequestRecord) -> list[float]:
    """Gaps between consecutive tokens in ms (zero gaps from batched delivery included); n - 1 of them."""
    ts = rec.token_ts
    return [(b - a) * 1000.0 for a, b in zip(ts, ts[1:], strict=False)]


def request_tbt_ms(rec: RequestRecord, tbt_form: str = "p99") -> float:
    """The request's own TBT: its P99 gap (``"p99"``) or largest gap (``"max"``); nan with no gap."""
    _check_form(tbt_form)
    gaps = tbt_gaps_ms(rec)
    if not gaps:
        return math.nan
    return max(gaps) if tbt_form == "max" else percentile(gaps, 99)


def meets_slo(rec: RequestRecord, tbt_form: str = "p99") -> bool:
    """True if the request completed and met both its TTFT SLO and its TBT SLO (in the given form)."""
    _check_form(tbt_form)
    if not is_completed(rec):
        return False
    ttft = ttft_ms(rec)
    if ttft is None or ttft > rec.ttft_slo_ms:
        return False
    gaps = tbt_gaps_ms(rec)
    if not gaps:
        return True
    if tbt_form == "max":
        return max(gaps) <= rec.tbt_slo_ms
    return percentile(gaps, 99) <= rec.tbt_slo_ms and max(gaps) <= STALL_FACTOR * rec.tbt_slo_ms


def _check_form(tbt_form: str) -> None:
    if tbt_form not in TBT_FORMS:
        raise ValueError(f"tbt_form must be one of {', '.join(TBT_FORMS)}, got {tbt_form!r}")


# ------------------------------------------------------------------------------------------ statistics


def percentile(values: Iterable[float], q: float) -> float:
    """The q-th percentile (0 <= q <= 100) with linear interpolation between ranks (numpy's default).

    Returns nan for empty input.
    """
    return _percentile_sorted(sorted(values), q)


def _percentile_sorted(xs: Sequence[float], q: float) -> float:
    if not 0.0 <= q <= 100.0:
        raise ValueError(f"percentile q must be in [0, 100], got {q}")
    if not xs:
        return math.nan
    pos = (len(xs) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(xs) - 1)
    frac = pos - lo
    return xs[lo] + (xs[hi] - xs[lo]) * frac


def _mean(xs: Sequence[float]) -> float:
    return math.fsum(xs) / len(xs) if xs else math.nan


@dataclass(frozen=True)
class Summary:
    """Aggregate metrics of one run. Latency fields are in ms and cover completed requests only.

    ``failed`` counts every request that did not complete (errors, aborts, unfinished). ``attainment`` is over
    all ``n`` requests. ``goodput_rps`` and ``throughput_tok_s`` (output tokens of completed requests) are per
    second of ``duration_s``. ``split_kinds`` counts the split kind of every request (``"unknown"`` if unset).
    """

    n: int
    completed: int
    failed: int
    slo_met: int
    duration_s: float
    tbt_form: str
    ttft_p50_ms: float
    ttft_p90_ms: float
    ttft_p99_ms: float
    tbt_p50_ms: float
    tbt_p90_ms: float
    tbt_p99_ms: float
    tbt_p99_per_request_mean_ms: float
    attainment: float
    goodput_rps: float
    throughput_tok_s: float
    split_kinds: dict[str, int] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        """Plain dict of all fields; non-finite floats become None so the result is valid JSON."""
        d = asdict(self)
        for k, v in d.items():
            if isinstance(v, float) and not math.isfinite(v):
                d[k] = None
        return d

    def as_table(self) -> str:
        """Human-readable two-column table of the summary."""
        return format_table({"value": self})


_TABLE_ROWS: tuple[tuple[str, str, str], ...] = (
    ("requests", "n", "d"),
    ("completed", "completed", "d"),
    ("failed", "failed", "d"),
    ("met SLO", "slo_met", "d"),
    ("duration (s)", "duration_s", ".2f"),
    ("TTFT p50 (ms)", "ttft_p50_ms", ".1f"),
    ("TTFT p90 (ms)", "ttft_p90_ms", ".1f"),
    ("TTFT p99 (ms)", "ttft_p99_ms", ".1f"),
    ("TBT p50 (ms)", "tbt_p50_ms", ".1f"),
    ("TBT p90 (ms)", "tbt_p90_ms", ".1f"),
    ("TBT p99 (ms)", "tbt_p99_ms", ".1f"),
    ("mean req P99 TBT (ms)", "tbt_p99_per_request_mean_ms", ".1f"),
    ("SLO attainment (TBT {form})", "attainment", ".3f"),
    ("goodput (req/s)", "goodput_rps", ".3f"),
    ("throughput (tok/s)", "throughput_tok_s", ".1f"),
)


def format_table(summaries: Mapping[str, Summary]) -> str:
    """Side-by-side text table of several summaries, one column per label (e.g. per policy)."""
    labels = list(summaries)
    form = "/".join(sorted({s.tbt_form for s in summaries.values()}))
    rows: list[list[str]] = [["metric", *labels]]
    for title, name, fmt in _TABLE_ROWS:
        rows.append([title.format(form=form), *(_fmt(getattr(summaries[lb], name), fmt) for lb in labels)])
    kinds = sorted({k for s in summaries.values() for k in s.split_kinds})
    for k in kinds:
        rows.append([f"split {k}", *(str(summaries[lb].split_kinds.get(k, 0)) for lb in labels)])
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = []
    for j, r in enumerate(rows):
        cells = [r[0].ljust(widths[0])] + [c.rjust(w) for c, w in zip(r[1:], widths[1:], strict=True)]
        lines.append("  ".join(cells).rstrip())
        if j == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def _fmt(v: float | int, fmt: str) -> str:
    if isinstance(v, float) and math.isnan(v):
        return "-"
    return format(v, fmt)


def summarize(
    records: Sequence[RequestRecord], duration_s: float | None = None, tbt_form: str = "p99"
) -> Summary:
    """Aggregate a run's records into a :class:`Summary`.

    ``duration_s`` defaults to the span from the first submit to the last token received over all records
    (nan when that is not positive, which makes the rates nan). TBT percentiles are over all gaps of all
    completed requests; ``tbt_p99_per_request_mean_ms`` is the mean of each completed request's own P99 gap.
    """
    _check_form(tbt_form)
    if duration_s is not None and not duration_s > 0:
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    done = [r for r in records if is_completed(r)]
    ttfts = sorted(t for r in done if (t := ttft_ms(r)) is not None)
    gaps: list[float] = []
    per_req_p99: list[float] = []
    for r in done:
        g = tbt_gaps_ms(r)
        if g:
            gaps.extend(g)
            per_req_p99.append(percentile(g, 99))
    gaps.sort()
    met = sum(1 for r in records if meets_slo(r, tbt_form))
    if duration_s is None:
        duration_s = _default_duration(records)
    kinds: dict[str, int] = {}
    for r in records:
        k = r.kind if r.kind is not None else "unknown"
        kinds[k] = kinds.get(k, 0) + 1
    return Summary(
        n=len(records),
        completed=len(done),
        failed=len(records) - len(done),
        slo_met=met,
        duration_s=duration_s,
        tbt_form=tbt_form,
        ttft_p50_ms=_percentile_sorted(ttfts, 50),
        ttft_p90_ms=_percentile_sorted(ttfts, 90),
        ttft_p99_ms=_percentile_sorted(ttfts, 99),
        tbt_p50_ms=_percentile_sorted(gaps, 50),
        tbt_p90_ms=_percentile_sorted(gaps, 90),
        tbt_p99_ms=_percentile_sorted(gaps, 99),
        tbt_p99_per_request_mean_ms=_mean(per_req_p99),
        attainment=met / len(records) if records else math.nan,
        goodput_rps=met / duration_s if duration_s > 0 else math.nan,
        throughput_tok_s=sum(len(r.token_ts) for r in done) / duration_s if duration_s > 0 else math.nan,
        split_kinds=dict(sorted(kinds.items())),
    )


def _default_duration(records: Sequence[RequestRecord]) -> float:
    if not records:
        return math.nan
    start = min(r.submit_ts for r in records)
    ends = [r.token_ts[-1] for r in records if r.token_ts]
    if not ends:
        return math.nan
    span = max(ends) - start
    return span if span > 0 else math.nan


# -------------------------------------------------------------------------------------------- capacity


def serving_capacity(points: Sequence[tuple[float, float]], threshold: float = 0.9) -> float:
    """Highest request rate whose SLO attainment is >= ``threshold``, from ``(rate, attainment)`` points.

    Takes the highest measured rate meeting the threshold; if a higher rate was measured (and so missed it),
    interpolates linearly between the two to where attainment crosses the threshold. Returns 0.0 if no
    measured rate meets the threshold. Raises ``ValueError`` for no points or invalid values.
    """
    if not points:
        raise ValueError("serving_capacity needs at least one (rate, attainment) point")
    if not 0.0 <= threshold <= 1.0:
        raise ValueError(f"threshold must be in [0, 1], got {threshold}")
    pts = sorted((float(r), float(a)) for r, a in points)
    for r, a in pts:
        if not (math.isfinite(r) and r >= 0):
            raise ValueError(f"rate must be a finite number >= 0, got {r}")
        if not 0.0 <= a <= 1.0:
            raise ValueError(f"attainment must be in [0, 1], got {a}")
    ok = [i for i, (_, a) in enumerate(pts) if a >= threshold]
    if not ok:
        return 0.0
    i = ok[-1]
    r0, a0 = pts[i]
    if i + 1 == len(pts):
        return r0
    r1, a1 = pts[i + 1]
    return r0 + (a0 - threshold) / (a0 - a1) * (r1 - r0)

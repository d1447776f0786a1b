"""Request traces for the replay benchmark: loading, synthetic Poisson arrivals and rescaling.

A trace is a list of :class:`TraceRequest` sorted by arrival, with the first arrival at 0 s. The same list
drives the live cluster and the simulator. Shipped traces live in ``bench/traces/`` (see ``LICENSES.md`` there)
and can be named by a short name (:data:`TRACE_FILES`) instead of a path.

Supported files:

- CSV with a header holding at least ``arrival_s,input_tokens,output_tokens`` (other columns are ignored);
- Mooncake JSONL, one ``{"timestamp": ms, "input_length": n, "output_length": n, ...}`` object per line;
- for :func:`poisson_from_lengths`, CSV with ``input_tokens,output_tokens`` (arrivals, if any, are ignored).
"""

from __future__ import annotations

import csv
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

TRACE_DIR = Path(__file__).resolve().parent / "traces"
"""Folder of the shipped trace files."""

TRACE_FILES: dict[str, str] = {
    "azure_conv": "azure_llm_2023_conv.csv",
    "azure_code": "azure_llm_2023_code.csv",
    "mooncake_conv": "mooncake_fast25_conversation.csv",
    "sharegpt": "sharegpt_v3_lengths.csv",
}
"""Short names of the shipped files (relative to :data:`TRACE_DIR`)."""

_CSV_COLUMNS = ("arrival_s", "input_tokens", "output_tokens")
_JSONL_KEYS = ("timestamp", "input_length", "output_length")


@dataclass(frozen=True)
class TraceRequest:
    """One request of a trace: when it arrives (seconds from the trace start) and its sizes in tokens."""

    arrival_s: float
    input_tokens: int
    output_tokens: int


def resolve_trace(path_or_name: str | Path) -> Path:
    """Return the file for a short name from :data:`TRACE_FILES`, a shipped file name, or a path.

    Raises ``ValueError`` if nothing matches.
    """
    key = str(path_or_name)
    if key in TRACE_FILES:
        return TRACE_DIR / TRACE_FILES[key]
    path = Path(key)
    if path.is_file():
        return path
    shipped = TRACE_DIR / key
    if not path.is_absolute() and shipped.is_file():
        return shipped
    names = ", ".join(sorted(TRACE_FILES))
    raise ValueError(f"trace {key!r} is neither an existing file nor a shipped trace name ({names})")


def load_trace(
    path_or_name: str | Path,
    *,
    limit: int | None = None,
    start_s: float = 0.0,
    duration_s: float | None = None,
) -> list[TraceRequest]:
    """Load an arrival trace (CSV or Mooncake JSONL), sorted by arrival and re-based to start at 0 s.

    Arrivals are first made relative to the earliest request of the file. Then only requests with
    ``start_s <= arrival < start_s + duration_s`` are kept (all from ``start_s`` on when ``duration_s`` is
    None), at most ``limit`` of them, and the result is re-based again so the first kept request arrives at 0.
    Token counts must be integers >= 1; a malformed row raises ``ValueError`` naming the file and line.
    """
    if limit is not None and limit < 0:
        raise ValueError(f"limit must be >= 0, got {limit}")
    if not math.isfinite(start_s) or start_s < 0:
        raise ValueError(f"start_s must be a finite number >= 0, got {start_s}")
    if duration_s is not None and not (duration_s > 0):
        raise ValueError(f"duration_s must be > 0, got {duration_s}")
    path = resolve_trace(path_or_name)
    rows = list(_read_arrivals(path))
    if not rows:
        return []
    rows.sort(key=lambda r: r.arrival_s)
    t0 = rows[0].arrival_s
    end_s = math.inf if duration_s is None else start_s + duration_s
    kept: list[TraceRequest] = []
    for r in rows:
        t = r.arrival_s - t0
        if t < start_s:
            continue
        if t >= end_s or (limit is not None and len(kept) >= limit):
            break
        kept.append(TraceRequest(t, r.input_tokens, r.output_tokens))
    if not kept:
        return []
    t1 = kept[0].arrival_s
    return [TraceRequest(r.arrival_s - t1, r.input_tokens, r.output_tokens) for r in kept]


def load_lengths(path_or_name: str | Path) -> list[tuple[int, int]]:
    """Read ``(input_tokens, output_tokens)`` pairs from a CSV (other columns, arrivals included, are ignored)."""
    path = resolve_trace(path_or_name)
    with path.open(newline="") as f:
        reader = csv.reader(f)
        header = next(reader, None)
        if header is None:
            return []
        idx = _column_index(path, header, ("input_tokens", "output_tokens"))
        out: list[tuple[int, int]] = []
        for lineno, row in enumerate(reader, start=2):
            if not row:
                continue
            if len(row) < len(header):
                raise ValueError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
            out.append(
                (
                    _parse_tokens(row[idx[0]], path, lineno, "input_tokens"),
                    _parse_tokens(row[idx[1]], path, lineno, "output_tokens"),
                )
            )
    return out


def poisson_from_lengths(path_or_name: str | Path, rate_rps: float, n: int, seed: int) -> list[TraceRequest]:
    """Build ``n`` requests with Poisson arrivals at ``rate_rps`` and lengths drawn from a lengths file.

    Lengths are drawn uniformly at random, with replacement, from the file's rows; inter-arrival gaps are
    exponential with mean ``1 / rate_rps``; the first request arrives at 0. The same seed gives the same trace.
    """
    if not (rate_rps > 0 and math.isfinite(rate_rps)):
        raise ValueError(f"rate_rps must be a finite number > 0, got {rate_rps}")
    if n < 0:
        raise ValueError(f"n must be >= 0, got {n}")
    lengths = load_lengths(path_or_name)
    if not lengths:
        raise ValueError(f"{resolve_trace(path_or_name)}: no rows")
    if n == 0:
        return []
    rng = np.random.default_rng(seed)
    picks = rng.integers(0, len(lengths), size=n)
    gaps = rng.exponential(1.0 / rate_rps, size=n - 1)
    arrivals = np.concatenate(([0.0], np.cumsum(gaps)))
    return [
        TraceRequest(float(t), lengths[int(i)][0], lengths[int(i)][1])
        for t, i in zip(arrivals, picks, strict=True)
    ]


def scale(
    reqs: Sequence[TraceRequest],
    *,
    time_scale: float = 1.0,
    rate: float | None = None,
    max_input: int | None = None,
    max_output: int | None = None,
    token_scale: float = 1.0,
) -> list[TraceRequest]:
    """Return a rescaled copy of a trace.

    - ``time_scale`` multiplies every arrival (2.0 stretches the trace to half the rate).
    - ``rate`` (req/s) rescales arrivals so the mean rate, ``(n - 1) / (last - first arrival)``, equals it;
      it cannot be combined with ``time_scale != 1``.
    - ``token_scale`` multiplies both lengths (rounded, at least 1); then ``max_input`` / ``max_output`` clip them.
    """
    if not (time_scale > 0 and math.isfinite(time_scale)):
        raise ValueError(f"time_scale must be a finite number > 0, got {time_scale}")
    if not (token_scale > 0 and math.isfinite(token_scale)):
        raise ValueError(f"token_scale must be a finite number > 0, got {token_scale}")
    for name, cap in (("max_input", max_input), ("max_output", max_output)):
        if cap is not None and cap < 1:
            raise ValueError(f"{name} must be >= 1, got {cap}")
    factor = time_scale
    if rate is not None:
        if time_scale != 1.0:
            raise ValueError("give either rate or time_scale, not both")
        if not (rate > 0 and math.isfinite(rate)):
            raise ValueError(f"rate must be a finite number > 0, got {rate}")
        if len(reqs) >= 2:
            span = max(r.arrival_s for r in reqs) - min(r.arrival_s for r in reqs)
            if span <= 0:
                raise ValueError("cannot rescale to a rate: all requests arrive at the same time")
            factor = (len(reqs) - 1) / span / rate

    def tokens(n: int, cap: int | None) -> int:
        v = max(1, round(n * token_scale))
        return v if cap is None else min(v, cap)

    return [
        TraceRequest(
            r.arrival_s * factor, tokens(r.input_tokens, max_input), tokens(r.output_tokens, max_output)
        )
        for r in reqs
    ]


def mean_rate(reqs: Sequence[TraceRequest]) -> float:
    """Mean arrival rate in req/s, ``(n - 1) / span``; nan for fewer than two requests or a zero span."""
    if len(reqs) < 2:
        return math.nan
    span = max(r.arrival_s for r in reqs) - min(r.arrival_s for r in reqs)
    return (len(reqs) - 1) / span if span > 0 else math.nan


# ----------------------------------------------------------------------------------------------- parsing


def _read_arrivals(path: Path) -> Iterator[TraceRequest]:
    """Yield raw (not re-based) requests from a CSV or Mooncake JSONL file."""
    with path.open(newline="") as f:
        first = f.read(1)
        f.seek(0)
        if path.suffix in (".jsonl", ".json") or first == "{":
            yield from _read_jsonl(path, f)
        else:
            yield from _read_csv(path, f)


def _read_csv(path: Path, f: Iterator[str]) -> Iterator[TraceRequest]:
    reader = csv.reader(f)
    header = next(reader, None)
    if header is None:
        return
    ia, ii, io = _column_index(path, header, _CSV_COLUMNS)
    for lineno, row in enumerate(reader, start=2):
        if not row:
            continue
        if len(row) < len(header):
            raise ValueError(f"{path}:{lineno}: expected {len(header)} columns, got {len(row)}")
        yield TraceRequest(
            _parse_arrival(row[ia], path, lineno),
            _parse_tokens(row[ii], path, lineno, "input_tokens"),
            _parse_tokens(row[io], path, lineno, "output_tokens"),
        )


def _read_jsonl(path: Path, f: Iterator[str]) -> Iterator[TraceRequest]:
    for lineno, line in enumerate(f, start=1):
        if not line.strip():
            continue
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
        if not isinstance(obj, dict):
            raise ValueError(f"{path}:{lineno}: expected a JSON object")
        missing = [k for k in _JSONL_KEYS if k not in obj]
        if missing:
            raise ValueError(f"{path}:{lineno}: missing key(s) {', '.join(missing)}")
        ts = _parse_arrival(obj["timestamp"], path, lineno, "timestamp")
        yield TraceRequest(
            ts / 1000.0,
            _parse_tokens(obj["input_length"], path, lineno, "input_length"),
            _parse_tokens(obj["output_length"], path, lineno, "output_length"),
        )


def _column_index(path: Path, header: list[str], names: Sequence[str]) -> list[int]:
    cols = [h.strip() for h in header]
    missing = [c for c in names if c not in cols]
    if missing:
        raise ValueError(f"{path}:1: missing column(s) {', '.join(missing)} (header: {','.join(cols)})")
    return [cols.index(c) for c in names]


def _parse_arrival(value: object, path: Path, lineno: int, name: str = "arrival_s") -> float:
    try:
        t = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"{path}:{lineno}: {name} is not a number: {value!r}") from None
    if not math.isfinite(t):
        raise ValueError(f"{path}:{lineno}: {name} is not finite: {value!r}")
    return t


def _parse_tokens(value: object, path: Path, lineno: int, name: str) -> int:
    n: int | None = None
    if isinstance(value, int) and not isinstance(value, bool):
        n = value
    elif isinstance(value, (str, float)):
        try:
            x = float(value)
        except ValueError:
            x = math.nan
        if math.isfinite(x) and x.is_integer():
            n = int(x)
    if n is None:
        raise ValueError(f"{path}:{lineno}: {name} is not an integer: {value!r}")
    if n < 1:
        raise ValueError(f"{path}:{lineno}: {name} must be >= 1, got {n}")
    return n

"""Tests for dynaserve.metrics with hand-computed expected values."""

from __future__ import annotations

import json
import math
import random

import numpy as np
import pytest

from dynaserve.metrics import (
    STALL_FACTOR,
    RequestRecord,
    format_table,
    is_completed,
    meets_slo,
    percentile,
    request_tbt_ms,
    serving_capacity,
    summarize,
    tbt_gaps_ms,
    ttft_ms,
)


def rec(
    req_id: str,
    submit: float,
    tokens: list[float],
    *,
    finish: str | None = "stop",
    error: str | None = None,
    ttft_slo: float = 200.0,
    tbt_slo: float = 250.0,
    kind: str | None = None,
) -> RequestRecord:
    return RequestRecord(
        req_id=req_id,
        arrival_s=submit,
        submit_ts=submit,
        prompt_tokens=16,
        max_tokens=len(tokens),
        token_ts=tokens,
        finish_reason=finish,
        error=error,
        ttft_slo_ms=ttft_slo,
        tbt_slo_ms=tbt_slo,
        kind=kind,
    )


# Four requests, worked out by hand:
#   a: TTFT 100, gaps [100, 0, 300] -> own P99 = 100 + 0.98 * 200 = 296 > 250: misses TBT
#   b: TTFT 300 > 200: misses TTFT; gaps [50]
#   c: TTFT 50, gaps [50, 50]: meets
#   d: errored: failed
RECORDS = [
    rec("a", 0.0, [0.1, 0.2, 0.2, 0.5], kind="none"),
    rec("b", 1.0, [1.3, 1.35], kind="pd"),
    rec("c", 2.0, [2.05, 2.1, 2.15], kind="pd"),
    rec("d", 3.0, [3.1], finish=None, error="timeout"),
]


def test_ttft_and_gaps() -> None:
    a = RECORDS[0]
    assert ttft_ms(a) == pytest.approx(100.0)
    assert tbt_gaps_ms(a) == pytest.approx([100.0, 0.0, 300.0])
    assert tbt_gaps_ms(rec("x", 0.0, [0.5])) == []
    assert ttft_ms(rec("x", 0.0, [])) is None
    assert request_tbt_ms(a, "p99") == pytest.approx(296.0)
    assert request_tbt_ms(a, "max") == pytest.approx(300.0)
    assert math.isnan(request_tbt_ms(rec("x", 0.0, [0.5])))


def test_percentile_hand_values() -> None:
    assert percentile([1, 2, 3, 4], 50) == 2.5
    assert percentile([4, 1, 3, 2], 99) == pytest.approx(3.97)
    assert percentile([1, 2, 3, 4], 0) == 1
    assert percentile([1, 2, 3, 4], 100) == 4
    assert percentile([15, 20, 35, 40, 50], 40) == pytest.approx(29.0)
    assert percentile([7.0], 99) == 7.0
    assert math.isnan(percentile([], 50))
    with pytest.raises(ValueError):
        percentile([1.0], 101)


def test_percentile_matches_numpy_linear() -> None:
    rng = random.Random(3)
    xs = [rng.expovariate(1.0) for _ in range(257)]
    for q in (0, 1, 37.5, 50, 90, 99, 99.9, 100):
        assert percentile(xs, q) == pytest.approx(float(np.percentile(xs, q)))


def test_meets_slo_p99_vs_max() -> None:
    # 99 gaps of 10 ms and one of 100 ms: own P99 = 10 + 0.01 * 90 = 10.9 ms, max = 100 ms
    ts = [0.05 + 0.01 * i for i in range(100)] + [0.05 + 0.99 + 0.1]
    r = rec("x", 0.0, ts, ttft_slo=60.0, tbt_slo=50.0)
    assert len(tbt_gaps_ms(r)) == 100
    assert request_tbt_ms(r, "p99") == pytest.approx(10.9)
    assert meets_slo(r, "p99")
    assert not meets_slo(r, "max")
    with pytest.raises(ValueError):
        meets_slo(r, "p50")


def test_one_stall_fails_the_p99_form() -> None:
    # 100 gaps of 10 ms and one long one: the P99 gap stays 10.x ms whatever the long gap is, so the P99
    # form alone would pass a stream that froze for seconds; a gap over STALL_FACTOR x the TBT SLO fails it
    def stalled(gap_s: float) -> RequestRecord:
        ts = [0.05 + 0.01 * i for i in range(101)]
        return rec("x", 0.0, ts + [ts[-1] + gap_s], ttft_slo=60.0, tbt_slo=50.0)

    at_limit, over = stalled(STALL_FACTOR * 0.05 - 0.001), stalled(STALL_FACTOR * 0.05 + 0.001)
    assert request_tbt_ms(over, "p99") < 11.0
    assert meets_slo(at_limit, "p99")
    assert not meets_slo(over, "p99")
    assert not meets_slo(stalled(30.0), "p99")
    assert summarize([at_limit, over]).attainment == 0.5


def test_meets_slo_failures() -> None:
    ok = [0.1, 0.15]
    assert meets_slo(rec("x", 0.0, ok))
    assert meets_slo(rec("x", 0.0, [0.1]))  # one token, no gap: TBT part holds
    assert not meets_slo(rec("x", 0.0, ok, error="boom"))
    assert not meets_slo(rec("x", 0.0, ok, finish="abort"))
    assert not meets_slo(rec("x", 0.0, ok, finish=None))  # unfinished
    assert not meets_slo(rec("x", 0.0, [], finish="stop"))
    assert not meets_slo(rec("x", 0.0, [0.3, 0.35]))  # TTFT 300 > 200
    assert meets_slo(rec("x", 0.0, [0.2, 0.45]))  # exactly at both SLOs
    assert not is_completed(rec("x", 0.0, ok, finish="error"))
    assert is_completed(rec("x", 0.0, ok, finish="length"))


def test_summarize_hand_values() -> None:
    s = summarize(RECORDS)
    assert (s.n, s.completed, s.failed, s.slo_met) == (4, 3, 1, 1)
    assert s.tbt_form == "p99"
    # TTFT of completed: [50, 100, 300]
    assert s.ttft_p50_ms == pytest.approx(100.0)
    assert s.ttft_p90_ms == pytest.approx(260.0)
    assert s.ttft_p99_ms == pytest.approx(296.0)
    # all gaps: [0, 50, 50, 50, 100, 300]
    assert s.tbt_p50_ms == pytest.approx(50.0)
    assert s.tbt_p90_ms == pytest.approx(200.0)
    assert s.tbt_p99_ms == pytest.approx(290.0)
    assert s.tbt_p99_per_request_mean_ms == pytest.approx((296.0 + 50.0 + 50.0) / 3)
    assert s.attainment == pytest.approx(0.25)
    # duration: first submit 0.0 to last token 3.1
    assert s.duration_s == pytest.approx(3.1)
    assert s.goodput_rps == pytest.approx(1 / 3.1)
    assert s.throughput_tok_s == pytest.approx(9 / 3.1)
    assert s.split_kinds == {"none": 1, "pd": 2, "unknown": 1}


def test_summarize_explicit_duration_and_form() -> None:
    s = summarize(RECORDS, duration_s=10.0, tbt_form="max")
    assert s.goodput_rps == pytest.approx(0.1)
    assert s.throughput_tok_s == pytest.approx(0.9)
    assert s.slo_met == 1
    with pytest.raises(ValueError):
        summarize(RECORDS, duration_s=0.0)


def test_summarize_empty() -> None:
    s = summarize([])
    assert (s.n, s.completed, s.failed) == (0, 0, 0)
    assert math.isnan(s.attainment) and math.isnan(s.ttft_p50_ms) and math.isnan(s.goodput_rps)
    d = s.to_dict()
    assert d["attainment"] is None
    json.dumps(d)


def test_record_round_trip() -> None:
    r = RequestRecord(
        req_id="r1",
        arrival_s=1.5,
        submit_ts=100.0,
        prompt_tokens=10,
        max_tokens=3,
        token_ts=[100.1, 100.1, 100.2],
        finish_reason="length",
        ttft_slo_ms=500.0,
        tbt_slo_ms=100.0,
        kind="pd",
        split=10,
        instance_a="i0",
        instance_b="i1",
    )
    d = json.loads(json.dumps(r.to_dict()))
    assert RequestRecord.from_dict(d) == r
    d["future_field"] = 1
    assert RequestRecord.from_dict(d) == r
    minimal = {k: d[k] for k in ("req_id", "arrival_s", "submit_ts", "prompt_tokens", "max_tokens")}
    minimal.update(ttft_slo_ms=1.0, tbt_slo_ms=2.0)
    m = RequestRecord.from_dict(minimal)
    assert m.token_ts == [] and m.kind is None and m.error is None
    del minimal["submit_ts"]
    with pytest.raises(ValueError, match="submit_ts"):
        RequestRecord.from_dict(minimal)
    with pytest.raises(ValueError, match="bad value"):
        RequestRecord.from_dict({**d, "prompt_tokens": "many"})


def test_tables() -> None:
    s = summarize(RECORDS)
    table = s.as_table()
    assert "TTFT p99 (ms)" in table and "296.0" in table
    assert "SLO attainment (TBT p99)" in table and "0.250" in table
    assert "split pd" in table
    both = format_table({"colocate": s, "disagg": summarize(RECORDS[3:])})
    lines = both.splitlines()
    assert lines[0].split() == ["metric", "colocate", "disagg"]
    assert len(lines[0]) == len(lines[1])
    ttft_row = next(line for line in lines if line.startswith("TTFT p50"))
    assert ttft_row.split()[-2:] == ["100.0", "-"]  # the second run completed nothing
    unknown_row = next(line for line in lines if line.startswith("split unknown"))
    assert unknown_row.split()[-2:] == ["1", "1"]


def test_serving_capacity() -> None:
    pts = [(1.0, 1.0), (2.0, 0.95), (3.0, 0.85), (4.0, 0.5)]
    assert serving_capacity(pts) == pytest.approx(2.5)
    assert serving_capacity(list(reversed(pts))) == pytest.approx(2.5)
    assert serving_capacity(pts, threshold=0.5) == pytest.approx(4.0)
    assert serving_capacity([(1.0, 0.9), (2.0, 0.5)]) == pytest.approx(1.0)
    assert serving_capacity([(1.0, 0.8), (2.0, 0.5)]) == 0.0
    # non-monotone: the highest rate that meets the threshold wins, 3 + 0.02 / 0.22
    noisy = [(1.0, 0.95), (2.0, 0.8), (3.0, 0.92), (4.0, 0.7)]
    assert serving_capacity(noisy) == pytest.approx(3.0 + 0.02 / 0.22)
    with pytest.raises(ValueError):
        serving_capacity([])
    with pytest.raises(ValueError):
        serving_capacity([(1.0, 1.5)])

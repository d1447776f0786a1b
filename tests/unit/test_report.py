"""Tests for bench.report: records I/O, summary.json and the PNG plots."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.report import PLOT_FILES, load_records, main, make_report, write_records
from dynaserve.metrics import RequestRecord

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _run(offset: float, ttft_s: float, gap_s: float, n: int = 20) -> list[RequestRecord]:
    """n requests, one per second, each with TTFT ttft_s and 4 tokens (two share a timestamp)."""
    out = []
    for i in range(n):
        t0 = offset + i
        first = t0 + ttft_s
        out.append(
            RequestRecord(
                req_id=f"r{i}",
                arrival_s=float(i),
                submit_ts=t0,
                prompt_tokens=100,
                max_tokens=4,
                token_ts=[first, first + gap_s, first + gap_s, first + 2 * gap_s],
                finish_reason="stop",
                ttft_slo_ms=200.0,
                tbt_slo_ms=50.0,
                kind="pd" if i % 2 else "none",
            )
        )
    out.append(
        RequestRecord(
            req_id="bad",
            arrival_s=float(n),
            submit_ts=offset + n,
            prompt_tokens=100,
            max_tokens=4,
            error="connection reset",
            ttft_slo_ms=200.0,
            tbt_slo_ms=50.0,
        )
    )
    return out


def _assert_pngs(out: Path) -> None:
    for name in PLOT_FILES:
        data = (out / name).read_bytes()
        assert data[:8] == PNG_MAGIC
        assert len(data) > 1000


def test_records_round_trip(tmp_path: Path) -> None:
    recs = _run(100.0, 0.1, 0.02)
    path = tmp_path / "run.jsonl"
    write_records(path, recs)
    assert load_records(path) == recs


def test_load_records_reports_line(tmp_path: Path) -> None:
    path = tmp_path / "run.jsonl"
    write_records(path, _run(0.0, 0.1, 0.02, n=1))
    with path.open("a") as f:
        f.write('{"req_id": "x"}\n')
    with pytest.raises(ValueError, match=r"run\.jsonl:3: .*misses key"):
        load_records(path)
    path.write_text("not json\n")
    with pytest.raises(ValueError, match=r"run\.jsonl:1: invalid JSON"):
        load_records(path)


def test_make_report_two_runs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    fast_path = tmp_path / "fast.jsonl"
    write_records(fast_path, _run(0.0, 0.1, 0.02))  # TTFT 100 ms, own P99 TBT ~20 ms: all meet
    slow = _run(50.0, 0.3, 0.02)  # TTFT 300 ms: none meet
    out = tmp_path / "report"
    summaries = make_report({"dynaserve": fast_path, "colocate": slow}, out)
    printed = capsys.readouterr().out
    assert "dynaserve" in printed and "colocate" in printed
    assert summaries["dynaserve"].attainment == pytest.approx(20 / 21)
    assert summaries["colocate"].attainment == 0.0
    doc = json.loads((out / "summary.json").read_text())
    assert doc["tbt_form"] == "p99"
    assert list(doc["runs"]) == ["dynaserve", "colocate"]
    fast = doc["runs"]["dynaserve"]
    assert (fast["n"], fast["completed"], fast["failed"], fast["slo_met"]) == (21, 20, 1, 20)
    assert fast["ttft_p50_ms"] == pytest.approx(100.0)
    # gaps per request: [20, 0, 20] -> over all: p50 = 20
    assert fast["tbt_p50_ms"] == pytest.approx(20.0)
    assert fast["split_kinds"] == {"none": 10, "pd": 10, "unknown": 1}
    _assert_pngs(out)


def test_cli(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    write_records(a, _run(0.0, 0.1, 0.02))
    write_records(b, _run(0.0, 0.1, 0.08))  # gaps of 80 ms > 50 ms SLO
    out = tmp_path / "cli"
    assert (
        main([str(a), str(b), "--labels", "disagg", "dynaserve", "--out", str(out), "--tbt-form", "max"]) == 0
    )
    doc = json.loads((out / "summary.json").read_text())
    assert doc["tbt_form"] == "max"
    assert doc["runs"]["disagg"]["slo_met"] == 20
    assert doc["runs"]["dynaserve"]["slo_met"] == 0
    _assert_pngs(out)
    assert "wrote" in capsys.readouterr().out


def test_cli_errors(tmp_path: Path) -> None:
    a = tmp_path / "a.jsonl"
    write_records(a, _run(0.0, 0.1, 0.02, n=2))
    with pytest.raises(SystemExit):
        main([str(a), "--labels", "x", "y", "--out", str(tmp_path / "o")])
    assert main([str(tmp_path / "missing.jsonl"), "--out", str(tmp_path / "o")]) == 1

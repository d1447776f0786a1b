"""Tests for bench.traces: loading shipped and custom traces, Poisson generation and rescaling."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from bench.traces import (
    TRACE_DIR,
    TRACE_FILES,
    TraceRequest,
    load_lengths,
    load_trace,
    mean_rate,
    poisson_from_lengths,
    resolve_trace,
    scale,
)


def _write_csv(path: Path, text: str) -> Path:
    path.write_text(text)
    return path


def test_shipped_traces_load() -> None:
    expected = {"azure_conv": 2000, "azure_code": 2000, "mooncake_conv": 1000}
    for name, n in expected.items():
        reqs = load_trace(name)
        assert len(reqs) == n
        assert reqs[0].arrival_s == 0.0
        assert all(a.arrival_s <= b.arrival_s for a, b in zip(reqs, reqs[1:], strict=False))
        assert all(r.input_tokens >= 1 and r.output_tokens >= 1 for r in reqs)
    conv = load_trace("azure_conv", limit=2)
    assert conv == [TraceRequest(0.0, 374, 44), TraceRequest(4.314579, 396, 109)]
    assert load_trace("mooncake_conv", limit=1) == [TraceRequest(0.0, 6758, 500)]


def test_shipped_files_live_in_the_package() -> None:
    for name, file in TRACE_FILES.items():
        path = resolve_trace(name)
        assert path == TRACE_DIR / file
        assert path.is_file()
        assert "shared" not in path.parts
    assert (TRACE_DIR / "LICENSES.md").is_file()
    total = sum(p.stat().st_size for p in TRACE_DIR.rglob("*") if p.is_file())
    assert total < 1_000_000


def test_shipped_file_name_resolves() -> None:
    assert resolve_trace("azure_llm_2023_code.csv") == TRACE_DIR / "azure_llm_2023_code.csv"


def test_unknown_name_raises() -> None:
    with pytest.raises(ValueError, match="azure_conv"):
        load_trace("no_such_trace")


def test_csv_rebased_sorted_and_extra_columns_ignored(tmp_path: Path) -> None:
    path = _write_csv(
        tmp_path / "t.csv",
        "arrival_s,input_tokens,output_tokens,hash_ids\n12.5,30,3,0 1\n10.0,10,1,2\n11.0,20.0,2,\n",
    )
    assert load_trace(str(path)) == [
        TraceRequest(0.0, 10, 1),
        TraceRequest(1.0, 20, 2),
        TraceRequest(2.5, 30, 3),
    ]


def test_window_and_limit(tmp_path: Path) -> None:
    rows = "".join(f"{t},{t + 1},1\n" for t in range(5))
    path = _write_csv(tmp_path / "t.csv", "arrival_s,input_tokens,output_tokens\n" + rows)
    # arrivals 0..4; window [1, 3) keeps 1 and 2, re-based to 0 and 1
    assert load_trace(str(path), start_s=1.0, duration_s=2.0) == [
        TraceRequest(0.0, 2, 1),
        TraceRequest(1.0, 3, 1),
    ]
    assert load_trace(str(path), start_s=2.0) == [
        TraceRequest(0.0, 3, 1),
        TraceRequest(1.0, 4, 1),
        TraceRequest(2.0, 5, 1),
    ]
    assert [r.input_tokens for r in load_trace(str(path), limit=2)] == [1, 2]
    assert load_trace(str(path), limit=0) == []
    assert load_trace(str(path), start_s=10.0) == []


def test_mooncake_jsonl(tmp_path: Path) -> None:
    path = tmp_path / "m.jsonl"
    lines = [
        {"timestamp": 1000, "input_length": 600, "output_length": 7, "hash_ids": [0, 1]},
        {"timestamp": 1500, "input_length": 100, "output_length": 8, "hash_ids": [2]},
        {"timestamp": 4000, "input_length": 513, "output_length": 9, "hash_ids": [0, 3]},
    ]
    path.write_text("\n".join(json.dumps(d) for d in lines) + "\n\n")
    assert load_trace(str(path)) == [
        TraceRequest(0.0, 600, 7),
        TraceRequest(0.5, 100, 8),
        TraceRequest(3.0, 513, 9),
    ]


@pytest.mark.parametrize(
    ("body", "match"),
    [
        ("arrival_s,input_tokens,output_tokens\n0,1,1\nx,1,1\n", r"t\.csv:3: arrival_s"),
        ("arrival_s,input_tokens,output_tokens\n0,1,1\n1,0,1\n", r"t\.csv:3: input_tokens must be >= 1"),
        ("arrival_s,input_tokens,output_tokens\n0,1.5,1\n", r"t\.csv:2: input_tokens is not an integer"),
        ("arrival_s,input_tokens,output_tokens\n0,1,-2\n", r"t\.csv:2: output_tokens"),
        ("arrival_s,input_tokens,output_tokens\n0,1\n", r"t\.csv:2: expected 3 columns"),
        ("arrival_s,input_tokens,output_tokens\ninf,1,1\n", r"t\.csv:2: arrival_s is not finite"),
        ("time,input_tokens,output_tokens\n0,1,1\n", r"t\.csv:1: missing column\(s\) arrival_s"),
    ],
)
def test_malformed_csv(tmp_path: Path, body: str, match: str) -> None:
    path = _write_csv(tmp_path / "t.csv", body)
    with pytest.raises(ValueError, match=match):
        load_trace(str(path))


@pytest.mark.parametrize(
    ("line", "match"),
    [
        ("{not json", r"m\.jsonl:2: invalid JSON"),
        ('{"timestamp": 1, "input_length": 3}', r"m\.jsonl:2: missing key\(s\) output_length"),
        ('{"timestamp": 1, "input_length": "a", "output_length": 1}', r"m\.jsonl:2: input_length"),
    ],
)
def test_malformed_jsonl(tmp_path: Path, line: str, match: str) -> None:
    path = tmp_path / "m.jsonl"
    path.write_text('{"timestamp": 0, "input_length": 1, "output_length": 1}\n' + line + "\n")
    with pytest.raises(ValueError, match=match):
        load_trace(str(path))


def test_load_lengths_and_lengths_file_is_not_a_trace() -> None:
    lengths = load_lengths("sharegpt")
    assert len(lengths) == 5000
    assert lengths[:2] == [(26, 5), (72, 693)]
    with pytest.raises(ValueError, match="missing column"):
        load_trace("sharegpt")


def test_poisson_from_lengths_is_seeded() -> None:
    a = poisson_from_lengths("sharegpt", 4.0, 4000, seed=7)
    b = poisson_from_lengths("sharegpt", 4.0, 4000, seed=7)
    c = poisson_from_lengths("sharegpt", 4.0, 4000, seed=8)
    assert a == b
    assert a != c
    assert len(a) == 4000
    assert a[0].arrival_s == 0.0
    assert all(x.arrival_s < y.arrival_s for x, y in zip(a, a[1:], strict=False))
    assert mean_rate(a) == pytest.approx(4.0, rel=0.05)
    pairs = set(load_lengths("sharegpt"))
    assert all((r.input_tokens, r.output_tokens) in pairs for r in a)
    assert poisson_from_lengths("sharegpt", 1.0, 0, seed=0) == []
    with pytest.raises(ValueError):
        poisson_from_lengths("sharegpt", 0.0, 10, seed=0)


def test_scale_time_and_rate() -> None:
    reqs = [TraceRequest(float(t), 10, 4) for t in range(4)]  # 1 req/s
    assert [r.arrival_s for r in scale(reqs, time_scale=2.0)] == [0.0, 2.0, 4.0, 6.0]
    assert [r.arrival_s for r in scale(reqs, rate=2.0)] == [0.0, 0.5, 1.0, 1.5]
    assert mean_rate(scale(reqs, rate=3.0)) == pytest.approx(3.0)
    with pytest.raises(ValueError, match="not both"):
        scale(reqs, time_scale=2.0, rate=1.0)
    with pytest.raises(ValueError, match="same time"):
        scale([TraceRequest(1.0, 1, 1), TraceRequest(1.0, 1, 1)], rate=1.0)
    assert scale(reqs[:1], rate=5.0) == reqs[:1]


def test_scale_tokens() -> None:
    reqs = [TraceRequest(0.0, 10, 1), TraceRequest(1.0, 300, 40)]
    assert scale(reqs, token_scale=0.5) == [TraceRequest(0.0, 5, 1), TraceRequest(1.0, 150, 20)]
    assert scale(reqs, max_input=100, max_output=8) == [TraceRequest(0.0, 10, 1), TraceRequest(1.0, 100, 8)]
    assert scale(reqs, token_scale=2.0, max_input=50) == [TraceRequest(0.0, 20, 2), TraceRequest(1.0, 50, 80)]
    with pytest.raises(ValueError):
        scale(reqs, max_output=0)

"""bench.bench_vllm's overhead and handoff tables (pure) and its process-tree helper (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

from bench.bench_vllm import (
    BLOCK,
    SYSTEMS,
    WIDE_KV_BYTES_PER_TOKEN,
    Handoff,
    descendants,
    handoff_tables,
    median_ci,
    overhead_table,
    records,
)


def _round(name: str, gap_ms: float, steps: list[float]) -> tuple[list, dict]:
    """One run of 2 requests, 5 tokens each, ``gap_ms`` apart, as the overhead phase records it."""
    runs = [(0.0, [0.010 + k * gap_ms / 1000.0 for k in range(5)]) for _ in range(2)]
    recs = records(runs, 128, 5, f"{name}0")
    row = {"rnd": 0, "n": 2, "name": name, "tbt_p50": gap_ms, "cpu": {"engine": 0.01}, "tokens": 10,
           "span": 0.05, "steps": steps}
    return recs, row


def test_overhead_table_has_a_ratio_row_against_every_bare_system_including_vllm_serving() -> None:
    gaps = {"bare": 4.0, "bare_thr": 4.0, "bare_eng": 4.0, "bare_load": 4.0, "bare_serve": 5.0, "ds": 4.5}
    res: dict = {name: {} for name, _ in SYSTEMS}
    res["rounds"] = []
    for name, gap in gaps.items():
        # vLLM serving steps in another process: no step times for it
        recs, row = _round(name, gap, [] if name == "bare_serve" else [gap - 0.1])
        res[name][2] = recs
        res["rounds"].append(row)
    table = overhead_table(res, [2])
    rows = {line.split("|")[2].strip(): line for line in table.splitlines() if line.startswith("| 2 |")}
    serve = rows["**ratio DynaServe / bare_serve**"]
    cells = [c.strip() for c in serve.split("|")]
    assert cells[5] == "**0.90**"  # TBT p50 4.5 / 5.0
    assert cells[7] == "**-**"  # no step time measured for vLLM serving
    assert [c.strip() for c in rows["**ratio DynaServe / bare**"].split("|")][5] == "**1.12**"  # 4.5 / 4.0
    assert "TBT p50 ratio DynaServe / bare_serve per round: N=2: 0.90." in table
    assert "| 2 | 1.12 (1.12–1.12) | 1.12 (1.12–1.12) | 1.12 (1.12–1.12) | 1.12 (1.12–1.12) | 0.90 (0.90–0.90) |" in table


def test_median_ci_brackets_the_median_and_narrows_with_more_rounds() -> None:
    import random

    rng = random.Random(5)
    few = [1.05 + rng.gauss(0, 0.1) for _ in range(9)]
    many = [1.05 + rng.gauss(0, 0.1) for _ in range(90)]
    for xs in (few, many):
        mid, lo, hi = median_ci(xs)
        assert lo <= mid <= hi
    assert median_ci(many)[2] - median_ci(many)[1] < median_ci(few)[2] - median_ci(few)[1]
    assert median_ci([1.0, 2.0, 3.0]) == median_ci([1.0, 2.0, 3.0])  # seeded
    assert median_ci([])[0] != median_ci([])[0]  # nan


def test_descendants_follows_the_process_tree_down() -> None:
    code = "import subprocess, sys, time; subprocess.Popen([sys.executable, '-c', 'import time; time.sleep(30)']); " \
           "time.sleep(30)"
    proc = subprocess.Popen([sys.executable, "-c", code])
    try:
        found: list[int] = []
        for _ in range(100):  # the grandchild starts a moment after the child
            found = descendants(proc.pid)
            if found:
                break
            time.sleep(0.05)
        assert len(found) == 1 and proc.pid not in found
        grandchild = found[0]
        with open(f"/proc/{grandchild}/stat") as fh:
            assert int(fh.read().rsplit(")", 1)[1].split()[1]) == proc.pid
        assert descendants(grandchild) == []
        mine = descendants(os.getpid())  # this process -> proc -> grandchild: both levels
        assert proc.pid in mine and grandchild in mine
    finally:
        for pid in descendants(proc.pid):
            subprocess.run(["kill", str(pid)], check=False)
        proc.kill()
        proc.wait()


_KEYS = ("relay_a_b a_ship direct_send ship_to_b to_post to_burst to_kick kick_to_burst step_to_post handshake "
         "read_post read_post_cpu read_seen to_decode handoff_workers decode relay_b_client b_waiting_steps "
         "a_held_steps a_release early_blocks early_post early_cpu early_slack kept_blocks a_prefill_steps ttft").split()


def _handoff(p: int, path: str, workers_ms: float, cold: bool = False) -> Handoff:
    inner = {k: 1.0 for k in _KEYS}
    inner.update(handoff_workers=workers_ms, early_blocks=6.0, kept_blocks=6.0, a_prefill_steps=2.0, ttft=541.0,
                 add=float("nan"), add_cpu=float("nan"), to_add=float("nan"), add_to_step=float("nan"))
    tel = {"xfer_ms": 0.8, "post_ms": 0.1, "bytes": float(2 * BLOCK * WIDE_KV_BYTES_PER_TOKEN), "descs": 16.0}
    return Handoff(p, cold, workers_ms + 17.0, path, inner, tel)


def test_handoff_tables_with_early_pulls_and_the_late_variant() -> None:
    res = {"vs": "late", "unsplit_tbt": {1000: [15.0]}, "unsplit_ttft": {1000: [530.0]},
           "raw": {(1000, "layers"): [3.0], (1000, "contiguous"): [2.8]},
           "splits": [_handoff(1000, "direct", 20.0, cold=True), _handoff(1000, "direct", 3.0),
                      _handoff(1000, "late", 6.0)]}
    text = handoff_tables(res, [1000])
    rows = [line for line in text.splitlines() if line.startswith("| 1000 |")]
    ratio = [c.strip() for c in rows[1].split("|")]
    assert ratio[3] == "**1.00**"  # raw 3.0 ms / handoff in the workers 3.0 ms
    assert ratio[4] == "0.94"  # the READ at the handoff: 8 MiB in 0.8 ms (10.5 GB/s), raw 32 MiB in 3.0 ms (11.2)
    assert "| 1000 | 2 | 6 / 8 | 6 |" in text and "| 541; 530 |" in text  # early pulls, TTFT split; unsplit
    assert "against B added to vLLM at the StartDecode" in text
    assert "| 3.0; 6.0 |" in text and "**1.00**; 0.50" in text  # default against late
    assert "(- : B was added at dispatch) | - | - |" in text  # no add_request on the handoff's path


def test_handoff_tables_of_a_decode_handoff() -> None:
    """--decode-tokens 100: s = p + 99 positions, whose whole blocks are what a raw READ moves."""
    res = {"vs": "late", "unsplit_tbt": {1000: [15.0]}, "unsplit_ttft": {1000: [530.0]}, "decode_tokens": 100,
           "raw": {(1000, "layers"): [3.0], (1000, "contiguous"): [2.8]},
           "splits": [_handoff(1000, "direct", 3.0), _handoff(1000, "late", 6.0)]}
    text = handoff_tables(res, [1000])
    assert "decode handoff after A's 100 tokens, s = p + 99, max_tokens = 101" in text
    assert "| 1000 | 34.3 MiB | 36 MiB (NIXL: 8.0 MiB) | 16 / 72 |" in text  # 1,099 positions: 9 whole blocks
    assert "| 1000 | 2 | 6 / 9 | 6 |" in text


def test_vllm_rss_report_and_plot(tmp_path: Path) -> None:
    from bench.vllm_rss import plot, report

    mib = 1024
    res = {"roles": {"w0": {"a": 4, "b": 0}, "w1": {"a": 0, "b": 4}}, "errors": [],
           "rounds": [{"label": "idle", "requests": 0, "rss_kib": {"w0": 1000 * mib, "w1": 900 * mib}},
                      {"label": "round 1", "requests": 2, "rss_kib": {"w0": 1200 * mib, "w1": 901 * mib}},
                      {"label": "round 2", "requests": 4, "rss_kib": {"w0": 1180 * mib, "w1": 901 * mib}}]}
    text = report(res)
    assert "| round 2 | 4 | 1,180 | 901 |" in text
    assert "w0: +200 MiB from idle over rounds 1-1, -20 MiB over rounds 2-2" in text
    assert "w0 (A 4, B 0) MiB" in text
    plot(res, tmp_path / "rss.png")
    assert (tmp_path / "rss.png").stat().st_size > 1000


def test_engine_ab_tables_summarize_per_session_and_over_sessions() -> None:
    from bench.engine_ab import tables

    def session(step: float, tbt: float) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
        steps = {"bare": [2.0, 2.0], "cluster": [2.0 * step, 2.0 * step], "bare_main": [2.0, 2.0]}
        return steps, {"bare": [2.0, 2.0], "bare_main": [2.5, 2.5], "cluster": [2.0 * tbt, 2.0 * tbt]}

    out = tables(["bare", "cluster", "bare_main"], [session(1.02, 1.04), session(1.06, 1.10)], 2)
    rows = {line.split("|")[1].strip(): line for line in out.splitlines() if line.startswith("| ")}
    assert "1.020, 1.060" in rows["cluster"]  # the decode step per session
    tbt = [line for line in out.splitlines() if line.startswith("| bare |") and "/" in line.split("|")[2]]
    assert len(tbt) == 1 and "1.040, 1.100" in tbt[0]  # TBT cluster / bare per session
    tbt_main = next(line for line in out.splitlines() if line.startswith("| bare_main |") and "0.832" in line)
    assert "0.832, 0.880" in tbt_main  # against bare_main's 2.5 ms
    one = tables(["bare", "cluster"], [session(1.02, 1.04)], 2)
    assert "| - |" in one  # no interval over sessions from one session
    assert "bare_main" not in one


def test_engine_ab_tables_without_the_cluster_step_log() -> None:
    import math

    from bench.engine_ab import tables

    steps = {"bare": [2.0, 2.0], "cluster": [math.nan, math.nan]}
    out = tables(["bare", "cluster"], [(steps, {"bare": [2.0, 2.0], "cluster": [2.2, 2.2]})], 2)
    assert "| cluster | - (no step log) |" in out
    assert "1.100 (1.100-1.100)" in out  # the TBT ratio still comes from the client's receive times

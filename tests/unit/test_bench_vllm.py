"""bench.bench_vllm's overhead table (pure) and its process-tree helper (real processes)."""

from __future__ import annotations

import os
import subprocess
import sys
import time

from bench.bench_vllm import SYSTEMS, descendants, overhead_table, records


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

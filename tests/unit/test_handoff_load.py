"""bench.handoff_load's summary (pure): the direct and relay-only gaps of each load level side by side."""

from __future__ import annotations

from bench.handoff_load import pct, table


def test_table_puts_both_systems_of_each_level_side_by_side() -> None:
    def run(gaps: list[float]) -> dict:
        return {"streams": 0, "gaps": gaps, "tokens_per_s": 1000.0, "broker_cpu": 0.25}

    res = {"levels": [0, 64], "runs": {
        "direct": {"0": [run([1.0, 2.0, 3.0])], "64": [run([2.0, 4.0]), run([6.0])]},
        "relay": {"0": [run([2.0, 2.0, 2.0])], "64": [run([8.0, 8.0, 8.0])]}}}
    lines = table(res).splitlines()
    assert len(lines) == 4
    # level 0: p50 2.00 both; level 64: direct p50 of [2, 4, 6] = 4, relay 8 -> 2.00x
    assert lines[2].startswith("| 0 | 1,000; 1,000 | 25%; 25% | 3 / 3 | 2.00; 2.00 |")
    assert lines[3].startswith("| 64 |") and "| 4.00; 8.00 |" in lines[3] and "**2.00**" in lines[3]


def test_pct_is_the_order_statistic_at_the_quantile() -> None:
    xs = [float(i) for i in range(10, 0, -1)]
    assert pct(xs, 0.9) == 10.0 and pct(xs, 0.0) == 1.0 and pct(xs, 0.5) == 6.0
    assert pct([], 0.5) != pct([], 0.5)  # NaN for no data

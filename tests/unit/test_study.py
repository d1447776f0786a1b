"""The study's capacity search (pure parts: no simulation)."""

from __future__ import annotations

from typing import Any

import pytest

from bench.sim.study import _refine
from dynaserve.metrics import serving_capacity


def _cliff(edge: float) -> tuple[dict[float, dict[str, Any]], Any, list[float]]:
    """Attainment 0.95 up to ``edge`` req/s, 0.5 above it (the cliff of an overloaded cluster)."""
    pts: dict[float, dict[str, Any]] = {}
    asked: list[float] = []

    def at(r: float) -> dict[str, Any]:
        asked.append(r)
        pts.setdefault(r, {"rate": r, "attainment": 0.95 if r <= edge else 0.5})
        return pts[r]

    return pts, at, asked


def capacity(pts: dict[float, dict[str, Any]]) -> float:
    return serving_capacity([(r, p["attainment"]) for r, p in pts.items()])


@pytest.mark.parametrize("edge", [201.0, 229.0, 239.0])
def test_refine_places_capacity_within_a_sixteenth_of_the_grid_step(edge: float) -> None:
    pts, at, asked = _cliff(edge)
    for r in (160.0, 200.0, 240.0, 320.0):
        at(r)
    coarse = capacity(pts)
    assert coarse == pytest.approx(200.0 + 0.05 / 0.45 * 40.0)  # linear across the cliff, wherever it is
    _refine(at, pts, 4)
    assert len(asked) == 4 + 4
    assert all(200.0 < r < 240.0 for r in asked[4:])
    assert abs(capacity(pts) - edge) <= 40.0 / 16


def test_refine_leaves_curves_without_a_crossing_alone() -> None:
    pts, at, asked = _cliff(1000.0)  # every rate meets 90 %
    for r in (100.0, 200.0):
        at(r)
    _refine(at, pts, 4)
    pts2, at2, asked2 = _cliff(10.0)  # none does
    for r in (100.0, 200.0):
        at2(r)
    _refine(at2, pts2, 4)
    assert (len(asked), len(asked2)) == (2, 2)

"""The study's capacity search (pure parts, and one small simulation for the jittered arrivals)."""

from __future__ import annotations

import gzip
import json
from pathlib import Path
from typing import Any

import pytest

from bench.sim import study
from bench.sim.study import RESULTS, Curve, _refine, curve_to_dict
from bench.sim.workloads import jittered
from bench.traces import TraceRequest
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


def _fake_curve(job: tuple[str, str, study.Spec, tuple[float, ...], int | None]) -> Curve:
    model, workload, spec, rates, _ = job
    return Curve(model, workload, spec, [{"rate": r, "attainment": 1.0, "goodput": r, "new": True} for r in rates])


def _old_study(out: Path, quick: bool = True) -> None:
    specs = study.main_specs(quick)
    curves = [Curve(m, w, sp, [{"rate": 1.0, "attainment": 1.0, "goodput": 1.0}])
              for m in ("llama3-8b", "qwen2.5-32b") for w in ("azure_conv", "arxiv") for sp in specs]
    meta = {"quick": quick, "overrides": {}, "reference_rates": {f"{m}/{w}": 10.0 for m in ("llama3-8b", "qwen2.5-32b")
                                                                  for w in ("azure_conv", "arxiv")}}
    out.mkdir(parents=True, exist_ok=True)
    with gzip.open(out / RESULTS, "wt") as fh:
        json.dump({"meta": meta, "curves": [curve_to_dict(c) for c in curves]}, fh)


def test_only_reruns_the_named_configurations_into_the_existing_study(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study, "run_curve", _fake_curve)
    _old_study(tmp_path)
    label = study.ORACLE_DYNASERVE_GATED
    curves = study.run_study(["arxiv"], ["qwen2.5-32b"], True, 1, tmp_path, ablations=False, only=[label])
    with gzip.open(tmp_path / RESULTS, "rt") as fh:
        saved = json.load(fh)
    assert len(saved["curves"]) == len(curves) == 4 * len(study.main_specs(True))  # nothing lost, nothing added
    new = [c for c in curves if c.points[0].get("new")]
    assert [(c.model, c.workload, c.spec.label) for c in new] == [("qwen2.5-32b", "arxiv", label)]
    assert [p["rate"] for p in new[0].points] == list(study.rate_grid(10.0, True))  # the study's own grid
    assert saved["meta"]["reference_rates"]["llama3-8b/azure_conv"] == 10.0


def test_only_refuses_unknown_labels_and_other_settings(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(study, "run_curve", _fake_curve)
    _old_study(tmp_path)
    with pytest.raises(ValueError, match="no configuration labelled nope"):
        study.run_study(["arxiv"], ["qwen2.5-32b"], True, 1, tmp_path, ablations=False, only=["nope"])
    with pytest.raises(ValueError, match="other settings"):
        study.run_study(["arxiv"], ["qwen2.5-32b"], False, 1, tmp_path, ablations=False, only=["dynaserve"])


def test_jittered_moves_each_arrival_within_the_bound_and_keeps_the_requests() -> None:
    reqs = [TraceRequest(0.0005 * i, 100 + i, 10 + i) for i in range(200)]
    out = jittered(reqs, 1.0, seed=3)
    assert out == jittered(reqs, 1.0, seed=3) and out != jittered(reqs, 1.0, seed=4)  # seeded
    assert [r.arrival_s for r in out] == sorted(r.arrival_s for r in out) and out[0].arrival_s >= 0.0
    by_len = {r.input_tokens: r for r in reqs}
    assert sorted(r.input_tokens for r in out) == sorted(by_len)  # the same requests
    moved = [abs(r.arrival_s - by_len[r.input_tokens].arrival_s) for r in out]
    assert max(moved) <= 0.001 and sum(m > 0 for m in moved) > 150
    assert [r.output_tokens - r.input_tokens for r in out] == [-90] * 200


def test_run_point_simulates_the_jittered_trace(monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[list[float]] = []
    real_run = study.Simulator.run

    def spy(self: Any, trace: Any, *args: Any, **kwargs: Any) -> Any:
        seen.append([r.arrival_s for r in trace])
        return real_run(self, trace, *args, **kwargs)

    monkeypatch.setattr(study.Simulator, "run", spy)
    spec = study.Spec("dynaserve", "dynaserve", "dynaserve", sim=(study.DEADLINE,))
    for jitter in (None, (1.0, 1), (1.0, 1)):
        pt = study.run_point("llama3-8b", "azure_code", spec, 2.0, 40, jitter=jitter)
        assert pt["completed"] == 40
    plain, a, b = seen
    assert a == b != plain
    assert max(abs(x - y) for x, y in zip(sorted(a), plain, strict=True)) <= 0.001


@pytest.mark.parametrize("argv, says", [
    (["--report-only"], "--report-only needs a study already run into --out"),
    (["--only", "dynaserve"], "--only needs a study already run into --out"),
    (["--set", "no_such_field=1"], "'no_such_field' is not a SimConfig field"),
    (["--variants", "no_such_policy"], "unknown policy 'no_such_policy'"),
    (["--workloads", "no_such_trace"], "unknown workload 'no_such_trace'"),
])
def test_study_cli_refuses_bad_arguments_with_a_message(
        tmp_path: Path, capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    with pytest.raises(SystemExit) as exc:
        study.main([*argv, "--out", str(tmp_path / "empty")])
    assert exc.value.code == 2 and says in capsys.readouterr().err
    assert not (tmp_path / "empty").exists()  # refused before anything ran


def test_study_cli_only_names_the_known_labels(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    _old_study(tmp_path)
    with pytest.raises(SystemExit):
        study.main(["--quick", "--only", "nope", "--out", str(tmp_path), "--workloads", "arxiv", "--models",
                    "qwen2.5-32b", "--no-ablations"])
    err = capsys.readouterr().err
    assert "no configuration labelled nope; known:" in err and "dynaserve" in err


@pytest.mark.parametrize("argv, says", [
    (["twin", "--model", "nope", "--rate", "1"], "argument --model: invalid choice: 'nope'"),
    (["timeline", "--workload", "mooncake", "--rate", "1"], "argument --workload: invalid choice: 'mooncake'"),
    (["model-error", "--rate", "1", "--policies", "colocate,nope"], "unknown policy 'nope'"),
    (["resolution", "--cells", "llama3-8b/nope"], "'llama3-8b/nope' is not MODEL/WORKLOAD"),
    (["migrate", "--cells", "sharegpt"], "'sharegpt' is not MODEL/WORKLOAD"),
])
def test_extras_cli_refuses_unknown_names_with_a_message(
        capsys: pytest.CaptureFixture[str], argv: list[str], says: str) -> None:
    from bench.sim import extras

    with pytest.raises(SystemExit) as exc:
        extras.main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err

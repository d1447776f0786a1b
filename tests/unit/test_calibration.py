"""Step-model files (round trip, bad files) and the calibration fit."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest

from broker.server import Broker, BrokerConfig
from dynaserve.calibration import (
    FitError,
    StepModelFile,
    StepModelFileError,
    choose_step_model,
    fit,
    fit_with_holdout,
    load_step_model,
    quantile,
)
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.costmodel import StepLatencyModel, preset_step_model

TRUE = StepLatencyModel(a=3.5, b=0.045, c=0.09, d=2e-4, e=3e-6)


def synthetic(n: int, noise: float, seed: int = 1) -> list[tuple[int, int, int, float, float]]:
    """Steps of random composition timed by TRUE with multiplicative noise of up to +-``noise``."""
    rng = random.Random(seed)
    out = []
    for _ in range(n):
        chunk = rng.choice([0, 0, 16, 64, 256, 1024])
        ctx_before = rng.choice([0, 256, 1024])
        n_dec = rng.choice([0, 1, 4, 16, 64]) if chunk else rng.choice([1, 4, 16, 64])
        dctx = n_dec * rng.randrange(32, 1500)
        attn = StepLatencyModel.chunk_attn(chunk, ctx_before) if chunk else 0.0
        ms = TRUE.step_ms(chunk, n_dec, dctx, attn) * (1 + rng.uniform(-noise, noise))
        out.append((chunk, n_dec, dctx, attn, ms))
    return out


def test_file_round_trip(tmp_path: Path) -> None:
    f = StepModelFile(TRUE, 2048, "tiny-llama", "cpu: 2 cores", "vllm", 400,
                      FitError(0.04, 0.12, 100, (0.8, 1.0, 1.5)), "x")
    path = tmp_path / "sub" / "m.json"
    f.save(path)
    assert StepModelFile.load(path) == f
    assert load_step_model(path) == (TRUE, 2048)
    assert json.loads(path.read_text())["version"] == 1


def test_choose_step_model_prefers_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    StepModelFile(TRUE, 4096).save(path)
    assert choose_step_model(str(path), "llama3-8b") == (TRUE, 4096)
    assert choose_step_model("", "llama3-8b", "a100") == preset_step_model("llama3-8b", "a100")


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("not json", "not JSON"),
        ("[1, 2]", "expected a JSON object"),
        ('{"version": 2}', "unsupported version"),
        ('{"version": 1, "a": 1, "b": 0.1}', "missing field(s) c, d, e, kv_bytes_per_token"),
        ('{"version": 1, "a": "x", "b": 0.1, "c": 0, "d": 0, "e": 0, "kv_bytes_per_token": 8}', "a must be a number"),
        ('{"version": 1, "a": -1, "b": 0.1, "c": 0, "d": 0, "e": 0, "kv_bytes_per_token": 8}', "finite number >= 0"),
        ('{"version": 1, "a": 1, "b": 0.1, "c": 0, "d": 0, "e": 0, "kv_bytes_per_token": 0}', "kv_bytes_per_token"),
        ('{"version": 1, "a": 1, "b": 0.1, "c": 0, "d": 0, "e": 0, "kv_bytes_per_token": 8, '
         '"fit_error": {"ratio_quantiles": [1.2, 0.9]}}', "non-decreasing"),
    ],
)
def test_bad_file_is_a_clear_error(tmp_path: Path, content: str, message: str) -> None:
    path = tmp_path / "bad.json"
    path.write_text(content)
    with pytest.raises(StepModelFileError, match="step model file .*bad.json") as exc:
        StepModelFile.load(path)
    assert message in str(exc.value)


def test_missing_file_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(StepModelFileError, match="cannot read step model file"):
        load_step_model(tmp_path / "none.json")


def test_fit_recovers_known_coefficients_from_noisy_steps() -> None:
    m = fit(synthetic(400, noise=0.05))
    for name in ("a", "b", "c", "d", "e"):
        assert getattr(m, name) == pytest.approx(getattr(TRUE, name), rel=0.15), name


def test_fit_with_holdout_reports_error_of_the_noise() -> None:
    m, err = fit_with_holdout(synthetic(400, noise=0.1), holdout=0.25, seed=3)
    assert err.holdout == 100
    # uniform +-10% noise: median |error| about 5%, P90 about 9%
    assert 0.02 < err.median < 0.08
    assert err.median < err.p90 < 0.12
    assert m.b == pytest.approx(TRUE.b, rel=0.15)
    # measured / predicted spans the noise: about 0.9 at the bottom, 1 in the middle, 1.1 at the top
    rq = err.ratio_quantiles
    assert len(rq) == 21 and list(rq) == sorted(rq)
    assert 0.85 < rq[0] < 0.95 and 0.95 < rq[10] < 1.05 and 1.05 < rq[20] < 1.15
    _, exact = fit_with_holdout(synthetic(100, noise=0.0))
    assert exact.p90 < 1e-6 and exact.ratio_quantiles[0] == exact.ratio_quantiles[20] == pytest.approx(1.0)


def test_fit_needs_enough_samples() -> None:
    with pytest.raises(ValueError, match="at least 5"):
        fit(synthetic(4, noise=0.0))


def test_quantile() -> None:
    assert quantile([3.0, 1.0, 2.0], 0.5) == 2.0
    assert quantile([0.0, 10.0], 0.9) == pytest.approx(9.0)


def test_broker_prices_with_the_file(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    StepModelFile(TRUE, 2048).save(path)
    for cfg, want in ((BrokerConfig(step_model=str(path)), TRUE), (BrokerConfig(), preset_step_model("llama3-8b")[0])):
        broker = Broker(cfg)
        try:
            assert broker.pricing.model == want
        finally:
            broker.ctx.term()


def test_cluster_passes_the_file_to_broker_and_workers(tmp_path: Path) -> None:
    cluster = LocalCluster(ClusterConfig(engine="sim", step_model="m.json"), run_dir=tmp_path)
    flags = cluster.step_model_flags()
    assert flags[0] == "--step-model" and Path(flags[1]).is_absolute() and flags[1].endswith("m.json")
    assert LocalCluster(ClusterConfig(engine="sim"), run_dir=tmp_path).step_model_flags() == []


def test_worker_and_broker_refuse_a_bad_file(tmp_path: Path) -> None:
    import broker.__main__ as broker_main
    import workers.__main__ as worker_main

    bad = tmp_path / "bad.json"
    bad.write_text("{}")
    for main in (worker_main.main, broker_main.main):
        with pytest.raises(SystemExit) as exc:
            main(["--step-model", str(bad)])
        assert exc.value.code == 2

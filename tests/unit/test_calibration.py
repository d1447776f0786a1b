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
    format_step,
    load_step_model,
    quantile,
    ratio_quantiles,
    read_step_log,
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


def write_log(path: Path, samples: list[tuple[int, int, int, float, float]], t0: float = 100.0) -> None:
    from dynaserve.calibration import open_step_log

    with open_step_log(path) as fh:
        for i, (p, n, ctx, attn, ms) in enumerate(samples):
            fh.write(format_step(t0 + i, ms, p, n, ctx, attn))


def test_step_log_round_trip_window_and_torn_last_line(tmp_path: Path) -> None:
    path = tmp_path / "w0.steps"
    steps = synthetic(10, 0.0)
    write_log(path, steps)
    got = read_step_log(path)
    assert [t for t, _ in got] == [100.0 + i for i in range(10)]
    for (_, (p, n, ctx, attn, ms)), (p0, n0, ctx0, attn0, ms0) in zip(got, steps, strict=True):
        assert (p, n, ctx) == (p0, n0, ctx0) and attn == pytest.approx(attn0, abs=0.05)
        assert ms == pytest.approx(ms0, abs=1e-4)
    assert [t for t, _ in read_step_log(path, 102.0, 104.5)] == [102.0, 103.0, 104.0]
    write_log(path, steps[:2], t0=200.0)  # appending to an existing log writes no second header
    assert path.read_text().count("#") == 1 and len(read_step_log(path)) == 12
    with open(path, "a") as fh:
        fh.write("300.0 4.2 16")  # a writer killed mid-line
    assert len(read_step_log(path)) == 12
    with open(path, "a") as fh:
        fh.write("\n1.0 x 0 1 2 0.0\n")
    with pytest.raises(StepModelFileError, match=r"w0.steps:\d+: not a step-log line"):
        read_step_log(path)


def test_ratio_quantiles() -> None:
    model = StepLatencyModel(a=2.0, b=0.01, c=0.0, d=0.0, e=0.0)  # prefill-free steps: 2 ms
    q = ratio_quantiles(model, [(0, 1, 10, 0.0, ms) for ms in (1.0, 2.0, 3.0, 4.0, 5.0)], points=5)
    assert q == (0.5, 1.0, 1.5, 2.0, 2.5)


def test_calibrate_fits_served_steps_from_logs(tmp_path: Path) -> None:
    from workers.calibrate import main

    steps = synthetic(400, 0.04)
    write_log(tmp_path / "w0.steps", steps[:200])
    write_log(tmp_path / "w1.steps", steps[200:])
    out = tmp_path / "served.json"
    assert main(["--engine", "log", "--model", "llama3-8b", "--from-log", str(tmp_path / "w0.steps"),
                 str(tmp_path / "w1.steps"), "--out", str(out)]) == 0
    f = StepModelFile.load(out)
    assert f.engine == "log" and f.samples == 400 and f.fit_error.median < 0.04
    assert f.model.a == pytest.approx(TRUE.a, rel=0.1) and f.model.b == pytest.approx(TRUE.b, rel=0.1)
    with pytest.raises(SystemExit):
        main(["--engine", "log", "--out", str(out)])  # no logs given


def test_serving_workers_log_every_step(tmp_path: Path) -> None:
    """Two simulated workers serving requests log steps whose compositions add up to exactly the work
    the requests needed: every prompt token prefilled once, every later token decoded once."""
    import asyncio

    from dynaserve.client import DynaServeClient
    from tests.conftest import make_prompt, start_cluster

    cluster = start_cluster("colocate", step_log_dir=str(tmp_path / "logs"), engine_time_scale=0.05)
    lens = [(40, 5), (300, 9), (1200, 3), (7, 20)]
    try:
        async def go() -> None:
            async with DynaServeClient(cluster.client_addr) as c:
                streams = [c.generate(make_prompt(p, i), max_tokens=o, ignore_eos=True)
                           for i, (p, o) in enumerate(lens)]
                await asyncio.gather(*(s.collect() for s in streams))

        asyncio.run(go())
    finally:
        cluster.stop()
    steps = [s for iid in cluster.instance_ids for _, s in read_step_log(tmp_path / "logs" / f"{iid}.steps")]
    assert sum(p for p, *_ in steps) == sum(p for p, _ in lens)
    assert sum(n for _, n, *_ in steps) == sum(o - 1 for _, o in lens)
    assert all(ms > 0 for *_, ms in steps)

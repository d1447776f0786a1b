"""bench.sim2real end to end on a tiny trace: a live two-worker simulated-engine cluster and the simulator."""

from __future__ import annotations

from pathlib import Path

import pytest

from bench.sim2real import METRICS, Sim2RealConfig, build_trace, run, sim_config, table
from dynaserve.costmodel import preset_step_model

pytestmark = pytest.mark.integration


def test_sim_config_mirrors_the_live_cluster() -> None:
    cfg = Sim2RealConfig(engine="vllm", step_model="docs/sim2real/tiny-llama-cpu.json", kv_capacity_tokens=1000)
    scfg = sim_config(cfg)
    assert scfg.instances == 2 and scfg.max_batched_tokens == 2048 and scfg.max_num_seqs == 64
    assert scfg.kv_capacity_tokens == 896  # whole 128-token blocks
    assert scfg.kv_bytes_per_token == 2048
    assert scfg.step_model != preset_step_model("tiny-llama")[0]  # the calibrated file, not the tables
    assert sim_config(Sim2RealConfig()).step_model == preset_step_model("llama3-8b", "a100")[0]


def test_trace_fits_the_context_and_keeps_the_rate() -> None:
    reqs = build_trace(Sim2RealConfig(engine="vllm", limit=30, rate=5.0, max_input=8192, max_output=4096))
    assert len(reqs) == 30
    assert all(r.input_tokens + r.output_tokens <= 2048 and r.output_tokens <= 512 for r in reqs)
    assert reqs[-1].arrival_s == pytest.approx(29 / 5.0)


def test_tiny_trace_end_to_end(tmp_path: Path) -> None:
    cfg = Sim2RealConfig(engine="sim", policy="dynaserve", limit=8, rate=4.0, max_input=512, max_output=12)
    result = run(cfg, tmp_path, progress=False)
    for side in ("live", "sim"):
        assert result[side]["n"] == 8 and result[side]["completed"] == 8, side
    assert set(result["compare"]) == set(METRICS)
    for v in result["compare"].values():
        assert v["live"] > 0 and v["sim"] > 0 and v["ratio"] == pytest.approx(v["sim"] / v["live"])
    assert (tmp_path / "sim_dynaserve.json").is_file()
    assert (tmp_path / "sim_dynaserve_ttft_cdf.png").stat().st_size > 0
    assert (tmp_path / "sim_dynaserve_tbt_cdf.png").stat().st_size > 0
    assert "| completed | 8/8 | 8/8 |" in table(result)

"""bench.sim2real end to end on a tiny trace: a live two-worker simulated-engine cluster and the simulator."""

from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import pytest

from bench.sim.policies import build_policy
from bench.sim.simulator import Simulator
from bench.sim2real import (
    METRICS,
    MIN_PREFILL_STEPS,
    NOISE_POINTS,
    PROBE_DECODE,
    PROBE_FIRST_TOKENS,
    LiveExtras,
    Sim2RealConfig,
    StepLogs,
    build_trace,
    compare_runs,
    delivery_delays,
    delivery_jitter,
    emitted_by_a,
    engine_drift,
    fit_transfer_latency,
    handoff_gaps,
    live_noise,
    noise_summary,
    noise_trace,
    reproducibility,
    run,
    run_sim,
    sim_config,
    table,
)
from dynaserve.calibration import FitError, StepModelFile
from dynaserve.costmodel import StepLatencyModel, preset_step_model
from dynaserve.metrics import RequestRecord

pytestmark = pytest.mark.integration


def test_sim_config_mirrors_the_live_cluster() -> None:
    cfg = Sim2RealConfig(engine="vllm", step_model="docs/sim2real/tiny-llama-cpu.json", kv_capacity_tokens=1000)
    scfg = sim_config(cfg)
    assert scfg.instances == 2 and scfg.max_batched_tokens == 2048 and scfg.max_num_seqs == 64
    assert scfg.kv_capacity_tokens == 896  # whole 128-token blocks
    assert scfg.kv_bytes_per_token == 2048
    assert scfg.step_model != preset_step_model("tiny-llama")[0]  # the calibrated file, not the tables
    assert sim_config(Sim2RealConfig()).step_model == preset_step_model("llama3-8b", "a100")[0]
    # the simulated instances step, schedule and advertise with the file's model too, and are priced with it
    sim = Simulator(scfg, build_policy("dynaserve", scfg.pricing()))
    assert scfg.pricing().model == scfg.step_model
    for inst in sim.instances:
        assert inst.sched.model == scfg.step_model == sim.cluster.instances[inst.id].step_model


def test_sim_config_takes_the_measured_extras_and_the_chosen_noise(tmp_path: Path) -> None:
    path = tmp_path / "m.json"
    StepModelFile(StepLatencyModel(a=2.0, b=0.02), 2048, fit_error=FitError(0.1, 0.2, 10, (0.8, 1.0, 1.6))).save(path)
    extras = LiveExtras(1.25, 0.0625, 4.5, step_noise=(0.9, 1.1, 1.7))
    cfg = Sim2RealConfig(engine="vllm", step_model=str(path))  # noise=live: what the live cluster measured
    scfg = sim_config(cfg, extras)
    assert (scfg.step_overhead_ms, scfg.step_overhead_per_seq_ms, scfg.path_latency_ms, scfg.step_noise) == (
        1.25, 0.0625, 4.5, (0.9, 1.1, 1.7))
    assert sim_config(replace(cfg, noise="file"), extras).step_noise == (0.8, 1.0, 1.6)
    assert sim_config(replace(cfg, noise="off"), extras).step_noise == ()
    plain = sim_config(cfg)  # the twin without the live extras (used to choose the rate)
    assert (plain.step_overhead_ms, plain.path_latency_ms, plain.step_noise) == (0.0, 0.0, ())
    with pytest.raises(ValueError, match="noise"):
        Sim2RealConfig(noise="calibrated")


def test_noise_window_is_disjoint_from_the_compared_requests() -> None:
    cfg = Sim2RealConfig(engine="vllm", limit=30, rate=5.0)
    main, noise = build_trace(cfg), noise_trace(cfg, 5.0)
    assert len(noise) == 30 and noise[0].arrival_s == 0.0 and noise[-1].arrival_s == pytest.approx(29 / 5.0)
    full = build_trace(replace(cfg, limit=60))
    assert [(r.input_tokens, r.output_tokens) for r in noise] == [(r.input_tokens, r.output_tokens) for r in full[30:]]
    assert [(r.input_tokens, r.output_tokens) for r in main] == [(r.input_tokens, r.output_tokens) for r in full[:30]]


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
    ex = result["live_extras"]  # measured on the live cluster before the replay
    assert ex["gaps"] == 2 * (PROBE_DECODE[1] - 1) and ex["ttfts"] == 2 * PROBE_FIRST_TOKENS
    # the step-time noise comes from the steps the workers logged while serving the next 8 requests first
    assert ex["noise_steps"] > 8 and len(ex["step_noise"]) == NOISE_POINTS and result["step_noise"] == list(ex["step_noise"])
    assert list(ex["step_noise"]) == sorted(ex["step_noise"]) and ex["step_noise"][0] > 0
    # steps with prefill get noise of their own when the window has enough of them
    pre = ex["step_noise_prefill"]
    assert (ex["noise_prefill_steps"] >= MIN_PREFILL_STEPS and len(pre) == NOISE_POINTS) or \
        (ex["noise_prefill_steps"] == 0 and not pre)
    # and the delivery jitter from the window's tokens against those steps
    assert ex["delivery_tokens"] > 8 and len(ex["delivery_jitter_ms"]) == 21  # the runs, summarized by quantiles
    assert list(ex["delivery_jitter_ms"]) == sorted(ex["delivery_jitter_ms"])
    during = result["steps_during_replay"]
    assert during["steps"] > 8 and len(during["ratio_quantiles"]) == 21
    assert 0 < during["prefill_steps"] < during["steps"]


def test_split_policy_end_to_end(tmp_path: Path) -> None:
    """1P:1D: every request is handed off, live and simulated; the probe, the delivery and the handoff cost
    are measured on the decoding instance and the noise window's handoffs."""
    cfg = Sim2RealConfig(engine="sim", policy="disagg", limit=8, rate=4.0, max_input=512, max_output=12)
    result = run(cfg, tmp_path, progress=False)
    for side in ("live", "sim"):
        assert result[side]["completed"] == 8, side
    ex = result["live_extras"]
    assert ex["gaps"] == 2 * (PROBE_DECODE[1] - 2)  # B's gaps only (A, the prefill instance, made token 0)
    assert ex["handoffs"] == 8 and ex["handoff_gap_ms"] > 0 and ex["delivery_tokens"] > 8
    hg = result["handoff_gap_ms"]
    assert hg["live"][2] == 8 and hg["sim"][2] == 8  # every compared request, on both sides
    assert "handoff gap" in table(result) and (tmp_path / "sim_disagg.json").is_file()


def test_delivery_delays_match_tokens_to_the_steps_that_made_them() -> None:
    steps = {"w0": [1.000, 1.003, 1.006, 1.009], "w1": [1.0015, 1.0045]}

    def rec(ts: list[float], a: str = "w0", b: str | None = None) -> RequestRecord:
        return RequestRecord(req_id="r", arrival_s=0.0, submit_ts=0.9, prompt_tokens=4, max_tokens=4, token_ts=ts,
                             instance_a=a, instance_b=b, ttft_slo_ms=1e9, tbt_slo_ms=1e9)

    # tokens 1 and 2 were held up and arrived together with token 3, just after the step that made token 3
    got = delivery_delays([rec([1.0005, 1.0090, 1.0090, 1.0092]), rec([1.0005, 1.0035], "w1")], steps)
    assert len(got) == 2
    assert got[0] == pytest.approx([6.0, 3.0, 0.2])  # tokens after the first: steps 1.003, 1.006, 1.009
    assert got[1] == pytest.approx([2.0])
    # a PD split (A made token 0): B's tokens are matched to B's steps, its first one included
    pd = replace(rec([1.0005, 1.0020, 1.0050], b="w1"), split=4)
    assert delivery_delays([pd], steps) == [pytest.approx([0.5, 0.5])]
    # unknown instances and single tokens are left out
    assert delivery_delays([rec([1.0005, 1.0035], "w9"), rec([1.0005])], steps) == []
    assert delivery_jitter([[0.2, 0.3, 5.3], [0.3, 0.4]]) == ((-0.1, 0.0, 5.0), (0.0, 0.1))  # less the median


def test_handoff_gaps_are_taken_between_a_and_b_at_the_client() -> None:
    def rec(ts: list[float], split: int | None, b: str | None = "w1") -> RequestRecord:
        return RequestRecord(req_id="r", arrival_s=0.0, submit_ts=0.9, prompt_tokens=4, max_tokens=4, token_ts=ts,
                             instance_a="w0", instance_b=b, split=split, ttft_slo_ms=1e9, tbt_slo_ms=1e9)

    ts = [1.0, 1.002, 1.010, 1.012]
    assert emitted_by_a(rec(ts, 4)) == 1 and emitted_by_a(rec(ts, 5)) == 2 and emitted_by_a(rec(ts, 2)) == 0
    assert emitted_by_a(rec(ts, None, None)) == 4
    # PD (A made token 0), a decode handoff after token 1; a prompt split and an unsplit request have none
    got = handoff_gaps([rec(ts, 4), rec(ts, 5), rec(ts, 2), rec(ts, None, None)])
    assert got == pytest.approx([2.0, 8.0])


def test_simulated_handoff_cost_is_fitted_to_the_live_handoff_gap() -> None:
    cfg = Sim2RealConfig(engine="sim", policy="disagg", limit=30, rate=2.0)
    window = noise_trace(cfg, 2.0)
    recs, _ = run_sim(replace(cfg, transfer_latency_ms=12.0), window, LiveExtras())
    gaps = handoff_gaps(recs)
    assert len(gaps) > 20  # 1P:1D: every request is handed off
    live = LiveExtras(handoff_gap_ms=sorted(gaps)[len(gaps) // 2], handoffs=len(gaps))
    fitted = fit_transfer_latency(cfg, window, live)
    assert fitted == pytest.approx(12.0, abs=1.0)
    assert sim_config(cfg, replace(live, transfer_latency_ms=fitted)).transfer_latency_ms == fitted
    assert sim_config(cfg, LiveExtras(transfer_latency_ms=7.0)).transfer_latency_ms == cfg.transfer_latency_ms


def test_live_noise_splits_steps_with_prefill_from_decode_only_steps() -> None:
    model = StepLatencyModel(a=2.0, b=0.02)
    dec = [(0, 4, 400, 0.0, model.step_ms(0, 4, 400) * 1.0) for _ in range(300)]
    # steps with prefill: 3 ms over the model for short and long chunks alike (as a ratio: 1.6x and 1.1x)
    pre = [(c, 4, 400, 0.0, model.step_ms(c, 4, 400) + 3.0) for c in (64, 1024) * (MIN_PREFILL_STEPS // 2)]
    both = live_noise(model, dec + pre)
    assert both["noise_steps"] == 300 and both["noise_prefill_steps"] == MIN_PREFILL_STEPS
    assert both["step_noise"][100] == pytest.approx(1.0)
    assert both["step_overhead_prefill_ms"] == pytest.approx(3.0)  # the constant, and a ratio of 1 left
    assert both["step_noise_prefill"][0] == pytest.approx(1.0) and both["step_noise_prefill"][-1] == pytest.approx(1.0)
    few = live_noise(model, dec + pre[:-1])  # too few steps with prefill: one noise for all
    assert few["noise_steps"] == 300 + MIN_PREFILL_STEPS - 1 and "step_noise_prefill" not in few
    assert few["step_noise"][-1] == pytest.approx(1.0 + 3.0 / model.step_ms(64, 4, 400), abs=1e-3)  # the short chunks' ratio
    assert few["step_noise"][0] == pytest.approx(1.0) and "step_overhead_prefill_ms" not in few
    assert live_noise(model, []) == {}


def test_several_runs_compare_the_medians_of_each_side() -> None:
    def one(live: float, sim: float) -> dict:
        return {"compare": {m: {"live": live, "sim": sim, "ratio": sim / live} for m in METRICS}}

    runs = [one(10.0, 7.0), one(14.0, 13.0), one(20.0, 9.0)]
    agg = compare_runs(runs)
    for m in METRICS:
        assert agg[m] == {"live": 14.0, "sim": 9.0, "ratio": pytest.approx(9.0 / 14.0)}
    result = {"compare": agg, "runs": runs, "live": {"completed": 8, "n": 8}, "sim": {"completed": 8, "n": 8}}
    text = table(result)
    assert "| ttft p50 (ms) | 14.0 | 9.0 | 0.64 | 0.70, 0.93, 0.45 |" in text and "medians over 3 runs" in text
    assert "changed speed" not in text
    runs[1]["engine_drift"] = engine_drift([0.8, 0.9, 1.0], {"ratio_quantiles": [1.0, 1.2, 1.5]})  # 1.33
    runs[2]["engine_drift"] = engine_drift([0.8, 0.9, 1.0], {"ratio_quantiles": [0.9, 1.0, 1.1]})  # 1.11
    assert runs[1]["engine_drift"] == pytest.approx(1.333, abs=1e-3) and engine_drift([], {}) is None
    text = table(result)
    assert "run 2: the live engines' steps ran 1.33x" in text and "run 3:" not in text
    with pytest.raises(ValueError, match="runs"):
        Sim2RealConfig(runs=0)


def test_step_logs_read_what_was_written_since_and_wait_for_whole_lines(tmp_path: Path) -> None:
    from dynaserve.calibration import format_step, open_step_log

    logs = StepLogs(tmp_path)
    with open_step_log(tmp_path / "w0.steps") as fh:
        fh.write(format_step(1.0, 3.0, 0, 2, 40, 0.0))
        fh.flush()
        assert logs.steps(0.0, 9.0, "w0") == [(0, 2, 40, 0.0, 3.0)]
        fh.write("2.0 4.5 16")  # a line still being written
        fh.flush()
        assert logs.measured_ms(0.0, 9.0, "w0") == [3.0]
        fh.write(" 1 20 128.0\n" + format_step(3.0, 5.0, 0, 1, 21, 0.0))
    assert logs.measured_ms(0.0, 9.0) == [3.0, 4.5, 5.0]
    assert logs.measured_ms(1.5, 2.5, "w0") == [4.5] and logs.steps(0.0, 9.0, "w1") == []


def test_reproducibility_counts_runs_and_pairs_of_live_runs_within_the_target() -> None:
    def run(live: float, sim: float) -> dict:
        return {"compare": {m: {"live": live, "sim": sim, "ratio": sim / live} for m in METRICS}}

    # live runs 10, 11, 15: of the 6 ordered pairs only (10, 11) and (11, 10) are within 20 % of each other
    runs = [run(10.0, 10.5), run(11.0, 14.0), run(15.0, 14.0)]
    rep = reproducibility(runs)["ttft_p50_ms"]
    assert rep["sim_within"] == pytest.approx(2 / 3)  # 1.05 and 0.93 in, 1.27 out
    assert rep["live_within"] == pytest.approx(2 / 6)
    assert rep["live_spread"] == pytest.approx(1.5)
    text = table({"compare": compare_runs(runs), "runs": runs, "live": {"completed": 1, "n": 1},
                    "sim": {"completed": 1, "n": 1}})
    assert "| ttft p50 | 67% | 33% | 1.50 |" in text


def test_live_noise_keeps_an_outlier_at_its_own_frequency() -> None:
    """One 40x step among 2,000: the simulator's noise has it once in 2,000 draws, not in the top 0.5 %."""
    model = StepLatencyModel(a=2.0, b=0.02)
    steps = [(0, 4, 400, 0.0, model.step_ms(0, 4, 400) * (1.0 + 0.0001 * i)) for i in range(1999)]
    steps.append((0, 4, 400, 0.0, model.step_ms(0, 4, 400) * 40.0))
    q = live_noise(model, steps)["step_noise"]
    assert len(q) == 2000 and q[-1] == pytest.approx(40.0) and q[-2] < 1.3
    # the simulator interpolates between neighbours: draws above 2x come only from the last interval
    assert sum(1 for a, b in zip(q, q[1:], strict=False) if b > 2.0) / (len(q) - 1) == pytest.approx(1 / 1999)
    summary = noise_summary(q)  # what the result files keep
    assert len(summary) == NOISE_POINTS and summary[-1] == pytest.approx(40.0) and summary[0] == pytest.approx(1.0)

"""Tests for the discrete-event simulator (bench.sim): timing, conservation, splits, KV, determinism."""

from __future__ import annotations

from dataclasses import dataclass

import pytest

from bench.sim.config import SimConfig
from bench.sim.migration import KIND_MOVED, Move
from bench.sim.policies import build_policy
from bench.sim.predictors import NoisyOraclePredictor
from bench.sim.simulator import Simulator
from bench.traces import TraceRequest, poisson_from_lengths
from broker.cluster_state import ClusterState, RequestInfo
from dynaserve.metrics import is_completed, summarize
from dynaserve.split import Plan, tokens_emitted_by_a


@dataclass
class ForcedSplit:
    """Test policy: every request on instances i0 -> i1, split at ``prompt_len + offset`` (clamped)."""

    offset: int
    name: str = "forced"

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        s = max(1, req.prompt_len + self.offset)
        return Plan.make("i0", "i1", req.prompt_len, req.max_tokens, s)


def trace(n: int = 200, rate: float = 20.0, seed: int = 3) -> list[TraceRequest]:
    return poisson_from_lengths("sharegpt", rate, n, seed)


def run(cfg: SimConfig, policy: object, reqs: list[TraceRequest], max_tokens: int | None = None,
        ttft: float = 5000.0, predictor: object | None = None):  # noqa: ANN201
    sim = Simulator(cfg, policy, predictor)  # type: ignore[arg-type]
    return sim, sim.run(reqs, ttft, 100.0, max_tokens=max_tokens)


def test_same_seed_same_result() -> None:
    cfg = SimConfig(instances=4)
    reqs = trace(300, 40.0)
    outs = []
    for _ in range(2):
        pol = build_policy("dynaserve", cfg.pricing())
        _, res = run(cfg, pol, reqs, max_tokens=2048, predictor=NoisyOraclePredictor(0.5, seed=1))
        outs.append([(r.kind, r.split, r.instance_a, r.instance_b, tuple(r.token_ts)) for r in res.records])
    assert outs[0] == outs[1]


def test_single_request_timeline_matches_step_model() -> None:
    cfg = SimConfig(instances=1)
    m = cfg.step_model
    p, o, t0 = 300, 5, 1.5
    _, res = run(cfg, build_policy("colocate", cfg.pricing()), [TraceRequest(t0, p, o)])
    (rec,) = res.records
    t = t0 + m.step_ms(p, 0, 0, m.chunk_attn(p, 0)) / 1000.0  # whole prompt in one step (budget 8192)
    expected = [t]
    for k in range(o - 1):  # then one decode step per token, context p, p+1, ...
        t += m.step_ms(0, 1, p + k) / 1000.0
        expected.append(t)
    assert rec.token_ts == pytest.approx(expected, abs=1e-9)
    assert rec.finish_reason == "length" and rec.kind == "none"


def test_chunked_prefill_respects_budget() -> None:
    cfg = SimConfig(instances=1, max_batched_tokens=256)
    m = cfg.step_model
    p = 600
    _, res = run(cfg, build_policy("colocate", cfg.pricing()), [TraceRequest(0.0, p, 2)])
    t = sum(m.step_ms(c, 0, 0, m.chunk_attn(c, done)) for c, done in ((256, 0), (256, 256), (88, 512))) / 1000.0
    assert res.records[0].token_ts[0] == pytest.approx(t, abs=1e-9)


@pytest.mark.parametrize("max_tokens", [None, 512])
@pytest.mark.parametrize("policy", ["colocate", "disagg", "dynaserve", "oracle"])
def test_conservation(policy: str, max_tokens: int | None) -> None:
    cfg = SimConfig(instances=4)
    reqs = trace(150, 30.0)
    _, res = run(cfg, build_policy(policy, cfg.pricing()), reqs, max_tokens=max_tokens)
    assert len(res.records) == len(reqs)
    for r, q in zip(res.records, reqs, strict=True):
        assert is_completed(r), r
        want = q.output_tokens if max_tokens is None else min(q.output_tokens, max_tokens)
        assert len(r.token_ts) == want
        assert r.finish_reason == ("length" if want == r.max_tokens else "stop")
        assert r.token_ts == sorted(r.token_ts) and r.token_ts[0] >= r.submit_ts
    if policy == "colocate":
        assert all(r.kind == "none" for r in res.records)
    assert summarize(res.records, res.span_s).failed == 0


@pytest.mark.parametrize("offset,kind", [(-100, "prompt"), (0, "pd"), (10, "decode")])
def test_split_requests_continue_on_b(offset: int, kind: str) -> None:
    cfg = SimConfig(instances=2)
    p, o = 400, 50
    sim, res = run(cfg, ForcedSplit(offset), [TraceRequest(0.0, p, o)])
    (rec,) = res.records
    assert rec.kind == kind and rec.instance_a == "i0" and rec.instance_b == "i1"
    assert len(rec.token_ts) == o and rec.finish_reason == "length"
    s = p + offset
    ea = tokens_emitted_by_a(p, o, s)
    a, b = sim.instances
    assert len(a.step_ends) >= 1 and len(b.step_ends) >= o - ea  # B decoded the rest
    # A's KV was freed after B's pull; everything is released at the end
    assert a.free_blocks == a.total_blocks and b.free_blocks == b.total_blocks
    assert res.stats["transfers"] == 1
    if ea:  # the gap across the handoff includes the transfer of s positions
        gap = rec.token_ts[ea] - rec.token_ts[ea - 1]
        assert gap >= cfg.transfer_ms(s) / 1000.0


@pytest.mark.parametrize("offset", [0, -100])
def test_early_pulls_read_before_the_handoff(offset: int) -> None:
    p, o = 4000, 20
    runs = {}
    for tail in (0, 128):
        cfg = SimConfig(instances=2, max_batched_tokens=1024, link_gbps=2.0, early_pull_tail_tokens=tail,
                        early_tail_auto=False)
        sim, res = run(cfg, ForcedSplit(offset), [TraceRequest(0.0, p, o)])
        (rec,) = res.records
        assert len(rec.token_ts) == o and rec.finish_reason == "length"
        a, b = sim.instances
        assert a.free_blocks == a.total_blocks and b.free_blocks == b.total_blocks
        runs[tail] = (res.stats, rec)
    (plain, rec0), (early, rec1) = runs[0], runs[128]
    s = p + offset
    assert plain["early_pulls"] == 0 and early["early_pulls"] == 1
    # without: the whole pull after A's part; with: B read each chunk's blocks while A computed the next, on a
    # 2 GB/s link slower than A's prefill, so part of the early reads and the tail's transfer are left
    cfg = SimConfig(instances=2, link_gbps=2.0, early_pull_tail_tokens=128, early_tail_auto=False)
    assert plain["transfer_ms"] == pytest.approx(cfg.transfer_ms(s))
    tail = s - cfg.early_pull_end(s)
    assert tail >= 128 and early["transfer_ms"] < plain["transfer_ms"]
    assert early["transfer_ms"] >= cfg.transfer_ms(tail) - 1e-9
    assert rec1.token_ts[-1] < rec0.token_ts[-1]
    # a 25 GB/s link keeps up with A's prefill: only the tail's transfer is left after A's part
    fast = SimConfig(instances=2, max_batched_tokens=1024, early_pull_tail_tokens=128,
                     early_tail_auto=False)
    _, res = run(fast, ForcedSplit(offset), [TraceRequest(0.0, p, o)])
    assert res.stats["early_pulls"] == 1 and res.stats["transfer_ms"] == pytest.approx(fast.transfer_ms(tail))


@pytest.mark.parametrize("offset", [10, 300])
def test_early_pulls_of_a_decode_handoff(offset: int) -> None:
    """s > p: B reads the prompt's blocks as A prefills and, past the tail's start, the blocks A's decode
    steps completed; at the handoff only the rest moves (the last few decode positions, or the tail)."""
    p, o = 4000, 400
    s = p + offset
    runs = {}
    for tail in (0, 128):
        cfg = SimConfig(instances=2, max_batched_tokens=1024, early_pull_tail_tokens=tail,
                        early_tail_auto=False)
        sim, res = run(cfg, ForcedSplit(offset), [TraceRequest(0.0, p, o)])
        (rec,) = res.records
        assert rec.kind == "decode" and len(rec.token_ts) == o and rec.finish_reason == "length"
        a, b = sim.instances
        assert a.free_blocks == a.total_blocks and b.free_blocks == b.total_blocks
        runs[tail] = (cfg, res.stats, rec)
    (cfg0, plain, rec0), (cfg, early, rec1) = runs[0], runs[128]
    assert plain["early_pulls"] == 0 and plain["transfer_ms"] == pytest.approx(cfg0.transfer_ms(s))
    assert early["early_pulls"] == 1
    read_early = max(p // cfg.block_size * cfg.block_size, cfg.early_pull_end(s))
    assert s - read_early == (offset if offset < 128 else s - cfg.early_pull_end(s))
    # a 25 GB/s link reads A's earlier blocks within a decode step: only the rest moves after A's part
    assert early["transfer_ms"] == pytest.approx(cfg.transfer_ms(s - read_early))
    ea = tokens_emitted_by_a(p, o, s)
    assert rec1.token_ts[ea] - rec1.token_ts[ea - 1] < rec0.token_ts[ea] - rec0.token_ts[ea - 1]


def test_the_broker_s_tail_leaves_less_transfer_after_a_one_step_prefill() -> None:
    """A 4,000-token PD split whose prompt fits one step: with the worker's own 128-position tail, B reads A's
    first chunk (3,872 positions, 20 ms at 25 GB/s) only after it, while A prefills just the 128 more. The tail
    the broker picks (Pricing.early_tail) is long enough for A's second chunk to cover that read, so less of the
    transfer is left after A's part and B's first token comes sooner."""
    p, o = 4000, 20
    got = {}
    for auto in (False, True):
        cfg = SimConfig(instances=2, max_batched_tokens=8192, early_pull_tail_tokens=128, early_tail_auto=auto)
        sim, res = run(cfg, ForcedSplit(0), [TraceRequest(0.0, p, o)])
        (rec,) = res.records
        assert res.stats["early_pulls"] == 1 and len(rec.token_ts) == o
        got[auto] = (res.stats["transfer_ms"], rec.token_ts[1] - rec.token_ts[0], sim)
    (fixed_ms, fixed_gap, _), (auto_ms, auto_gap, sim) = got[False], got[True]
    pricing = sim.cfg.pricing()
    a = sim.cluster.instances["i0"]
    tail = pricing.early_tail(a, sim.cluster.instances["i1"], p, p, sim.cfg.tbt_slo_ms)[0]
    assert tail > 128 and (p - tail) % sim.cfg.block_size == 0
    assert auto_ms < fixed_ms and auto_gap < fixed_gap


def test_early_pulls_of_a_decode_handoff_on_a_slow_link() -> None:
    """At 0.5 GB/s the prompt's early reads fall behind A; they still end before the whole pull would."""
    p, o = 4000, 400
    got = {}
    for tail in (0, 128):
        cfg = SimConfig(instances=2, max_batched_tokens=1024, link_gbps=0.5, early_pull_tail_tokens=tail)
        _, res = run(cfg, ForcedSplit(10), [TraceRequest(0.0, p, o)])
        got[tail] = res.stats["transfer_ms"]
    assert cfg.transfer_ms(10) < got[128] < got[0]


def test_a_prefill_sharing_its_step_is_not_split_for_an_early_pull() -> None:
    """As the live scheduler: A's prefill is cut where the tail begins only when it is the step's one prefill.
    Three PD splits at once: the first starts a step alone (cut there: B reads its blocks before the tail);
    the other two share the next step, which both prompts fit: neither is cut, both chunks reach the split,
    nothing of theirs is read early."""
    cfg = SimConfig(instances=2, max_batched_tokens=8192, early_pull_tail_tokens=128)
    _, res = run(cfg, ForcedSplit(0), [TraceRequest(0.0, 2000, 20) for _ in range(3)])
    assert res.stats["early_pulls"] == 1 and res.stats["transfers"] == 3


def test_early_reads_take_b_s_link_in_turn() -> None:
    """Two long PD splits on a 0.5 GB/s link: the second's early reads queue behind the first's reads and
    handoff on B's link (serialize_transfers), so its handoff waits longer than with a link per transfer."""
    reqs = [TraceRequest(0.0, 4000, 20), TraceRequest(0.0, 4000, 20)]
    waits = {}
    for serialize in (False, True):
        cfg = SimConfig(instances=2, max_batched_tokens=1024, link_gbps=0.5, early_pull_tail_tokens=128,
                        serialize_transfers=serialize)
        _, res = run(cfg, ForcedSplit(0), reqs)
        assert res.stats["early_pulls"] == 2 and len(res.records) == 2
        waits[serialize] = res.stats["transfer_ms"]
    assert waits[True] > waits[False]


def test_early_pull_tail_must_not_be_negative() -> None:
    with pytest.raises(ValueError, match="early_pull_tail_tokens"):
        SimConfig(early_pull_tail_tokens=-1)


def test_output_ending_on_a_aborts_b() -> None:
    cfg = SimConfig(instances=2)
    # max_tokens 100 but the true output is 5: A (split at p + 20) emits all 5 and B never runs
    sim, res = run(cfg, ForcedSplit(20), [TraceRequest(0.0, 200, 5)], max_tokens=100)
    (rec,) = res.records
    assert len(rec.token_ts) == 5 and rec.finish_reason == "stop"
    assert res.stats["transfers"] == 0
    b = sim.instances[1]
    assert b.step_ends == [] and b.qp == 0 and b.pd == 0


def test_kv_capacity_never_exceeded() -> None:
    cfg = SimConfig(instances=2, gpu_memory_gb=18.6)  # ~6k KV tokens per instance
    cap = cfg.kv_capacity_tokens
    assert 2000 < cap < 10000
    reqs = [TraceRequest(0.01 * i, 700, 300) for i in range(40)] + [TraceRequest(1.0, cap + 100, 10)]
    for policy in ("colocate", "dynaserve"):
        sim, res = run(cfg, build_policy(policy, cfg.pricing()), reqs)
        assert res.stats["min_free_kv_tokens"] >= 0
        for inst in sim.instances:
            assert inst.free_blocks == inst.total_blocks
        done = [r for r in res.records if is_completed(r)]
        assert len(done) == 40  # the oversized request fails, the others all complete
        assert res.records[-1].error == "no_capacity"


@pytest.mark.parametrize("offset", [None, -100, 0, 40])
def test_on_demand_kv_preempts_and_recomputes(offset: int | None) -> None:
    """Outputs outgrow the KV: the newest sequences are preempted, recompute, and still emit every token."""
    cfg = SimConfig(instances=2, gpu_memory_gb=18.6)  # ~6k KV tokens per instance
    reqs = [TraceRequest(0.001 * i, 300, 400) for i in range(30)]  # 30 x 700 tokens > 2 x ~6k
    policy = build_policy("colocate", cfg.pricing()) if offset is None else ForcedSplit(offset)
    sim, res = run(cfg, policy, reqs, max_tokens=2048)
    assert res.stats["preemptions"] > 0
    assert res.stats["min_free_kv_tokens"] >= 0
    for rec, req in zip(res.records, sim.requests, strict=True):
        assert is_completed(rec) and req.emitted == 400 and len(req.token_ts) == 400
        assert req.token_ts == sorted(req.token_ts)
    for inst in sim.instances:
        assert inst.free_blocks == inst.total_blocks and inst.qp == 0 and inst.pd == 0 and inst.dctx == 0
    # reserving prompt + max_tokens never preempts: the same requests wait for admission instead
    sim2, res2 = run(SimConfig(instances=2, gpu_memory_gb=18.6, kv_alloc="reserve"), policy, reqs, max_tokens=2048)
    assert res2.stats["preemptions"] == 0
    assert all(is_completed(r) for r in res2.records)


def test_loads_reported_to_the_broker() -> None:
    cfg = SimConfig(instances=2, report_interval_ms=20.0)
    sim = Simulator(cfg, build_policy("colocate", cfg.pricing()))
    reqs = [TraceRequest(0.0, 3000, 200), TraceRequest(0.001, 3000, 200)]
    sim.run(reqs, 5000.0)
    for inst in sim.cluster.instances.values():  # the last report shows idle instances
        assert inst.queued_prefill_tokens == 0 and inst.running_seqs == 0 and inst.kv_used_tokens == 0
        assert inst.last_report > 0


@dataclass
class Watching:
    """Test policy: colocate's plans; records, at every placement, how many instances the cluster view gets
    wrong (queued prefill or running sequences differ from the simulator's instance)."""

    inner: object
    sim: Simulator | None = None
    stale: list[int] | None = None
    name: str = "watching"

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        assert self.sim is not None and self.stale is not None
        self.stale.append(sum(
            1 for inst in self.sim.instances
            if (cluster.instances[inst.id].queued_prefill_tokens, cluster.instances[inst.id].running_seqs)
            != (inst.qp, len(inst.decoding))
        ))
        return self.inner.plan(req, cluster, now)  # type: ignore[attr-defined,no-any-return]


@pytest.mark.parametrize("exact", [False, True])
def test_exact_state_shows_the_policy_every_instance_as_it_is(exact: bool) -> None:
    cfg = SimConfig(instances=3, report_interval_ms=20.0, exact_state=exact)
    pol = Watching(build_policy("colocate", cfg.pricing()), stale=[])
    sim = Simulator(cfg, pol)  # type: ignore[arg-type]
    pol.sim = sim
    reqs = [TraceRequest(0.007 * i, 2000 + 37 * i, 20) for i in range(60)]  # arrivals between report ticks
    sim.run(reqs, 5000.0)
    assert len(pol.stale) == 60
    if exact:
        assert sum(pol.stale) == 0
    else:  # the control: between ticks the view lags the instances
        assert sum(pol.stale) > 0


def test_live_truth_adds_overhead_and_replays_noise_quantiles() -> None:
    from bench.sim.simulator import linear_truth, live_truth

    base = linear_truth(SimConfig())
    assert live_truth(base, SimConfig(), 0) is base
    plain = base([(100, 0)], 4, 400, 0.0)
    over = live_truth(base, SimConfig(step_overhead_ms=1.5, step_overhead_per_seq_ms=0.25), 0)
    assert over([(100, 0)], 4, 400, 0.0) == pytest.approx(plain + 1.5 + 5 * 0.25)
    noisy = live_truth(base, SimConfig(step_noise=(0.5, 1.0, 2.0)), 7)
    draws = [noisy([(100, 0)], 4, 400, 0.0) / plain for _ in range(4000)]
    assert 0.5 <= min(draws) < 0.55 and 1.95 < max(draws) <= 2.0
    assert sorted(draws)[2000] == pytest.approx(1.0, abs=0.05)  # the middle quantile
    again = live_truth(base, SimConfig(step_noise=(0.5, 1.0, 2.0)), 7)
    assert [again([(100, 0)], 4, 400, 0.0) / plain for _ in range(4000)] == draws  # seeded
    with pytest.raises(ValueError, match="non-decreasing"):
        SimConfig(step_noise=(1.2, 0.9))


def test_live_truth_gives_steps_with_prefill_their_own_noise() -> None:
    from bench.sim.simulator import linear_truth, live_truth

    base = linear_truth(SimConfig())
    split = live_truth(base, SimConfig(step_noise=(0.9, 1.1), step_noise_prefill=(1.5, 2.5)), 3)
    decode = [split([], 4, 400, 0.0) / base([], 4, 400, 0.0) for _ in range(2000)]
    mixed = [split([(100, 0)], 4, 400, 0.0) / base([(100, 0)], 4, 400, 0.0) for _ in range(2000)]
    assert 0.9 <= min(decode) and max(decode) <= 1.1
    assert 1.5 <= min(mixed) and max(mixed) <= 2.5 and sorted(mixed)[1000] == pytest.approx(2.0, abs=0.05)
    with pytest.raises(ValueError, match="needs step_noise"):
        SimConfig(step_noise_prefill=(1.0, 1.2))
    extra = live_truth(base, SimConfig(step_overhead_ms=0.5, step_overhead_prefill_ms=3.0), 3)
    assert extra([], 4, 400, 0.0) == pytest.approx(base([], 4, 400, 0.0) + 0.5)
    assert extra([(100, 0)], 4, 400, 0.0) == pytest.approx(base([(100, 0)], 4, 400, 0.0) + 3.5)
    with pytest.raises(ValueError, match="overheads"):
        SimConfig(step_overhead_prefill_ms=-1.0)
    with pytest.raises(ValueError, match="step_noise_prefill must be"):
        SimConfig(step_noise=(1.0, 1.1), step_noise_prefill=(1.0,))


def test_delivery_jitter_replays_measured_runs_in_order() -> None:
    reqs = trace(50, rate=5.0)
    _, base = run(SimConfig(instances=2), build_policy("colocate", SimConfig().pricing()), reqs)
    cfg = SimConfig(instances=2, path_latency_ms=1.0, delivery_jitter_ms=((0.0, 0.0, 0.0, 30.0), (-0.5,)))
    _, late = run(cfg, build_policy("colocate", cfg.pricing()), reqs)
    extra, bunched = [], 0
    for a, b in zip(base.records, late.records, strict=True):
        assert b.token_ts == sorted(b.token_ts)  # first in, first out
        extra += [(y - x) * 1000.0 - 1.0 for x, y in zip(a.token_ts, b.token_ts, strict=True)]
        bunched += sum(1 for x, y in zip(b.token_ts, b.token_ts[1:], strict=False) if y == x)
    assert min(extra) == pytest.approx(-0.5) and max(extra) <= 30.0 + 1e-6
    assert any(e == pytest.approx(30.0) for e in extra) and any(e == pytest.approx(0.0) for e in extra)
    assert bunched > 0  # a held-up token lets the next ones catch up: they arrive together, as live
    _, again = run(cfg, build_policy("colocate", cfg.pricing()), reqs)
    assert [r.token_ts for r in again.records] == [r.token_ts for r in late.records]  # seeded
    with pytest.raises(ValueError, match="delivery_jitter_ms"):
        SimConfig(delivery_jitter_ms=((1.0,), ()))


def test_path_latency_delays_every_token_at_the_client() -> None:
    reqs = trace(50, rate=5.0)
    _, base = run(SimConfig(instances=2), build_policy("colocate", SimConfig().pricing()), reqs)
    _, late = run(SimConfig(instances=2, path_latency_ms=3.0, path_latency_per_prompt_token_ms=0.001),
                  build_policy("colocate", SimConfig().pricing()), reqs)
    for a, b in zip(base.records, late.records, strict=True):
        assert b.token_ts == pytest.approx([t + 0.003 + 1e-6 * a.prompt_tokens for t in a.token_ts])


@dataclass
class MoveOnce:
    """Test policy: everything unsplit on i0; at the first tick after ``at`` s, move r0's decode to i1."""

    at: float
    name: str = "move-once"
    done: bool = False

    def plan(self, req: RequestInfo, cluster: ClusterState, now: float) -> Plan | None:
        return Plan.whole("i0", req.prompt_len, req.max_tokens)

    def moves(self, cluster: ClusterState, decoding_on: object, now: float) -> list[Move]:
        if self.done or now < self.at:
            return []
        got = [d for d in decoding_on("i0") if d.req_id == "r0"]  # type: ignore[operator]
        if not got:
            return []
        self.done = True
        assert got[0].instance == "i0" and got[0].context == 300 + got[0].generated - 1
        return [Move("r0", "i0", "i1")]


def test_a_decode_moved_at_run_time_continues_on_b() -> None:
    """The run-time handoff: A stops after the step it runs, B pulls the positions A computed and emits the
    rest; every token is emitted once, in order, and both instances end with nothing held."""
    cfg = SimConfig(instances=2)
    p, o = 300, 80
    pol = MoveOnce(at=0.5)
    sim, res = run(cfg, pol, [TraceRequest(0.0, p, o)])
    (rec,) = res.records
    assert pol.done and res.stats["moves"] == 1 and res.stats["transfers"] == 1
    assert rec.kind == KIND_MOVED and rec.instance_a == "i0" and rec.instance_b == "i1"
    assert len(rec.token_ts) == o and rec.token_ts == sorted(rec.token_ts) and rec.finish_reason == "length"
    ea = rec.split - p + 1  # tokens A emitted: the split is the positions it computed
    assert 1 < ea < o
    a, b = sim.instances
    longest_step = max(a.step_ends[i + 1] - a.step_ends[i] for i in range(len(a.step_ends) - 1))
    assert rec.token_ts[ea - 1] <= 0.5 + cfg.report_interval_ms / 1000.0 + longest_step  # the tick, then one step
    assert rec.token_ts[ea] - rec.token_ts[ea - 1] >= cfg.transfer_ms(rec.split) / 1000.0
    assert len(b.step_ends) >= o - ea
    for inst in sim.instances:
        assert inst.free_blocks == inst.total_blocks and inst.qp == 0 and inst.pd == 0 and inst.dctx == 0


@pytest.mark.parametrize("into", ["full", "idle"])
def test_run_time_handoffs_under_load_conserve_every_token(into: str) -> None:
    cfg = SimConfig(instances=4, gpu_memory_gb=24.0, max_num_seqs=32)  # small engines: they fill up and preempt
    reqs = trace(400, 60.0)
    sim, res = run(cfg, build_policy("dynaserve-migrate", cfg.pricing(), into=into), reqs, max_tokens=2048,
                   predictor=NoisyOraclePredictor(0.0, seed=1))
    assert res.stats["moves"] > 0
    moved = [r for r in res.records if r.kind == KIND_MOVED]
    assert len(moved) == res.stats["moves"]
    for r, q in zip(res.records, reqs, strict=True):
        assert is_completed(r) and len(r.token_ts) == q.output_tokens and r.token_ts == sorted(r.token_ts)
    for inst in sim.instances:
        assert inst.free_blocks == inst.total_blocks and inst.qp == 0 and inst.pd == 0 and inst.dctx == 0


def test_a_mixed_cluster_runs_each_instance_on_its_gpu_and_prices_it_so() -> None:
    """Instances alternate A100 and H100: each steps at its own GPU's speed, and with the step models
    advertised (the default, as workers do) the policy sends the H100s more of a burst; priced as one GPU
    (advertise_step_models=False) it splits the burst evenly."""
    reqs = [TraceRequest(1.0, 2000, 4) for _ in range(40)]  # one burst of equal prompts
    placed = {}
    for advertise in (True, False):
        cfg = SimConfig(instances=2, gpu="a100,h100", advertise_step_models=advertise)
        assert cfg.gpus == ["a100", "h100"] and cfg.step_model is cfg.step_models["a100"]
        sim, res = run(cfg, build_policy("colocate", cfg.pricing()), reqs)
        assert [i.sched.model for i in sim.instances] == [cfg.step_models["a100"], cfg.step_models["h100"]]
        assert all(is_completed(r) for r in res.records)
        placed[advertise] = sum(r.instance_a == "i1" for r in res.records)
    assert placed[False] == 20 and placed[True] >= 26, placed
    with pytest.raises(ValueError, match="comma list"):
        SimConfig(gpu="a100,b300")


def test_advertised_models_change_nothing_on_a_uniform_cluster() -> None:
    reqs = trace(300, 40.0)
    outs = []
    for advertise in (True, False):
        cfg = SimConfig(instances=4, advertise_step_models=advertise)
        _, res = run(cfg, build_policy("dynaserve", cfg.pricing()), reqs, max_tokens=2048)
        outs.append([(r.kind, r.split, r.instance_a, r.instance_b, tuple(r.token_ts)) for r in res.records])
    assert outs[0] == outs[1]

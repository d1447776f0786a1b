"""The global scheduler: colocate, disagg and dynaserve policies, commit, forced plans and pricing.

Prices are computed by hand with a simple step model: a = 2 ms, b = 0.25 ms per prefill token, c = 1 ms
per decode sequence, no context or attention terms; TBT SLO 100 ms with a 50% margin (50 ms per step) and
at most 512 tokens per step. An idle instance then prefills at m = (2 + 0.25 * 512) / 512 = 0.25390625 ms
per token, and every decode token costs 1 ms.
"""

from __future__ import annotations

import dataclasses

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from broker.cluster_state import (
    SCALE_RANGE,
    ClusterState,
    InstanceState,
    Pricing,
    RequestInfo,
    best_early_tail,
    exposed_transfer_ms,
)
from broker.scheduler import (
    POLICIES,
    BalancePolicy,
    ColocatePolicy,
    DisaggPolicy,
    DynaServePolicy,
    commit,
    first_decode_cost,
    forced_plan,
    make_policy,
)
from dynaserve.costmodel import StepLatencyModel
from dynaserve.split import KIND_DECODE, KIND_NONE, KIND_PD, KIND_PROMPT, Plan

MODEL = StepLatencyModel(a=2.0, b=0.25, c=1.0, d=0.0, e=0.0)
PRICING = Pricing(MODEL, tbt_margin=0.5, max_batched_tokens=512, min_chunk_tokens=16, handoff_ms=2.0)
FIXED_TAIL = dataclasses.replace(PRICING, early_tail_auto=False)  # every A pulls early with its advertised tail
AUTO_TAIL = dataclasses.replace(PRICING, early_tail_auto=True)  # the broker picks each split's tail
M_IDLE = 0.25390625  # ms per prefill token on an instance without running decodes
SLO = 100.0
BIG = 1 << 30


def req(p: int, o: int, predicted: int | None = None, rid: str = "r") -> RequestInfo:
    return RequestInfo(rid, p, o, o if predicted is None else predicted, 2000.0, SLO)


def inst(iid: str, kv: int = BIG, **kw: object) -> InstanceState:
    return InstanceState(iid, kv_capacity_tokens=kv, **kw)  # type: ignore[arg-type]


def cluster(*insts: InstanceState) -> ClusterState:
    c = ClusterState()
    for i in insts:
        c.add(i)
    return c


# ----------------------------------------------------------------------------------- pricing


def test_idle_prices_by_hand() -> None:
    idle = inst("w0")
    assert PRICING.prefill_budget(idle, SLO) == 512
    assert PRICING.prefill_ms_per_token(idle, SLO) == M_IDLE
    assert PRICING.decode_ms_per_token(idle, 5000) == 1.0
    busy = inst("w1", queued_prefill_tokens=100, pending_decode_tokens=10)
    assert PRICING.work_ms(busy, SLO) == pytest.approx(100 * M_IDLE + 10 * 1.0)


@pytest.mark.parametrize(
    ("running", "budget", "ms_per_token"),
    [
        (0, 512, 130 / 512),
        (8, 160, 50 / 160),  # room 50 - 2 - 8 = 40 ms -> 160 tokens, step 50 ms
        (40, 32, 50 / 32),
        (46, 16, 52 / 16),  # room 2 ms -> 8 tokens, raised to min_chunk_tokens
        (100, 16, 106 / 16),  # no room at all: still min_chunk_tokens
    ],
)
def test_prefill_rate_under_decode_load(running: int, budget: int, ms_per_token: float) -> None:
    i = inst("w", running_seqs=running)
    assert PRICING.prefill_budget(i, SLO) == budget
    assert PRICING.prefill_ms_per_token(i, SLO) == pytest.approx(ms_per_token)


def test_prefill_price_is_monotonic_in_decode_load() -> None:
    pricing = Pricing(StepLatencyModel(), handoff_ms=2.0)  # default model: context matters too
    for ctx_per_seq in (0, 100, 2000):
        budgets, prices = [], []
        for running in (0, 1, 2, 8, 32, 128, 512, 2048):
            i = inst("w", running_seqs=running, decode_ctx_tokens=running * ctx_per_seq)
            budgets.append(pricing.prefill_budget(i, SLO))
            prices.append(pricing.prefill_ms_per_token(i, SLO))
        assert budgets == sorted(budgets, reverse=True)
        assert prices == sorted(prices)
        assert prices[-1] > prices[0]  # heavy decode load makes prefill really dearer
    # more context at the same number of sequences also costs
    light = inst("w", running_seqs=64, decode_ctx_tokens=64 * 10)
    heavy = inst("w", running_seqs=64, decode_ctx_tokens=64 * 100_000)
    assert pricing.prefill_budget(heavy, SLO) < pricing.prefill_budget(light, SLO)
    assert pricing.prefill_ms_per_token(heavy, SLO) > pricing.prefill_ms_per_token(light, SLO)


def test_transfer_price() -> None:
    assert PRICING.transfer_ms_per_token(inst("w")) == 0.0
    i = inst("w", kv_bytes_per_token=131072)
    assert PRICING.transfer_ms_per_token(i) == pytest.approx(131072 / 25e6)  # 25 GB/s = 25e6 bytes/ms
    assert Pricing(MODEL, transfer_gbps=0.0).transfer_ms_per_token(i) == 0.0


def test_handoff_transfer_price_with_early_pulls() -> None:
    x = 1_500_000 / 25e6  # 0.06 ms per token
    a, b = inst("a", early_pull_tail_tokens=128), inst("b", kv_bytes_per_token=1_500_000, early_pull_tail_tokens=1)
    # A computes 1000 - 512 positions after its first chunk (budget 512): 123.9 ms, more than the early part's
    # 872 x 0.06 = 52.3 ms; only the tail's transfer remains
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 1000, 1000, SLO) == pytest.approx(128 * x)
    # ten times slower link: the early part's 523 ms less those 123.9 ms show too
    slow = inst("b", kv_bytes_per_token=15_000_000, early_pull_tail_tokens=1)
    assert FIXED_TAIL.handoff_transfer_ms(a, slow, 1000, 1000, SLO) == pytest.approx(
        128 * 10 * x + (872 * 10 * x - 488 * M_IDLE))
    # one chunk before the tail (472 <= 512): A's last 128 positions cover the early part's 28.3 ms
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 600, 1000, SLO) == pytest.approx(128 * x)
    assert FIXED_TAIL.handoff_transfer_ms(a, slow, 600, 1000, SLO) == pytest.approx(
        128 * 10 * x + (472 * 10 * x - 128 * M_IDLE))
    # the whole transfer without them: B does not pull early, A does not publish, a decode handoff, a short split
    plain = inst("b0", kv_bytes_per_token=1_500_000)
    assert FIXED_TAIL.handoff_transfer_ms(a, plain, 1000, 1000, SLO) == pytest.approx(1000 * x)
    assert FIXED_TAIL.handoff_transfer_ms(inst("a0"), b, 1000, 1000, SLO) == pytest.approx(1000 * x)
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 100, 1000, SLO) == pytest.approx(100 * x)
    assert FIXED_TAIL.handoff_transfer_ms(inst("a0"), b, 1010, 1000, SLO) == pytest.approx(1010 * x)


def test_decode_handoff_transfer_price_with_early_pulls() -> None:
    """s > p: the prompt's blocks go as A prefills, the decode positions up to A's last 128 at one decode
    step each; what is left is the tail (at most the decode positions), plus the uncovered early part."""
    x = 1_500_000 / 25e6
    a, b = inst("a", early_pull_tail_tokens=128), inst("b", kv_bytes_per_token=1_500_000, early_pull_tail_tokens=1)
    slow = inst("b", kv_bytes_per_token=150_000_000, early_pull_tail_tokens=1)  # 100 times slower
    step = MODEL.step_ms(0, 1, 1000)  # A's decode step with this request alone
    assert FIXED_TAIL.decode_step_ms(a, 1000) == pytest.approx(step)
    # ten decode positions: they are the tail. The prompt's first 488 positions are read while A prefills
    # its last chunk, whose 512 positions (30.7 ms) are read during A's 10 decode steps (30 ms)
    assert step == 3.0
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 1010, 1000, SLO) == pytest.approx(10 * x + 512 * x - 10 * step)
    # 100 times slower link: the reads fall behind A, the prompt's 6,000 ms less A's 154 ms show
    assert FIXED_TAIL.handoff_transfer_ms(a, slow, 1010, 1000, SLO) == pytest.approx(
        10 * 100 * x + (1000 * 100 * x - 488 * M_IDLE - 10 * step))
    # 300 decode positions: the last 128 are the tail, the 172 before it and the last prefill chunk are covered
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 1300, 1000, SLO) == pytest.approx(128 * x)
    assert FIXED_TAIL.handoff_transfer_ms(a, slow, 1300, 1000, SLO) == pytest.approx(
        128 * 100 * x + (1172 * 100 * x - 488 * M_IDLE - 300 * step))
    # a decode handoff right after the prefill pays the last prefill chunk's read: classic PD stays cheaper
    assert FIXED_TAIL.handoff_transfer_ms(a, b, 1001, 1000, SLO) > FIXED_TAIL.handoff_transfer_ms(a, b, 1000, 1000, SLO)

def _least_exposed(s: int, x: float, first: int, a: float, p: int, a_step: float, block: int) -> float:
    """The least exposed transfer over every block-aligned first-chunk end, and no early pull."""
    return min([s * x] + [exposed_transfer_ms(s, x, s - end, first, a, p, a_step) for end in range(block, s, block)])


@settings(max_examples=400, deadline=None)
@given(p=st.integers(1, 5000), extra=st.integers(-4999, 600), x=st.floats(0.001, 3.0), a=st.floats(0.005, 1.0),
       first=st.integers(16, 8192), a_step=st.floats(0.0, 60.0), block=st.sampled_from([16, 128]),
       default=st.integers(1, 600))
def test_best_early_tail_is_the_least_exposed_block_boundary(p: int, extra: int, x: float, a: float, first: int,
                                                             a_step: float, block: int, default: int) -> None:
    s = max(2, p + extra)
    tail, cost = best_early_tail(s, x, first, a, p, a_step, block, default)
    assert cost == pytest.approx(_least_exposed(s, x, first, a, p, a_step, block), rel=1e-6, abs=1e-6)
    if tail == s:
        assert cost == pytest.approx(s * x)
    else:  # the tail begins at a block boundary, and the transfer is what it leaves
        assert 0 < tail < s and (s - tail) % block == 0
        assert cost == pytest.approx(exposed_transfer_ms(s, x, tail, first, a, p, a_step), rel=1e-6, abs=1e-6)


def test_best_early_tail_by_hand() -> None:
    """A 4,000-token prompt handed over whole (s = p) on a fast link (x = 0.005 ms per position), A prefilling at
    0.06 ms per position. With the first chunk at most 512 positions, the reads keep up with A: the tail only
    needs to cover the last early chunk's read, 512 x 0.005 = 2.56 ms, which 43 positions of A's prefill do; the
    first boundary at least that far before s leaves 48. With A's whole prompt in its first chunk (8,192), the
    last early chunk is all of it but the tail: (4000 - t) x = t a at t = 307.7, and the boundary at or past it
    leaves 320. The worker's own 128 would leave 128 x 0.005 = 0.64 ms and 3872 x 0.005 - 128 x 0.06 = 11.7 ms
    more exposed."""
    x, a = 0.005, 0.06
    assert best_early_tail(4000, x, 512, a, 4000, 0.0, 16, 128) == (48, pytest.approx(48 * x))
    assert best_early_tail(4000, x, 8192, a, 4000, 0.0, 16, 128) == (320, pytest.approx(320 * x))
    assert exposed_transfer_ms(4000, x, 128, 8192, a, 4000, 0.0) == pytest.approx(128 * x + 3872 * x - 128 * a)
    # a decode handoff 100 positions after a 4,000-token prompt, 20 ms decode steps: A's decode covers every read
    # but the last block's, so the shortest tail (s - 4096 = 4) is left
    assert best_early_tail(4100, x, 8192, a, 4000, 20.0, 16, 128) == (4, pytest.approx(4 * x))
    # 10 positions after a 1,000-token prompt: A publishes up to the boundary at 1008 during its decode steps,
    # and only 2 positions are left (the worker's own 128 would leave all 10 decode positions)
    assert best_early_tail(1010, x, 8192, a, 1000, 20.0, 16, 128) == (2, pytest.approx(2 * x))
    assert exposed_transfer_ms(1010, x, 130, 8192, a, 1000, 20.0) == pytest.approx(10 * x)


def test_pricing_picks_the_tail_for_the_link_and_a_load() -> None:
    """Pricing.early_tail: none without early pulls on both sides or for a prompt part within A's own tail; the
    advertised tail without early_tail_auto; else the least exposed."""
    x = 1_500_000 / 25e6  # 0.06 ms per token
    a, b = inst("a", early_pull_tail_tokens=128), inst("b", kv_bytes_per_token=1_500_000, early_pull_tail_tokens=1)
    plain = inst("b0", kv_bytes_per_token=1_500_000)
    assert AUTO_TAIL.early_tail(a, plain, 1000, 1000, SLO) == (0, pytest.approx(1000 * x))
    assert AUTO_TAIL.early_tail(inst("a0"), b, 1000, 1000, SLO) == (0, pytest.approx(1000 * x))
    assert AUTO_TAIL.early_tail(a, b, 100, 1000, SLO) == (0, pytest.approx(100 * x))  # one step for A, as before
    assert FIXED_TAIL.early_tail(a, b, 1000, 1000, SLO)[0] == 128
    tail, exposed = AUTO_TAIL.early_tail(a, b, 1000, 1000, SLO)
    budget, m = AUTO_TAIL.prefill_budget(a, SLO), AUTO_TAIL.prefill_ms_per_token(a, SLO)
    assert (tail, exposed) == best_early_tail(1000, x, budget, m, 1000, 0.0, a.block_size, 128)
    # the 512-position first chunk's read (30.7 ms) needs 121 positions of A's prefill: 120 leave 0.25 ms of it
    assert tail == 120 and exposed == pytest.approx(120 * x + 512 * x - 120 * M_IDLE)
    assert exposed < FIXED_TAIL.handoff_transfer_ms(a, b, 1000, 1000, SLO) == pytest.approx(128 * x)
    assert AUTO_TAIL.handoff_transfer_ms(a, b, 1000, 1000, SLO) == pytest.approx(exposed)


# ----------------------------------------------------------------------------------- colocate


def test_colocate_picks_least_loaded_and_never_splits() -> None:
    c = cluster(
        inst("w0", queued_prefill_tokens=100),  # 25.4 ms of work
        inst("w1", pending_decode_tokens=10),  # 10 ms
        inst("w2", queued_prefill_tokens=20),  # 5.1 ms
    )
    plan = ColocatePolicy(PRICING).plan(req(1000, 500, predicted=50), c, 0.0)
    assert plan == Plan("w2", None, 1500, KIND_NONE)  # split = p + max_tokens


def test_colocate_prices_prefill_under_decode_load() -> None:
    # w0 has a little queued prefill but 40 running decodes: its prefill costs 1.5625 ms per token
    c = cluster(inst("w0", running_seqs=40), inst("w1", queued_prefill_tokens=200))
    # w0: 100 * 1.5625 = 156.25; w1: 200 * m + 100 * m = 76.2
    assert ColocatePolicy(PRICING).plan(req(100, 10), c, 0.0) == Plan("w1", None, 110, KIND_NONE)


def test_colocate_respects_kv_and_liveness() -> None:
    pol = ColocatePolicy(PRICING)
    c = cluster(inst("w0", kv=100), inst("w1", queued_prefill_tokens=5000, kv=200), inst("w2", alive=False))
    assert pol.plan(req(90, 10), c, 0.0) == Plan("w0", None, 100, KIND_NONE)
    assert pol.plan(req(90, 11), c, 0.0) == Plan("w1", None, 101, KIND_NONE)  # w0 is one token short
    assert pol.plan(req(150, 60), c, 0.0) is None
    c.instances["w1"].kv_used_tokens = 150
    assert pol.plan(req(90, 11), c, 0.0) is None  # 50 tokens free on w1
    assert pol.plan(req(10, 10), cluster(inst("w0", alive=False)), 0.0) is None


# ----------------------------------------------------------------------------------- disagg


def test_disagg_first_instances_prefill_rest_decode() -> None:
    c = cluster(inst("w0", queued_prefill_tokens=4000), inst("w1", pending_decode_tokens=500), inst("w2"))
    plan = DisaggPolicy(PRICING).plan(req(100, 20), c, 0.0)
    assert plan == Plan("w0", "w2", 100, KIND_PD)  # A is the only prefill instance, however loaded
    plan = DisaggPolicy(PRICING, prefill_instances=2).plan(req(100, 20), c, 0.0)
    assert plan == Plan("w1", "w2", 100, KIND_PD)  # w1 has less work than w0
    # never more prefill instances than leave one for decode
    assert DisaggPolicy(PRICING, prefill_instances=9).pools(c)[1] == [c.instances["w2"]]


def test_disagg_explicit_pools() -> None:
    c = cluster(inst("w0", pool="decode"), inst("w1", pool="decode", pending_decode_tokens=50), inst("w2", pool="prefill"))
    assert DisaggPolicy(PRICING).plan(req(64, 8), c, 0.0) == Plan("w2", "w0", 64, KIND_PD)
    c.instances["w0"].pending_decode_tokens = 80
    assert DisaggPolicy(PRICING).plan(req(64, 8), c, 0.0) == Plan("w2", "w1", 64, KIND_PD)


def test_disagg_single_output_token_is_unsplit() -> None:
    c = cluster(inst("w0"), inst("w1"))
    assert DisaggPolicy(PRICING).plan(req(64, 1), c, 0.0) == Plan("w0", None, 65, KIND_NONE)


def test_disagg_without_a_usable_pool_plans_nothing() -> None:
    c = cluster(inst("w0"), inst("w1", alive=False))
    assert DisaggPolicy(PRICING).plan(req(64, 8), c, 0.0) is None
    c = cluster(inst("w0", kv=32), inst("w1"))
    assert DisaggPolicy(PRICING).plan(req(64, 8), c, 0.0) is None  # the prefill instance is too small
    c = cluster(inst("w0"), inst("w1", kv=70))
    assert DisaggPolicy(PRICING).plan(req(64, 8), c, 0.0) is None  # the decode instance is too small


# ----------------------------------------------------------------------------------- dynaserve
# Prefill rates: idle 0.25390625 ms/token; with 8 running decodes the 50 ms step fits (50 - 2 - 8) / 0.25 =
# 160 prefill tokens, so 50 / 160 = 0.3125 ms/token.


def test_dynaserve_places_by_prefill_queue_not_decode_backlog() -> None:
    # w0: 1000 prompt tokens queued. w1: 8 decodes running with 5000 decode tokens pending.
    # TTFT-first: w0 (1000 + 500) * 0.2539 = 380.9 ms, w1 500 * 0.3125 = 156.3 ms -> w1.
    # Colocate prices w1's decode backlog (5000 ms) and picks w0.
    c = cluster(inst("w0", queued_prefill_tokens=1000), inst("w1", running_seqs=8, pending_decode_tokens=5000))
    assert DynaServePolicy(PRICING).plan(req(500, 10), c, 0.0) == Plan("w1", None, 510, KIND_NONE)
    assert ColocatePolicy(PRICING).plan(req(500, 10), c, 0.0) == Plan("w0", None, 510, KIND_NONE)


def test_dynaserve_ties_go_to_fewer_running() -> None:
    c = cluster(inst("w0", running_seqs=3), inst("w1", running_seqs=1), inst("w2", running_seqs=2))
    # with d = 0 and budgets capped at 512 for all three, a 3-decode step is (2 + 128 + 3) / 512 ... not a tie;
    # give them equal rates by making the step model ignore decodes
    flat = Pricing(StepLatencyModel(a=2.0, b=0.25, c=0.0, d=0.0, e=0.0), tbt_margin=0.5, max_batched_tokens=512)
    assert DynaServePolicy(flat).plan(req(100, 10), c, 0.0) == Plan("w1", None, 110, KIND_NONE)


def _offload_cluster(**b: object) -> ClusterState:
    # A = w0 (queue 100, idle rate: 1100 * 0.2539 = 279.3 ms) beats w1 (queue 100 at 0.3125: 343.8 ms) and
    # w2 (no queue, 8 decodes: 1000 * 0.3125 = 312.5 ms); w2 has no prefill queued, so it can take the decode
    spec: dict[str, object] = {"running_seqs": 8, **b}
    return cluster(inst("w0", queued_prefill_tokens=100), inst("w1", queued_prefill_tokens=100, running_seqs=8),
                   inst("w2", **spec))


def test_dynaserve_hands_the_decode_to_a_prefill_idle_instance() -> None:
    # B = w2: its decode step with the request is 2 + 9 = 11 ms; gap 2 + 2 * 11 = 24 ms <= 80 ms
    assert DynaServePolicy(PRICING).plan(req(1000, 200), _offload_cluster(), 0.0) == Plan("w0", "w2", 1000, KIND_PD)
    # among prefill-idle instances, B is the one with the shortest decode step
    c = _offload_cluster()
    c.add(inst("w3", running_seqs=12))
    assert DynaServePolicy(PRICING).plan(req(1000, 200), c, 0.0) == Plan("w0", "w2", 1000, KIND_PD)
    c.instances["w3"].running_seqs = 7  # 1000 * (50 / 164) = 304.9 ms: still not A, now the better B
    assert DynaServePolicy(PRICING).plan(req(1000, 200), c, 0.0) == Plan("w0", "w3", 1000, KIND_PD)


def test_dynaserve_keeps_short_outputs_whole() -> None:
    pol = DynaServePolicy(PRICING)
    assert pol.plan(req(1000, 200, predicted=101), _offload_cluster(), 0.0) == Plan("w0", None, 1200, KIND_NONE)
    assert pol.plan(req(1000, 200, predicted=102), _offload_cluster(), 0.0) == Plan("w0", "w2", 1000, KIND_PD)


def test_dynaserve_no_handoff_when_a_has_no_queue_or_b_is_unfit() -> None:
    pol = DynaServePolicy(PRICING)
    # A without queued prefill starts at once: nothing to gain
    c = cluster(inst("w0"), inst("w1"))
    assert pol.plan(req(1000, 200), c, 0.0) == Plan("w0", None, 1200, KIND_NONE)
    # B without room for the request
    assert pol.plan(req(1000, 200), _offload_cluster(kv=1199), 0.0) == Plan("w0", None, 1200, KIND_NONE)


def test_dynaserve_no_handoff_when_the_gap_breaks_the_tbt_slo() -> None:
    pol = DynaServePolicy(PRICING)
    # 1000 tokens at 0.05 ms/token (1.25 MB per token over 25 GB/s) = 50 ms; gap 2 + 50 + 22 = 74 ms <= 80 ms
    assert pol.plan(req(1000, 200), _offload_cluster(kv_bytes_per_token=1_250_000), 0.0).b == "w2"
    # 0.06 ms/token: gap 2 + 60 + 22 = 84 ms > 0.8 * 100 ms
    plan = pol.plan(req(1000, 200), _offload_cluster(kv_bytes_per_token=1_500_000), 0.0)
    assert plan == Plan("w0", None, 1200, KIND_NONE)
    # B's last measured step counts: 2 + 2 * 40 = 82 ms
    plan = pol.plan(req(1000, 200), _offload_cluster(step_ms=40.0), 0.0)
    assert plan == Plan("w0", None, 1200, KIND_NONE)


def test_dynaserve_prices_the_gap_with_early_pulls() -> None:
    pol = DynaServePolicy(PRICING)

    def offload(a_tail: int, b_tail: int) -> ClusterState:
        return cluster(inst("w0", queued_prefill_tokens=100, early_pull_tail_tokens=a_tail),
                       inst("w1", queued_prefill_tokens=100, running_seqs=8),
                       inst("w2", running_seqs=8, kv_bytes_per_token=1_500_000, early_pull_tail_tokens=b_tail))

    # 0.06 ms/token: the whole pull makes the gap 2 + 60 + 22 = 84 ms > 80 ms; with early pulls
    # 2 + 7.7 + 22 = 31.7 ms (A's prefill after its first chunk covers the early part's 52.3 ms)
    assert pol.plan(req(1000, 200), offload(128, 128), 0.0) == Plan("w0", "w2", 1000, KIND_PD)
    assert pol.plan(req(1000, 200), offload(0, 128), 0.0) == Plan("w0", None, 1200, KIND_NONE)
    assert pol.plan(req(1000, 200), offload(128, 0), 0.0) == Plan("w0", None, 1200, KIND_NONE)


def test_dynaserve_avoids_instances_at_their_running_cap_for_prefill() -> None:
    pol = DynaServePolicy(PRICING)
    # w1 would be A (w0: 20,500 x 0.254 ms; w1: 500 x 4.19 ms) but runs max_num_seqs - 6 decodes: a new
    # prompt there waits for a free slot
    c = cluster(inst("w0", queued_prefill_tokens=20000, max_num_seqs=64),
                inst("w1", running_seqs=58, max_num_seqs=64))
    assert pol.plan(req(500, 10), c, 0.0) == Plan("w0", None, 510, KIND_NONE)
    c.instances["w1"].running_seqs = 57
    assert pol.plan(req(500, 10), c, 0.0) == Plan("w1", None, 510, KIND_NONE)
    # when every instance is full, the TTFT-first choice among them; an unknown cap (0) is never full
    c.instances["w1"].running_seqs = 64
    c.instances["w0"].running_seqs = 60
    assert pol.plan(req(500, 10), c, 0.0).a == "w1"
    c.instances["w0"].running_seqs = 0
    assert pol.plan(req(500, 10), c, 0.0).a == "w0"
    c.instances["w1"].max_num_seqs = 0
    assert pol.plan(req(500, 10), c, 0.0).a == "w1"


def test_dynaserve_never_hands_off_to_a_full_b() -> None:
    pol = DynaServePolicy(PRICING)
    # B = w2 runs 8 decodes: with a cap of 15 (8 + 6 headroom < 15) it has a free slot and takes the PD
    # handoff; with a cap of 14 the request would wait there for a slot mid-stream, so it stays whole on A
    assert pol.plan(req(1000, 200), _offload_cluster(max_num_seqs=15), 0.0) == Plan("w0", "w2", 1000, KIND_PD)
    assert pol.plan(req(1000, 200), _offload_cluster(max_num_seqs=14), 0.0) == Plan("w0", None, 1200, KIND_NONE)
    # another prefill-idle instance with a free slot takes it instead
    c = _offload_cluster(max_num_seqs=14)
    c.instances["w1"].queued_prefill_tokens = 0
    c.instances["w1"].max_num_seqs = 256
    assert pol.plan(req(1000, 200), c, 0.0) == Plan("w0", "w1", 1000, KIND_PD)


def test_dynaserve_skips_dead_and_full_instances() -> None:
    pol = DynaServePolicy(PRICING)
    c = cluster(inst("w0", alive=False), inst("w1", kv=1000), inst("w2", queued_prefill_tokens=5000))
    assert pol.plan(req(1000, 2), c, 0.0) == Plan("w2", None, 1002, KIND_NONE)
    c.instances["w2"].alive = False
    assert pol.plan(req(1000, 2), c, 0.0) is None
    assert pol.plan(req(1000, 2), ClusterState(), 0.0) is None


def test_dynaserve_reprices_after_a_load_change() -> None:
    pol = DynaServePolicy(PRICING)
    c = cluster(inst("w0"), inst("w1", queued_prefill_tokens=10))
    assert pol.plan(req(500, 10), c, 0.0).a == "w0"
    c.instances["w0"].running_seqs = 40  # its prefill rate drops to 50 / 32 ms/token
    assert pol.plan(req(500, 10), c, 0.0).a == "w1"


# ----------------------------------------------------------------------------------- balance (the design's starting formulation)


def test_balance_single_instance_never_splits() -> None:
    c = cluster(inst("w0"))
    assert BalancePolicy(PRICING).plan(req(8000, 4000), c, 0.0) == Plan("w0", None, 12000, KIND_NONE)
    c = cluster(inst("w0"), inst("w1", alive=False))
    assert BalancePolicy(PRICING).plan(req(8000, 4000), c, 0.0) == Plan("w0", None, 12000, KIND_NONE)


def test_balance_idle_pair_splits_a_long_prompt_in_half() -> None:
    # p = 1000, o = 2. A: m*s; B: m*(1000 - s) + 2. s = 504: max(127.97, 127.94); s = 503: B = 128.19.
    plan = BalancePolicy(PRICING).plan(req(1000, 2), cluster(inst("w0"), inst("w1")), 0.0)
    assert plan == Plan("w0", "w1", 504, KIND_PROMPT)


def test_balance_loaded_b_gets_less_of_the_prompt() -> None:
    # w0 only fits the prompt (it can only be A). w1 has 400 queued prompt tokens (101.5625 ms).
    # Balance m*s = 101.5625 + m*(1000 - s) + 2 -> s = 704 (A 178.75, B 178.72; s = 703: B 178.97).
    c = cluster(inst("w0", kv=1000), inst("w1", queued_prefill_tokens=400))
    assert BalancePolicy(PRICING).plan(req(1000, 2), c, 0.0) == Plan("w0", "w1", 704, KIND_PROMPT)


def test_balance_decode_heavy_instance_gets_the_decode() -> None:
    # w0 runs 40 decodes: its prefill costs 1.5625 ms/token; w1 is idle (0.2539 ms/token).
    # A = w1, B = w0: 0.2539*s vs 1.5625*(1000 - s) + 200 -> s = 971 (A 246.54, B 245.31; s = 970: B 246.88).
    # The other direction balances at 390 ms; whole on w1 costs 453.9 ms.
    c = cluster(inst("w0", running_seqs=40), inst("w1"))
    assert BalancePolicy(PRICING).plan(req(1000, 200), c, 0.0) == Plan("w1", "w0", 971, KIND_PROMPT)


def test_balance_pd_when_b_decode_backlog_matches_a_prefill() -> None:
    # w0 only fits the prompt; w1 has 1000 ms of pending decodes. p = 4000, o = 16.
    # s = p: A = 4000*m = 1015.625, B = 1000 + 15 = 1015 -> 1015.625.
    # s = p - 1: B = 1000 + m + 16 = 1016.25; s = p + 1: A = 1016.625. Whole on w1: 2031.6.
    c = cluster(inst("w0", kv=4000), inst("w1", pending_decode_tokens=1000))
    assert BalancePolicy(PRICING).plan(req(4000, 16), c, 0.0) == Plan("w0", "w1", 4000, KIND_PD)


def test_balance_prices_early_pulls() -> None:
    # test_balance_pd_when_b_decode_backlog_matches_a_prefill with a 0.06 ms/token link (4000 tokens: 240 ms)
    def plan(tail: int, b_pending: int) -> Plan | None:
        c = cluster(inst("w0", kv=4000, early_pull_tail_tokens=tail),
                    inst("w1", pending_decode_tokens=b_pending, kv_bytes_per_token=1_500_000, early_pull_tail_tokens=8))
        return BalancePolicy(PRICING).plan(req(4000, 16), c, 0.0)

    # whole transfer: s = p costs B 1015 + 240 ms, no split balances well enough -> all on w1. With early pulls
    # A's prefill after its first 512-token chunk covers the early part: B 1015 + 128 x 0.06 = 1022.68 ms
    assert plan(0, 1000) == Plan("w1", None, 4016, KIND_NONE)
    assert plan(128, 1000) == Plan("w0", "w1", 4000, KIND_PD)
    # 600 ms of decodes on B: prompt splits. Whole transfer: s = 3643, A 925.0, B 616 + 357 m + 218.6 = 925.2.
    # Early pulls: s = 3214, A 816.1, B 616 + 786 m + 7.68 = 823.3 (B computes more of the prompt)
    assert plan(0, 600) == Plan("w0", "w1", 3643, KIND_PROMPT)
    assert plan(128, 600) == Plan("w0", "w1", 3214, KIND_PROMPT)


def test_balance_decode_handoff_when_b_is_busy() -> None:
    # w0 only fits the prompt; w1 has 300 ms of pending decodes. p = 400, o = 400, A decodes u tokens:
    # A: 400*m + u = 101.5625 + u; B: 300 + (399 - u).
    # u = 298: A 399.5625, B 401; u = 299: A 400.5625, B 400; u = 300: A 401.56 -> s = p + 299 = 699.
    c = cluster(inst("w0", kv=400), inst("w1", pending_decode_tokens=300))
    assert BalancePolicy(PRICING).plan(req(400, 400), c, 0.0) == Plan("w0", "w1", 699, KIND_DECODE)


def test_balance_falls_back_when_the_handoff_costs_too_much() -> None:
    c = cluster(inst("w0"), inst("w1"))
    pricey = Pricing(MODEL, tbt_margin=0.5, max_batched_tokens=512, handoff_ms=1e9)
    assert BalancePolicy(pricey).plan(req(1000, 2), c, 0.0) == Plan("w0", None, 1002, KIND_NONE)
    # the no-split alternative is the instance that finishes the whole request soonest
    c.instances["w0"].queued_prefill_tokens = 10
    assert BalancePolicy(pricey).plan(req(1000, 2), c, 0.0) == Plan("w1", None, 1002, KIND_NONE)


def test_balance_does_not_split_small_requests() -> None:
    # whole: 8*m + 2 = 4.03 ms; the best split saves about 2 ms, the handoff costs 2 ms
    plan = BalancePolicy(PRICING).plan(req(8, 2), cluster(inst("w0"), inst("w1")), 0.0)
    assert plan == Plan("w0", None, 10, KIND_NONE)


def test_balance_single_output_token_is_unsplit() -> None:
    c = cluster(inst("w0", queued_prefill_tokens=1000), inst("w1"))
    assert BalancePolicy(PRICING).plan(req(3000, 1), c, 0.0) == Plan("w1", None, 3001, KIND_NONE)


def test_balance_kv_capacity() -> None:
    pol = BalancePolicy(PRICING)
    # w0 has room for the prompt only: it can be A, never B, and never hold the whole request
    c = cluster(inst("w0", kv=1000), inst("w1"))
    for p, o in ((1000, 2), (1000, 50), (900, 100)):
        plan = pol.plan(req(p, o), c, 0.0)
        assert plan is not None and plan.b != "w0" and (plan.b is not None or plan.a == "w1")
    # nobody has room for prompt + output
    c = cluster(inst("w0", kv=1001), inst("w1", kv=1001))
    assert pol.plan(req(1000, 2), c, 0.0) is None
    # used KV counts against capacity
    c = cluster(inst("w0", kv=2000, kv_used_tokens=1500), inst("w1", kv=2000, kv_used_tokens=999))
    assert pol.plan(req(1000, 2), c, 0.0) is None
    c.instances["w1"].kv_used_tokens = 998
    assert pol.plan(req(1000, 2), c, 0.0) == Plan("w1", None, 1002, KIND_NONE)  # w0 cannot even be A


def test_balance_never_puts_a_whole_request_where_it_does_not_fit() -> None:
    # w1 fits the 1000-token prompt but not prompt + output (1002); w0 is busy but has room.
    c = cluster(inst("w0", queued_prefill_tokens=5000), inst("w1", kv=1001))
    plan = BalancePolicy(PRICING).plan(req(1000, 2), c, 0.0)
    assert plan is not None
    assert plan.b is not None or c.instances[plan.a].kv_free_tokens >= 1002


def test_balance_skips_dead_instances() -> None:
    pol = BalancePolicy(PRICING)
    c = cluster(inst("w0", alive=False), inst("w1"), inst("w2"))
    assert pol.plan(req(1000, 2), c, 0.0) == Plan("w1", "w2", 504, KIND_PROMPT)
    c.instances["w1"].alive = False
    assert pol.plan(req(1000, 2), c, 0.0) == Plan("w2", None, 1002, KIND_NONE)
    c.instances["w2"].alive = False
    assert pol.plan(req(1000, 2), c, 0.0) is None
    assert pol.plan(req(1000, 2), ClusterState(), 0.0) is None


_inst_strategy = st.builds(
    dict,
    kv=st.integers(0, 6000),
    alive=st.booleans(),
    queued_prefill_tokens=st.integers(0, 5000),
    running_seqs=st.integers(0, 64),
    pending_decode_tokens=st.integers(0, 3000),
    kv_used_tokens=st.integers(0, 2000),
    kv_bytes_per_token=st.sampled_from([0, 131072]),
)


@pytest.mark.parametrize("policy", [BalancePolicy, DynaServePolicy])
@settings(max_examples=300, deadline=None)
@given(st.lists(_inst_strategy, min_size=1, max_size=4), st.integers(1, 3000), st.integers(1, 600))
def test_split_plans_are_feasible(policy: type, specs: list[dict], p: int, o: int) -> None:
    c = cluster(*(inst(f"w{i}", **spec) for i, spec in enumerate(specs)))
    plan = policy(PRICING).plan(req(p, o), c, 0.0)
    if plan is None:
        assert not any(i.alive and i.kv_free_tokens >= p + o for i in c.instances.values())
        return
    a = c.instances[plan.a]
    assert a.alive and a.kv_free_tokens >= p
    if plan.b is None:
        assert plan.kind == KIND_NONE and plan.split == p + o
        # (room for p + o on A is not guaranteed: test_dynaserve_never_puts_a_whole_request_where_it_does_not_fit)
    else:
        b = c.instances[plan.b]
        assert plan.a != plan.b
        assert b.alive and b.kv_free_tokens >= p + o
        assert 1 <= plan.split < p + o - 1 and plan.kind != KIND_NONE
        assert len(c.alive()) >= 2


# ----------------------------------------------------------------------------------- commit


def _state_after(plan: Plan, r: RequestInfo) -> dict[str, tuple[int, int, int]]:
    c = cluster(inst("A", kv=10_000), inst("B", kv=10_000))
    commit(plan, r, c)
    return {k: (i.queued_prefill_tokens, i.pending_decode_tokens, i.kv_used_tokens) for k, i in c.instances.items()}


@pytest.mark.parametrize(
    ("plan", "a", "b"),
    [
        (Plan.whole("A", 100, 20), (100, 20, 120), (0, 0, 0)),
        (Plan.make("A", "B", 100, 20, 40), (40, 0, 40), (60, 20, 120)),  # prompt split: B emits all 20
        (Plan.make("A", "B", 100, 20, 100), (100, 0, 100), (0, 19, 120)),  # PD: A's one token needs no decode
        (Plan.make("A", "B", 100, 20, 110), (100, 10, 110), (0, 9, 120)),  # A emits 11, B 9
    ],
    ids=["whole", "prompt", "pd", "decode"],
)
def test_commit_adds_planned_work(plan: Plan, a: tuple[int, int, int], b: tuple[int, int, int]) -> None:
    assert _state_after(plan, req(100, 20)) == {"A": a, "B": b}


def test_commit_accumulates_and_tolerates_removed_instances() -> None:
    c = cluster(inst("A"), inst("B"))
    r = req(100, 20)
    commit(Plan.whole("A", 100, 20), r, c)
    commit(Plan.whole("A", 100, 20), r, c)
    assert (c.instances["A"].queued_prefill_tokens, c.instances["A"].kv_used_tokens) == (200, 240)
    c.remove("B")
    commit(Plan.make("A", "B", 100, 20, 100), r, c)  # B left the cluster meanwhile
    assert c.instances["A"].queued_prefill_tokens == 300
    commit(Plan.whole("gone", 100, 20), r, c)
    assert list(c.instances) == ["A"]


def test_report_overwrites_committed_work() -> None:
    c = cluster(inst("A"))
    commit(Plan.whole("A", 100, 20), req(100, 20), c)
    c.report("A", 5.0, queued_prefill_tokens=7, running_seqs=1, decode_ctx_tokens=30,
             pending_decode_tokens=3, kv_used_tokens=48, step_ms=9.5)
    a = c.instances["A"]
    assert (a.queued_prefill_tokens, a.pending_decode_tokens, a.kv_used_tokens, a.last_report) == (7, 3, 48, 5.0)
    c.report("nobody", 6.0, queued_prefill_tokens=1, running_seqs=1, decode_ctx_tokens=1,
             pending_decode_tokens=1, kv_used_tokens=1, step_ms=1.0)
    assert list(c.instances) == ["A"]


def test_commit_spreads_a_burst() -> None:
    # without commit every request of a burst would see the same idle cluster
    c = cluster(inst("w0"), inst("w1"))
    pol = ColocatePolicy(PRICING)
    chosen = []
    for k in range(4):
        r = req(100, 10, rid=f"r{k}")
        plan = pol.plan(r, c, 0.0)
        assert plan is not None
        commit(plan, r, c)
        chosen.append(plan.a)
    assert chosen == ["w0", "w1", "w0", "w1"]


# ----------------------------------------------------------------------------------- forced plans


def test_forced_plan_pins_the_split() -> None:
    c = cluster(inst("w0", queued_prefill_tokens=50), inst("w1"), inst("w2", pending_decode_tokens=10))
    assert forced_plan(req(100, 20), c, 100) == Plan("w1", "w2", 100, KIND_PD)
    assert forced_plan(req(100, 20), c, 30) == Plan("w1", "w2", 30, KIND_PROMPT)
    assert forced_plan(req(100, 20), c, 105) == Plan("w1", "w2", 105, KIND_DECODE)
    assert forced_plan(req(100, 20), c, 0) == Plan("w1", "w2", 1, KIND_PROMPT)
    assert forced_plan(req(100, 20), c, 119) == Plan("w1", None, 120, KIND_NONE)


def test_forced_plan_ties_break_by_id_and_dead_are_skipped() -> None:
    c = cluster(inst("w2"), inst("w1"), inst("w0", alive=False))
    assert forced_plan(req(10, 5), c, 10) == Plan("w1", "w2", 10, KIND_PD)
    c.instances["w2"].alive = False
    assert forced_plan(req(10, 5), c, 10) == Plan("w1", None, 15, KIND_NONE)
    c.instances["w1"].alive = False
    assert forced_plan(req(10, 5), c, 10) is None


# ----------------------------------------------------------------------------------- registry


def test_make_policy() -> None:
    assert set(POLICIES) == {"colocate", "disagg", "dynaserve", "balance"}
    pol = make_policy("disagg", PRICING, prefill_instances=2)
    assert isinstance(pol, DisaggPolicy) and pol.prefill_instances == 2 and pol.pricing is PRICING
    assert isinstance(make_policy("dynaserve", PRICING), DynaServePolicy)
    assert isinstance(make_policy("balance", PRICING), BalancePolicy)
    assert make_policy("colocate", PRICING).name == "colocate"
    with pytest.raises(ValueError, match="unknown policy 'round_robin'.*colocate"):
        make_policy("round_robin", PRICING)


# ----------------------------------------------------------------------------------- decode concentration
# host_frac 0.6 of the 50 ms step budget: a host's decode-only step 2 + (running + 1) ms must stay <= 30 ms,
# so a host takes a new decode while it runs 27 sequences or fewer.


def test_concentration_hands_the_decode_to_the_busiest_host_and_leaves_it_the_tail() -> None:
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0"), inst("w1", running_seqs=10, queued_prefill_tokens=50),
                inst("w2", running_seqs=20, queued_prefill_tokens=50))
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None
    assert (plan.kind, plan.a, plan.b, plan.split) == (KIND_PROMPT, "w0", "w2", 1000 - 64)


def test_concentration_skips_a_host_over_its_step_cap() -> None:
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0"), inst("w1", running_seqs=10), inst("w2", running_seqs=28))
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None and (plan.a, plan.b) == ("w0", "w1")
    c.instances["w1"].running_seqs = 27  # 2 + 28 = 30 ms: still under the cap
    assert pol.plan(req(1000, 400), c, 0.0).b == "w1"  # type: ignore[union-attr]
    c.instances["w1"].running_seqs = 28
    assert pol.plan(req(1000, 400), c, 0.0).kind == KIND_NONE  # type: ignore[union-attr]


def test_concentration_only_moves_decodes_to_busier_instances() -> None:
    """A host must run more decodes than A; otherwise the default rules apply (here: no prefill-idle B,
    so the request stays whole on A)."""
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0", running_seqs=5, queued_prefill_tokens=10),
                inst("w1", running_seqs=5, queued_prefill_tokens=4000))
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None and (plan.kind, plan.a) == (KIND_NONE, "w0")


def test_concentration_takes_short_outputs_unless_gated_and_auto_skips_cheap_first_decodes() -> None:
    c = cluster(inst("w0"), inst("w1", running_seqs=10, queued_prefill_tokens=50))
    short = DynaServePolicy(PRICING, concentrate="on").plan(req(1000, 400, predicted=50), c, 0.0)
    assert short is not None and (short.kind, short.a, short.b) == (KIND_PROMPT, "w0", "w1")  # under min_output
    tiny = DynaServePolicy(PRICING, concentrate="on").plan(req(1000, 400, predicted=20), c, 0.0)
    assert tiny is not None and (tiny.kind, tiny.a) == (KIND_NONE, "w0")  # under host_min_output
    gated = DynaServePolicy(PRICING, concentrate="on", host_min_output=102).plan(req(1000, 400, predicted=50), c, 0.0)
    assert gated is not None and (gated.kind, gated.a) == (KIND_NONE, "w0")
    one = DynaServePolicy(PRICING, concentrate="on").plan(req(1000, 1, predicted=1), c, 0.0)
    assert one is not None and (one.kind, one.a) == (KIND_NONE, "w0")  # nothing to decode: stays whole
    default = DynaServePolicy(PRICING).plan(req(1000, 400), c, 0.0)
    assert default is not None and default.kind == KIND_NONE  # auto: the first decode costs 1.05x, off


def test_concentration_puts_a_prompt_shorter_than_the_tail_on_the_host() -> None:
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0"), inst("w1", running_seqs=10, queued_prefill_tokens=50))
    plan = pol.plan(req(40, 400), c, 0.0)
    assert plan is not None and (plan.kind, plan.a) == (KIND_NONE, "w1")


def test_concentration_leaves_hosts_kv_headroom() -> None:
    """A host must keep 30 % of its KV free after the request (1,400 tokens here)."""
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0"), inst("w1", running_seqs=10, kv=10_000, kv_used_tokens=5_600))  # 3,000 left: ok
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None and (plan.kind, plan.b) == (KIND_PROMPT, "w1")
    c.instances["w1"].kv_used_tokens = 5_700  # 2,900 left < 3,000
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None and plan.kind == KIND_NONE


def test_concentration_respects_kv_room_and_full_hosts() -> None:
    pol = DynaServePolicy(PRICING, concentrate="on")
    c = cluster(inst("w0"), inst("w1", running_seqs=10, kv=1000),
                inst("w2", running_seqs=20, max_num_seqs=24))  # 20 + 6 >= 24: full
    plan = pol.plan(req(1000, 400), c, 0.0)
    assert plan is not None and plan.kind == KIND_NONE and plan.a == "w0"


def test_broker_config_enables_concentration() -> None:
    from broker.server import Broker, BrokerConfig

    b = Broker(BrokerConfig(concentrate="on"))
    try:
        assert isinstance(b.policy, DynaServePolicy) and b.policy.concentrate == "on"
    finally:
        b.ctx.term()
    b = Broker(BrokerConfig())
    try:
        assert isinstance(b.policy, DynaServePolicy) and b.policy.concentrate == "auto"
    finally:
        b.ctx.term()


# "auto": a model with a large fixed step cost (20 ms) and full 8192-token chunks, where the first decode on
# an instance cuts its prefill chunks from 8192 to 580 tokens and costs it 1.64x its prefill rate.
BIG_FIXED = Pricing(StepLatencyModel(a=20.0, b=0.05, c=1.0, d=0.0), tbt_margin=0.5, max_batched_tokens=8192)


def test_first_decode_cost_by_hand() -> None:
    # one decode: 50 - 21 ms of room = 580 prefill tokens
    assert first_decode_cost(BIG_FIXED, SLO) == pytest.approx((50.0 / 580) / ((20 + 0.05 * 8192) / 8192))
    assert first_decode_cost(PRICING, SLO) < 1.25  # 2 ms fixed, 512-token chunks: no reason to concentrate


def _concentrates(pol: DynaServePolicy, ttft_slo_ms: float) -> bool:
    c = cluster(inst("w0"), inst("w1", running_seqs=5, queued_prefill_tokens=50))  # host step 26 <= 30 ms
    plan = pol.plan(RequestInfo("r", 1000, 400, 400, ttft_slo_ms, SLO), c, 0.0)
    assert plan is not None
    return plan.kind == KIND_PROMPT


def test_auto_concentration_follows_the_share_of_requests_with_ttft_slack() -> None:
    """The tail handoff costs 2 + 2 x 0.6 x 50 = 62 ms: a request with a 2 s TTFT SLO has slack (62 <= 200),
    one with 300 ms does not. The share of requests with slack is their mean over the first 256 requests,
    then an EWMA (weight 1/256); auto turns on at 60 % and off below 50 %."""
    pol = DynaServePolicy(BIG_FIXED, concentrate="auto")
    assert not _concentrates(pol, 300.0)  # share 0
    on = [_concentrates(pol, 2000.0) for _ in range(400)]
    assert not on[0] and on[1] and all(on[1:])  # share 1/2, then 2/3 >= 0.6
    off = [_concentrates(pol, 300.0) for _ in range(250)]
    last = off.index(False)
    assert 170 <= last <= 178 and not any(off[last:])  # share x (255/256)^k > 0.5 up to k ~ 177: hysteresis


def test_auto_concentration_stays_off_when_the_first_decode_is_cheap() -> None:
    pol = DynaServePolicy(PRICING, concentrate="auto")
    assert not any(_concentrates(pol, 2000.0) for _ in range(400))


def test_concentrate_must_be_off_on_or_auto() -> None:
    with pytest.raises(ValueError, match="concentrate"):
        DynaServePolicy(PRICING, concentrate="yes")


def test_auto_concentration_prices_the_tail_handoff_with_early_pulls() -> None:
    """The tail handoff moves 1000 - 64 = 936 positions at 0.04 ms each (37.4 ms): 2 + 37.4 + 60 = 99.4 ms, over
    the 96 ms slack of a 960 ms TTFT SLO. With early pulls A's prefill (one 808-token chunk, then the 128-token
    tail at 0.0524 ms/token) covers 6.7 ms of the early part's 32.3 ms: 2 + 5.1 + 25.6 + 60 = 92.7 ms."""
    def concentrates(tail: int) -> list[bool]:
        pol = DynaServePolicy(BIG_FIXED, concentrate="auto")
        c = cluster(inst("w0", kv_bytes_per_token=1_000_000, early_pull_tail_tokens=tail),
                    inst("w1", running_seqs=5, queued_prefill_tokens=50, early_pull_tail_tokens=tail))
        plans = [pol.plan(RequestInfo("r", 1000, 400, 400, 960.0, SLO), c, 0.0) for _ in range(3)]
        return [p is not None and p.kind == KIND_PROMPT for p in plans]

    assert not any(concentrates(0))
    assert concentrates(128)[1:] == [True, True]


# ----------------------------------------------------------------------------------- per-instance step models


def test_an_instance_is_priced_with_its_own_step_model() -> None:
    slow = inst("slow", step_model=MODEL.scaled(3.0))
    plain = inst("plain")
    assert PRICING.model_of(plain) is MODEL and PRICING.model_of(slow) == MODEL.scaled(3.0)
    assert PRICING.prefill_ms_per_token(plain, SLO) == pytest.approx(M_IDLE)
    assert PRICING.prefill_ms_per_token(slow, SLO) == pytest.approx(3 * M_IDLE)
    assert PRICING.decode_ms_per_token(slow, 0) == pytest.approx(3.0)
    assert PRICING.decode_step_ms(slow, 100) == pytest.approx(3 * (2.0 + 1.0))
    # under decode load its TBT-limited chunk is smaller too: (50 - 3 * (2 + 10)) / 0.75 = 18 tokens
    slow.running_seqs = 10
    assert PRICING.prefill_budget(slow, SLO) == 18
    assert first_decode_cost(PRICING, SLO, model=MODEL.scaled(3.0)) > first_decode_cost(PRICING, SLO)


def test_reported_correction_rescales_the_advertised_model() -> None:
    c = cluster(inst("w0", step_model=MODEL), inst("w1"))
    w0, w1 = c.instances["w0"], c.instances["w1"]
    load = dict(queued_prefill_tokens=0, running_seqs=0, decode_ctx_tokens=0, pending_decode_tokens=0,
                kv_used_tokens=0, step_ms=3.0)
    c.report("w0", 1.0, step_scale=1.01, **load)  # within SCALE_STEP of 1: not re-priced
    assert w0.model is MODEL and w0.step_scale == 1.0
    c.report("w0", 2.0, step_scale=2.5, **load)
    assert w0.step_scale == 2.5 and PRICING.model_of(w0) == MODEL.scaled(2.5)
    for bad in (float("nan"), float("inf"), 0.0, -1.0):  # ignored
        c.report("w0", 3.0, step_scale=bad, **load)
        assert w0.step_scale == 2.5
    c.report("w0", 4.0, step_scale=1e9, **load)  # clamped
    assert w0.step_scale == SCALE_RANGE[1] and PRICING.model_of(w0) == MODEL.scaled(SCALE_RANGE[1])
    c.report("w1", 5.0, step_scale=4.0, **load)  # advertised no model: priced with the pricing's
    assert w1.model is None and PRICING.model_of(w1) is MODEL


@pytest.mark.parametrize("policy", [ColocatePolicy, DynaServePolicy, BalancePolicy])
def test_policies_place_by_each_instances_own_model(policy: type) -> None:
    # w0 is idle but three times slower than the pricing's model; w1 has 200 prompt tokens queued.
    # Whole on w0: 3 * 1000 * M_IDLE = 762 ms of prefill; on w1: 1200 * M_IDLE = 305 ms.
    c = cluster(inst("w0", step_model=MODEL.scaled(3.0)), inst("w1", queued_prefill_tokens=200))
    plan = policy(PRICING).plan(req(1000, 1), c, 0.0)
    assert plan is not None and plan.a == "w1" and plan.b is None
    # the same cluster with both instances as fast: the idle one
    c = cluster(inst("w0", step_model=MODEL), inst("w1", queued_prefill_tokens=200))
    assert policy(PRICING).plan(req(1000, 1), c, 0.0).a == "w0"


@pytest.mark.parametrize("policy", [ColocatePolicy, DynaServePolicy, BalancePolicy])
def test_policies_reprice_after_a_reported_correction(policy: type) -> None:
    # the policies cache per-instance prices until the load changes; a new correction must reach them too
    pol = policy(PRICING)
    c = cluster(inst("w0", step_model=MODEL), inst("w1", queued_prefill_tokens=200))
    assert pol.plan(req(1000, 1), c, 0.0).a == "w0"
    c.report("w0", 1.0, queued_prefill_tokens=0, running_seqs=0, decode_ctx_tokens=0, pending_decode_tokens=0,
             kv_used_tokens=0, step_ms=3.0, step_scale=3.0)
    assert pol.plan(req(1000, 1), c, 0.0).a == "w1"


def test_balance_gives_the_slower_instance_its_share_of_the_prompt() -> None:
    # w1 runs at twice the pricing's step times, so it gets a third of the prompt either way round.
    # A = w0: m s = 2 m (1000 - s) + 2 * 2 (B's two decode tokens at 2 ms) -> s = 671.9: 672 (max 170.625 ms;
    # 671: 171.07, 673: 170.88). A = w1: 2 m s = m (1000 - s) + 2 -> s = 336 (170.625 ms too; w0 comes first).
    # With the pricing's model on both it would be 504 (test_balance_idle_pair_splits_a_long_prompt_in_half).
    c = cluster(inst("w0"), inst("w1", step_model=MODEL.scaled(2.0)))
    plan = BalancePolicy(PRICING).plan(req(1000, 2), c, 0.0)
    assert plan == Plan("w0", "w1", 672, KIND_PROMPT)

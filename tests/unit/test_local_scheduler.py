"""The local scheduler: decodes first, prefill chunks under the TBT SLO, and the adaptive correction.

Hand-computed cases use a = 2 ms, b = 0.25 ms per prefill token, c = 1 ms per decode, d = 0.001 ms per
context token, no attention term, a 100 ms SLO and a 50% margin: every step must stay under 50 ms.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from dynaserve.costmodel import StepLatencyModel
from workers.local_scheduler import (
    DecodeItem,
    LocalScheduler,
    LocalSchedulerConfig,
    PrefillItem,
    StepPlan,
    prefill_rank,
)

MODEL = StepLatencyModel(a=2.0, b=0.25, c=1.0, d=0.001, e=0.0)
CFG = LocalSchedulerConfig(tbt_slo_ms=100.0, margin=0.5, max_batched_tokens=512, max_num_seqs=256, min_chunk_tokens=16)


def sched(**kw: object) -> LocalScheduler:
    cfg = LocalSchedulerConfig(**{**CFG.__dict__, **kw})  # type: ignore[arg-type]
    return LocalScheduler(MODEL, cfg)


def decodes(n: int, ctx: int = 1000) -> list[DecodeItem]:
    return [DecodeItem(f"d{i}", ctx) for i in range(n)]


def prefills(*remaining: int, ctx: int = 0) -> list[PrefillItem]:
    return [PrefillItem(f"p{i}", r, ctx) for i, r in enumerate(remaining)]


# ----------------------------------------------------------------------------------- batch forming


def test_decodes_first_up_to_max_num_seqs() -> None:
    s = sched(max_num_seqs=3)
    ds = [DecodeItem("a", 10), DecodeItem("b", 20), DecodeItem("c", 30), DecodeItem("d", 40), DecodeItem("e", 50)]
    plan = s.schedule(ds, prefills(100))
    assert plan.decodes == ["a", "b", "c"]
    assert plan.decode_ctx_tokens == 60
    # 3 decodes, 60 context tokens: room 50 - 2 - 3 - 0.06 = 44.94 ms -> 179 tokens
    assert plan.token_budget == 179
    assert plan.prefills == [("p0", 100)]


def test_all_decodes_are_scheduled() -> None:
    plan = sched().schedule(decodes(200, ctx=10), [])
    assert plan.decodes == [f"d{i}" for i in range(200)]
    assert plan.prefills == [] and plan.prefill_tokens == 0


def test_no_decodes_budget_is_max_batched_tokens() -> None:
    s = sched()
    assert s.token_budget(0, 0) == 512
    plan = s.schedule([], prefills(100, 300, 200, 50))
    assert plan.token_budget == 512
    assert plan.prefills == [("p0", 100), ("p1", 300), ("p2", 112)]  # fills the budget in order
    assert plan.prefill_tokens == 512
    assert plan.predicted_ms == pytest.approx(2 + 0.25 * 512)
    assert s.last_budget == 512


def test_budget_with_decodes_keeps_the_step_under_the_slo() -> None:
    s = sched()
    # 8 decodes of 1000 context: 2 + 8 + 8 = 18 ms; 32 ms left -> 128 prefill tokens
    plan = s.schedule(decodes(8), prefills(50, 200))
    assert plan.token_budget == 128
    assert plan.prefills == [("p0", 50), ("p1", 78)]
    assert plan.predicted_ms == pytest.approx(50.0)
    assert MODEL.step_ms(plan.prefill_tokens, 8, 8000) <= 50.0


def test_budget_is_capped_by_engine_buffer() -> None:
    # 8 decodes take 8 of the 100 batched tokens
    plan = sched(max_batched_tokens=100).schedule(decodes(8), prefills(500))
    assert plan.token_budget == 92 and plan.prefills == [("p0", 92)]


def test_chunks_never_exceed_remaining() -> None:
    plan = sched().schedule([], prefills(3, 0, 7, 1))
    assert plan.prefills == [("p0", 3), ("p2", 7), ("p3", 1)]  # an item with nothing left is skipped
    assert plan.prefill_tokens == 11


def test_min_chunk_progress_under_heavy_decode_load() -> None:
    s = sched(max_num_seqs=300)
    # 300 decodes alone take 2 + 300 + 300 = 602 ms: no room at all, yet prefill advances
    plan = s.schedule(decodes(300), prefills(1000, 1000))
    assert len(plan.decodes) == 300
    assert plan.token_budget == 16
    assert plan.prefills == [("p0", 16)]
    # room for fewer tokens than the minimum chunk
    plan = s.schedule(decodes(40), prefills(1000))  # 2 + 40 + 40 = 82 ms
    assert plan.prefills == [("p0", 16)]


def test_empty_plan() -> None:
    plan = sched().schedule([], [])
    assert plan.empty and plan.predicted_ms == pytest.approx(2.0)
    assert not StepPlan(decodes=["x"]).empty and not StepPlan(prefills=[("x", 1)]).empty


@settings(max_examples=300, deadline=None)
@given(
    st.lists(st.integers(0, 4000), max_size=60),
    st.lists(st.tuples(st.integers(0, 3000), st.integers(0, 4000)), max_size=6),
    st.floats(0.0, 0.9),
)
def test_plans_respect_budget_and_slo(dctx: list[int], items: list[tuple[int, int]], margin: float) -> None:
    model = StepLatencyModel()  # defaults: a=5, b=0.02, c=0.05, d=2e-5, no attention term
    cfg = LocalSchedulerConfig(tbt_slo_ms=100.0, margin=margin, max_batched_tokens=2048, max_num_seqs=48)
    s = LocalScheduler(model, cfg)
    ds = [DecodeItem(f"d{i}", c) for i, c in enumerate(dctx)]
    ps = [PrefillItem(f"p{i}", rem, ctx) for i, (rem, ctx) in enumerate(items)]
    plan = s.schedule(ds, ps)
    assert plan.decodes == [d.req_id for d in ds[:48]]
    chunks = dict(plan.prefills)
    assert len(chunks) == len(plan.prefills)
    assert sum(chunks.values()) == plan.prefill_tokens <= plan.token_budget
    for item in ps:
        assert 0 <= chunks.get(item.req_id, 0) <= item.remaining
    # items are served in order: only the last chunk may be partial, and nothing after it is served
    served = [item for item in ps if item.req_id in chunks]
    for item in served[:-1]:
        assert chunks[item.req_id] == item.remaining
    if served:
        last = ps.index(served[-1])
        assert all(item.remaining == 0 for item in ps[: last] if item not in served)
    if plan.prefill_tokens < plan.token_budget:
        assert all(chunks.get(i.req_id, 0) == i.remaining for i in ps)  # everything fit
    if plan.decodes:
        limit = 100.0 * (1 - margin)
        n_free = model.max_prefill_tokens(limit, len(plan.decodes), plan.decode_ctx_tokens)
        if n_free >= cfg.min_chunk_tokens:
            assert plan.predicted_ms <= limit + 1e-9
    else:
        assert plan.token_budget == 2048


def test_attention_term_counted_for_one_chunk() -> None:
    model = StepLatencyModel(a=2.0, b=0.25, c=1.0, d=0.0, e=0.001)
    s = LocalScheduler(model, CFG)
    plan = s.schedule(decodes(1), [PrefillItem("p0", 5000, 300)])
    (rid, n), = plan.prefills
    assert rid == "p0" and n == plan.token_budget == 79  # 0.0005 n^2 + 0.55 n = 47
    assert plan.prefill_attn == pytest.approx(n * (300 + n / 2))
    assert plan.predicted_ms <= 50.0
    assert model.step_ms(n + 1, 1, 1000, (n + 1) * (300 + (n + 1) / 2)) > 50.0  # the budget is the largest


def test_attention_of_every_chunk_stays_under_the_slo() -> None:
    model = StepLatencyModel(a=2.0, b=0.25, c=1.0, d=0.0, e=0.001)
    s = LocalScheduler(model, CFG)
    plan = s.schedule(decodes(1), [PrefillItem("short", 10, 0), PrefillItem("long", 1000, 20000)])
    assert plan.prefills[0] == ("short", 10)
    assert plan.predicted_ms <= 50.0


# ----------------------------------------------------------------------------------- adaptation


def _reference_plan(s: LocalScheduler) -> StepPlan:
    return s.schedule(decodes(8), prefills(10_000))


def test_slow_steps_raise_the_correction_and_shrink_the_budget() -> None:
    s = sched()
    plan = _reference_plan(s)
    assert plan.token_budget == 128 and plan.predicted_ms == pytest.approx(50.0)
    s.observe(plan, 100.0)  # twice the model: correction 0.5 * 1 + 0.5 * 2
    assert s.correction == pytest.approx(1.5)
    assert s.steps == 1
    nxt = _reference_plan(s)
    # limit 50 / 1.5 = 33.33 ms; 18 ms of decodes -> int(15.33 / 0.25) = 61 tokens
    assert nxt.token_budget == 61
    assert nxt.predicted_ms == pytest.approx(1.5 * (2 + 0.25 * 61 + 8 + 8))
    assert nxt.predicted_ms <= 50.0


def test_fast_steps_lower_the_correction_slowly() -> None:
    s = sched()
    plan = _reference_plan(s)
    s.observe(plan, 25.0)  # half the model: correction 0.95 * 1 + 0.05 * 0.5
    assert s.correction == pytest.approx(0.975)
    # limit 50 / 0.975 = 51.28 ms -> int(33.28 / 0.25) = 133 tokens
    assert _reference_plan(s).token_budget == 133
    # after a spike, normal steps bring it back only slowly
    s = sched()
    s.observe(plan, 100.0)
    s.observe(plan, 50.0)
    assert s.correction == pytest.approx(0.95 * 1.5 + 0.05 * 1.0)


def test_correction_is_bounded() -> None:
    s = sched()
    plan = _reference_plan(s)
    for _ in range(50):
        s.observe(plan, 1e9)
    assert s.correction == s.config.max_correction == 10.0
    assert _reference_plan(s).token_budget == 16  # 5 ms allowed: only the minimum chunk
    for _ in range(400):
        s.observe(plan, 1e-6)
    assert s.correction == pytest.approx(0.1)
    assert _reference_plan(s).token_budget == 512 - 8  # 500 ms allowed: the buffer caps it


def test_observe_ignores_empty_plans_and_bad_measurements() -> None:
    s = sched()
    s.observe(StepPlan(), 1000.0)
    s.observe(_reference_plan(s), 0.0)
    s.observe(_reference_plan(s), -5.0)
    assert s.correction == 1.0 and s.steps == 0


# ----------------------------------------------------------------------------------- config


@pytest.mark.parametrize(
    "kw",
    [
        {"tbt_slo_ms": 0.0},
        {"tbt_slo_ms": -1.0},
        {"margin": 1.0},
        {"margin": -0.1},
        {"max_batched_tokens": 0},
        {"max_num_seqs": 0},
        {"min_chunk_tokens": 0},
    ],
)
def test_config_validation(kw: dict) -> None:
    with pytest.raises(ValueError):
        LocalSchedulerConfig(**kw)


def test_prefill_rank() -> None:
    # by deadline: a short prompt with a 1 s SLO arriving at t=5 goes before a long one with 30 s at t=0
    assert prefill_rank("deadline", 5.0, 1000.0) == 6.0 < prefill_rank("deadline", 0.0, 30_000.0) == 30.0
    assert prefill_rank("fcfs", 5.0, 1000.0) == 5.0 > prefill_rank("fcfs", 0.0, 30_000.0) == 0.0
    assert sched().prefill_rank(5.0, 1000.0) == 6.0  # the default order is by deadline
    assert sched(prefill_order="fcfs").prefill_rank(5.0, 1000.0) == 5.0
    with pytest.raises(ValueError, match="prefill_order"):
        sched(prefill_order="lifo")


def test_is_late_only_in_deadline_order_with_demotion() -> None:
    assert sched().is_late(5.0, now=6.0) and not sched().is_late(5.0, now=5.0)
    assert not sched(demote_late=False).is_late(5.0, now=6.0)
    assert not sched(prefill_order="fcfs").is_late(5.0, now=6.0)  # an arrival time is no deadline


def test_config_defaults_are_valid_and_frozen() -> None:
    cfg = LocalSchedulerConfig()
    assert (cfg.tbt_slo_ms, cfg.margin, cfg.max_batched_tokens) == (100.0, 0.1, 8192)
    with pytest.raises(AttributeError):
        cfg.margin = 0.2  # type: ignore[misc]
    assert LocalScheduler(MODEL).config == cfg

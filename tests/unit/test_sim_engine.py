"""The simulated engine: exact greedy tokens, stops, sampling, aborts, KV queueing, bad descriptors, and
split runs over real NIXL transports between two engines in this process."""

from __future__ import annotations

import asyncio
import dataclasses
import random
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace

import pytest

from dynaserve.costmodel import StepLatencyModel
from dynaserve.protocol import (
    FINISH_HANDOFF,
    FINISH_LENGTH,
    FINISH_STOP,
    ROLE_A,
    ROLE_B,
    ROLE_FULL,
    MicroDescriptor,
    SamplingParams,
)
from dynaserve.split import tokens_emitted_by_a
from workers.engine import EngineError, Handoff, StepOutput
from workers.engines.sim import SimEngine, SimEngineConfig, reference_tokens
from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig

BLOCK = 16


def make_engine(kv_capacity_tokens: int = 4096, transport: object = None, **kw: object) -> SimEngine:
    cfg = SimEngineConfig(time_scale=1e-4, kv_capacity_tokens=kv_capacity_tokens, block_size=BLOCK, **kw)  # type: ignore[arg-type]
    return SimEngine(cfg, LocalScheduler(StepLatencyModel()), transport)  # type: ignore[arg-type]


def prompt_of(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, 32000) for _ in range(n)]


def desc(
    rid: str,
    prompt: list[int],
    max_tokens: int,
    *,
    role: str = ROLE_FULL,
    split: int | None = None,
    emit: int | None = None,
    arrival: float = 0.0,
    **sampling: object,
) -> MicroDescriptor:
    p = len(prompt)
    total = p + max_tokens
    s = total if split is None else split
    if role == ROLE_FULL:
        start, end, n = 0, total, max_tokens
    elif role == ROLE_A:
        start, end, n = 0, s, tokens_emitted_by_a(p, max_tokens, s)
    else:
        start, end, n = s, total, max_tokens - tokens_emitted_by_a(p, max_tokens, s)
    sp = SamplingParams(max_tokens=max_tokens, **{"ignore_eos": True, **sampling})  # type: ignore[arg-type]
    return MicroDescriptor(rid, role, prompt, s, start, end, n if emit is None else emit, None, sp, 2000.0, 100.0, arrival)


@dataclass
class Run:
    tokens: dict[str, list[int]] = field(default_factory=dict)
    finish: dict[str, str | None] = field(default_factory=dict)
    handoffs: list[Handoff] = field(default_factory=list)
    failures: list[tuple[str, str, str]] = field(default_factory=list)
    first_step: dict[str, int] = field(default_factory=dict)  # step index of a request's first token
    finish_step: dict[str, int] = field(default_factory=dict)
    steps: int = 0

    def absorb(self, out: StepOutput, step: int) -> None:
        for rid, toks, fin in out.entries:
            assert rid not in self.finish, f"{rid} emitted after finishing"
            self.tokens.setdefault(rid, []).extend(toks)
            self.first_step.setdefault(rid, step)
            if fin is not None:
                self.finish[rid] = fin
                self.finish_step[rid] = step
        self.handoffs += out.handoffs
        self.failures += out.failures


async def drive(
    engine: SimEngine, run: Run | None = None, max_steps: int = 3000, until: Callable[[Run], bool] | None = None
) -> Run:
    """Step the engine until it has no work (or ``until(run)``), at most ``max_steps`` steps."""
    run = run or Run()
    now = 0.0
    for _ in range(max_steps):
        if until is not None and until(run):
            break
        if not engine.has_work():
            break
        out = await engine.step(now)
        run.absorb(out, run.steps)
        run.steps += 1
        now += 0.001
    return run


def run_full(engine: SimEngine, *descs: MicroDescriptor) -> Run:
    for d in descs:
        engine.add(d, 0.0)
    return asyncio.run(drive(engine))


# ----------------------------------------------------------------------------------- full role


@pytest.mark.parametrize(("p", "o"), [(1, 1), (5, 1), (40, 12), (33, 30), (300, 8)])
def test_full_run_equals_reference(p: int, o: int) -> None:
    eng = make_engine()
    prompt = prompt_of(p, seed=p * 100 + o)
    run = run_full(eng, desc("r", prompt, o))
    assert run.tokens["r"] == reference_tokens(prompt, o)
    assert run.finish["r"] == FINISH_LENGTH
    assert eng.pool.num_used == 0 and not eng.seqs and not eng.has_work()


def test_reference_tokens_depend_on_the_whole_prompt() -> None:
    prompt = prompt_of(20, seed=1)
    ref = reference_tokens(prompt, 10)
    assert len(ref) == 10 and all(0 <= t < 32000 for t in ref)
    assert reference_tokens([prompt[0] + 1, *prompt[1:]], 10) != ref
    assert reference_tokens(prompt, 4) == ref[:4]
    assert all(0 <= t < 50 for t in reference_tokens(prompt, 30, vocab_size=50))


def test_several_requests_at_once_are_independent() -> None:
    eng = make_engine()
    prompts = {f"r{i}": prompt_of(10 + 37 * i, seed=i) for i in range(5)}
    run = run_full(eng, *(desc(rid, pr, 6 + i, arrival=float(i)) for i, (rid, pr) in enumerate(prompts.items())))
    for i, (rid, pr) in enumerate(prompts.items()):
        assert run.tokens[rid] == reference_tokens(pr, 6 + i)
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("order", ["deadline", "fcfs"])
def test_prefill_order(order: str) -> None:
    """A long prompt with a loose TTFT SLO arrives first, a short one with a tight SLO after it; chunks of
    64 tokens per step: by deadline the short one gets its first token first, by arrival the long one."""
    cfg = SimEngineConfig(time_scale=1e-4, kv_capacity_tokens=4096, block_size=BLOCK)
    local = LocalScheduler(StepLatencyModel(), LocalSchedulerConfig(max_batched_tokens=64, prefill_order=order))
    eng = SimEngine(cfg, local, None)
    long_p, short_p = prompt_of(600, seed=1), prompt_of(50, seed=2)
    long_d = replace(desc("long", long_p, 3, arrival=0.0), ttft_slo_ms=20_000.0)  # deadline 20 s
    short_d = replace(desc("short", short_p, 3, arrival=0.5), ttft_slo_ms=1_000.0)  # deadline 1.5 s
    run = run_full(eng, long_d, short_d)
    assert run.tokens == {"long": reference_tokens(long_p, 3), "short": reference_tokens(short_p, 3)}
    if order == "deadline":
        assert run.first_step["short"] == 0 and run.first_step["long"] > run.first_step["short"]
    else:
        assert run.first_step["long"] < run.first_step["short"]
    assert eng.pool.num_used == 0


@pytest.mark.parametrize("demote", [True, False])
def test_prefills_past_their_deadline_go_last(demote: bool) -> None:
    """The long prompt's TTFT deadline has passed before the engine starts (it arrived 10 s before, with a
    1 s SLO); the short one can still meet its own. With demotion the short one gets its first token
    first although its deadline is later; without, the earlier deadline goes first."""
    cfg = SimEngineConfig(time_scale=1e-4, kv_capacity_tokens=4096, block_size=BLOCK)
    local = LocalScheduler(StepLatencyModel(), LocalSchedulerConfig(max_batched_tokens=64, demote_late=demote))
    eng = SimEngine(cfg, local, None)
    long_p, short_p = prompt_of(600, seed=3), prompt_of(50, seed=4)
    long_d = replace(desc("long", long_p, 3, arrival=-10.0), ttft_slo_ms=1_000.0)  # deadline -9 s
    short_d = replace(desc("short", short_p, 3, arrival=0.0), ttft_slo_ms=1_000.0)  # deadline 1 s
    run = run_full(eng, long_d, short_d)
    assert run.tokens == {"long": reference_tokens(long_p, 3), "short": reference_tokens(short_p, 3)}
    if demote:
        assert run.first_step["short"] < run.first_step["long"]
    else:
        assert run.first_step["long"] < run.first_step["short"]


def _stop_at(ref: list[int], k: int) -> int:
    assert ref[k] not in ref[:k], "pick another prompt: the stop token appears earlier"
    return ref[k]


def test_stop_token_ids_finish_with_stop() -> None:
    prompt = prompt_of(30, seed=7)
    ref = reference_tokens(prompt, 20)
    eng = make_engine()
    run = run_full(eng, desc("r", prompt, 20, stop_token_ids=[_stop_at(ref, 5)]))
    assert run.tokens["r"] == ref[:6]
    assert run.finish["r"] == FINISH_STOP
    assert eng.pool.num_used == 0


@pytest.mark.parametrize(("ignore_eos", "expect_len", "reason"), [(False, 4, FINISH_STOP), (True, 20, FINISH_LENGTH)])
def test_eos(ignore_eos: bool, expect_len: int, reason: str) -> None:
    prompt = prompt_of(30, seed=8)
    ref = reference_tokens(prompt, 20)
    eng = make_engine(eos_token_id=_stop_at(ref, 3))
    run = run_full(eng, desc("r", prompt, 20, ignore_eos=ignore_eos))
    assert run.tokens["r"] == ref[:expect_len]
    assert run.finish["r"] == reason


def test_sampling_with_seed_is_deterministic_and_not_greedy() -> None:
    prompt = prompt_of(25, seed=9)

    def sample(seed: int | None, temperature: float = 0.8) -> list[int]:
        return run_full(make_engine(), desc("r", prompt, 16, temperature=temperature, seed=seed)).tokens["r"]

    a = sample(7)
    assert a == sample(7)
    assert a != reference_tokens(prompt, 16)
    assert a != sample(8)
    assert sample(7, temperature=0.0) == reference_tokens(prompt, 16)  # the seed is ignored when greedy


def test_abort_frees_blocks() -> None:
    eng = make_engine()
    eng.add(desc("r", prompt_of(200, seed=3), 50), 0.0)
    run = asyncio.run(drive(eng, max_steps=2))
    assert eng.pool.num_used == eng.pool.blocks_for_tokens(250)
    assert "r" not in run.finish
    assert eng.abort("r") is True
    assert eng.pool.num_used == 0 and not eng.seqs and not eng.has_work()
    assert eng.abort("r") is False
    assert eng.abort("never-seen") is False
    assert eng.load().active_requests == 0


def test_kv_exhaustion_queues_until_blocks_free() -> None:
    eng = make_engine(kv_capacity_tokens=64)  # 4 blocks
    p1, p2 = prompt_of(40, seed=1), prompt_of(30, seed=2)
    eng.add(desc("r1", p1, 20, arrival=0.0), 0.0)  # 60 tokens: all 4 blocks
    eng.add(desc("r2", p2, 10, arrival=1.0), 0.0)  # 40 tokens: 3 blocks
    run = asyncio.run(drive(eng, max_steps=1))
    assert eng.pool.num_used == 4
    ld = eng.load()
    assert ld.active_requests == 2 and ld.kv_used_tokens == 64 and ld.kv_capacity_tokens == 64
    assert "r2" not in run.tokens
    run = asyncio.run(drive(eng, run))
    assert run.tokens == {"r1": reference_tokens(p1, 20), "r2": reference_tokens(p2, 10)}
    assert run.first_step["r2"] > run.finish_step["r1"]
    assert eng.pool.num_used == 0


def test_a_request_larger_than_the_pool_does_not_block_others() -> None:
    eng = make_engine(kv_capacity_tokens=64, max_model_len=4096)
    small = prompt_of(10, seed=2)
    try:
        eng.add(desc("big", prompt_of(100, seed=1), 10, arrival=0.0), 0.0)
    except EngineError:
        return  # rejected up front: fine
    eng.add(desc("small", small, 5, arrival=1.0), 0.0)
    run = asyncio.run(drive(eng, max_steps=200, until=lambda r: "small" in r.finish))
    assert run.tokens.get("small") == reference_tokens(small, 5)


def test_load_report_of_queued_work() -> None:
    eng = make_engine()
    eng.add(desc("r", prompt_of(100, seed=4), 30), 0.0)
    ld = eng.load()
    assert (ld.queued_prefill_tokens, ld.pending_decode_tokens, ld.running_seqs, ld.active_requests) == (100, 30, 0, 1)
    eng.abort("r")


# ----------------------------------------------------------------------------------- bad descriptors


@pytest.mark.parametrize(
    ("make", "code"),
    [
        (lambda pr: desc("r", pr, 8, role="C"), "bad_role"),
        (lambda pr: desc("r", [], 8), "empty_prompt"),
        (lambda pr: desc("r", [*pr, 32000], 8), "bad_token"),
        (lambda pr: desc("r", [-1, *pr], 8), "bad_token"),
        (lambda pr: desc("r", pr, 4096 - len(pr) + 1), "too_long"),
        (lambda pr: desc("r", pr, 8, emit=9), "bad_field"),
        (lambda pr: desc("r", pr, 8, emit=-1), "bad_field"),
        (lambda pr: desc("r", pr, 8, role=ROLE_A, split=0), "bad_split"),
        (lambda pr: desc("r", pr, 8, role=ROLE_A, split=len(pr) + 8), "bad_split"),
        (lambda pr: desc("r", pr, 8, role=ROLE_B, split=len(pr) + 9), "bad_split"),
        (lambda pr: dataclasses.replace(desc("r", pr, 8, role=ROLE_A, split=5), early_tail=-1), "bad_field"),
    ],
    ids=["role", "empty", "token_high", "token_negative", "too_long", "emit_high", "emit_negative",
         "split_zero", "split_total", "split_beyond", "early_tail_negative"],
)
def test_bad_descriptors(make: object, code: str) -> None:
    eng = make_engine(max_model_len=4096)
    with pytest.raises(EngineError) as info:
        eng.add(make(prompt_of(10, seed=5)), 0.0)  # type: ignore[operator]
    assert info.value.code == code
    assert not eng.seqs and eng.pool.num_used == 0


def test_longest_accepted_request() -> None:
    eng = make_engine(max_model_len=4096)
    eng.add(desc("r", prompt_of(10, seed=5), 4086), 0.0)
    eng.add(desc("vocab-edge", [0, 31999], 1), 0.0)
    assert set(eng.seqs) == {"r", "vocab-edge"}


def test_duplicate_id() -> None:
    eng = make_engine()
    pr = prompt_of(10, seed=6)
    eng.add(desc("r", pr, 4), 0.0)
    with pytest.raises(EngineError) as info:
        eng.add(desc("r", pr, 4), 0.0)
    assert info.value.code == "duplicate_id"
    run = asyncio.run(drive(eng))
    assert run.tokens["r"] == reference_tokens(pr, 4)  # the first one is untouched


def test_start_decode_errors() -> None:
    eng = make_engine()
    pr = prompt_of(20, seed=7)
    with pytest.raises(EngineError) as info:
        eng.start_decode("nobody", {}, 10, [], 0.0)
    assert info.value.code == "unknown_id"
    eng.add(desc("full", pr, 4), 0.0)
    with pytest.raises(EngineError) as info:
        eng.start_decode("full", {}, 10, [], 0.0)
    assert info.value.code == "unknown_id"
    eng.add(desc("b", pr, 4, role=ROLE_B, split=10), 0.0)
    with pytest.raises(EngineError) as info:
        eng.start_decode("b", {}, 11, [], 0.0)
    assert info.value.code == "bad_handoff"
    eng.start_decode("b", {}, 10, [], 0.0)
    with pytest.raises(EngineError) as info:
        eng.start_decode("b", {}, 10, [], 0.0)
    assert info.value.code == "bad_state"
    eng.abort("b")
    eng.abort("full")
    assert eng.pool.num_used == 0


def test_role_b_waits_for_kv() -> None:
    eng = make_engine()
    eng.add(desc("b", prompt_of(20, seed=7), 4, role=ROLE_B, split=10), 0.0)
    assert not eng.has_work()
    out = asyncio.run(eng.step(0.0))
    assert out.entries == [] and eng.pool.num_used == 0
    assert eng.load().queued_prefill_tokens == 10  # the prompt positions B will compute
    eng.abort("b")


def test_role_b_without_transport_recomputes() -> None:
    # no transport to pull with: B reports the failure and recomputes from position 0
    eng = make_engine()
    pr = prompt_of(20, seed=7)
    ref = reference_tokens(pr, 6)
    eng.add(desc("b", pr, 6, role=ROLE_B, split=22), 0.0)  # A emitted 3 tokens
    eng.start_decode("b", {"agent": "nowhere"}, 22, ref[:3], 0.0)
    run = asyncio.run(drive(eng))
    assert [f[:2] for f in run.failures] == [("b", "kv_transfer_recompute")]
    assert run.tokens["b"] == ref[3:]
    assert eng.pool.num_used == 0


# ----------------------------------------------------------------------------------- NIXL handoff


def _nixl_available() -> bool:
    from workers.kv.nixl import nixl_available

    return nixl_available()


nixl_only = pytest.mark.skipif(not _nixl_available(), reason="nixl is not importable")


def _engine_pair(**kw: object) -> Iterator[tuple[SimEngine, SimEngine]]:
    from workers.kv import make_transport

    tag = uuid.uuid4().hex[:8]
    a = make_engine(transport=make_transport("nixl", f"simA-{tag}"), **kw)
    b = make_engine(transport=make_transport("nixl", f"simB-{tag}"), **kw)
    yield a, b
    leaks = [(e.pool.num_used, sorted(e.seqs)) for e in (a, b)]
    a.close()
    b.close()
    assert leaks == [(0, []), (0, [])], "blocks or requests left on the engines"


@pytest.fixture(scope="module")
def pair() -> Iterator[tuple[SimEngine, SimEngine]]:
    yield from _engine_pair()


@pytest.fixture(scope="module")
def unverified_pair() -> Iterator[tuple[SimEngine, SimEngine]]:
    """Engines that do not checksum handoffs: B continues from whatever bytes it pulled."""
    yield from _engine_pair(verify_kv=False)


def _split_run(
    pair: tuple[SimEngine, SimEngine], rid: str, prompt: list[int], o: int, s: int, corrupt: bool = False
) -> tuple[list[int], list[int], Run, Run]:
    eng_a, eng_b = pair
    eng_a.add(desc(rid, prompt, o, role=ROLE_A, split=s), 0.0)
    eng_b.add(desc(rid, prompt, o, role=ROLE_B, split=s), 0.0)
    run_a = asyncio.run(drive(eng_a))
    assert not eng_a.has_work()
    (hand,) = run_a.handoffs
    ea = tokens_emitted_by_a(len(prompt), o, s)
    assert hand.req_id == rid and hand.num_tokens == s and len(hand.tokens) == ea
    a_tokens = run_a.tokens.get(rid, [])
    assert a_tokens == hand.tokens
    if ea:
        assert run_a.finish[rid] == FINISH_HANDOFF
    else:
        assert rid not in run_a.finish
    held = hand.kv["block_ids"]
    assert len(held) == -(-s // BLOCK) and eng_a.pool.num_used == len(held)
    assert eng_a.load().held_blocks == len(held)
    if corrupt:
        eng_a.pool.buffer[held] ^= 0x5A
    eng_b.start_decode(rid, hand.kv, hand.num_tokens, hand.tokens, 0.0)
    run_b = asyncio.run(drive(eng_b))
    assert run_b.finish[rid] == FINISH_LENGTH
    assert eng_b.pool.num_used == 0 and not eng_b.seqs
    # A frees the blocks it held once the read is confirmed
    deadline = time.monotonic() + 10.0
    while eng_a.pool.num_used and time.monotonic() < deadline:
        eng_a.housekeeping(0.0)
        time.sleep(0.001)
    assert eng_a.pool.num_used == 0 and not eng_a.seqs
    return a_tokens, run_b.tokens[rid], run_a, run_b


P_LEN, O_LEN = 40, 12


@nixl_only
@pytest.mark.parametrize(
    "s",
    [1, 20, 16, 32, P_LEN, P_LEN + 1, P_LEN + 8, P_LEN + O_LEN - 2],
    ids=["prompt_1", "prompt", "prompt_block", "prompt_block2", "pd", "decode_1", "decode_block", "decode_last"],
)
def test_split_equals_unsplit(pair: tuple[SimEngine, SimEngine], s: int) -> None:
    prompt = prompt_of(P_LEN, seed=11)
    a_tokens, b_tokens, _, run_b = _split_run(pair, f"split-{s}", prompt, O_LEN, s)
    assert a_tokens + b_tokens == reference_tokens(prompt, O_LEN)
    assert len(b_tokens) == O_LEN - tokens_emitted_by_a(P_LEN, O_LEN, s)
    assert run_b.failures == []  # B used the pulled KV, no recompute


@nixl_only
@pytest.mark.parametrize("s", [32, P_LEN, P_LEN + 3], ids=["prompt", "pd", "decode"])
def test_corrupted_handoff_changes_b_tokens(unverified_pair: tuple[SimEngine, SimEngine], s: int) -> None:
    """Control: without the checksum, B's tokens follow the bytes it pulled, so B really uses A's KV."""
    prompt = prompt_of(P_LEN, seed=12)
    ref = reference_tokens(prompt, O_LEN)
    a_tokens, b_tokens, _, run_b = _split_run(unverified_pair, f"corrupt-{s}", prompt, O_LEN, s, corrupt=True)
    assert run_b.failures == []  # the transfer itself succeeded
    assert a_tokens == ref[: len(a_tokens)]
    assert b_tokens != ref[len(a_tokens) :]


@nixl_only
@pytest.mark.parametrize("s", [32, P_LEN, P_LEN + 3], ids=["prompt", "pd", "decode"])
def test_corrupted_handoff_is_detected_and_recomputed(pair: tuple[SimEngine, SimEngine], s: int) -> None:
    prompt = prompt_of(P_LEN, seed=14)
    ref = reference_tokens(prompt, O_LEN)
    a_tokens, b_tokens, _, run_b = _split_run(pair, f"verified-{s}", prompt, O_LEN, s, corrupt=True)
    assert [(rid, code) for rid, code, _ in run_b.failures] == [(f"verified-{s}", "kv_transfer_recompute")]
    assert a_tokens + b_tokens == ref


def _hand_off_only(eng_a: SimEngine, rid: str) -> Handoff:
    eng_a.add(desc(rid, prompt_of(P_LEN, seed=13), O_LEN, role=ROLE_A, split=P_LEN), 0.0)
    run = asyncio.run(drive(eng_a))
    (hand,) = run.handoffs
    assert eng_a.pool.num_used == len(hand.kv["block_ids"]) == 3
    return hand


@nixl_only
def test_lease_expiry_frees_held_blocks(pair: tuple[SimEngine, SimEngine]) -> None:
    eng_a, _ = pair
    _hand_off_only(eng_a, "lease")  # driven on a clock that starts at 0
    eng_a.housekeeping(1.0)  # no confirmation, lease still running
    assert eng_a.pool.num_used == 3
    eng_a.housekeeping(eng_a.config.lease_s + 2.0)
    assert eng_a.pool.num_used == 0 and not eng_a.seqs


@nixl_only
def test_abort_frees_held_blocks(pair: tuple[SimEngine, SimEngine]) -> None:
    eng_a, _ = pair
    _hand_off_only(eng_a, "abort-held")
    assert eng_a.abort("abort-held") is True
    assert eng_a.pool.num_used == 0 and not eng_a.seqs


@nixl_only
def test_lease_expiry_follows_the_injected_clock(pair: tuple[SimEngine, SimEngine]) -> None:
    eng_a, _ = pair
    _hand_off_only(eng_a, "lease-clock")  # every step ran at now <= 1 s
    try:
        eng_a.housekeeping(eng_a.config.lease_s + 10.0)
        assert eng_a.pool.num_used == 0
    finally:
        eng_a.abort("lease-clock")

"""The scheduler subclass's split of an A's prefill for an early KV pull (pure logic on stand-in requests)."""

from __future__ import annotations

from types import SimpleNamespace

import pytest

pytest.importorskip("vllm")

from vllm.v1.request import RequestStatus  # noqa: E402

from workers.engines.vllm_scheduler import DynaServeScheduler  # noqa: E402


def _req(rid: str, computed: int, prompt: int, status: RequestStatus = RequestStatus.WAITING) -> SimpleNamespace:
    return SimpleNamespace(request_id=rid, num_computed_tokens=computed, num_prompt_tokens=prompt, status=status)


def _sched(running: list, waiting: list) -> DynaServeScheduler:
    s = DynaServeScheduler.__new__(DynaServeScheduler)  # only the queues and the split table are used
    s.split_prefill = {"a": 768}
    s.running, s.waiting = running, waiting
    return s


def test_the_one_prefill_stops_at_its_first_chunk_end() -> None:
    assert _sched([], [_req("a", 0, 1000)])._split_cap() == 768  # waiting: the first step takes 768 tokens
    decoding = _req("d", 70, 60, RequestStatus.RUNNING)
    assert _sched([decoding, _req("a", 256, 1000, RequestStatus.RUNNING)], [])._split_cap() == 512
    assert _sched([_req("a", 768, 1000, RequestStatus.RUNNING)], [])._split_cap() == 0  # the rest: no cap


def test_no_cap_beside_other_prefills_or_for_other_requests() -> None:
    assert _sched([_req("a", 0, 1000, RequestStatus.RUNNING)], [_req("x", 0, 50)])._split_cap() == 0
    assert _sched([], [_req("x", 0, 1000)])._split_cap() == 0
    parked = _req("b", 0, 300, RequestStatus.WAITING_FOR_REMOTE_KVS)  # not a prefill in line
    assert _sched([], [_req("a", 0, 1000), parked])._split_cap() == 768

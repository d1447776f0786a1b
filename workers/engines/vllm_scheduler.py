"""vLLM scheduler subclass: DynaServe's local scheduler sets every step's token budget inside vLLM.

vLLM builds it from ``EngineArgs(scheduler_cls="workers.engines.vllm_scheduler.DynaServeScheduler")``. The
worker's engine attaches its LocalScheduler as ``scheduler.local``; before each step the budget is set to
the decodes in the batch plus the prefill tokens the SLO allows, and a summary of what was scheduled is
kept in ``last_step`` so the engine can feed the measured step time back (``LocalScheduler.observe``).

Prefill order: vLLM fills a step's budget from its running list in order, then from its waiting queue in
order. With the local scheduler's ``prefill_order="deadline"``, both are re-sorted before each step: decodes
first (one token each), then sequences with prompt left by ``ranks`` (the engine sets each request's rank
from ``LocalScheduler.prefill_rank``: its TTFT deadline; those already past it after the others,
``LocalScheduler.is_late``), so the budget goes to the earliest deadline that can still be met, as in the
simulated engine. The order also makes vLLM preempt the latest deadline first when KV runs out.
Only workers/engines/vllm* imports vllm.
"""

from __future__ import annotations

import time
from collections import deque
from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler
from vllm.v1.request import RequestStatus

from workers.local_scheduler import LocalScheduler, StepPlan

_READY = (RequestStatus.WAITING, RequestStatus.PREEMPTED)


class DynaServeScheduler(Scheduler):
    """vLLM's scheduler with a per-step token budget from the SLO-aware local scheduler."""

    local: LocalScheduler | None = None
    last_step: StepPlan | None = None

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.ranks: dict[str, float] = {}  # internal request id -> prefill rank (smaller first)
        # internal request id -> where its first prefill chunk ends (an A whose finished blocks B pulls while
        # it computes the rest; set by the engine)
        self.split_prefill: dict[str, int] = {}
        self._now = 0.0

    def _rank(self, req: Any) -> tuple[int, bool, float]:
        if req.num_computed_tokens >= req.num_prompt_tokens:
            return (0, False, 0.0)  # decoding
        rank = self.ranks.get(req.request_id, float("inf"))
        local = self.local
        return (1, local is not None and local.is_late(rank, self._now), rank)

    def _order_by_deadline(self) -> list[Any]:
        """Sort running and waiting by rank; returns the running prefills to sit out this step (see below)."""
        self._now = time.monotonic()  # the broker's clock too when they share a host (descriptor arrivals)
        ranks = self.ranks
        if len(ranks) > 2 * len(self.requests) + 64:
            self.ranks = {k: v for k, v in ranks.items() if k in self.requests}
        if len(self.running) > 1:
            self.running.sort(key=self._rank)  # stable: arrival order among equals
        waiting = self.waiting
        if not waiting or not isinstance(waiting, deque):
            return []
        if len(waiting) > 1:
            items = sorted(waiting, key=self._rank)
            waiting.clear()
            waiting.extend(items)
        # vLLM serves running requests before waiting ones. A running prefill whose deadline is later than
        # a waiting request's sits out this step, so the budget reaches the earlier deadline first (next
        # step both are running and sorted). Only while every request fits the running cap: hidden
        # requests must not let vLLM admit more than max_num_running_reqs.
        if len(self.running) + len(waiting) > self.max_num_running_reqs:
            return []
        ready = [r for r in waiting if r.status in _READY]  # not those waiting for KV from A
        if not ready:
            return []
        first = self._rank(ready[0])
        keep: list[Any] = []
        late: list[Any] = []
        for r in self.running:
            (late if self._rank(r) > first else keep).append(r)
        if late:
            self.running = keep
        return late

    def _split_cap(self) -> int:
        """Prefill tokens this step may take when the one prefill in line is an A to be split for an early
        pull and has not reached its first chunk's end (0: no cap). With other prefills around, the budget
        is left as it is (splitting one would cut the others' share)."""
        prefills = [r for r in self.running if r.num_computed_tokens < r.num_prompt_tokens]
        prefills += [r for r in self.waiting if r.status in _READY]
        if len(prefills) != 1:
            return 0
        req = prefills[0]
        end = self.split_prefill.get(req.request_id, 0)
        return end - req.num_computed_tokens if end > req.num_computed_tokens else 0

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        local = self.local
        late: list[Any] = []
        if local is not None:
            decodes = 0
            ctx = 0
            for req in self.running:
                if req.num_computed_tokens >= req.num_prompt_tokens:
                    decodes += 1
                    ctx += req.num_computed_tokens
            # only decodes and nothing waiting (most steps): every rank is equal, nothing to order
            if local.config.prefill_order == "deadline" and (decodes < len(self.running) or self.waiting):
                late = self._order_by_deadline()  # sets aside running prefills only: the decodes stay counted
            budget = local.token_budget(decodes, ctx) + decodes
            if self.split_prefill:
                cap = self._split_cap()
                if cap:
                    budget = min(budget, decodes + cap)
            self.max_num_scheduled_tokens = max(1, min(budget, self.scheduler_config.max_num_batched_tokens))
        try:
            out = super().schedule(*args, **kwargs)
        finally:
            if late:
                self.running.extend(late)
        if local is not None:
            plan = StepPlan(token_budget=self.max_num_scheduled_tokens)
            for rid, n in out.num_scheduled_tokens.items():
                req = self.requests.get(rid)
                # schedule() has already advanced num_computed_tokens by this step's tokens
                ctx = max(0, req.num_computed_tokens - n) if req is not None else 0
                if req is not None and n == 1 and ctx >= req.num_prompt_tokens:
                    plan.decodes.append(rid)
                    plan.decode_ctx_tokens += ctx
                else:
                    plan.prefills.append((rid, n))
                    plan.prefill_tokens += n
                    plan.prefill_attn += n * (ctx + n / 2.0)
            self.last_step = plan
        return out

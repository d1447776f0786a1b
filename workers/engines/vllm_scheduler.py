"""vLLM scheduler subclass: DynaServe's local scheduler sets every step's token budget inside vLLM.

vLLM builds it from ``EngineArgs(scheduler_cls="workers.engines.vllm_scheduler.DynaServeScheduler")``. The
worker's engine attaches its LocalScheduler as ``scheduler.local``; before each step the budget is set to
the decodes in the batch plus the prefill tokens the SLO allows, and a summary of what was scheduled is
kept in ``last_step`` so the engine can feed the measured step time back (``LocalScheduler.observe``).
Only workers/engines/vllm* imports vllm.
"""

from __future__ import annotations

from typing import Any

from vllm.v1.core.sched.scheduler import Scheduler

from workers.local_scheduler import LocalScheduler, StepPlan


class DynaServeScheduler(Scheduler):
    """vLLM's scheduler with a per-step token budget from the SLO-aware local scheduler."""

    local: LocalScheduler | None = None
    last_step: StepPlan | None = None

    def schedule(self, *args: Any, **kwargs: Any) -> Any:
        local = self.local
        if local is not None:
            decodes = 0
            ctx = 0
            for req in self.running:
                if req.num_computed_tokens >= req.num_prompt_tokens:
                    decodes += 1
                    ctx += req.num_computed_tokens
            budget = local.token_budget(decodes, ctx) + decodes
            self.max_num_scheduled_tokens = max(1, min(budget, self.scheduler_config.max_num_batched_tokens))
        out = super().schedule(*args, **kwargs)
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

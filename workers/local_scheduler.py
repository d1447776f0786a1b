"""The local scheduler: forms every engine step's batch under the TBT SLO.

Pure: sequences in, a StepPlan out; measured step times go back in through ``observe``. Decodes go first
(every running decode gets a token each step, up to ``max_num_seqs``), then prefill chunks fill the largest
token budget whose predicted step time stays under ``(1 - margin) * TBT SLO``. Prefill chunks are taken in
the engine's priority order, which ``prefill_rank`` defines: by TTFT deadline (``prefill_order="deadline"``,
the default: a short prompt with a tight deadline does not wait behind a long one that has time) or by
arrival (``"fcfs"``, what a stock engine does). In deadline order, prefills whose deadline has already
passed go behind those that can still meet theirs (``demote_late``): the late ones have missed their TTFT
SLO whatever happens, and serving them first would make the others miss theirs too. The prediction is the
step-latency model times a correction factor learned from measured steps (fast to rise after a latency
spike, slow to fall), so the budget adapts when the model is off.

The simulated engine runs a StepPlan as is; the vLLM engine takes only ``token_budget`` into vLLM's own
scheduler. Both use this class.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

from dynaserve.costmodel import StepLatencyModel

PREFILL_ORDERS = ("deadline", "fcfs")


@dataclass(frozen=True)
class LocalSchedulerConfig:
    """Knobs of the SLO-aware batcher."""

    tbt_slo_ms: float = 100.0  # the TBT SLO every step must respect
    margin: float = 0.1  # keep predicted step time under (1 - margin) * SLO
    max_batched_tokens: int = 8192  # hard cap of tokens per step (engine buffer size)
    max_num_seqs: int = 256  # cap of decode sequences per step
    min_chunk_tokens: int = 16  # prefill progress guaranteed per step even under decode pressure
    alpha_up: float = 0.5  # EWMA weight when steps run slower than predicted
    alpha_down: float = 0.05  # EWMA weight when steps run faster than predicted
    max_correction: float = 10.0
    prefill_order: str = "deadline"  # "deadline" (earliest TTFT deadline first) or "fcfs" (arrival order)
    demote_late: bool = True  # deadline order: prefills past their TTFT deadline go behind the others

    def __post_init__(self) -> None:
        if self.tbt_slo_ms <= 0:
            raise ValueError("tbt_slo_ms must be > 0")
        if not 0 <= self.margin < 1:
            raise ValueError("margin must be in [0, 1)")
        if self.max_batched_tokens < 1 or self.max_num_seqs < 1 or self.min_chunk_tokens < 1:
            raise ValueError("max_batched_tokens, max_num_seqs and min_chunk_tokens must be >= 1")
        if self.prefill_order not in PREFILL_ORDERS:
            raise ValueError(f"prefill_order must be one of {PREFILL_ORDERS}, got {self.prefill_order!r}")


def prefill_rank(order: str, arrival: float, ttft_slo_ms: float) -> float:
    """Sort key of a sequence with prefill work (smaller first): its TTFT deadline, or its arrival.

    Engines keep their prefilling sequences sorted by this key (ties in arrival order) and hand them to
    :meth:`LocalScheduler.schedule` in that order; a B micro-request that prefills the rest of a split
    prompt carries the request's arrival and TTFT SLO, so it keeps the request's deadline.
    """
    return arrival + ttft_slo_ms / 1000.0 if order == "deadline" else arrival


@dataclass(frozen=True, slots=True)
class PrefillItem:
    """A sequence with prompt (or handoff) positions still to compute, in priority order."""

    req_id: str
    remaining: int
    ctx: int  # positions already computed


@dataclass(frozen=True, slots=True)
class DecodeItem:
    req_id: str
    ctx: int


@dataclass(slots=True)
class StepPlan:
    decodes: list[str] = field(default_factory=list)
    prefills: list[tuple[str, int]] = field(default_factory=list)  # (req_id, chunk tokens)
    token_budget: int = 0
    predicted_ms: float = 0.0
    prefill_tokens: int = 0
    decode_ctx_tokens: int = 0
    prefill_attn: float = 0.0

    @property
    def empty(self) -> bool:
        return not self.decodes and not self.prefills


class LocalScheduler:
    """SLO-aware batch former with an adaptive correction of the step-latency model."""

    def __init__(self, model: StepLatencyModel, config: LocalSchedulerConfig | None = None) -> None:
        self.model = model
        self.config = config or LocalSchedulerConfig()
        self.correction = 1.0
        self.steps = 0
        self.last_budget = self.config.max_batched_tokens

    def prefill_rank(self, arrival: float, ttft_slo_ms: float) -> float:
        """:func:`prefill_rank` under this scheduler's ``prefill_order``."""
        return prefill_rank(self.config.prefill_order, arrival, ttft_slo_ms)

    def is_late(self, rank: float, now: float) -> bool:
        """True when a prefill of this rank goes behind the others at ``now``: deadline order with
        ``demote_late``, and its deadline (the rank) has passed. Engines sort prefills by
        ``(is_late(rank, now), rank)``."""
        cfg = self.config
        return cfg.demote_late and cfg.prefill_order == "deadline" and rank < now

    def token_budget(self, decode_seqs: int, decode_ctx_tokens: int, first_prefill_ctx: int = 0) -> int:
        """Prefill tokens the next step may carry next to these decodes."""
        cfg = self.config
        if decode_seqs == 0:
            return cfg.max_batched_tokens
        limit = cfg.tbt_slo_ms * (1.0 - cfg.margin) / self.correction
        n = self.model.max_prefill_tokens(limit, decode_seqs, decode_ctx_tokens, first_prefill_ctx)
        return max(cfg.min_chunk_tokens, min(n, cfg.max_batched_tokens - decode_seqs))

    def schedule(self, decodes: Sequence[DecodeItem], prefills: Sequence[PrefillItem]) -> StepPlan:
        """One step's batch: ``decodes`` first, then chunks of ``prefills`` in the given (priority) order."""
        cfg = self.config
        plan = StepPlan()
        for d in decodes[: cfg.max_num_seqs]:
            plan.decodes.append(d.req_id)
            plan.decode_ctx_tokens += d.ctx
        first_ctx = prefills[0].ctx if prefills else 0
        budget = self.token_budget(len(plan.decodes), plan.decode_ctx_tokens, first_ctx)
        plan.token_budget = budget
        self.last_budget = budget
        left = budget
        # with decodes in the batch, every chunk must also fit the time left under the SLO (a chunk's
        # attention cost grows with its own context); the first chunk always gets min_chunk_tokens
        limit = cfg.tbt_slo_ms * (1.0 - cfg.margin) / self.correction if plan.decodes else None
        for item in prefills:
            if left <= 0:
                break
            n = min(item.remaining, left)
            if limit is not None and plan.prefills:
                room = limit - self.model.step_ms(
                    plan.prefill_tokens, len(plan.decodes), plan.decode_ctx_tokens, plan.prefill_attn)
                n = min(n, self.model.max_chunk(room, item.ctx))
            if n <= 0:
                continue
            plan.prefills.append((item.req_id, n))
            plan.prefill_tokens += n
            plan.prefill_attn += StepLatencyModel.chunk_attn(n, item.ctx)
            left -= n
        plan.predicted_ms = self.correction * self.model.step_ms(
            plan.prefill_tokens, len(plan.decodes), plan.decode_ctx_tokens, plan.prefill_attn
        )
        return plan

    def observe(self, plan: StepPlan, measured_ms: float) -> None:
        """Feed back a measured step time; adapts the correction factor."""
        if plan.empty or measured_ms <= 0:
            return
        raw = self.model.step_ms(plan.prefill_tokens, len(plan.decodes), plan.decode_ctx_tokens, plan.prefill_attn)
        if raw <= 0:
            return
        ratio = measured_ms / raw
        alpha = self.config.alpha_up if ratio > self.correction else self.config.alpha_down
        self.correction = min(self.config.max_correction, max(0.1, (1 - alpha) * self.correction + alpha * ratio))
        self.steps += 1

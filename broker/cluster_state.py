"""The global scheduler's view of the cluster: one InstanceState per registered worker.

Pure state: load reports overwrite an instance's numbers; between reports the scheduler adds the work it
just dispatched (optimistic accounting) so a burst of arrivals does not all land on one instance.
Instance cost helpers (prefill rate under the TBT SLO, projected work) live here so every policy, the
live broker and the simulator price work the same way. Each instance is priced with the step model its
worker advertised at registration, times the correction its local scheduler reports with its load (so a
cluster of unlike engines, or an engine the broker's own model does not describe, is priced as it runs);
an instance that advertised none is priced with the pricing's model.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

from dynaserve.costmodel import StepLatencyModel

SCALE_STEP = 0.02  # a reported step_scale re-prices an instance when it moved by more than this share
SCALE_RANGE = (0.01, 100.0)  # reported step_scale values are clamped to this range


@dataclass(slots=True)
class InstanceState:
    """What the broker knows about one instance."""

    id: str
    kv_capacity_tokens: int
    max_model_len: int = 1 << 20
    kv_bytes_per_token: int = 0
    pool: str = "any"  # "prefill" / "decode" / "any" (only the disagg policy reads it)
    max_num_seqs: int = 0  # the engine's cap of running sequences (0: none known)
    early_pull_tail_tokens: int = 0  # RegisterWorker.early_pull_tail_tokens (0: pulls all KV at the handoff)
    block_size: int = 16  # RegisterWorker.block_size: where an early-pull tail may begin
    alive: bool = True
    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    decode_ctx_tokens: int = 0
    pending_decode_tokens: int = 0
    kv_used_tokens: int = 0
    step_ms: float = 0.0
    last_report: float = 0.0
    step_model: StepLatencyModel | None = None  # RegisterWorker.step_model (None: priced with Pricing.model)
    step_scale: float = 1.0  # LoadReport.step_scale the instance is priced at
    model: StepLatencyModel | None = None  # step_model x step_scale: what Pricing.model_of prices it with

    def __post_init__(self) -> None:
        if self.model is None and self.step_model is not None:
            self.model = self.step_model.scaled(self.step_scale) if self.step_scale != 1.0 else self.step_model

    @property
    def kv_free_tokens(self) -> int:
        return self.kv_capacity_tokens - self.kv_used_tokens

    def rescale(self, step_scale: float) -> bool:
        """Price the instance at its advertised step model times ``step_scale`` (its local scheduler's
        correction), when that moved by more than ``SCALE_STEP``; non-finite or non-positive values are
        ignored, others clamped to ``SCALE_RANGE``. True when its price changed (use
        :meth:`ClusterState.report`, which tells the policies' price caches)."""
        if self.step_model is None or not (math.isfinite(step_scale) and step_scale > 0):
            return False
        scale = min(SCALE_RANGE[1], max(SCALE_RANGE[0], step_scale))
        if abs(scale - self.step_scale) <= SCALE_STEP * self.step_scale:
            return False
        self.step_scale = scale
        self.model = self.step_model.scaled(scale)
        return True


@dataclass(frozen=True, slots=True)
class RequestInfo:
    """What a policy needs to know about a request."""

    req_id: str
    prompt_len: int
    max_tokens: int
    predicted_output: int
    ttft_slo_ms: float
    tbt_slo_ms: float


@dataclass(slots=True)
class ClusterState:
    """All instances, keyed by id, in registration order. ``models`` counts changes of the instances' step
    models (registrations, removals, re-scalings): the policies' price caches start over when it moves."""

    instances: dict[str, InstanceState] = field(default_factory=dict)
    models: int = 0

    def add(self, inst: InstanceState) -> None:
        self.instances[inst.id] = inst
        self.models += 1

    def remove(self, instance_id: str) -> None:
        self.instances.pop(instance_id, None)
        self.models += 1

    def alive(self) -> list[InstanceState]:
        return [i for i in self.instances.values() if i.alive]

    def report(
        self,
        instance_id: str,
        now: float,
        *,
        queued_prefill_tokens: int,
        running_seqs: int,
        decode_ctx_tokens: int,
        pending_decode_tokens: int,
        kv_used_tokens: int,
        step_ms: float,
        step_scale: float = 1.0,
    ) -> None:
        inst = self.instances.get(instance_id)
        if inst is None:
            return
        if step_scale != inst.step_scale and inst.rescale(step_scale):
            self.models += 1
        inst.queued_prefill_tokens = queued_prefill_tokens
        inst.running_seqs = running_seqs
        inst.decode_ctx_tokens = decode_ctx_tokens
        inst.pending_decode_tokens = pending_decode_tokens
        inst.kv_used_tokens = kv_used_tokens
        inst.step_ms = step_ms
        inst.last_report = now


@dataclass(frozen=True, slots=True)
class Pricing:
    """Prices work on an instance with its step-latency model (:meth:`model_of`) and the TBT SLO."""

    model: StepLatencyModel  # for instances that advertise no step model of their own
    tbt_margin: float = 0.1  # keep step time under (1 - margin) * TBT SLO
    max_batched_tokens: int = 8192
    min_chunk_tokens: int = 16
    transfer_gbps: float = 25.0  # KV link bandwidth, GB/s
    handoff_ms: float = 2.0  # fixed cost of a handoff (descriptor round trip, transfer setup)
    early_tail_auto: bool = True  # early pulls: each split's tail for its link and A's load (early_tail);
    # False: A's advertised one

    def model_of(self, inst: InstanceState) -> StepLatencyModel:
        """The step model ``inst`` is priced with: its own (``InstanceState.model``), else this pricing's."""
        m = inst.model
        return self.model if m is None else m

    def prefill_budget(self, inst: InstanceState, tbt_slo_ms: float) -> int:
        """Prefill tokens per step the local scheduler can add without breaking the TBT SLO."""
        if inst.running_seqs == 0:
            return self.max_batched_tokens
        n = self.model_of(inst).max_prefill_tokens(
            tbt_slo_ms * (1.0 - self.tbt_margin), inst.running_seqs, inst.decode_ctx_tokens
        )
        return min(self.max_batched_tokens, max(self.min_chunk_tokens, n))

    def prefill_ms_per_token(self, inst: InstanceState, tbt_slo_ms: float) -> float:
        """Wall time per prefill token on this instance (its TBT-limited prefill rate, inverted)."""
        budget = self.prefill_budget(inst, tbt_slo_ms)
        step = self.model_of(inst).step_ms(budget, inst.running_seqs, inst.decode_ctx_tokens)
        return step / budget

    def decode_ms_per_token(self, inst: InstanceState, ctx: int) -> float:
        """Step time one more decode token of context ``ctx`` costs this instance."""
        return self.model_of(inst).decode_token_ms(ctx)

    def decode_ms_fn(self, inst: InstanceState) -> Callable[[int], float]:
        """``decode_ms_per_token(inst, ctx)`` as a function of ``ctx`` alone, for loops that price an
        instance at several contexts."""
        return self.model_of(inst).decode_token_ms

    def work_ms(self, inst: InstanceState, tbt_slo_ms: float) -> float:
        """Projected time the instance needs for the work it already has."""
        avg_ctx = inst.decode_ctx_tokens / inst.running_seqs if inst.running_seqs else 0
        return (
            inst.queued_prefill_tokens * self.prefill_ms_per_token(inst, tbt_slo_ms)
            + inst.pending_decode_tokens * self.decode_ms_per_token(inst, int(avg_ctx))
        )

    def decode_step_ms(self, inst: InstanceState, ctx: int) -> float:
        """Wall time of one decode step on the instance with one more sequence of context ``ctx``."""
        return self.model_of(inst).step_ms(0, inst.running_seqs + 1, inst.decode_ctx_tokens + ctx)

    def transfer_ms_per_token(self, inst: InstanceState) -> float:
        if inst.kv_bytes_per_token <= 0 or self.transfer_gbps <= 0:
            return 0.0
        return inst.kv_bytes_per_token / (self.transfer_gbps * 1e6)

    def handoff_transfer_ms(self, a: InstanceState, b: InstanceState, s: int, p: int, tbt_slo_ms: float) -> float:
        """Transfer time a handoff of ``s`` positions adds after A's part ends (``handoff_ms`` aside).

        Without early pulls, the whole transfer. With them (A and B both advertise them), B reads the blocks
        before A's last ``tail`` positions chunk by chunk while A computes the rest of its part (all of it but
        its first chunk, at most one step's budget: at A's prefill rate, and for ``s > p`` the decode positions
        at one of A's decode steps each): the tail's transfer remains, plus whatever of the early part's
        transfer that computation does not cover (:func:`exposed_transfer_ms`).
        """
        return self.early_tail(a, b, s, p, tbt_slo_ms)[1]

    def early_tail(self, a: InstanceState, b: InstanceState, s: int, p: int, tbt_slo_ms: float) -> tuple[int, float]:
        """The early-pull tail for a handoff of ``s`` positions from A to B (:func:`best_early_tail`, or A's
        advertised one without ``early_tail_auto``) and the transfer it leaves exposed. 0 (no early pull) when
        A and B do not both advertise early pulls, the link is free, or A's part is a prompt part no longer than
        A's advertised tail (A prefills it in one step)."""
        x = self.transfer_ms_per_token(b)
        tail = a.early_pull_tail_tokens if b.early_pull_tail_tokens > 0 else 0
        if tail <= 0 or x <= 0 or (s <= p and s <= tail):
            return 0, s * x
        first, a_ms = self.prefill_budget(a, tbt_slo_ms), self.prefill_ms_per_token(a, tbt_slo_ms)
        a_step = self.decode_step_ms(a, p) if s > p else 0.0
        if not self.early_tail_auto:
            return tail, exposed_transfer_ms(s, x, tail, first, a_ms, p, a_step)
        return best_early_tail(s, x, first, a_ms, p, a_step, a.block_size, tail)


def best_early_tail(
    s: int, x: float, first_max: int, a_ms_per_token: float, p: int, a_step_ms: float, block: int, default: int,
) -> tuple[int, float]:
    """The early-pull tail of a handoff of ``s`` positions that leaves the least transfer exposed after A's
    part (:func:`exposed_transfer_ms`; the arguments as there), and that transfer.

    A tail begins at a block boundary: it is ``s - end`` for a block-aligned ``end`` in (0, s), or ``s`` (no
    early pull). A short tail leaves little to read at the handoff, but the last early chunk may then not be
    read by the time A ends; a long one is read whole at the handoff. The exposed transfer is piecewise linear
    in the tail, so its least value over block boundaries lies next to a break between pieces or at an end:
    where the last early chunk's read ends with A (``min(s - t, first_max) x = t a``), where the early reads
    catch up with A, where A's first chunk reaches ``first_max``, for a decode handoff where the tail reaches
    the prompt and where either early end meets A's decode steps, and the shortest and longest tails.
    ``default`` (the worker's own tail) is a candidate too and wins ties, then the longer tail."""
    if s <= 1 or block <= 0:
        return s, s * x
    a = a_ms_per_token
    cands = [float(default), float(block), float(s - block), float(s - first_max)]
    if x + a > 0:
        cands.append(s * x / (x + a))
    if a > 0:
        cands.append(first_max * x / a)
    if s <= p and x > 0:
        cands.append(s - (s - first_max) * a / x)
    if s > p:  # a decode handoff
        f = min(first_max, p)
        decode_ms = (s - p) * a_step_ms
        cands.append(float(s - p))
        if x > 0:
            cands.append(f + s - p - decode_ms / x)
            cands.append(s - ((p - f) * a + decode_ms) / x)
    own = s - max(0, (s - default) // block * block)  # the tail the worker's own would give
    best = (round(s * x, 9), True, -s)  # no early pull: (exposed transfer, not the worker's own, longer first)
    seen: set[int] = set()
    for t in cands:
        lo = max(0, int((s - t) // block) * block)  # first chunk's end at or below s - t, and the next boundary
        for end in (lo, lo + block):
            if 0 < end < s and end not in seen:
                seen.add(end)
                tail = s - end
                cost = round(exposed_transfer_ms(s, x, tail, first_max, a, p, a_step_ms), 9)
                best = min(best, (cost, tail != own, -tail))
    best_c, _, neg_t = best
    return -neg_t, best_c


def exposed_transfer_ms(
    s: int, x: float, tail: int, first_max: int, a_ms_per_token: float, p: int, a_step_ms: float,
) -> float:
    """The transfer of ``s`` positions (``x`` ms each) left after A's part when B pulls early (``tail < s``).

    B reads each chunk A publishes (its prefill chunks, at most ``first_max`` positions each at
    ``a_ms_per_token``) after the previous one; A's last ``tail`` positions are read at the handoff. What shows
    besides the tail is the later of two ends of the early reads: when they fall behind A (all of them after
    A's first chunk), or when the last early chunk's read ends (it starts when A publishes it). For ``s <= p``
    the last early chunk (at most ``first_max`` positions) is followed by the tail's prefill. A decode handoff
    (``s > p``, a ``p``-token prompt, decode steps of ``a_step_ms``) publishes its last prefill chunk at the
    prefill's end and the decode positions before the tail (at most all of them) while it decodes; all its
    decode steps follow the prefill's end."""
    if s > p:
        tail = min(tail, s - p)
        decode_ms = (s - p) * a_step_ms
        behind = (s - tail) * x - (p - min(p, first_max)) * a_ms_per_token - decode_ms
        last = (min(p, first_max) + s - tail - p) * x - decode_ms
    else:
        behind = (s - tail) * x - (s - min(s - tail, first_max)) * a_ms_per_token
        last = min(s - tail, first_max) * x - tail * a_ms_per_token
    early = behind if behind > last else last
    return tail * x + (early if early > 0.0 else 0.0)

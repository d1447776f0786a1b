"""An experiment: run-time decode handoffs, a split point chosen when a slot frees rather than at dispatch.

Simulator only (like the oracle): ``dynaserve-migrate`` is the ``dynaserve`` policy plus ``moves(cluster,
decoding_on, now) -> list[Move]``, which the simulator calls at every load report tick and carries out
(A stops after the step it is running and hands the decode to B at whatever position it reached). The
study found it does not pay (docs/study.md, "Run-time decode handoffs"), so the live broker has no such
message; the code stays to reproduce that (``python -m bench.sim.extras migrate``).

The idea: an engine runs at most ``max_num_seqs`` sequences. Under heavy decode load (ShareGPT: short
prompts, long outputs) instances fill up; a full instance takes no new prompts, finishes its prefills
and then only decodes, in steps far shorter than the mixed steps of instances that still prefill. A
handoff decided at dispatch cannot wait for a slot there to free (a request handed to a full instance
waits mid-stream: a stall); here A keeps decoding until the slot is free.

Rule: destinations are live instances with no prefill queued and a free slot (``into="full"``: only those
already within ``full_headroom`` of their cap, which the dynaserve policy gives no new prompts; ``"idle"``:
any); sources are instances with prefill queued, most queued first; a source's decodes move newest first
(the most predicted output left, the least KV to move), only those with ``min_remaining`` predicted tokens
left, only while the handoff gap fits ``gap_frac`` of the TBT SLO, none while some source has more than
``max_queue_tokens`` prefill tokens queued (0: no limit), at most ``max_moves`` per call. Each move is
committed to the cluster view at once (one slot and the KV move) until the next reports overwrite it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

from broker.cluster_state import ClusterState, InstanceState
from broker.scheduler import DynaServePolicy

KIND_MOVED = "moved"  # the plan kind of a request whose decode was moved at run time
INTO = ("full", "idle")


@dataclass(frozen=True, slots=True)
class Decoding:
    """An unsplit request in its decode phase, as the broker sees it."""

    req_id: str
    instance: str
    context: int  # positions computed: prompt + tokens generated so far
    generated: int  # tokens generated so far
    remaining: int  # predicted tokens still to generate
    tbt_slo_ms: float


@dataclass(frozen=True, slots=True)
class Move:
    """Hand ``req_id``'s decode from ``src`` to ``dst`` at ``src``'s next step boundary."""

    req_id: str
    src: str
    dst: str


DecodingOn = Callable[[str], Iterable[Decoding]]


@dataclass
class MigratingPolicy(DynaServePolicy):
    """The dynaserve policy with run-time decode handoffs (see the module docstring)."""

    into: str = "full"  # destinations: "full" (decode hosts at their cap) or "idle" (any prefill-idle instance)
    max_queue_tokens: int = 0  # no moves while some source has more prefill tokens queued (0: no limit)
    min_remaining: int = 64  # move only decodes predicted to emit this many more tokens
    max_moves: int = 64  # moves per call at most
    name: str = field(default="dynaserve-migrate")

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.into not in INTO:
            raise ValueError(f"into must be one of {INTO}, got {self.into!r}")

    def moves(self, cluster: ClusterState, decoding_on: DecodingOn, now: float) -> list[Move]:
        low = self.full_headroom if self.into == "full" else 1 << 30
        dsts = [i for i in cluster.instances.values()
                if i.alive and i.queued_prefill_tokens <= 0 and 0 < i.max_num_seqs
                and i.max_num_seqs - low <= i.running_seqs < i.max_num_seqs]
        if not dsts:
            return []
        srcs = sorted((i for i in cluster.instances.values() if i.alive and i.queued_prefill_tokens > 0),
                      key=lambda i: -i.queued_prefill_tokens)
        if not srcs or (self.max_queue_tokens and srcs[0].queued_prefill_tokens > self.max_queue_tokens):
            return []
        pr = self.pricing
        out: list[Move] = []
        dsts.sort(key=lambda i: i.running_seqs - i.max_num_seqs)  # most free slots first
        pool = iter(self._candidates(srcs, decoding_on))
        for dst in dsts:
            while dst.running_seqs < dst.max_num_seqs and len(out) < self.max_moves:
                cand = next(pool, None)
                if cand is None:
                    return out
                d, src = cand
                if dst.kv_free_tokens < d.context + d.remaining:
                    continue
                gap = (pr.handoff_ms + d.context * pr.transfer_ms_per_token(dst)
                       + 2.0 * max(dst.step_ms, pr.decode_step_ms(dst, d.context)))
                if gap > self.gap_frac * d.tbt_slo_ms:
                    continue
                out.append(Move(d.req_id, src.id, dst.id))
                _commit(src, dst, d)
        return out

    def _candidates(self, srcs: list[InstanceState], decoding_on: DecodingOn) -> Iterable[tuple[Decoding, InstanceState]]:
        """Each source's movable decodes, newest first, the sources in order (most prefill queued first)."""
        for src in srcs:
            ds = [d for d in decoding_on(src.id) if d.remaining >= self.min_remaining]
            ds.sort(key=lambda d: d.generated)
            for d in ds:
                yield d, src


def _commit(src: InstanceState, dst: InstanceState, d: Decoding) -> None:
    """The move's slot, context and KV leave the source for the destination (until the next reports)."""
    src.running_seqs -= 1
    src.decode_ctx_tokens -= d.context
    src.pending_decode_tokens -= d.remaining
    src.kv_used_tokens -= d.context
    dst.running_seqs += 1
    dst.decode_ctx_tokens += d.context
    dst.pending_decode_tokens += d.remaining
    dst.kv_used_tokens += d.context + d.remaining

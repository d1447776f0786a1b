"""The one engine interface a worker drives (simulated engine, vLLM engine).

Lifecycle of a micro-request inside an engine:
    add(desc) -> queued (waits for KV blocks)
    role A / full: prefill -> decode (emitting tokens) -> A: hand off (blocks held until B confirms the
        read, the lease expires or an abort arrives) / full: finished
    role B: waits for start_decode(kv params) -> transferring -> (on transfer failure: recompute) ->
        prefill of the rest -> decode -> finished
    abort(req_id) at any point frees everything the request holds.
"""

from __future__ import annotations

from collections.abc import Callable, Container
from dataclasses import dataclass, field
from typing import Protocol

from dynaserve.protocol import ROLE_A, ROLE_B, ROLE_FULL, MicroDescriptor


class EngineError(Exception):
    """A micro-request the engine cannot take (bad descriptor, too long, unknown id)."""

    def __init__(self, code: str, message: str) -> None:
        super().__init__(message)
        self.code = code


def validate_descriptor(desc: MicroDescriptor, info: EngineInfo, active: Container[str]) -> None:
    """Checks every engine makes before taking a micro-request; raises EngineError naming the problem."""
    p = len(desc.prompt)
    if desc.req_id in active:
        raise EngineError("duplicate_id", f"request {desc.req_id!r} is already on this instance")
    if desc.role not in (ROLE_FULL, ROLE_A, ROLE_B):
        raise EngineError("bad_role", f"unknown role {desc.role!r}")
    if p < 1:
        raise EngineError("empty_prompt", "prompt must hold at least one token")
    if min(desc.prompt) < 0 or max(desc.prompt) >= info.vocab_size:
        raise EngineError("bad_token", f"prompt token ids must be in [0, {info.vocab_size})")
    total = p + desc.sampling.max_tokens
    if total > info.max_model_len:
        raise EngineError("too_long", f"prompt + max_tokens = {total} exceeds max_model_len {info.max_model_len}")
    if desc.emit_tokens < 0 or desc.emit_tokens > desc.sampling.max_tokens:
        raise EngineError("bad_field", "emit_tokens out of range")
    if desc.early_tail < 0:
        raise EngineError("bad_field", "early_tail must be >= 0")
    if desc.role != ROLE_FULL and not (1 <= desc.split < total):
        raise EngineError("bad_split", f"split {desc.split} outside [1, {total})")


@dataclass(slots=True)
class Handoff:
    """A finished role-A micro-request: what B needs to continue."""

    req_id: str
    kv: dict
    num_tokens: int
    tokens: list[int]


@dataclass(slots=True)
class StepOutput:
    """What one engine step produced."""

    entries: list[list] = field(default_factory=list)  # [req_id, new tokens, finish reason or None]
    handoffs: list[Handoff] = field(default_factory=list)
    chunks: list[Handoff] = field(default_factory=list)  # role A, still prefilling: blocks B may pull early
    failures: list[tuple[str, str, str]] = field(default_factory=list)  # (req_id, code, message)
    step_ms: float = 0.0
    prefill_tokens: int = 0
    decode_seqs: int = 0
    decode_ctx_tokens: int = 0  # context of the step's decodes (with the two above: the step's composition)
    prefill_attn: float = 0.0  # attention work of its prefill chunks (StepLatencyModel.chunk_attn)
    token_budget: int = 0
    kv_transfers: list[tuple[int, float]] = field(default_factory=list)  # KV pulls done: (bytes, seconds)
    kv_early_blocks: int = 0  # role B: blocks pulled before the StartDecode (KvChunk) and kept at it


@dataclass(slots=True)
class EngineLoad:
    """Load numbers reported to the broker."""

    queued_prefill_tokens: int = 0
    running_seqs: int = 0
    decode_ctx_tokens: int = 0
    pending_decode_tokens: int = 0
    kv_used_tokens: int = 0
    kv_capacity_tokens: int = 0
    step_ms: float = 0.0
    token_budget: int = 0
    held_blocks: int = 0
    active_requests: int = 0
    step_scale: float = 1.0  # the local scheduler's correction factor (LoadReport.step_scale)


@dataclass(frozen=True, slots=True)
class EngineInfo:
    kind: str
    model: str
    block_size: int
    max_model_len: int
    kv_capacity_tokens: int
    kv_bytes_per_token: int
    vocab_size: int
    eos_token_id: int
    max_num_seqs: int = 0  # cap of running sequences the engine admits (0: none)
    early_pull_tail_tokens: int = 0  # see RegisterWorker.early_pull_tail_tokens (needs the handoff inbox)
    step_model: tuple[float, ...] = ()  # its local scheduler's step model, (a, b, c, d, e) ms (RegisterWorker.step_model)


class Engine(Protocol):
    info: EngineInfo

    def add(self, desc: MicroDescriptor, now: float) -> None:
        """Queue a micro-request; raises EngineError when it cannot be taken."""

    def start_decode(self, req_id: str, kv: dict, num_tokens: int, tokens: list[int], now: float) -> None:
        """Role B: A's KV is ready to pull; raises EngineError for unknown ids or bad parameters."""

    def kv_chunk(self, req_id: str, kv: dict, num_tokens: int) -> None:
        """Role B, before its StartDecode: A's first ``num_tokens`` positions are ready in the blocks ``kv``
        names (A's KvChunk). Advisory: an engine may pull them now or ignore it; never raises."""

    def abort(self, req_id: str) -> bool:
        """Drop a micro-request and free its blocks; False when the id is unknown."""

    def active_ids(self) -> list[str]:
        """Ids of every micro-request the engine holds (running, waiting or holding blocks)."""

    def has_work(self) -> bool:
        """True when a step would make progress (runnable sequences or transfers to drive)."""

    async def step(self, now: float) -> StepOutput:
        """Run one engine step (or one round of transfer polling) and return its output."""

    def set_shipper(self, ship: Callable[[StepOutput], None]) -> bool:
        """Offer ``ship`` (thread-safe) for the engine to send every step's output itself, from the thread that
        ran the step; True if the engine will (step() then returns what is left when its run of steps
        ends), False if step() keeps returning every output."""

    def housekeeping(self, now: float) -> StepOutput:
        """Poll transfers and confirmations, expire leases; cheap, called every loop."""

    def load(self) -> EngineLoad: ...

    def close(self) -> None: ...

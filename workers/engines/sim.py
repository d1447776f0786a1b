"""Simulated GPU engine: real time, real KV buffers, modeled step latency, checkable tokens.

Each step's duration comes from the step-latency model of a real model on a real GPU (cost tables),
multiplied by ``time_scale``; the engine really sleeps for it. Tokens are deterministic pseudo-tokens:
position i stores a 64-bit rolling hash h_i = mix(h_{i-1}, token_i, i) in its KV slot, and the token after
position i is a function of h_i. So a sequence's tokens depend on its whole prefix, and instance B can only
continue a split request correctly from the KV bytes it really pulled from A: a lost or corrupted transfer
shows up as different tokens. A split run therefore equals the unsplit run token for token only when the
handoff is right.
"""

from __future__ import annotations

import asyncio
import hashlib
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np

from dynaserve.costmodel import StepLatencyModel
from dynaserve.protocol import (
    FINISH_HANDOFF,
    FINISH_LENGTH,
    FINISH_STOP,
    ROLE_A,
    ROLE_B,
    MicroDescriptor,
)
from workers.engine import EngineError, EngineInfo, EngineLoad, Handoff, StepOutput, validate_descriptor
from workers.kv.base import KvTransferError, KvTransport, XferState
from workers.kv.pool import KvBlockPool
from workers.local_scheduler import DecodeItem, LocalScheduler, PrefillItem

MASK64 = (1 << 64) - 1
H0 = 0x243F6A8885A308D3


def _splitmix(z: int) -> int:
    z = (z + 0x9E3779B97F4A7C15) & MASK64
    z = ((z ^ (z >> 30)) * 0xBF58476D1CE4E5B9) & MASK64
    z = ((z ^ (z >> 27)) * 0x94D049BB133111EB) & MASK64
    return z ^ (z >> 31)


def mix(h: int, token: int, pos: int) -> int:
    """Rolling hash of a sequence prefix after appending ``token`` at position ``pos``."""
    return _splitmix(h ^ ((token * 0x100000001B3 + pos) & MASK64))


def next_token(h: int, vocab_size: int, temperature: float, seed: int | None, step_salt: int) -> int:
    """The token that follows a prefix with hash ``h``: greedy is a pure function of h; sampling with
    temperature > 0 mixes in the request seed."""
    if temperature > 0:
        h = _splitmix(h ^ ((seed or 0) * 0xD6E8FEB86659FD93 + step_salt) & MASK64)
    return (_splitmix(h) >> 11) % vocab_size


def reference_tokens(prompt: list[int], max_tokens: int, vocab_size: int = 32000) -> list[int]:
    """Greedy tokens an unsplit run produces for this prompt (for tests and checks)."""
    h = H0
    for i, t in enumerate(prompt):
        h = mix(h, t, i)
    out = []
    pos = len(prompt)
    for _ in range(max_tokens):
        t = next_token(h, vocab_size, 0.0, None, pos)
        out.append(t)
        h = mix(h, t, pos)
        pos += 1
    return out


@dataclass(frozen=True)
class SimEngineConfig:
    """The simulated engine's model, GPU and scale."""

    model: str = "llama3-8b"  # a preset of dynaserve.costtables.MODEL_PRESETS
    gpu: str = "a100"  # cost tables to price steps with: a100 or h100
    tp: int = 1  # tensor-parallel degree the step costs assume
    time_scale: float = 1.0  # real seconds per modeled second (0.1 runs ten times faster)
    kv_capacity_tokens: int = 131072  # KV cache size of the instance, in tokens
    block_size: int = 16  # tokens per KV block
    kv_scale: float = 1.0 / 256  # the KV buffer moved per token is the model's KV bytes times this
    max_model_len: int = 32768  # longest prompt + output accepted
    vocab_size: int = 32000  # token ids the simulated model knows
    eos_token_id: int = 2  # the id that ends a sequence unless ignore_eos is set
    lease_s: float = 30.0  # A frees handed-off blocks after this long without B's confirmation
    transfer_timeout_s: float = 10.0  # B recomputes when a KV pull takes longer than this
    verify_kv: bool = True  # A sends a checksum of the handed-off blocks; B recomputes when its copy differs

    def __post_init__(self) -> None:
        if self.time_scale <= 0:
            raise ValueError("time_scale must be > 0")
        if self.block_size < 1 or self.kv_capacity_tokens < self.block_size:
            raise ValueError("kv_capacity_tokens must hold at least one block")


# sequence states
QUEUED, WAIT_KV, XFER, RUN, HELD = "queued", "wait_kv", "xfer", "run", "held"


@dataclass(slots=True)
class _Seq:
    desc: MicroDescriptor
    tokens: list[int]
    kv_end: int  # compute KV of positions < kv_end at most (A: the split point)
    emit_left: int
    state: str = QUEUED
    blocks: list[int] = field(default_factory=list)
    computed: int = 0
    h: int = H0
    xfer: int | None = None
    deadline: float = 0.0
    emitted: int = 0
    kv: dict | None = None  # role B: A's transfer parameters until the pull starts
    checksum: bytes | None = None  # role B: A's checksum of the blocks being pulled
    xfer_start: float = 0.0  # role B: when the KV pull started

    @property
    def pending(self) -> int:
        return min(len(self.tokens), self.kv_end) - self.computed


class SimEngine:
    """Engine with modeled step times; see the module docstring."""

    def __init__(
        self,
        config: SimEngineConfig,
        scheduler: LocalScheduler,
        transport: KvTransport | None,
        step_model: StepLatencyModel | None = None,
        kv_bytes_per_token_model: int = 131072,
    ) -> None:
        self.config = config
        self.sched = scheduler
        self.model = step_model or scheduler.model
        bpt = max(8, int(kv_bytes_per_token_model * config.kv_scale) // 8 * 8)
        nblocks = config.kv_capacity_tokens // config.block_size
        self.pool = KvBlockPool(nblocks, config.block_size, bpt)
        self._hashes = self.pool.buffer.reshape(nblocks, config.block_size, bpt)[:, :, :8].view(np.uint64)
        self.transport = transport
        if transport is not None:
            transport.register_pool(self.pool)
        self.info = EngineInfo(
            kind="sim",
            model=config.model,
            block_size=config.block_size,
            max_model_len=config.max_model_len,
            kv_capacity_tokens=nblocks * config.block_size,
            kv_bytes_per_token=kv_bytes_per_token_model,
            vocab_size=config.vocab_size,
            eos_token_id=config.eos_token_id,
            step_model=scheduler.model.coefficients(),
        )
        self.seqs: dict[str, _Seq] = {}
        self.last_step_ms = 0.0
        self.transfer_failures = 0

    # ------------------------------------------------------------------ intake

    def add(self, desc: MicroDescriptor, now: float) -> None:
        validate_descriptor(desc, self.info, self.seqs)
        cfg = self.config
        total = len(desc.prompt) + desc.sampling.max_tokens
        kv_end = desc.split if desc.role == ROLE_A else total
        if self.pool.blocks_for_tokens(kv_end) > self.pool.num_blocks:
            raise EngineError("too_long", f"{kv_end} tokens of KV exceed this instance's capacity "
                                          f"({self.pool.num_blocks * cfg.block_size} tokens)")
        seq = _Seq(desc=desc, tokens=list(desc.prompt), kv_end=kv_end, emit_left=desc.emit_tokens)
        if desc.role == ROLE_B:
            seq.state = WAIT_KV
        self.seqs[desc.req_id] = seq

    def kv_chunk(self, req_id: str, kv: dict, num_tokens: int) -> None:
        """Ignored: the simulated engine pulls the whole handoff at the StartDecode (its A sends no chunks)."""

    def start_decode(self, req_id: str, kv: dict, num_tokens: int, tokens: list[int], now: float) -> None:
        seq = self.seqs.get(req_id)
        if seq is None or seq.desc.role != ROLE_B:
            raise EngineError("unknown_id", f"no role-B micro-request {req_id!r} on this instance")
        if seq.state != WAIT_KV:
            raise EngineError("bad_state", f"request {req_id!r} is not waiting for KV")
        if num_tokens != seq.desc.split:
            raise EngineError("bad_handoff", f"handoff covers {num_tokens} positions, expected {seq.desc.split}")
        seq.tokens.extend(tokens)
        seq.state = QUEUED
        seq.computed = 0
        seq.deadline = now + self.config.transfer_timeout_s
        seq.kv = kv  # pulled as soon as blocks are allocated

    def active_ids(self) -> list[str]:
        return list(self.seqs)

    def abort(self, req_id: str) -> bool:
        seq = self.seqs.pop(req_id, None)
        if seq is None:
            return False
        self._release(seq)
        return True

    def _release(self, seq: _Seq) -> None:
        if seq.xfer is not None and self.transport is not None:
            self.transport.release(seq.xfer)
        seq.xfer = None
        if seq.blocks:
            self.pool.free(seq.blocks)
            seq.blocks = []

    # ------------------------------------------------------------------ progress

    def has_work(self) -> bool:
        return any(s.state in (RUN, XFER) or (s.state == QUEUED) for s in self.seqs.values())

    def _admit(self, now: float, out: StepOutput) -> None:
        """Give queued sequences their blocks (FCFS); start B's pulls."""
        bs = self.config.block_size
        for seq in sorted((s for s in self.seqs.values() if s.state == QUEUED), key=lambda s: s.desc.arrival):
            need = self.pool.blocks_for_tokens(seq.kv_end)
            blocks = self.pool.alloc(need)
            if blocks is None:
                break
            seq.blocks = blocks
            if seq.kv is not None:  # role B: pull A's KV
                kv, seq.kv = seq.kv, None
                checksum = kv.get("checksum")
                seq.checksum = checksum if isinstance(checksum, bytes) else None
                nremote = -(-seq.desc.split // bs)
                try:
                    assert self.transport is not None, "no KV transport configured"
                    seq.xfer = self.transport.start_read(seq.desc.req_id, kv, blocks[:nremote])
                    seq.state = XFER
                    seq.xfer_start = now
                except (KvTransferError, AssertionError) as exc:
                    self.transfer_failures += 1
                    seq.xfer = None
                    out.failures.append((seq.desc.req_id, "kv_transfer_recompute", str(exc)))
                    seq.state = RUN  # recompute from position 0
            else:
                seq.state = RUN

    def _poll_transfers(self, now: float, out: StepOutput) -> None:
        if self.transport is None:
            return
        for seq in self.seqs.values():
            if seq.state != XFER or seq.xfer is None:
                continue
            st = self.transport.poll(seq.xfer)
            if st == XferState.DONE:
                self.transport.release(seq.xfer)
                seq.xfer = None
                s = seq.desc.split
                nbytes = -(-s // self.config.block_size) * self.pool.block_bytes
                out.kv_transfers.append((nbytes, max(0.0, now - seq.xfer_start)))
                want = seq.checksum
                nremote = -(-s // self.config.block_size)
                if want is not None and self._digest(seq.blocks[:nremote]) != want:
                    self.transfer_failures += 1  # corrupted or partial copy: never continue from it
                    out.failures.append((seq.desc.req_id, "kv_transfer_recompute", "KV checksum mismatch"))
                    seq.computed, seq.h, seq.state = 0, H0, RUN
                    continue
                seq.computed = s
                seq.h = int(self._hash_at(seq.blocks, s - 1))
                seq.state = RUN
            elif st == XferState.FAILED or now > seq.deadline:
                self.transport.release(seq.xfer)
                seq.xfer = None
                self.transfer_failures += 1
                out.failures.append((seq.desc.req_id, "kv_transfer_recompute", f"KV pull {st.name.lower()}"))
                seq.computed, seq.h, seq.state = 0, H0, RUN

    def _digest(self, blocks: list[int]) -> bytes:
        """Checksum of whole KV blocks, in order (the bytes a handoff moves)."""
        h = hashlib.blake2b(digest_size=16)
        for b in blocks:
            h.update(self.pool.block_view(b))
        return h.digest()

    def _hash_at(self, blocks: list[int], pos: int) -> int:
        bs = self.config.block_size
        return int(self._hashes[blocks[pos // bs], pos % bs, 0])

    def housekeeping(self, now: float) -> StepOutput:
        out = StepOutput()
        self._admit(now, out)
        self._poll_transfers(now, out)
        if self.transport is not None:
            for rid in self.transport.confirmed():
                seq = self.seqs.get(rid)
                if seq is not None and seq.state == HELD:
                    self.abort(rid)
        for seq in [s for s in self.seqs.values() if s.state == HELD and now > s.deadline]:
            self.abort(seq.desc.req_id)
        return out

    def set_shipper(self, ship: Callable[[StepOutput], None]) -> bool:
        return False  # steps run on the loop: step() returns every output

    async def step(self, now: float) -> StepOutput:
        out = self.housekeeping(now)
        decodes, prefills = [], []
        for seq in self.seqs.values():
            if seq.state != RUN:
                continue
            pend = seq.pending
            if pend == 1 and seq.computed > 0:
                decodes.append(DecodeItem(seq.desc.req_id, seq.computed))
            elif pend > 0:
                rank = self.sched.prefill_rank(seq.desc.arrival, seq.desc.ttft_slo_ms)
                key = (self.sched.is_late(rank, now), rank, seq.desc.arrival)
                prefills.append((key, PrefillItem(seq.desc.req_id, pend, seq.computed)))
        prefills.sort(key=lambda t: t[0])
        plan = self.sched.schedule(decodes, [p for _, p in prefills])
        if plan.empty:
            return out
        t0 = time.perf_counter()
        modeled = self.model.step_ms(
            plan.prefill_tokens, len(plan.decodes), plan.decode_ctx_tokens, plan.prefill_attn
        )
        await asyncio.sleep(modeled * self.config.time_scale / 1000.0)
        # results appear at the end of the step; sequences aborted meanwhile are skipped
        measured = (time.perf_counter() - t0) * 1000.0
        end = now + measured / 1000.0  # the caller's clock at the end of the step
        for rid in plan.decodes:
            self._compute(rid, 1, out, end)
        for rid, n in plan.prefills:
            self._compute(rid, n, out, end)
        self.last_step_ms = measured / self.config.time_scale
        self.sched.observe(plan, self.last_step_ms)
        out.step_ms = self.last_step_ms
        out.prefill_tokens = plan.prefill_tokens
        out.decode_seqs = len(plan.decodes)
        out.decode_ctx_tokens = plan.decode_ctx_tokens
        out.prefill_attn = plan.prefill_attn
        out.token_budget = plan.token_budget
        return out

    def _compute(self, rid: str, n: int, out: StepOutput, now: float) -> None:
        seq = self.seqs.get(rid)
        if seq is None or seq.state != RUN:
            return
        n = min(n, seq.pending)
        start = seq.computed
        h = seq.h
        hs = np.empty(n, dtype=np.uint64)
        toks = seq.tokens
        for i in range(n):
            pos = start + i
            h = mix(h, toks[pos], pos)
            hs[i] = h
        self._store(seq.blocks, start, hs)
        seq.h = h
        seq.computed = start + n
        if seq.computed < len(seq.tokens) or seq.emit_left <= 0:
            if seq.desc.role == ROLE_A and seq.computed >= seq.kv_end and seq.emit_left <= 0:
                self._handoff(seq, [], out, now)
            return
        # the last known position was computed: emit the next token
        sp = seq.desc.sampling
        tok = next_token(h, self.config.vocab_size, sp.temperature, sp.seed, seq.computed)
        seq.tokens.append(tok)
        seq.emit_left -= 1
        seq.emitted += 1
        stop = (tok == self.config.eos_token_id and not sp.ignore_eos) or tok in sp.stop_token_ids
        if stop:
            out.entries.append([rid, [tok], FINISH_STOP])
            self.abort(rid)
        elif seq.emit_left == 0:
            if seq.desc.role == ROLE_A:
                self._handoff(seq, [tok], out, now)
            else:
                out.entries.append([rid, [tok], FINISH_LENGTH])
                self.abort(rid)
        else:
            out.entries.append([rid, [tok], None])

    def _handoff(self, seq: _Seq, last: list[int], out: StepOutput, now: float) -> None:
        rid = seq.desc.req_id
        if last:
            out.entries.append([rid, last, FINISH_HANDOFF])
        s = seq.kv_end
        nblocks = -(-s // self.config.block_size)
        keep, extra = seq.blocks[:nblocks], seq.blocks[nblocks:]
        if extra:
            self.pool.free(extra)
        seq.blocks = keep
        assert self.transport is not None, "a split plan needs a KV transport"
        kv = self.transport.export(rid, keep, s)
        if self.config.verify_kv:
            kv["checksum"] = self._digest(keep)
        seq.state = HELD
        seq.deadline = now + self.config.lease_s
        out.handoffs.append(Handoff(rid, kv, s, seq.tokens[len(seq.desc.prompt) :]))

    def _store(self, blocks: list[int], start: int, hs: np.ndarray) -> None:
        bs = self.config.block_size
        pos = np.arange(start, start + len(hs))
        barr = np.asarray(blocks, dtype=np.int64)
        self._hashes[barr[pos // bs], pos % bs, 0] = hs

    # ------------------------------------------------------------------ reporting

    def load(self) -> EngineLoad:
        ld = EngineLoad(kv_capacity_tokens=self.info.kv_capacity_tokens, step_ms=self.last_step_ms)
        ld.token_budget = self.sched.last_budget
        ld.step_scale = self.sched.correction
        for seq in self.seqs.values():
            ld.active_requests += 1
            if seq.state == HELD:
                ld.held_blocks += len(seq.blocks)
                continue
            pend = max(0, seq.pending)
            if seq.state == WAIT_KV:
                pend = max(0, len(seq.desc.prompt) - seq.desc.split)
            if pend > 1 or (pend == 1 and seq.computed == 0):
                ld.queued_prefill_tokens += pend
            elif seq.state == RUN:
                ld.running_seqs += 1
                ld.decode_ctx_tokens += seq.computed
            ld.pending_decode_tokens += seq.emit_left
        ld.kv_used_tokens = self.pool.num_used * self.config.block_size
        return ld

    def close(self) -> None:
        for rid in list(self.seqs):
            self.abort(rid)
        if self.transport is not None:
            self.transport.close()


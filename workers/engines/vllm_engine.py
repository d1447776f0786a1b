"""vLLM behind the worker's engine interface (vLLM's CPU build here, its CUDA build on GPUs; one code path).

The engine runs vLLM in-process (``LLMEngine`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``), so one
``step()`` is one vLLM scheduler step plus one forward pass. All of vLLM (construction, warm-up, steps,
shutdown) runs on one engine thread while the asyncio loop keeps receiving messages. Every change to
vLLM's state (add, abort, expire) is queued on the loop and applied on the engine thread right before the
next step, so vLLM is never touched concurrently.

Steps run in bursts: the engine thread steps back to back for as long as each step runs the model (or lands
pulled KV, which makes its request runnable at once). A burst starts as soon as a message queues a change
and the engine thread is idle (a StartDecode starts B's pull at once), and otherwise when the worker's loop
asks for a step; it ends at a step that runs nothing, and the worker's loop polls again after its idle
period. Inside a worker the engine thread ships every step's output itself (``set_shipper``: tokens,
handoffs, failures go out on the worker's socket straight from the engine thread), so the loop thread does
not wake up per step: a Python thread that wakes takes the GIL from the engine thread mid-step, which
measurably slows the step (see docs/vllm_engine.md). Without a shipper (calibration probes) the engine
thread hands every step's outputs to the loop, which returns them from ``step()``.

Why one thread for everything: torch's CPU kernels and vLLM's run OpenMP parallel regions, and OpenMP
keeps one thread team per thread that opens regions. Had the loop thread built the engine (its team
exists from then on) and another thread stepped it (a second team), the process would manage more OpenMP
threads than it has cores, and GNU OpenMP then lets idle team threads sleep instead of spin, so every
parallel region of every step pays a wake-up. The engine thread also gets the CPU binding
(``cpu_bind``): its affinity and thread count are set before it opens its first region, so its team
inherits them.

Micro-request mapping (the connector, workers.engines.vllm_connector, does the NIXL part):
    full:           prompt, max_tokens = o.
    A, s >= p:      prompt, max_tokens = d = s - p + 1, do_remote_decode. Emits d tokens; its blocks cover
                    s positions and are held for B.
    A, s < p:       prompt[:s], max_tokens = 1 (that token is discarded), do_remote_decode.
    B, s >= p:      prompt + A's d tokens, A's parameters, max_tokens = B's share. The connector claims
                    the s positions A computed; B's first step computes position s (A's last token) and
                    samples B's first token.
    B, s < p:       prompt, A's parameters switched to the bidirectional path; pulls s positions.
A B enters vLLM when the broker dispatches it (``admit_b_at_dispatch``): with its prompt and
``dynaserve_pending``, so vLLM allocates its blocks and parks it waiting for remote KV. For s >= p its
prompt ends with s - p + 1 placeholders where A's tokens will be (B's sequence has its final length from the
start); A's StartDecode writes A's tokens over them and hands the connector A's parameters (``resume``); the
READ is posted at the next step. A parked B does not keep the engine stepping (``_live``). Meanwhile A
publishes its finished blocks (``KvChunk``): per prefill step, and for s > p once more while it decodes, at
the last block boundary at least ``overlap_tail_tokens`` before s; the parked B pulls them early.
Only workers/engines/vllm* imports vllm.
"""

from __future__ import annotations

import asyncio
import logging
import math
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from dynaserve.env import loopback_kv_env
from dynaserve.protocol import (
    FINISH_ABORT,
    FINISH_HANDOFF,
    FINISH_LENGTH,
    FINISH_STOP,
    ROLE_A,
    ROLE_B,
    ROLE_FULL,
    MicroDescriptor,
)
from workers.engine import EngineError, EngineInfo, EngineLoad, Handoff, StepOutput, validate_descriptor
from workers.engines.vllm_config import (
    PENDING_KEY,
    PREEMPTIONS_KEY,
    ROLE_KEY,
    VllmEngineConfig,
    parse_cpu_list,
)
from workers.local_scheduler import LocalScheduler

log = logging.getLogger("dynaserve.vllm")

_FINISH = {"length": FINISH_LENGTH, "stop": FINISH_STOP, "abort": FINISH_ABORT}

RECOMPUTE_SUFFIX = "#recompute"

_T = TypeVar("_T")

# request states
WAIT_KV, RUNNING, HELD = "wait_kv", "running", "held"


@dataclass(slots=True)
class _Stepped:
    """What the engine thread hands the loop: the outputs of one or more steps, the last of which ran the
    model when ``plan`` is set."""

    outputs: list[Any]
    ms: float = 0.0  # duration of the step that ran the model
    plan: Any = None  # its StepPlan (None: no forward pass since the previous hand-over)
    last: bool = False  # the burst ended with this one
    error: BaseException | None = None  # the burst died with this exception


@dataclass(slots=True)
class _Req:
    desc: MicroDescriptor
    state: str = RUNNING
    a_tokens: list[int] = field(default_factory=list)  # role A: tokens emitted so far
    b_prompt: list[int] = field(default_factory=list)  # role B: the true token sequence it continues from
    b_max_tokens: int = 0
    b_deadline: float = 0.0  # role B: recompute locally if A's KV has not arrived by then
    b_producer: str = ""  # role B: A's vLLM engine id (its handshake failing also means recompute)
    published: int = 0  # role A: blocks announced to B so far (KvChunk)
    parked: bool = False  # role B: in vLLM since its dispatch, waiting for A's StartDecode (admit_b_at_dispatch)
    vllm_id: str = ""  # the id we gave vLLM (changes when B falls back to recomputing)
    internal_id: str = ""  # vLLM's internal id (its scheduler and the connector key requests by it)


def _prepare_env(cfg: VllmEngineConfig) -> None:
    """Process settings vLLM reads at import/start-up (this module is the only one that sets them)."""
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(cfg.side_channel_port)
    for key, val in loopback_kv_env().items():
        os.environ.setdefault(key, val)


def _bind_this_thread(spec: str, name: str) -> set[int]:
    """Restrict the calling thread to the CPUs of ``spec`` that this process may use; returns them."""
    cpus = parse_cpu_list(spec) & os.sched_getaffinity(0)
    if not cpus:
        raise ValueError(f"{name} {spec!r} names no CPU this process may use")
    os.sched_setaffinity(0, cpus)  # 0 = the calling thread
    return cpus


def _bind_engine_thread(cfg: VllmEngineConfig) -> None:
    """On the engine thread, before its first OpenMP region: restrict it to ``cfg.cpu_bind`` (if set) with
    one compute thread per core. The OpenMP team this thread opens later inherits the affinity. (vLLM's own
    VLLM_CPU_OMP_THREADS_BIND applies only to the worker processes of its multiprocess executor, not to an
    in-process engine.)"""
    if not cfg.cpu_bind or cfg.device != "cpu":
        return
    import torch

    cpus = _bind_this_thread(cfg.cpu_bind, "cpu_bind")
    # torch.set_num_threads as torch defines it (vLLM's CPU worker replaces the public name with a no-op)
    torch._C.set_num_threads(len(cpus))


def _bind_loop_thread(cfg: VllmEngineConfig) -> None:
    """On the thread that runs the worker's event loop: restrict it to ``cfg.loop_bind`` (if set), so the
    loop, and the socket threads started from it later, do not take the engine's cores."""
    if not cfg.loop_bind or cfg.device != "cpu":
        return
    _bind_this_thread(cfg.loop_bind, "loop_bind")


POLL_THREADS = ("gloo_tcp_loop",)  # torch.distributed's gloo transport: one per process group, each waking
# every 10 ms (an epoll timeout) whether or not anything is sent; vLLM's CPU build starts 13


def _move_pollers(cfg: VllmEngineConfig) -> int:
    """On the engine thread, once vLLM has started: move the process's idle poll threads (``POLL_THREADS``),
    which vLLM's start-up created on the engine's cores, to the loop's cores (``loop_bind``). Left there, their
    1,300 wake-ups a second preempt the engine thread; moving them made bare vLLM's decode step 0.963x as long
    and a one-worker cluster's 0.978x (bench.poll_threads). Without ``loop_bind`` they stay: the other cores may
    be other engines'. Returns how many moved."""
    if not cfg.cpu_bind or not cfg.loop_bind or cfg.device != "cpu":
        return 0
    target = parse_cpu_list(cfg.loop_bind) & os.sched_getaffinity(os.getpid())  # the main thread's: the process's
    return pin_poll_threads(target) if target else 0


def pin_poll_threads(cpus: set[int], pid: int | str = "self") -> int:
    """Bind every thread named in ``POLL_THREADS`` of this process (or of process ``pid``) to ``cpus``;
    returns how many (Linux)."""
    moved = 0
    for tid in os.listdir(f"/proc/{pid}/task"):
        try:
            with open(f"/proc/{pid}/task/{tid}/comm") as fh:
                if fh.read().strip() not in POLL_THREADS:
                    continue
            os.sched_setaffinity(int(tid), cpus)
            moved += 1
        except OSError:  # the thread ended meanwhile
            continue
    return moved


def scramble_token(token: int, vocab: int) -> int:
    """A different, deterministic token id (fault injection and the handoff control test)."""
    return (token * 7 + 13) % (vocab - 3) + 3


class VllmEngine:
    """vLLM engine with DynaServe's local scheduler and KV connector; see the module docstring."""

    def __init__(self, cfg: VllmEngineConfig, local: LocalScheduler) -> None:
        _prepare_env(cfg)
        self.cfg = cfg
        self.local = local
        self.reqs: dict[str, _Req] = {}
        self._ops: deque[tuple[str, Any]] = deque()  # appended on the loop, applied on the engine thread
        self._results: asyncio.Queue[_Stepped] = asyncio.Queue()
        self._bursting = False  # the engine thread is stepping (or about to); cleared when its last result is taken
        self._closing = False
        self._held_blocks: dict[str, tuple[str, int]] = {}  # request -> (vLLM internal id, blocks held)
        # the request table (reqs, _held_blocks, request states) is changed by the loop (add, start_decode,
        # abort) and, when the engine thread ships its own outputs, by the engine thread: one lock for both
        self._lock = threading.Lock()
        self._ship: Callable[[StepOutput], None] | None = None
        self._next_pull_check = math.inf  # earliest deadline of a B's pull (monotonic s); 0 after a failed handshake
        self._failed_producers: set[str] = set()  # engine ids of producers whose handshake failed since the last check
        self._publishing: dict[str, _Req] = {}  # internal id -> A whose finished blocks go to B early
        self._decode_publish: dict[str, int] = {}  # internal id -> position at which A (s > p) publishes while decoding
        self._early_kept = 0  # blocks pulled early and kept since the last shipped output (engine thread)
        self._parked: set[str] = set()  # internal ids of parked Bs in vLLM (engine thread; they do not keep it stepping)
        self.last_step_ms = 0.0
        self.transfer_failures = 0
        self._exec = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-step")
        try:
            self.run_on_engine_thread(self._start)
        except BaseException:
            self._exec.shutdown(wait=False)
            raise
        _bind_loop_thread(cfg)  # after the engine thread exists: it must not inherit this binding

    def run_on_engine_thread(self, fn: Callable[..., _T], *args: Any) -> _T:
        """Run ``fn(*args)`` on the engine thread and return its result (blocking). Code that drives
        ``self.llm`` directly (step-time measurements) should go through this, so its steps run where the
        engine's do."""
        return self._exec.submit(fn, *args).result()

    def _start(self) -> None:
        """On the engine thread: bind it, build the engine, warm it up."""
        cfg = self.cfg
        _bind_engine_thread(cfg)
        from vllm import EngineArgs
        from vllm.v1.engine.llm_engine import LLMEngine

        args = EngineArgs(**cfg.engine_kwargs())
        self.llm = LLMEngine.from_engine_args(args)
        core = self.llm.engine_core.engine_core  # the in-process EngineCore
        # with a KV connector vLLM hashes every request's full blocks (sha256: the prompt's when it is added,
        # each new one after every step) for prefix caching, which is off; NIXL never reads the hashes
        # (0.1 ms per 2,000-token prompt measured). Requests made without a hasher skip all of it.
        core.request_block_hasher = None
        self.sched = core.scheduler
        self.sched.local = self.local
        self.connector = self.sched.connector
        from vllm.distributed.kv_transfer.kv_transfer_state import get_kv_transfer_group

        self.kv_worker = get_kv_transfer_group()  # the worker side's connector (self.connector: the scheduler's)
        self.kv_worker.on_producer_failure = self._producer_failed
        vcfg = core.vllm_config
        mcfg = vcfg.model_config
        self.block_size = vcfg.cache_config.block_size
        num_blocks = self.sched.kv_cache_config.num_blocks
        tok = self.llm.get_tokenizer()
        elem = {"float32": 4, "float16": 2, "bfloat16": 2}.get(str(mcfg.dtype).replace("torch.", ""), 2)
        kv_bytes = 2 * mcfg.get_num_layers(vcfg.parallel_config) * mcfg.get_num_kv_heads(vcfg.parallel_config) \
            * mcfg.get_head_size() * elem
        self.info = EngineInfo(
            kind="vllm", model=os.path.basename(os.path.normpath(cfg.model)), block_size=self.block_size,
            max_model_len=mcfg.max_model_len, kv_capacity_tokens=num_blocks * self.block_size,
            kv_bytes_per_token=kv_bytes, vocab_size=mcfg.get_vocab_size(),
            eos_token_id=int(tok.eos_token_id) if tok.eos_token_id is not None else -1,
            max_num_seqs=cfg.max_num_seqs,
            early_pull_tail_tokens=cfg.overlap_tail_tokens if cfg.admit_b_at_dispatch else 0,
            step_model=self.local.model.coefficients(),
        )
        self._warm_up()
        moved = _move_pollers(cfg)
        if moved:
            log.info("moved %d idle poll threads off the engine's cores", moved)

    def _warm_up(self) -> None:
        """Run one small request through vLLM before serving: the first request pays for lazy start-up
        work (input processing, kernel selection) that must not land on a live request."""
        from vllm import SamplingParams

        self.llm.add_request("dynaserve-warmup", {"prompt_token_ids": [3] * 16},
                             SamplingParams(max_tokens=2, ignore_eos=True))
        while self.llm.has_unfinished_requests():
            self.llm.step()

    # ------------------------------------------------------------------ intake

    def _params(self, desc: MicroDescriptor, max_tokens: int, kv: dict | None) -> Any:
        from vllm import SamplingParams
        from vllm.sampling_params import RequestOutputKind

        sp = desc.sampling
        # token ids only: no detokenizing (the stream carries ids, stops are token ids), and no deep copy of
        # these fresh parameters in add_request
        return SamplingParams(
            max_tokens=max_tokens, temperature=sp.temperature, top_p=sp.top_p, seed=sp.seed,
            stop_token_ids=list(sp.stop_token_ids), ignore_eos=sp.ignore_eos, output_kind=RequestOutputKind.DELTA,
            extra_args={"kv_transfer_params": kv} if kv is not None else None, detokenize=False, skip_clone=True,
        )

    def set_shipper(self, ship: Callable[[StepOutput], None]) -> bool:
        """Ship every step's output from the engine thread through ``ship`` (thread-safe), right after the
        step; ``step()`` then returns only at the end of a burst."""
        self._ship = ship
        return True

    def add(self, desc: MicroDescriptor, now: float) -> None:
        with self._lock:
            self._add(desc)

    def _add(self, desc: MicroDescriptor) -> None:
        validate_descriptor(desc, self.info, self.reqs)
        p, s = len(desc.prompt), desc.split
        req = _Req(desc)
        self.reqs[desc.req_id] = req
        if desc.role == ROLE_FULL:
            self._add_op(req, desc.prompt, self._params(desc, desc.emit_tokens, None))
        elif desc.role == ROLE_A:
            kv = {"do_remote_decode": True, ROLE_KEY: "A"}
            if s >= p:
                self._add_op(req, desc.prompt, self._params(desc, desc.emit_tokens, kv))
            else:
                self._add_op(req, desc.prompt[:s], self._params(desc, 1, kv))
        else:
            req.state = WAIT_KV
            if self.cfg.admit_b_at_dispatch:
                self._park(req)

    def _park(self, req: _Req) -> None:
        """Queue adding a waiting B to vLLM now: its blocks are allocated at its next step, and its pull waits
        for A's parameters (the connector's ``dynaserve_pending``). For s >= p its prompt ends with placeholders
        for A's s - p + 1 tokens (``_resume`` writes them), so that vLLM sees B's sequence at its final length."""
        desc = req.desc
        p, s = len(desc.prompt), desc.split
        prompt = list(desc.prompt) + [desc.prompt[-1]] * (s - p + 1 if s >= p else 0)
        if self.cfg.fault_injection == "scramble_prefix":  # as in _start_decode
            prompt = [scramble_token(t, self.info.vocab_size) for t in prompt[:desc.split]] + prompt[desc.split:]
        kv = {ROLE_KEY: "B", PENDING_KEY: True, "remote_num_tokens": desc.split}
        req.parked = True
        self._add_op(req, prompt, self._params(desc, desc.emit_tokens, kv), parked=True)

    def _add_op(self, req: _Req, prompt: list[int], params: Any, parked: bool = False) -> None:
        """Queue adding ``req`` to vLLM (again, under a new id, when B falls back to recomputing) and make
        sure the engine thread picks it up."""
        rid = req.desc.req_id
        req.vllm_id = rid if not req.vllm_id else rid + RECOMPUTE_SUFFIX
        self._ops.append(("add", (rid, req.vllm_id, prompt, params, parked)))
        self._kick()

    def start_decode(self, req_id: str, kv: dict, num_tokens: int, tokens: list[int], now: float) -> None:
        with self._lock:
            self._start_decode(req_id, kv, num_tokens, tokens)

    def _start_decode(self, req_id: str, kv: dict, num_tokens: int, tokens: list[int]) -> None:
        req = self.reqs.get(req_id)
        if req is None or req.desc.role != ROLE_B:
            raise EngineError("unknown_id", f"no role-B micro-request {req_id!r} on this instance")
        if req.state != WAIT_KV:
            raise EngineError("bad_state", f"request {req_id!r} is not waiting for KV")
        desc = req.desc
        p, s = len(desc.prompt), desc.split
        if num_tokens != s or (s >= p and len(tokens) != s - p + 1) or (s < p and tokens):
            raise EngineError("bad_handoff", f"handoff of {num_tokens} positions / {len(tokens)} tokens does not "
                                             f"match split {s} of a {p}-token prompt")
        params = dict(kv)
        params[ROLE_KEY] = "B"
        if s >= p:
            prompt = desc.prompt + tokens  # the connector claims the first s positions (what A computed)
        else:
            prompt = list(desc.prompt)
            params["do_remote_prefill"] = False
            params["do_remote_decode"] = True
        max_tokens = desc.emit_tokens
        req.b_prompt, req.b_max_tokens = list(prompt), max_tokens
        req.b_deadline = time.monotonic() + self.cfg.kv_pull_timeout_s
        req.b_producer = str(kv.get("remote_engine_id", ""))
        self._next_pull_check = min(self._next_pull_check, req.b_deadline)
        req.state = RUNNING
        if req.parked:  # in vLLM already: append A's token (s = p) and start the pull
            req.parked = False
            self._ops.append(("resume", (req, tokens if s >= p else [], params)))
            self._kick()
            return
        if self.cfg.fault_injection == "scramble_prefix":
            # B's tokens for the pulled positions no longer matter if B really continues from A's KV
            prompt = [scramble_token(t, self.info.vocab_size) for t in prompt[:s]] + prompt[s:]
        self._add_op(req, prompt, self._params(desc, max_tokens, params))

    def active_ids(self) -> list[str]:
        with self._lock:
            return list(self.reqs)

    def abort(self, req_id: str) -> bool:
        with self._lock:
            req = self.reqs.pop(req_id, None)
            if req is None:
                return False
            if req.parked:
                req.parked = False
                self._ops.append(("abort_parked", req))
            elif req.state == RUNNING:
                self._ops.append(("abort", req.vllm_id))
                if req.desc.role == ROLE_A:
                    self._ops.append(("unpublish", req.internal_id))
            elif req.state == HELD:
                self._ops.append(("expire", req.internal_id))
        self._kick()
        return True

    # ------------------------------------------------------------------ progress

    def _apply_ops(self) -> None:
        """On the engine thread: apply the changes the loop queued, in order."""
        ops = self._ops
        while ops:
            kind, arg = ops.popleft()
            if kind == "add":
                rid, vllm_id, prompt, params, parked = arg
                req = self.reqs.get(rid)
                if req is not None and req.vllm_id == vllm_id:
                    req.internal_id = self.llm.add_request(vllm_id, {"prompt_token_ids": prompt}, params)
                    if parked:
                        self._parked.add(req.internal_id)
                    elif req.desc.role == ROLE_A and req.desc.peer_addr and self.cfg.admit_b_at_dispatch:
                        self._start_publishing(req)  # B is parked and A can reach its handoff inbox
                    self.sched.ranks[req.internal_id] = self.local.prefill_rank(req.desc.arrival,
                                                                                req.desc.ttft_slo_ms)
            elif kind == "abort":
                self.llm.abort_request([arg])
            elif kind == "resume":
                self._resume(*arg)
            elif kind == "chunk":
                self._prefetch(*arg)
            elif kind == "abort_parked":
                self._parked.discard(arg.internal_id)
                settled = self.kv_worker.drop(arg.internal_id, self.cfg.kv_pull_timeout_s)
                if settled and self.connector.is_parked(arg.internal_id):
                    # no READ of its own is running: vLLM may free its blocks at once (it otherwise waits
                    # for the pull to report)
                    self.sched.finished_recving_kv_req_ids.add(arg.internal_id)
                self.llm.abort_request([arg.vllm_id])
            elif kind == "unpublish":
                self._publishing.pop(arg, None)
                self._decode_publish.pop(arg, None)
                self.sched.split_prefill.pop(arg, None)
            elif kind == "expire":
                self.connector.expire(arg)

    def _start_publishing(self, req: _Req) -> None:
        """On the engine thread: A's finished blocks go to its parked B from now on. For s <= p its prefill
        is split where the tail begins (its first chunk's blocks are read while it computes the rest); for
        s > p it publishes once more while decoding, where the tail begins, if that adds blocks to the
        prompt's."""
        iid, s, p = req.internal_id, req.desc.split, len(req.desc.prompt)
        self._publishing[iid] = req
        if s <= p:
            end = self._first_chunk_end(req.desc) if self.cfg.overlap_tail_tokens else 0
            if end:
                self.sched.split_prefill[iid] = end
            return
        at = self._first_chunk_end(req.desc)
        if p // self.block_size * self.block_size < at < s:
            self._decode_publish[iid] = at

    def _first_chunk_end(self, desc: MicroDescriptor) -> int:
        """Where A's first prefill chunk ends when it is split for an early pull: the last block boundary at
        least the tail before the split (0: not split). The tail is the descriptor's (the broker's choice for
        the request), else ``overlap_tail_tokens``."""
        tail = desc.early_tail or self.cfg.overlap_tail_tokens
        return max(0, (desc.split - tail) // self.block_size * self.block_size)

    def kv_chunk(self, req_id: str, kv: dict, num_tokens: int) -> None:
        with self._lock:
            req = self.reqs.get(req_id)
            if req is None or not req.parked or not isinstance(kv, dict):
                return  # advisory: not (or no longer) a parked B here
            self._ops.append(("chunk", (req, kv)))
        self._kick()

    def _prefetch(self, req: _Req, kv: dict) -> None:
        """On the engine thread: pull the blocks of a KvChunk into a parked B's blocks."""
        if req.internal_id not in self._parked:
            return  # resumed or aborted meanwhile
        local = self.connector.parked_block_ids(req.internal_id)
        if local is None:
            return  # not admitted yet (no free blocks when it was added)
        try:
            self.kv_worker.prefetch(req.internal_id, local, kv)
        except Exception as exc:  # noqa: BLE001 - a bad chunk (or a failed post) only loses the early pull
            log.warning("request %s: early KV pull not started: %s", req.desc.req_id, exc)

    def _publish(self, plan: Any, out: StepOutput) -> None:
        """On the engine thread, after a step: the blocks an A has completed while it still prefills, and for
        s > p those it has at its decode publishing point, go to its B as a KvChunk."""
        requests = self.sched.requests
        for iid, _ in plan.prefills:
            req = self._publishing.get(iid)
            vreq = requests.get(iid) if req is not None else None
            if req is not None and vreq is not None:
                self._chunk(req, vreq, out)
        if self._decode_publish:
            for iid, at in list(self._decode_publish.items()):
                req = self._publishing.get(iid)
                vreq = requests.get(iid) if req is not None else None
                if req is None or vreq is None:
                    del self._decode_publish[iid]
                elif vreq.num_computed_tokens >= at:
                    del self._decode_publish[iid]
                    self._chunk(req, vreq, out)

    def _chunk(self, req: _Req, vreq: Any, out: StepOutput) -> None:
        """A KvChunk of A's finished blocks not published yet (none at A's last step: the handoff names them)."""
        done = vreq.num_computed_tokens
        if done >= req.desc.split:
            return
        full = done // self.block_size
        groups = self.sched.kv_cache_manager.get_block_ids(vreq.request_id)
        if full <= req.published or len(groups) != 1:
            return
        req.published = full
        kv = self.connector.chunk_params(vreq, groups[0][:full])
        out.chunks.append(Handoff(req.desc.req_id, kv, full * self.block_size, []))

    def _resume(self, req: _Req, tokens: list[int], params: dict) -> None:
        """On the engine thread: a parked B gets A's tokens (over the placeholders at the end of its prompt,
        before vLLM schedules it again) and A's parameters; the blocks it pulled early are kept if they still
        match."""
        self._parked.discard(req.internal_id)
        local = self.connector.parked_block_ids(req.internal_id)
        try:
            pulled = self.kv_worker.settle(req.internal_id, params, self.cfg.kv_pull_timeout_s)
            if pulled and (local is None or len(params["remote_block_ids"][0]) != len(local)):
                pulled = 0  # vLLM's pull pairs the two sides' blocks from the end: only equal counts line up
        except Exception as exc:  # noqa: BLE001 - malformed parameters: the pull (or its failure) decides
            log.warning("request %s: early KV pulls not used: %s", req.desc.req_id, exc)
            pulled = 0
        vreq = self.sched.requests.get(req.internal_id)
        if vreq is None:
            return
        if tokens:
            if self.cfg.fault_injection == "scramble_prefix":  # as in _start_decode: positions before s
                tokens = [scramble_token(t, self.info.vocab_size) for t in tokens[:-1]] + tokens[-1:]
            n = len(tokens)
            vreq.prompt_token_ids[-n:] = tokens
            vreq._all_token_ids[-n:] = tokens
        self._early_kept += pulled
        self.connector.resume(vreq, params, pulled)

    def _runnable(self) -> bool:
        """vLLM has unfinished requests other than parked Bs."""
        unfinished = self.llm.output_processor.get_num_unfinished_requests()
        if not self._parked:
            return unfinished > 0
        requests = self.sched.requests
        return unfinished > sum(1 for iid in list(self._parked) if iid in requests)

    def _live(self) -> bool:
        """vLLM has requests to step (parked Bs alone do not count) or finished ones to clean up."""
        if self._runnable():
            return True
        return self.sched.has_finished_requests() if self._parked else self.sched.has_requests()

    def has_work(self) -> bool:
        return self._bursting or bool(self._ops) or self._live()

    def housekeeping(self, now: float) -> StepOutput:
        return StepOutput()  # vLLM polls transfers and leases inside its steps

    def _producer_failed(self, engine_id: str) -> None:
        """From a handshake thread: the handshake with producer ``engine_id`` failed (dead A); the next check
        recomputes the requests still waiting for its KV."""
        with self._lock:
            self._failed_producers.add(engine_id)
            self._next_pull_check = 0.0

    def _check_pulls(self, out: StepOutput) -> None:
        """B requests whose KV has not arrived in time or whose producer's handshake failed (failed read,
        dead A): recompute."""
        from vllm.v1.request import RequestStatus

        mono = time.monotonic()
        if mono < self._next_pull_check:
            return  # no B's deadline has passed (the check runs every step: keep it O(1) then)
        self._next_pull_check = math.inf
        dead, self._failed_producers = self._failed_producers, set()
        for rid, req in self.reqs.items():
            if req.desc.role != ROLE_B or req.state != RUNNING or not req.b_deadline:
                continue
            failed = req.b_producer in dead
            if mono < req.b_deadline and not failed:
                self._next_pull_check = min(self._next_pull_check, req.b_deadline)
                continue
            vreq = self.sched.requests.get(req.internal_id)
            if vreq is None or vreq.status != RequestStatus.WAITING_FOR_REMOTE_KVS:
                req.b_deadline = 0.0  # the pull completed (or vLLM recovered on its own)
                continue
            req.b_deadline = 0.0
            self.transfer_failures += 1
            why = "the handshake with A failed" if failed else f"no KV from A after {self.cfg.kv_pull_timeout_s} s"
            out.failures.append((rid, "kv_transfer_recompute", why))
            log.warning("request %s: %s; recomputing locally", rid, why)
            self._ops.append(("abort", req.vllm_id))
            self._add_op(req, req.b_prompt, self._params(req.desc, req.b_max_tokens, None))

    def _kick(self) -> None:
        """Start a burst of steps on the engine thread now, unless one runs (it applies queued changes at
        its next step) or no loop runs here (the worker's next step() starts it)."""
        if self._bursting or self._closing:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        self._bursting = True

        def post(item: _Stepped) -> None:
            loop.call_soon_threadsafe(self._results.put_nowait, item)

        self._exec.submit(self._run_steps, post)

    def _run_steps(self, post: Callable[[_Stepped], None]) -> None:
        """On the engine thread: apply queued changes and step vLLM, back to back while each step runs the
        model or lands pulled KV (its request is runnable at the very next step) and vLLM has requests left to
        run. With a shipper, ships every step's output itself and tells the loop only when the burst ends;
        without, hands the outputs to the loop at every step that ran the model, and at the end."""
        ship = self._ship
        outputs: list[Any] = []
        first = True
        try:
            while not self._closing:
                if ship is not None and time.monotonic() >= self._next_pull_check:  # a B's deadline passed
                    late = StepOutput()
                    with self._lock:
                        self._check_pulls(late)
                    if late.failures:
                        ship(late)
                self._apply_ops()
                # requests that only wait for their KV to be read (held blocks) need a poll, not back-to-back steps
                if not (self._runnable() or (first and self.sched.has_requests())):
                    break
                first = False
                t0 = time.perf_counter()
                outputs += self.llm.step()
                ms = (time.perf_counter() - t0) * 1000.0
                plan, self.sched.last_step = self.sched.last_step, None
                if plan is not None and not plan.empty:
                    if ship is not None:
                        out = self._collect(outputs, plan, ms)
                        if self._publishing:
                            self._publish(plan, out)
                        ship(out)
                    else:
                        post(_Stepped(outputs, ms, plan))
                    outputs = []
                elif not self.sched.finished_recving_kv_req_ids:
                    break  # nothing ran and nothing became runnable: the worker polls again after its idle period
            if ship is not None and outputs:
                ship(self._collect(outputs, None, 0.0))
                outputs = []
        except BaseException as exc:  # noqa: BLE001 - handed to the loop, which raises it
            post(_Stepped(outputs, last=True, error=exc))
            return
        post(_Stepped(outputs, last=True))

    def _collect(self, outputs: list[Any], plan: Any, ms: float, out: StepOutput | None = None) -> StepOutput:
        """``out`` (a new one if None) with a step's vLLM outputs added (and its plan, when it ran the model)."""
        out = out if out is not None else StepOutput()
        with self._lock:
            for o in outputs:
                self._on_output(o, out)
            if self._early_kept:
                out.kv_early_blocks, self._early_kept = self._early_kept, 0
            if plan is not None:
                self.local.observe(plan, ms)
                self.last_step_ms = ms
                out.step_ms = ms
                out.prefill_tokens = plan.prefill_tokens
                out.decode_seqs = len(plan.decodes)
                out.decode_ctx_tokens = plan.decode_ctx_tokens
                out.prefill_attn = plan.prefill_attn
                out.token_budget = plan.token_budget
            for rid in [r for r, (iid, _) in self._held_blocks.items() if iid not in self.sched.requests]:
                del self._held_blocks[rid]  # the reader confirmed or the lease ran out: vLLM freed the blocks
                held = self.reqs.get(rid)
                if held is not None and held.state == HELD:
                    del self.reqs[rid]
        return out

    async def step(self, now: float) -> StepOutput:
        """Without a shipper: the outputs of the engine thread's next step that runs the model, or of its
        burst's end. With one: runs a burst (its steps ship their own outputs) and returns at its end."""
        out = StepOutput()
        if self._ship is None:
            with self._lock:
                self._check_pulls(out)
        while True:
            self._kick()
            if not self._bursting:
                return out  # closing
            got = await self._results.get()
            if got.last:
                self._bursting = False
            if got.error is not None:
                raise got.error
            self._collect(got.outputs, got.plan, got.ms, out)  # also forgets blocks vLLM has freed
            if got.plan is not None or not self._ops:
                return out
            # the burst ended while changes were queued (they arrived after its last step): run them now

    def _on_output(self, o: Any, out: StepOutput) -> None:
        rid = o.request_id.removesuffix(RECOMPUTE_SUFFIX)
        req = self.reqs.get(rid)
        if req is None or req.state != RUNNING or o.request_id != req.vllm_id:
            return
        comp = o.outputs[0]
        new = list(comp.token_ids)
        finish = _FINISH.get(comp.finish_reason or "", FINISH_STOP) if o.finished else None
        desc = req.desc
        if desc.role == ROLE_A:
            p, s = len(desc.prompt), desc.split
            if s < p:
                new = []  # the token after a partial prompt is not part of the stream
            req.a_tokens += new
            if finish is None:
                if new:
                    out.entries.append([rid, new, None])
                return
            if finish == FINISH_LENGTH or (s < p and finish is not None):
                if new:
                    out.entries.append([rid, new, FINISH_HANDOFF])
                kv = dict(o.kv_transfer_params or {})
                if self.cfg.fault_injection == "dead_handoff_port":
                    kv["remote_port"] = 9  # discard port: nothing listens, the reader's handshake fails
                req.state = HELD
                vreq = self.sched.requests.get(req.internal_id)
                kv[PREEMPTIONS_KEY] = vreq.num_preemptions if vreq is not None else -1
                self._ops.append(("unpublish", req.internal_id))
                self._held_blocks[rid] = (req.internal_id, -(-s // self.block_size))
                out.handoffs.append(Handoff(rid, kv, s, list(req.a_tokens)))
            else:  # stopped early (stop token): the request ends on A and nobody will read its KV
                out.entries.append([rid, new, finish])
                del self.reqs[rid]
                self._ops.append(("unpublish", req.internal_id))
                self._ops.append(("expire", req.internal_id))
                self._kick()
            return
        if new or finish is not None:
            out.entries.append([rid, new, finish])
        if finish is not None:
            del self.reqs[rid]

    # ------------------------------------------------------------------ reporting

    def load(self) -> EngineLoad:
        sched = self.sched
        ld = EngineLoad(kv_capacity_tokens=self.info.kv_capacity_tokens, step_ms=self.last_step_ms,
                        token_budget=self.local.last_budget, step_scale=self.local.correction)
        parked = self._parked
        for r in list(sched.running) + list(sched.waiting):
            if parked and r.request_id in parked:
                continue  # a B not yet admitted (no free blocks): counted below as waiting for KV
            if r.num_computed_tokens >= r.num_prompt_tokens:
                ld.running_seqs += 1
                ld.decode_ctx_tokens += r.num_computed_tokens
            else:
                ld.queued_prefill_tokens += r.num_prompt_tokens - r.num_computed_tokens
            ld.pending_decode_tokens += max(0, r.max_tokens - r.num_output_tokens)
        with self._lock:
            waiting = [req for req in self.reqs.values() if req.state == WAIT_KV]
            ld.active_requests = len(self.reqs)
            ld.held_blocks = sum(n for _, n in self._held_blocks.values())
        for req in waiting:
            ld.queued_prefill_tokens += max(0, len(req.desc.prompt) - req.desc.split)
        pool = sched.kv_cache_manager.block_pool
        ld.kv_used_tokens = (pool.num_gpu_blocks - 1 - pool.get_num_free_blocks()) * self.block_size
        return ld

    def close(self) -> None:
        self._closing = True  # a running burst stops at its next step; shutdown queues behind it
        try:
            self.run_on_engine_thread(self.llm.engine_core.shutdown)
        except Exception:  # noqa: BLE001 - best effort at exit
            log.debug("engine shutdown failed", exc_info=True)
        self._exec.shutdown(wait=True)

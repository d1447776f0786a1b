"""Broker throughput: request dispatch rate, token relay rate, and an end-to-end run on simulated engines.

(a) dispatch: a real broker process (``python -m broker``, pinned to the first CPU with ``taskset`` when
    there are two or more) and N "firehose" worker processes defined here that speak the wire protocol
    directly (DEALER, identity = instance id; RegisterWorker, LoadReport heartbeats with zero load). A
    firehose answers every DispatchMicro at once: role A hands off right away (HandoffReady), roles
    full and B send all their tokens in one TokenBatch entry. One client keeps a window of requests in
    flight and submits a new one whenever one ends -> requests/s admitted and completed.
(b) relay: the firehoses run every request they hold for ``--relay-max-tokens`` tokens and emit one
    TokenBatch per "step" carrying one token for each of their running requests, as fast as the broker
    absorbs them (a shared in-flight token window throttles the workers against what the client has
    received) -> tokens/s relayed by the broker.
(c) cluster: LocalCluster with the real simulated-engine workers at a tiny engine time scale, and the
    client SDK, running requests with Azure conversation trace lengths end to end.

Everything except the broker runs on the other CPUs. The broker's CPU time is read from /proc/<pid>/stat
(utime + stime, all its threads) over each measured window, so rates per broker-CPU-second are given
too; they are what one core of broker can do even when the load generators share a busy machine.

Usage: python -m bench.bench_broker [--seconds 6] [--workers 4] [--phases dispatch,relay,cluster]
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import msgpack
import zmq
from tqdm import tqdm

from bench.traces import load_trace
from dynaserve import protocol as P

REPO = Path(__file__).resolve().parent.parent
CLK_TCK = os.sysconf("SC_CLK_TCK")
HEARTBEAT_S = 0.02
VOCAB = 32000
MAX_MODEL_LEN = 32768
KV_CAPACITY = 1 << 30  # firehoses never run out of KV: the broker's plan never waits for capacity
KV_BYTES_PER_TOKEN = 131072  # llama3-8b, fp16

# Field positions on the wire ([version, type, *fields]), taken from the message definitions.
_DESC = {f.name: i for i, f in enumerate(dataclasses.fields(P.MicroDescriptor))}
_START_DECODE = {f.name: 2 + i for i, f in enumerate(dataclasses.fields(P.StartDecode))}
_ABORT = {f.name: 2 + i for i, f in enumerate(dataclasses.fields(P.AbortMicro))}
_ERROR = {f.name: 2 + i for i, f in enumerate(dataclasses.fields(P.ErrorReply))}
_ADMITTED = {f.name: 2 + i for i, f in enumerate(dataclasses.fields(P.Admitted))}
_SUBMIT = {f.name: 2 + i for i, f in enumerate(dataclasses.fields(P.SubmitRequest))}


def cpu_seconds(pid: int) -> float:
    """utime + stime of a process (all its threads), in seconds, from /proc/<pid>/stat."""
    with open(f"/proc/{pid}/stat") as f:
        data = f.read()
    rest = data[data.rindex(")") + 2 :].split()  # fields from 3 (state) on; comm may hold spaces
    return (int(rest[11]) + int(rest[12])) / CLK_TCK


def main_thread_wait_seconds(pid: int) -> float:
    """Time the process's main thread spent runnable but waiting for a CPU (its run-queue delay: other
    processes, or the process's own ZeroMQ I/O thread, held the CPU), in seconds."""
    with open(f"/proc/{pid}/task/{pid}/schedstat") as f:
        return int(f.read().split()[1]) / 1e9


def advance(bar: tqdm, seconds: float) -> None:
    """Move the time-based progress bar on, never past its total (the total is an estimate)."""
    bar.update(max(0.0, min(round(seconds, 2), (bar.total or 0) - bar.n)))


def cpu_layout() -> tuple[tuple[int, ...], tuple[int, ...]]:
    """(broker CPUs, everything-else CPUs): the first CPU for the broker when there are two or more."""
    cpus = sorted(os.sched_getaffinity(0))
    if len(cpus) < 2:
        return (), ()
    return (cpus[0],), tuple(cpus[1:])


# ------------------------------------------------------------------------------------------ firehose


@dataclass(frozen=True)
class FirehoseConfig:
    addr: str
    instance_id: str
    mode: str  # "dispatch" or "relay"
    slot: int  # index into the shared emitted-token counters
    window_tokens: int  # relay: tokens emitted by all firehoses and not yet received by the client
    cpus: tuple[int, ...]


@dataclass(slots=True)
class _Running:
    left: int  # tokens still to emit
    role: str
    split: int
    emitted: int = 0


class Firehose:
    """A worker that answers the broker as fast as it can, with no engine behind it."""

    def __init__(self, cfg: FirehoseConfig, stop: Any, emitted: Any, received: Any) -> None:
        self.cfg = cfg
        self.stop = stop
        self.emitted = emitted
        self.received = received
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, cfg.instance_id.encode())
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)  # flow control is ours (window) or the broker's pace
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(cfg.addr)
        self.running: dict[str, _Running] = {}
        self.waiting_b: dict[str, int] = {}  # role B: tokens to emit once StartDecode arrives
        self.out: list[list] = []  # token entries of the next TokenBatch
        self.handoffs: list[P.HandoffReady] = []
        self.seq = 0
        self.sent_tokens = 0
        self.token = 3

    def _tokens(self, n: int) -> list[int]:
        self.token = (self.token * 7919 + 17) % VOCAB
        return [self.token] * n

    def _register(self) -> None:
        self.sock.send(P.encode(P.RegisterWorker(
            self.cfg.instance_id, "firehose", "llama3-8b", KV_CAPACITY, 16, MAX_MODEL_LEN, "none", VOCAB, 2,
            KV_BYTES_PER_TOKEN, "any",
        )))

    def _report(self) -> None:
        self.seq += 1
        self.sock.send(P.encode(P.LoadReport(
            self.cfg.instance_id, self.seq, 0, 0, 0, 0, 0, KV_CAPACITY, 0.0, 8192, 0, len(self.running),
        )))

    def run(self) -> None:
        self._register()
        registered = False
        deadline = time.monotonic() + 30.0
        while not registered:
            if self.stop.is_set() or time.monotonic() > deadline:
                return
            if self.sock.poll(1000):
                obj = msgpack.unpackb(self.sock.recv(), raw=False)
                registered = obj[1] == P.RegisterAck.TYPE and obj[3] is True
            else:
                self._register()
        next_report = 0.0
        relay = self.cfg.mode == "relay"
        while not self.stop.is_set():
            now = time.monotonic()
            if now >= next_report:
                self._report()
                next_report = now + HEARTBEAT_S
            self._drain()
            if relay and self.running and self._credit():
                self._step()
            if self.out:
                n = sum(len(e[1]) for e in self.out)
                self.sock.send(P.encode_token_entries(P.TokenBatch.TYPE, self.out))
                self.out = []
                self.sent_tokens += n
                self.emitted[self.cfg.slot] = self.sent_tokens
            for h in self.handoffs:
                self.sock.send(P.encode(h))
            self.handoffs.clear()
            if not (relay and self.running and self._credit()):
                self.sock.poll(max(0.0, min(2.0, (next_report - time.monotonic()) * 1000.0)))
        self.sock.close(0)
        self.ctx.term()

    def _credit(self) -> bool:
        return sum(self.emitted[:]) - self.received.value < self.cfg.window_tokens

    def _drain(self) -> None:
        sock = self.sock
        while True:
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            obj = msgpack.unpackb(frame, raw=False)
            kind = obj[1]
            if kind == P.DispatchMicro.TYPE:
                self._on_dispatch(obj[2])
            elif kind == P.StartDecode.TYPE:
                rid = obj[_START_DECODE["req_id"]]
                n = self.waiting_b.pop(rid, None)
                if n is not None:
                    self._start(rid, n, P.ROLE_B, 0)
            elif kind == P.AbortMicro.TYPE:
                rid = obj[_ABORT["req_id"]]
                self.running.pop(rid, None)
                self.waiting_b.pop(rid, None)
            elif kind == P.ErrorReply.TYPE and obj[_ERROR["code"]] == "not_registered":
                self._register()
            elif kind == P.Shutdown.TYPE:
                self.stop.set()
                return

    def _on_dispatch(self, desc: list) -> None:
        rid = desc[_DESC["req_id"]]
        role = desc[_DESC["role"]]
        n = desc[_DESC["emit_tokens"]]
        if role == P.ROLE_B:
            self.waiting_b[rid] = n
        else:
            self._start(rid, n, role, desc[_DESC["split"]])

    def _start(self, rid: str, n: int, role: str, split: int) -> None:
        if self.cfg.mode == "relay" and n > 0:
            self.running[rid] = _Running(n, role, split)
        elif role == P.ROLE_A:
            toks = self._tokens(n)
            if toks:
                self.out.append([rid, toks, P.FINISH_HANDOFF])
            self.handoffs.append(P.HandoffReady(rid, {}, split, toks))
        else:
            self.out.append([rid, self._tokens(n), P.FINISH_LENGTH])

    def _step(self) -> None:
        """One 'engine step': one token for every running request."""
        out = self.out
        done = []
        tok = self._tokens(1)
        for rid, r in self.running.items():
            r.left -= 1
            r.emitted += 1
            if r.left > 0:
                out.append([rid, tok, None])
            elif r.role == P.ROLE_A:
                out.append([rid, tok, P.FINISH_HANDOFF])
                self.handoffs.append(P.HandoffReady(rid, {}, r.split, tok * r.emitted))
                done.append(rid)
            else:
                out.append([rid, tok, P.FINISH_LENGTH])
                done.append(rid)
        for rid in done:
            del self.running[rid]


def firehose_main(cfg: FirehoseConfig, stop: Any, emitted: Any, received: Any) -> None:
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    if cfg.cpus:
        os.sched_setaffinity(0, cfg.cpus)
    Firehose(cfg, stop, emitted, received).run()


# ------------------------------------------------------------------------------------------ broker + client


@dataclass
class PhaseResult:
    name: str
    workers: int
    window: int
    seconds: float
    admitted: int
    completed: int
    tokens: int
    broker_cpu_s: float
    broker_wait_s: float  # main thread runnable but waiting for the CPU
    loadgen_cpu_s: float  # the client and the firehose workers together
    mean_prompt: float
    kinds: Counter[str] = field(default_factory=Counter)
    errors: Counter[str] = field(default_factory=Counter)
    broker_stats: dict[str, Any] = field(default_factory=dict)
    broker_warnings: list[str] = field(default_factory=list)  # logged before the workers were stopped

    @property
    def cpu_util(self) -> float:
        return self.broker_cpu_s / self.seconds if self.seconds else 0.0


class BrokerProc:
    """``python -m broker`` on ipc sockets in a temporary folder, pinned with taskset when possible."""

    def __init__(self, run_dir: Path, cpus: tuple[int, ...], policy: str) -> None:
        self.client_addr = f"ipc://{run_dir}/client.sock"
        self.worker_addr = f"ipc://{run_dir}/worker.sock"
        argv = [sys.executable, "-m", "broker", "--client-addr", self.client_addr,
                "--worker-addr", self.worker_addr, "--policy", policy, "--max-active", "1000000"]
        taskset = shutil.which("taskset")
        if cpus and taskset:
            argv = [taskset, "-c", ",".join(map(str, cpus)), *argv]
        self.cmdline = " ".join(Path(a).name if a in (sys.executable, taskset) else a for a in argv)
        self.log_path = run_dir / "broker.log"
        env = dict(os.environ, DYNASERVE_LOG_LEVEL="WARNING")
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(argv, stdout=log, stderr=subprocess.STDOUT, cwd=str(REPO), env=env,
                                         start_new_session=True)
        self.pid = self.proc.pid  # taskset execs the broker: same pid

    def stop(self) -> None:
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)


class LoadClient:
    """One client connection driving a closed loop of raw SubmitRequest frames."""

    def __init__(self, addr: str, prompts: Sequence[list[int]], max_tokens: int) -> None:
        self.ctx = zmq.Context()
        self.sock = self.ctx.socket(zmq.DEALER)
        self.sock.setsockopt(zmq.IDENTITY, uuid.uuid4().bytes)
        self.sock.setsockopt(zmq.LINGER, 0)
        self.sock.setsockopt(zmq.SNDHWM, 0)
        self.sock.setsockopt(zmq.RCVHWM, 0)
        self.sock.connect(addr)
        # Frame templates made by the protocol's own encoder; only req_id changes per request.
        self.templates = [
            msgpack.unpackb(P.encode(P.SubmitRequest("x", list(pr), P.SamplingParams(max_tokens=max_tokens,
                                                                                      ignore_eos=True))))
            for pr in prompts
        ]
        self.prompt_lens = [len(pr) for pr in prompts]
        self.packer = msgpack.Packer(use_bin_type=True)
        self.next_id = 0
        self.outstanding = 0
        self.admitted = 0
        self.completed = 0
        self.tokens = 0
        self.prompt_tokens = 0
        self.kinds: Counter[str] = Counter()
        self.errors: Counter[str] = Counter()

    def submit(self) -> None:
        i = self.next_id
        self.next_id += 1
        k = i % len(self.templates)
        t = self.templates[k]
        t[_SUBMIT["req_id"]] = format(i, "x")
        self.sock.send(self.packer.pack(t), zmq.NOBLOCK)
        self.prompt_tokens += self.prompt_lens[k]
        self.outstanding += 1

    def drain(self, budget: int = 4000) -> None:
        sock = self.sock
        for _ in range(budget):
            try:
                frame = sock.recv(zmq.NOBLOCK)
            except zmq.Again:
                return
            obj = msgpack.unpackb(frame, raw=False)
            kind = obj[1]
            if kind == P.TokenStream.TYPE:
                for e in obj[2]:
                    self.tokens += len(e[1])
                    if e[2] is not None:
                        self.completed += 1
                        self.outstanding -= 1
            elif kind == P.Admitted.TYPE:
                self.admitted += 1
                self.kinds[obj[_ADMITTED["kind"]]] += 1
            elif kind == P.ErrorReply.TYPE:
                self.errors[obj[_ERROR["code"]]] += 1
                if len(obj) > _ERROR["req_id"] and obj[_ERROR["req_id"]] is not None:
                    self.outstanding -= 1

    def status(self, timeout_s: float) -> P.StatusReply | None:
        self.sock.send(P.encode(P.StatusRequest("bench")))
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if not self.sock.poll(100):
                continue
            frame = self.sock.recv()
            try:
                msg = P.decode(frame, P.BROKER_TO_CLIENT)
            except P.ProtocolError:
                continue
            if isinstance(msg, P.StatusReply):
                return msg
        return None

    def close(self) -> None:
        self.sock.close(0)
        self.ctx.term()


def run_firehose_phase(
    name: str, mode: str, *, workers: int, window: int, seconds: float, warmup: float, prompts: list[list[int]],
    max_tokens: int, policy: str, relay_window_tokens: int, bar: tqdm, profile_dir: Path | None = None,
) -> PhaseResult:
    broker_cpus, other_cpus = cpu_layout()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    run_dir = Path(tempfile.mkdtemp(prefix="dynaserve-bench-"))
    broker = BrokerProc(run_dir, broker_cpus, policy)
    mpctx = mp.get_context("spawn")
    stop = mpctx.Event()
    emitted = mpctx.Array("q", workers, lock=False)
    received = mpctx.Value("q", 0, lock=False)
    procs: list[Any] = []
    client = LoadClient(broker.client_addr, prompts, max_tokens)
    try:
        if client.status(20.0) is None:
            raise RuntimeError(f"broker did not answer; log: {broker.log_path}")
        for i in range(workers):
            cfg = FirehoseConfig(broker.worker_addr, f"f{i}", mode, i, relay_window_tokens, other_cpus)
            proc = mpctx.Process(target=firehose_main, args=(cfg, stop, emitted, received), daemon=True)
            proc.start()
            procs.append(proc)
        deadline = time.monotonic() + 30.0
        while True:
            st = client.status(2.0)
            if st is not None and len(st.instances) >= workers:
                break
            if time.monotonic() > deadline:
                raise RuntimeError(f"firehose workers did not register; log: {broker.log_path}")
        t0 = time.monotonic()
        t_measure, t_end = t0 + warmup, t0 + warmup + seconds
        snap: tuple[float, int, int, int, float, float, float] | None = None
        last_bar = t0
        spy: subprocess.Popen | None = None

        def loadgen_cpu() -> float:
            return cpu_seconds(os.getpid()) + sum(cpu_seconds(p.pid) for p in procs)

        while True:
            now = time.monotonic()
            if snap is None and now >= t_measure:
                snap = (now, client.admitted, client.completed, client.tokens, cpu_seconds(broker.pid),
                        loadgen_cpu(), main_thread_wait_seconds(broker.pid))
                client.kinds.clear()
                client.errors.clear()
                if profile_dir is not None:
                    spy = start_py_spy(broker.pid, profile_dir / f"{mode}-{len(prompts)}-{window}.txt", seconds)
            if now >= t_end:
                break
            while client.outstanding < window:
                client.submit()
            if client.sock.poll(5):
                client.drain()
            received.value = client.tokens
            if now - last_bar >= 0.25:
                advance(bar, now - last_bar)
                bar.set_postfix_str(f"{name}: {client.completed} done, {client.tokens} tokens", refresh=False)
                last_bar = now
        assert snap is not None
        t1, cpu1, wait1 = time.monotonic(), cpu_seconds(broker.pid), main_thread_wait_seconds(broker.pid)
        gen1 = loadgen_cpu()
        result = PhaseResult(
            name=name, workers=workers, window=window, seconds=t1 - snap[0], admitted=client.admitted - snap[1],
            completed=client.completed - snap[2], tokens=client.tokens - snap[3], broker_cpu_s=cpu1 - snap[4],
            broker_wait_s=wait1 - snap[6], loadgen_cpu_s=gen1 - snap[5],
            mean_prompt=statistics.fmean(client.prompt_lens),
            kinds=Counter(client.kinds), errors=Counter(client.errors),
        )
        if spy is not None:
            spy.wait(30)
        if mode == "dispatch":  # let the requests in flight finish, so the broker's counters add up
            t_drain = time.monotonic() + 5.0
            while client.outstanding > 0 and time.monotonic() < t_drain:
                if client.sock.poll(5):
                    client.drain()
        st = client.status(10.0)
        result.broker_stats = dict(st.stats) if st is not None else {}
        result.broker_warnings = [ln for ln in broker.log_path.read_text(errors="replace").splitlines()
                                  if " WARNING " in ln or " ERROR " in ln]
        advance(bar, time.monotonic() - last_bar)
        return result
    finally:
        stop.set()
        for proc in procs:
            proc.join(3)
            if proc.is_alive():
                proc.terminate()
                proc.join(5)
        client.close()
        broker.stop()
        shutil.rmtree(run_dir, ignore_errors=True)


def start_py_spy(pid: int, out: Path, seconds: float) -> subprocess.Popen | None:
    """Sample the broker with py-spy (raw collapsed stacks) for ``seconds``; None if py-spy is missing."""
    exe = shutil.which("py-spy") or str(Path(sys.executable).parent / "py-spy")
    if not os.path.exists(exe):
        print("py-spy not found (pip install py-spy): no profile", file=sys.stderr)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen(
        [exe, "record", "--pid", str(pid), "--duration", str(max(1, int(seconds))), "--rate", "250",
         "--format", "raw", "--nonblocking", "--output", str(out)],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )


def summarize_profile(path: Path, top: int = 12) -> str:
    """Self and inclusive sample shares per function from py-spy's raw (collapsed) output."""
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    total = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = [f.split(" (")[0] + " (" + f.split(" (")[1].split(":")[0].rsplit("/", 1)[-1] + ")"
                  if " (" in f else f for f in stack.split(";")]
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
    if not total:
        return f"{path.name}: no samples"
    lines = [f"{path.name}: {total} samples", "", "| function | self | inclusive |", "|---|---:|---:|"]
    for f, n in own.most_common(top):
        lines.append(f"| `{f}` | {100.0 * n / total:.1f}% | {100.0 * incl[f] / total:.1f}% |")
    return "\n".join(lines)


# ------------------------------------------------------------------------------------------ (c) LocalCluster


@dataclass
class ClusterResult:
    workers: int
    requests: int
    seconds: float
    tokens: int
    prompt_tokens: int
    broker_cpu_s: float
    broker_wait_s: float
    short_streams: int  # completed requests that streamed fewer or more tokens than max_tokens
    ttft_ms: list[float]
    kinds: Counter[str]
    errors: Counter[str]
    time_scale: float


async def run_cluster_phase(
    *, workers: int, requests: int, concurrency: int, time_scale: float, policy: str, max_seconds: float,
    seed: int, bar: tqdm,
) -> ClusterResult:
    from dynaserve.client import DynaServeClient
    from dynaserve.cluster import ClusterConfig, LocalCluster
    from dynaserve.errors import DynaServeError

    broker_cpus, other_cpus = cpu_layout()
    if other_cpus:
        os.sched_setaffinity(0, other_cpus)
    cfg = ClusterConfig(workers=workers, policy=policy, engine="sim", transport="ipc",
                        engine_time_scale=time_scale, http_port=0)
    lc = LocalCluster(cfg)
    lc.start()
    for name, proc in lc.procs.items():  # the pinning is inherited by every thread started later
        cpus = broker_cpus if name == "broker" else other_cpus
        if cpus:
            os.sched_setaffinity(proc.pid, cpus)
    rng = random.Random(seed)
    lengths = [(r.input_tokens, r.output_tokens) for r in load_trace("azure_conv")]
    work = [lengths[rng.randrange(len(lengths))] for _ in range(requests)]
    ttft: list[float] = []
    kinds: Counter[str] = Counter()
    errors: Counter[str] = Counter()
    counts = {"tokens": 0, "prompt": 0, "done": 0, "short": 0}
    try:
        await lc.wait_ready()
        async with DynaServeClient(lc.client_addr) as client:
            queue = list(reversed(work))
            t0 = time.monotonic()
            deadline = t0 + max_seconds
            cpu0 = cpu_seconds(lc.procs["broker"].pid)
            wait0 = main_thread_wait_seconds(lc.procs["broker"].pid)

            async def one_worker() -> None:
                while queue and time.monotonic() < deadline:
                    p, o = queue.pop()
                    prompt = [rng.randrange(3, 32000) for _ in range(p)]
                    try:
                        async with client.generate(prompt, max_tokens=o, ignore_eos=True) as stream:
                            toks = await stream.collect()
                    except DynaServeError as exc:
                        errors[exc.code] += 1
                        continue
                    counts["tokens"] += len(toks)
                    counts["short"] += len(toks) != o  # ignore_eos: exactly max_tokens are due
                    counts["prompt"] += p
                    counts["done"] += 1
                    if stream.token_ts:
                        ttft.append((stream.token_ts[0] - stream.submit_ts) * 1000.0)
                    if stream.admitted is not None:
                        kinds[stream.admitted.kind] += 1
                    bar.set_postfix_str(f"cluster: {counts['done']} done, {counts['tokens']} tokens",
                                        refresh=False)

            async def progress() -> None:
                last = time.monotonic()
                while True:
                    await asyncio.sleep(0.25)
                    now = time.monotonic()
                    advance(bar, now - last)
                    last = now

            ticker = asyncio.create_task(progress())
            try:
                await asyncio.gather(*(one_worker() for _ in range(concurrency)))
            finally:
                ticker.cancel()
            t1 = time.monotonic()
            cpu1 = cpu_seconds(lc.procs["broker"].pid)
            wait1 = main_thread_wait_seconds(lc.procs["broker"].pid)
    finally:
        lc.stop()
        if lc.run_dir is not None:
            shutil.rmtree(lc.run_dir, ignore_errors=True)
    return ClusterResult(workers, counts["done"], t1 - t0, counts["tokens"], counts["prompt"], cpu1 - cpu0,
                         wait1 - wait0, counts["short"], ttft, kinds, errors, time_scale)


# ------------------------------------------------------------------------------------------ report


def _kinds(c: Counter[str]) -> str:
    total = sum(c.values())
    return ", ".join(f"{k} {100.0 * v / total:.0f}%" for k, v in sorted(c.items())) if total else "-"


def firehose_table(rows: list[PhaseResult]) -> str:
    out = [
        "| phase | firehose workers | in flight | prompt tokens (mean) | admitted req/s | completed req/s | "
        "tokens/s | broker CPU | broker main thread waiting for CPU | load-gen CPU | "
        "completed req per broker-CPU-s | "
        "tokens per broker-CPU-s | plan kinds |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in rows:
        cpu = r.broker_cpu_s or float("nan")
        out.append(
            f"| {r.name} | {r.workers} | {r.window} | {r.mean_prompt:.0f} | {r.admitted / r.seconds:,.0f} | "
            f"{r.completed / r.seconds:,.0f} | {r.tokens / r.seconds:,.0f} | {100.0 * r.cpu_util:.0f}% | "
            f"{100.0 * r.broker_wait_s / r.seconds:.0f}% | {100.0 * r.loadgen_cpu_s / r.seconds:.0f}% | "
            f"{r.completed / cpu:,.0f} | {r.tokens / cpu:,.0f} | {_kinds(r.kinds)} |"
        )
    return "\n".join(out)


def cluster_table(r: ClusterResult) -> str:
    tt = sorted(r.ttft_ms)

    def pct(q: float) -> str:
        return f"{tt[min(len(tt) - 1, int(q * len(tt)))]:.1f}" if tt else "-"

    cpu = r.broker_cpu_s or float("nan")
    return "\n".join([
        "| sim workers | engine time scale | requests | wall s | completed req/s | output tokens/s | "
        "prompt tokens/s | broker CPU | broker main thread waiting for CPU | TTFT p50 ms | TTFT p99 ms | "
        "tokens per broker-CPU-s | plan kinds |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|",
        f"| {r.workers} | {r.time_scale:g} | {r.requests} | {r.seconds:.1f} | {r.requests / r.seconds:,.1f} | "
        f"{r.tokens / r.seconds:,.0f} | {r.prompt_tokens / r.seconds:,.0f} | "
        f"{100.0 * r.broker_cpu_s / r.seconds:.0f}% | {100.0 * r.broker_wait_s / r.seconds:.0f}% | "
        f"{pct(0.5)} | {pct(0.99)} | {r.tokens / cpu:,.0f} | "
        f"{_kinds(r.kinds)} |",
    ])


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--seconds", type=float, default=6.0, help="measured seconds per firehose phase")
    ap.add_argument("--warmup", type=float, default=1.5, help="unmeasured seconds before each firehose phase")
    ap.add_argument("--workers", type=int, default=4, help="firehose worker processes")
    ap.add_argument("--policy", default="dynaserve")
    ap.add_argument("--dispatch-window", type=int, default=256, help="dispatch: requests kept in flight")
    ap.add_argument("--dispatch-max-tokens", type=int, default=4, help="dispatch: max_tokens per request")
    ap.add_argument("--relay-concurrency", default="1024,256",
                    help="relay: requests kept in flight, one relay row per comma-separated value")
    ap.add_argument("--relay-max-tokens", type=int, default=2000, help="relay: tokens per request")
    ap.add_argument("--relay-window-tokens", type=int, default=65536,
                    help="relay: tokens emitted but not yet received by the client, at most")
    ap.add_argument("--cluster-workers", type=int, default=2)
    ap.add_argument("--cluster-requests", type=int, default=1200)
    ap.add_argument("--cluster-concurrency", type=int, default=32)
    ap.add_argument("--cluster-time-scale", type=float, default=0.001,
                    help="simulated engine: real seconds per modeled second")
    ap.add_argument("--cluster-max-seconds", type=float, default=40.0)
    ap.add_argument("--phases", default="dispatch,relay,cluster",
                    help="comma-separated subset of: dispatch, relay, cluster")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--profile-dir", type=Path, default=None,
                    help="sample the broker with py-spy during each measured firehose window (slows it a bit)")
    args = ap.parse_args(argv)

    rng = random.Random(args.seed)
    lengths = [r.input_tokens for r in load_trace("azure_conv")]
    short = [[rng.randrange(3, VOCAB) for _ in range(32)] for _ in range(16)]
    trace = [[rng.randrange(3, VOCAB) for _ in range(lengths[rng.randrange(len(lengths))])] for _ in range(64)]
    relay_prompts = [[rng.randrange(3, VOCAB) for _ in range(16)] for _ in range(16)]
    phases = {x.strip() for x in args.phases.split(",") if x.strip()}
    unknown = phases - {"dispatch", "relay", "cluster"}
    if unknown:
        ap.error(f"unknown phases {sorted(unknown)}")
    relay_concurrency = [int(x) for x in args.relay_concurrency.split(",") if x.strip()]
    phase_s = args.warmup + args.seconds + 3.0
    total = phase_s * (2 * ("dispatch" in phases) + len(relay_concurrency) * ("relay" in phases))
    total += args.cluster_max_seconds if "cluster" in phases else 0.0
    broker_cpus, other_cpus = cpu_layout()

    rows: list[PhaseResult] = []
    cluster: ClusterResult | None = None
    fmt = "{l_bar}{bar}| {n:.0f}/{total:.0f} s{postfix}"
    with tqdm(total=round(total), unit="s", desc="broker bench", bar_format=fmt) as bar:
        common: dict[str, Any] = dict(workers=args.workers, seconds=args.seconds, warmup=args.warmup,
                                      policy=args.policy, relay_window_tokens=args.relay_window_tokens, bar=bar,
                                      profile_dir=args.profile_dir)
        if "dispatch" in phases:
            rows.append(run_firehose_phase("(a) dispatch, 32-token prompts", "dispatch", prompts=short,
                                           window=args.dispatch_window, max_tokens=args.dispatch_max_tokens,
                                           **common))
            rows.append(run_firehose_phase("(a) dispatch, azure_conv prompts", "dispatch", prompts=trace,
                                           window=args.dispatch_window, max_tokens=args.dispatch_max_tokens,
                                           **common))
        if "relay" in phases:
            for conc in relay_concurrency:
                rows.append(run_firehose_phase(f"(b) relay, {conc // args.workers} entries per TokenBatch", "relay",
                                               window=conc, prompts=relay_prompts, max_tokens=args.relay_max_tokens,
                                               **common))
        if "cluster" in phases:
            cluster = asyncio.run(run_cluster_phase(
                workers=args.cluster_workers, requests=args.cluster_requests, concurrency=args.cluster_concurrency,
                time_scale=args.cluster_time_scale, policy=args.policy, max_seconds=args.cluster_max_seconds,
                seed=args.seed, bar=bar,
            ))
        advance(bar, bar.total - bar.n)

    print()
    print(f"Broker throughput, policy {args.policy}, Python {platform.python_version()}, "
          f"{os.cpu_count()} CPUs; broker on CPU {list(broker_cpus) or 'any'}, "
          f"clients and workers on CPU {list(other_cpus) or 'any'}; {args.seconds:g} s measured per phase")
    if rows:
        print()
        print(firehose_table(rows))
        print()
    for r in rows:
        s = r.broker_stats
        print(f"- {r.name}: client errors in the measured window: {dict(r.errors) or 'none'}; broker totals "
              f"admitted={s.get('admitted')} finished={s.get('finished')} rejected={s.get('rejected')} "
              f"failed={s.get('failed')} bad_frames={s.get('bad_frames')} tokens_relayed={s.get('tokens_relayed')}")
        for line in r.broker_warnings[:5]:
            print(f"  - broker log: {line}")
        if len(r.broker_warnings) > 5:
            print(f"  - broker log: ... {len(r.broker_warnings) - 5} more warnings")
    for relay in rows:
        if relay.name.startswith("(b)"):
            rate = relay.tokens / relay.seconds
            per_cpu = relay.tokens / relay.broker_cpu_s if relay.broker_cpu_s else float("nan")
            verdict = "meets" if rate >= 200_000 else "misses"
            cpu_verdict = "meets" if per_cpu >= 200_000 else "misses"
            print(f"\n{relay.name}: {rate:,.0f} tokens/s wall clock ({verdict} the 200,000 tokens/s target), "
                  f"{per_cpu:,.0f} tokens per broker-CPU-second ({cpu_verdict} it)")
    if args.profile_dir is not None:
        for path in sorted(args.profile_dir.glob("*.txt")):
            print()
            print(summarize_profile(path))
    if cluster is not None:
        print()
        print(f"(c) LocalCluster, simulated engines, azure_conv lengths, {args.cluster_concurrency} requests in "
              f"flight, client SDK")
        print()
        print(cluster_table(cluster))
        print(f"\nclient errors: {dict(cluster.errors) or 'none'}; completed requests with a token count other "
              f"than max_tokens: {cluster.short_streams}")


if __name__ == "__main__":
    main()

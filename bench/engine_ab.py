"""What DynaServe's parts inside vLLM cost a decode step: bare vLLM against the same engine with DynaServe's KV
connector (and its NIXL agent), with the local scheduler's ``scheduler_cls``, and with both.

Each variant is its own process (bench.bench_vllm's ``_bare_main``, built and stepped in one worker thread,
as VllmEngine runs), all bound to ``--engine-core`` and alternating round by round, so the machine's drift
falls on all alike. No worker, broker or client: only what the connector and the scheduler subclass add to
vLLM's own step. Each round decodes N requests (128-token prompts) for ``--tokens`` tokens; a variant's
figure is the median over its rounds of the per-round median decode step (steps that decode all N).

With ``--engine-class`` two more variants run DynaServe's ``VllmEngine`` itself, as a worker runs it (its engine
thread stepping in bursts and shipping every step: tokens encoded for the wire, a load report every 20 ms), one
without and one with the ZeroMQ send of each step's tokens to a socket this process drains: what the engine
class adds on top of the parts inside vLLM. A third, ``worker``, is a real worker process (``python -m workers``,
its engine on the engine core and its loop on the others) that a stand-in broker in this process feeds the same
requests and drains (its decode steps from the worker's step log): the whole worker, without the broker's and
the client's work. A fourth, ``cluster``, is the same worker behind a real broker (``LocalCluster``, colocate
policy, the broker on the other cores) with this process as the client (the SDK): what the overhead phase of
bench.bench_vllm runs, in the same alternating rounds. ``bare_main`` is bare vLLM built and stepped in its
process's main thread. For ``cluster`` the benchmark also prints the TBT p50 each client saw (the SDK's receive
times; the bare loops' own stamps) against ``bare`` and ``bare_main``: the median of the per-round ratios with a
95 % bootstrap interval.

Two processes of the same engine step a few percent apart for their whole life, which more rounds do not average
out: ``--sessions K`` runs the whole comparison K times, each with new processes for every variant, and adds the
median of the per-session ratios with an interval over the sessions.

Usage: python -m bench.engine_ab [--rounds 8] [--sessions 1] [--n 32] [--tokens 150] [--engine-core 0]
       [--engine-class] [--only engine,engine+zmq,worker,cluster,bare_main,...]
"""

from __future__ import annotations

import argparse
import math
import multiprocessing as mp
import os
import statistics
import tempfile
from typing import Any

from tqdm import tqdm

VARIANTS = {"bare": "", "conn": "conn", "sched": "sched", "conn+sched": "conn+sched"}
# with --engine-class: DynaServe's VllmEngine itself (its engine thread stepping in bursts and shipping each step,
# as in a worker), without and with the ZeroMQ send of each step's tokens; no worker loop, broker or client
ENGINE_VARIANTS = {"engine": False, "engine+zmq": True}
SIDE_PORT = 6690  # NIXL handshake ports (base + 10 i) of the variants with the connector
REPORT_S = 0.02  # the worker's heartbeat: a load report (engine.load()) this often, as its engine thread sends
Session = tuple[dict[str, list[float]], dict[str, list[float]]]  # per-round decode steps and TBT p50, per variant


def _whole_request(rid: str, prompt: list[int], max_tokens: int, now: float) -> Any:
    """An unsplit micro-request (what a broker dispatches for a request it does not split)."""
    from dynaserve import protocol as P

    end = len(prompt) + max_tokens
    return P.MicroDescriptor(rid, P.ROLE_FULL, prompt, end, 0, end, max_tokens, None,
                             P.SamplingParams(max_tokens=max_tokens, ignore_eos=True), 60000.0, 10000.0, now)


def _engine_main(conn: Any, model: str, log_path: str, cores: str, side_port: int, sink: str) -> None:
    """A VllmEngine (the worker's engine class) in this process, its engine thread bound to ``cores``: each
    round adds the prompts as whole (unsplit) micro-requests and runs them to the end, the engine thread
    shipping every step as in a worker: the step's token entries encoded for the wire, a load report every
    ``REPORT_S``, and, with ``sink`` (a ZeroMQ address), the encoded tokens sent there. Protocol on ``conn``
    as bench.bench_vllm's ``_bare_main``; the step times are the engine's own (``StepOutput.step_ms``) of the
    steps that decode every request and prefill nothing."""
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    import asyncio
    import time

    import zmq

    from bench.bench_vllm import serve_runs
    from dynaserve import protocol as P
    from workers.engine import StepOutput
    from workers.engines import make_vllm_engine
    from workers.engines.vllm_config import VllmEngineConfig
    from workers.local_scheduler import LocalSchedulerConfig

    eng = make_vllm_engine(VllmEngineConfig(model=model, cpu_bind=cores, side_channel_port=side_port),
                           LocalSchedulerConfig())
    ctx = zmq.Context()
    push = ctx.socket(zmq.PUSH) if sink else None
    if push is not None:
        push.connect(sink)
    state: dict[str, Any] = {"n": 0, "steps": [], "report": 0.0}

    def ship(out: StepOutput) -> None:
        if out.step_ms > 0 and out.decode_seqs == state["n"] and out.prefill_tokens == 0:
            state["steps"].append(out.step_ms)
        frame = P.encode_token_entries(P.TokenBatch.TYPE, out.entries) if out.entries else b""
        if push is not None and frame:
            push.send(frame)  # only the engine thread ships
        if time.monotonic() >= state["report"] + REPORT_S:
            state["report"] = time.monotonic()
            eng.load()

    eng.set_shipper(ship)

    async def run(prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list, list[float]]:
        state["n"], state["steps"] = len(prompts), []
        now = time.monotonic()
        for i, p in enumerate(prompts):
            eng.add(_whole_request(f"{tag}-{i}", p, max_tokens, now), now)
        while eng.has_work():
            await eng.step(time.monotonic())
        return [], list(state["steps"])

    async def serve() -> None:
        await run([[3] * 16], 2, "warmup")
        conn.send(("ready", eng.info.kv_capacity_tokens))
        await serve_runs(conn, run)

    try:
        asyncio.run(serve())
    finally:
        eng.close()
        if push is not None:
            push.close(0)
        ctx.term()


def _busy(ms: float) -> None:
    """``ms`` of Python work that allocates and touches small objects (dictionary updates)."""
    import time

    end = time.perf_counter() + ms / 1000.0
    d: dict[int, list] = {}
    i = 0
    while time.perf_counter() < end:
        d[i % 997] = [i, str(i)]
        i += 1


class _StandInBroker:
    """The broker's part for one real worker process (``python -m workers``), reduced to the protocol: it
    accepts the worker's registration, dispatches each round's prompts as whole micro-requests, and takes the
    worker's messages until every request has finished. No client, no policy, no forwarding."""

    def __init__(self, cpu_ms: float = 0.0) -> None:
        import zmq

        self.cpu_ms = cpu_ms  # Python work per TokenBatch, as a broker and a client do per step (0: none)
        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.bind("tcp://127.0.0.1:*")
        self.addr = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._ident = b""

    def _messages(self, timeout_s: float) -> list[Any]:
        from dynaserve import protocol as P

        if not self._sock.poll(int(timeout_s * 1000)):
            raise RuntimeError(f"the worker sent nothing for {timeout_s} s")
        frames = self._sock.recv_multipart()
        self._ident = frames[0]
        return [P.decode(f, P.WORKER_TO_BROKER) for f in frames[1:]]

    def wait_registered(self, timeout_s: float) -> None:
        import time

        from dynaserve import protocol as P

        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            for msg in self._messages(timeout_s):
                if isinstance(msg, P.RegisterWorker):
                    self._sock.send_multipart([self._ident, P.encode(P.RegisterAck(msg.instance_id, True, "", 20))])
                    return
        raise RuntimeError("the worker did not register")

    def run(self, prompts: list[list[int]], max_tokens: int, tag: str) -> None:
        import time

        from dynaserve import protocol as P

        now = time.monotonic()
        left = set()
        for i, p in enumerate(prompts):
            rid = f"{tag}-{i}"
            left.add(rid)
            desc = _whole_request(rid, p, max_tokens, now)
            self._sock.send_multipart([self._ident, P.encode(P.DispatchMicro(desc))])
        while left:
            for msg in self._messages(120.0):
                if isinstance(msg, P.TokenBatch):
                    left.difference_update(e[0] for e in msg.entries if e[2] is not None)
                    if self.cpu_ms > 0:
                        _busy(self.cpu_ms)
                elif isinstance(msg, P.MicroFailed):
                    raise RuntimeError(f"{msg.req_id} failed: {msg.code} {msg.message}")

    def close(self) -> None:
        self._sock.close(0)
        self._ctx.term()


class _WorkerVariant:
    """The ``worker`` variant: a real worker process on the engine core (its loop and socket threads on the
    other cores), driven by a stand-in broker in this process; its decode steps come from its step log."""

    def __init__(self, model: str, core: int, others: str, side_port: int, log_dir: str, cpu_ms: float = 0.0) -> None:
        import subprocess
        import sys

        self.broker = _StandInBroker(cpu_ms)
        self.step_log = f"{log_dir}/worker.steps"
        self._log = open(f"{log_dir}/worker.log", "ab")  # noqa: SIM115 - open while the worker runs
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "workers", "--broker-addr", self.broker.addr, "--instance-id", "w0",
             "--engine", "vllm", "--vllm-model", model, "--vllm-side-channel-port", str(side_port),
             "--vllm-cpu-bind", str(core), *(["--vllm-loop-bind", others] if others else []),
             "--step-log", self.step_log],
            stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            self.broker.wait_registered(300.0)
        except BaseException:
            self.close()
            raise

    def run(self, prompts: list[list[int]], max_tokens: int, tag: str) -> list[float]:
        import time

        from bench.bench_vllm import decode_steps

        t0 = time.monotonic()
        self.broker.run(prompts, max_tokens, tag)  # the worker flushes its step log before a request's last tokens
        return decode_steps(self.step_log, t0, time.monotonic(), len(prompts))

    def close(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(20)
        except Exception:  # noqa: BLE001 - a worker that does not stop is killed
            self.proc.kill()
        self.broker.close()
        self._log.close()


class _ClusterVariant:
    """The ``cluster`` variant: a one-worker ``LocalCluster`` (the worker as in ``worker``, a real broker on the
    other cores) that this process drives through the client SDK; its decode steps from the worker's step log."""

    def __init__(self, model: str, core: int, others: str, side_port: int, log_dir: str, step_log: bool = True) -> None:
        import asyncio

        from bench.bench_vllm import bind_process, make_cluster
        from workers.engines.vllm_config import parse_cpu_list

        self.step_log = f"{log_dir}/w0.steps" if step_log else ""  # off: as deployed, no decode-step times
        self.cluster = make_cluster(False, engine="vllm", workers=1, policy="colocate",
                                    model_dir=model, side_channel_base_port=side_port, ready_timeout_s=300.0,
                                    step_log_dir=log_dir if step_log else "",
                                    worker_args=["--vllm-cpu-bind", str(core),
                                                 *(["--vllm-loop-bind", others] if others else [])])
        try:
            self.cluster.start()
            asyncio.run(self.cluster.wait_ready(300.0))
            if others:
                bind_process(self.cluster.procs["broker"].pid, parse_cpu_list(others))
        except BaseException:
            self.cluster.stop()
            raise

    def run(self, prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list, list[float]]:
        """Each request's (submit time, token receive times) at the client, and the decode steps."""
        import asyncio
        import time

        from bench.bench_vllm import decode_steps, stream_all

        t0 = time.monotonic()
        out = asyncio.run(stream_all(self.cluster.client_addr, prompts, max_tokens))
        if not self.step_log:
            return out, []
        return out, decode_steps(self.step_log, t0, time.monotonic(), len(prompts))

    def close(self) -> None:
        self.cluster.stop()


class _Drain:
    """A PULL socket on loopback that a thread empties: where ``engine+zmq`` sends each step's tokens (the
    broker's part, reduced to receiving)."""

    def __init__(self) -> None:
        import threading

        import zmq

        self._ctx = zmq.Context()
        self._sock = self._ctx.socket(zmq.PULL)
        self._sock.bind("tcp://127.0.0.1:*")
        self.addr = self._sock.getsockopt_string(zmq.LAST_ENDPOINT)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            if self._sock.poll(100):
                self._sock.recv()

    def close(self) -> None:
        self._stop.set()
        self._thread.join(2)
        self._sock.close(0)
        self._ctx.term()


def _session(args: argparse.Namespace, names: list[str], model: str, prompts: list[list[int]], log_dir: str,
             session: int, bar: Any) -> Session:
    """Start every variant's process (fresh ones), run the alternating rounds and stop them: each variant's
    per-round decode step p50 (ms) and, for ``bare``, ``bare_main`` and ``cluster``, per-round TBT p50 (ms)."""
    from bench.bench_vllm import _bare_main, records
    from dynaserve.metrics import summarize

    ctx = mp.get_context("spawn")
    os.makedirs(log_dir, exist_ok=True)
    procs: dict[str, tuple[Any, Any]] = {}
    steps: dict[str, list[float]] = {v: [] for v in names}
    tbt: dict[str, list[float]] = {v: [] for v in ("bare", "bare_main", "cluster") if v in names}
    drain = _Drain() if args.engine_class else None
    worker: _WorkerVariant | None = None
    cluster: _ClusterVariant | None = None
    cores = os.sched_getaffinity(0)
    others = cores - {args.engine_core}
    port = SIDE_PORT + 100 * session
    tag = f"s{session + 1}/{args.sessions} " if args.sessions > 1 else ""
    try:
        for i, name in enumerate(names):
            bar.set_postfix_str(f"{tag}starting {name}")
            if name == "worker":
                worker = _WorkerVariant(model, args.engine_core, ",".join(map(str, sorted(others))), port + 10 * i,
                                        log_dir, args.stand_in_cpu_ms)
                worker.run(prompts, 32, "warm")
                bar.update(1)
                continue
            if name == "cluster":
                cluster = _ClusterVariant(model, args.engine_core, ",".join(map(str, sorted(others))), port + 10 * i,
                                          log_dir, not args.no_step_log)
                cluster.run(prompts, 32, "warm")
                bar.update(1)
                continue
            conn, child = ctx.Pipe()
            if name in ENGINE_VARIANTS:
                assert drain is not None
                proc = ctx.Process(target=_engine_main, daemon=True, args=(
                    child, model, f"{log_dir}/{name}.log", str(args.engine_core), port + 10 * i,
                    drain.addr if ENGINE_VARIANTS[name] else ""))
            else:
                proc = ctx.Process(target=_bare_main, daemon=True, args=(
                    child, model, "main" if name == "bare_main" else "engine_thread", f"{log_dir}/{name}.log",
                    str(args.engine_core), VARIANTS.get(name, ""), port + 10 * i))
            proc.start()
            child.close()
            procs[name] = (proc, conn)
            if not conn.poll(300):
                raise RuntimeError(f"{name} did not start (log: {log_dir}/{name}.log)")
            conn.recv()
            conn.send(("run", prompts, 32))  # warm-up
            conn.recv()
            bar.update(1)
        if args.engine_class and others:  # after the starts (children inherit it): the stand-in broker, the
            os.sched_setaffinity(0, others)  # drain and the client stay off the engine core
        for rnd in range(args.rounds):
            k = rnd % len(names)
            for name in names[k:] + names[:k]:
                bar.set_postfix_str(f"{tag}round {rnd + 1}/{args.rounds}, {name}")
                if name == "worker":
                    assert worker is not None
                    step_ms = worker.run(prompts, args.tokens, f"r{rnd}")
                elif name == "cluster":
                    assert cluster is not None
                    out, step_ms = cluster.run(prompts, args.tokens, f"r{rnd}")
                else:
                    conn = procs[name][1]
                    conn.send(("run", prompts, args.tokens))
                    out, step_ms = conn.recv()
                steps[name].append(statistics.median(step_ms) if step_ms else math.nan)
                if name in tbt:
                    tbt[name].append(summarize(records(out, 128, args.tokens, f"{name}{rnd}")).tbt_p50_ms)
                bar.update(1)
    finally:
        os.sched_setaffinity(0, cores)  # the next session's processes may use the engine core again
        for proc, conn in procs.values():
            try:
                conn.send(("stop",))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        if drain is not None:
            drain.close()
        if worker is not None:
            worker.close()
        if cluster is not None:
            cluster.close()
    return steps, tbt


def _ratios(xs: list[float], base: list[float]) -> list[float]:
    return [x / b for x, b in zip(xs, base, strict=True)]


def tables(names: list[str], sessions: list[Session], rounds: int) -> str:
    """The decode-step table of every variant against ``bare`` and, with ``cluster``, the client TBT table
    (markdown). Ratios are per round (a variant's round against ``bare``'s same round), summarized per
    session (median) and over all rounds and sessions."""
    from bench.bench_vllm import median_ci

    lines: list[str] = []
    steps = {n: [x for st, _ in sessions for x in st[n]] for n in names}
    unlogged = {n for n in names if any(math.isnan(x) for x in steps[n])}  # cluster with --no-step-log
    lines.append(f"| variant | decode step p50 ms (median over {len(sessions)} x {rounds} rounds) | / bare (median "
                 "of per-round ratios) | per session | per round |\n|---|---|---|---|---|")
    for name in names:
        if name in unlogged:
            lines.append(f"| {name} | - (no step log) | - | - | - |")
            continue
        per = _ratios(steps[name], steps["bare"])
        sess = [statistics.median(_ratios(st[name], st["bare"])) for st, _ in sessions]
        lines.append(f"| {name} | {statistics.median(steps[name]):.3f} | {statistics.median(per):.3f} | "
                     f"{', '.join(f'{x:.3f}' for x in sess)} | {', '.join(f'{x:.2f}' for x in per)} |")
    if "cluster" in names:
        lines.append("\nTBT p50 at the client (bare: its own loop's stamps; cluster: the SDK's receive times), "
                     "cluster / baseline: the median of the per-round ratios with a 95 % bootstrap interval over "
                     "the rounds, and (with --sessions > 1) the median of the per-session medians with one over "
                     "the sessions\n\n| baseline | TBT p50 ms, baseline / cluster (medians over rounds) | "
                     "cluster / baseline, rounds | over sessions | per session | per round |\n|---|---|---|---|---|---|")
        for b in [n for n in ("bare", "bare_main") if n in names]:
            per = [x for _, tb in sessions for x in _ratios(tb["cluster"], tb[b])]
            sess = [statistics.median(_ratios(tb["cluster"], tb[b])) for _, tb in sessions]
            mid, lo, hi = median_ci(per)
            smid, slo, shi = median_ci(sess)
            over = f"{smid:.3f} ({slo:.3f}-{shi:.3f})" if len(sess) > 1 else "-"
            pooled = {n: [x for _, tb in sessions for x in tb[n]] for n in (b, "cluster")}
            lines.append(f"| {b} | {statistics.median(pooled[b]):.3f} / {statistics.median(pooled['cluster']):.3f} | "
                         f"{mid:.3f} ({lo:.3f}-{hi:.3f}) | {over} | {', '.join(f'{x:.3f}' for x in sess)} | "
                         f"{', '.join(f'{x:.2f}' for x in per)} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds per session (each runs every variant)")
    ap.add_argument("--sessions", type=int, default=1,
                    help="sessions, each with fresh processes for every variant: two processes of the same engine "
                         "differ in speed by a few percent, which more rounds do not average out")
    ap.add_argument("--n", type=int, default=32, help="requests decoding together (128-token prompts)")
    ap.add_argument("--tokens", type=int, default=150, help="output tokens per request and run")
    ap.add_argument("--engine-core", type=int, default=0, help="the core every variant computes on")
    ap.add_argument("--only", default="", help="comma-separated variants to run (bare always runs), e.g. worker")
    ap.add_argument("--stand-in-cpu-ms", type=float, default=0.0,
                    help="worker variant: ms of Python work the stand-in broker does per TokenBatch on the other "
                         "cores, a neighbour load tied to the steps as a broker's and a client's is")
    ap.add_argument("--no-step-log", action="store_true",
                    help="cluster variant: the worker without its step log, as deployed (no decode-step times)")
    ap.add_argument("--engine-class", action="store_true",
                    help="also run DynaServe's VllmEngine itself (without and with the ZeroMQ send of each step), "
                         "a real worker process, a one-worker cluster and bare vLLM on its main thread")
    args = ap.parse_args(argv)
    if (args.rounds < 1 or args.sessions < 1 or args.n < 1 or args.tokens < 8
            or args.engine_core not in os.sched_getaffinity(0)):
        ap.error("need --rounds >= 1, --sessions >= 1, --n >= 1, --tokens >= 8 and an engine core this process "
                 "may use")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vcache")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from dynaserve.tinymodel import DEFAULT_OUT, build

    model = str(build(DEFAULT_OUT))
    log_dir = tempfile.mkdtemp(prefix="bench-engine-ab-")
    prompts = [[3 + (i * 31 + j * 7) % 4000 for j in range(128)] for i in range(args.n)]
    names = list(VARIANTS) + ([*ENGINE_VARIANTS, "worker", "cluster", "bare_main"] if args.engine_class else [])
    if args.only:
        only = set(args.only.split(","))
        if only - set(names):
            ap.error(f"unknown variants {sorted(only - set(names))} (known: {names})")
        names = ["bare", *[n for n in names if n in only and n != "bare"]]
    sessions: list[Session] = []
    with tqdm(total=args.sessions * len(names) * (args.rounds + 1), desc="engine_ab", unit="run") as bar:
        for sn in range(args.sessions):
            sessions.append(_session(args, names, model, prompts, f"{log_dir}/s{sn}", sn, bar))
    print(tables(names, sessions, args.rounds))
    print(f"\nN = {args.n}, {args.tokens} tokens per run, every variant on core {args.engine_core}; load average "
          f"{os.getloadavg()[0]:.1f}; vLLM logs: {log_dir}")


if __name__ == "__main__":
    main()

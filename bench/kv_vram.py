"""NIXL READ of KV blocks laid out as vLLM's NIXL connector lays them out, between two processes.

This is the transfer a vLLM worker's B performs at a handoff, without vLLM: A owns per-layer KV
caches of shape ``(2, blocks, block_size, kv_heads, head_dim)``, registers them with NIXL (UCX backend,
progress thread off, UCX error handling mode ``none``, as the workers run it) and drains notifications
every millisecond; B holds the same caches and READs the first ``n`` tokens' blocks of every layer.
vLLM's descriptor layout: one region per layer and K/V half, one descriptor per block and region,
region-major, prepared once per peer and turned into a transfer per request with a notification.

Per token count, in rotating order within each repetition, B times:

- ``copy``: a plain copy of the same number of bytes inside B (``torch`` ``copy_``), the ceiling of
  any transfer on that memory (on a GPU: device-to-device);
- ``raw``: a NIXL READ of the same bytes as one descriptor, prepared once and re-posted, no notification;
- ``handoff``: the vLLM-shaped READ (``make_prepped_xfer`` + ``transfer``, with notification), to DONE;
  ``post`` is the time until ``transfer`` returned, which is all the READ costs B's loop when the
  copy runs asynchronously (GPU), and the whole copy when it runs inside the post (cma on CPU).

Every path is verified byte for byte once per token count. On a GPU the run also times a loop of
bf16 matrix products on B alone and with the longest READ in flight (what a transfer costs the
engine's step on the same GPU).

Each ``--ucx`` configuration runs in a fresh pair of processes (UCX reads its settings at start):
``dynaserve`` is what the workers set on this host when nothing is set (``dynaserve/env.py``),
``loopback`` is the host-memory set (``tcp,sm,self`` on ``lo``), ``cuda`` adds UCX's CUDA transports,
``cuda-get`` also turns on cuda_ipc's get, ``all`` leaves ``UCX_TLS`` unset.

Usage: python -m bench.kv_vram [--device cpu|cuda] [--preset tiny|llama3-8b] [--tokens 128,1000,2000,4000]
                               [--ucx dynaserve,loopback,cuda,cuda-get,...] [--reps 10] [--out FILE.json]
"""

from __future__ import annotations

import argparse
import json
import math
import multiprocessing as mp
import os
import platform
import statistics
import time
import traceback
from dataclasses import asdict, dataclass
from multiprocessing.connection import Connection
from typing import Any

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")

BLOCK_SIZE = 16
READ_TIMEOUT_S = 20.0
WARMUP = 2


@dataclass(frozen=True)
class Shape:
    """KV cache geometry of one model instance (one tensor-parallel rank)."""

    layers: int
    kv_heads: int
    head_dim: int
    elem_bytes: int = 2

    @property
    def block_bytes(self) -> int:
        """Bytes of one block in one region (one layer's K or V half)."""
        return BLOCK_SIZE * self.kv_heads * self.head_dim * self.elem_bytes

    @property
    def bytes_per_token(self) -> int:
        return 2 * self.layers * self.kv_heads * self.head_dim * self.elem_bytes


PRESETS: dict[str, Shape] = {
    "tiny": Shape(layers=4, kv_heads=4, head_dim=32),  # the project's tiny model (bf16-sized elements)
    "llama3-8b": Shape(layers=32, kv_heads=8, head_dim=128),  # Llama-3-8B, bf16, one GPU
}

UCX_CONFIGS: dict[str, dict[str, str | None]] = {
    "dynaserve": {},  # what the workers set on this host when nothing is set (dynaserve.env.loopback_kv_env)
    "loopback": {"UCX_TLS": "tcp,sm,self", "UCX_NET_DEVICES": "lo"},
    "cuda": {"UCX_TLS": "cuda_ipc,cuda_copy,tcp,sm,self", "UCX_NET_DEVICES": "lo"},
    "all": {"UCX_TLS": None, "UCX_NET_DEVICES": "lo"},
    "cuda-any-net": {"UCX_TLS": "cuda_ipc,cuda_copy,tcp,sm,self", "UCX_NET_DEVICES": None},
    "cuda-no-tcp": {"UCX_TLS": "cuda_ipc,cuda_copy,sm,self", "UCX_NET_DEVICES": "lo"},
    # UCX turns cuda_ipc's get (NIXL's READ) off on GPUs without NVLink peers ("auto"), and a READ
    # then falls back to software emulation through host memory; this turns it on.
    "cuda-get": {
        "UCX_TLS": "cuda_ipc,cuda_copy,tcp,sm,self",
        "UCX_NET_DEVICES": "lo",
        "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
    },
}


def _apply_env(env: dict[str, str | None]) -> None:
    for key, val in env.items():
        if val is None:
            os.environ.pop(key, None)
        else:
            os.environ[key] = val


def _agent(name: str) -> Any:
    """A NIXL agent as the workers create it (progress thread off, UCX error handling mode none)."""
    from workers.kv.nixl import _import_nixl

    api = _import_nixl()
    agent = api.nixl_agent(name, api.nixl_agent_config(enable_prog_thread=False, backends=[]))
    agent.create_backend("UCX", {"ucx_error_handling_mode": "none"})
    return agent


def _fill(t: Any, seed: int) -> None:
    """Deterministic content, reproducible on the other side for verification."""
    import torch

    g = torch.Generator(device=t.device)
    g.manual_seed(seed)
    t.copy_(torch.randint(-32768, 32767, t.shape, generator=g, device=t.device, dtype=torch.int16))


class _Side:
    """One process's caches: ``layers`` tensors plus two flat buffers for the raw READ and the copy."""

    def __init__(self, device: str, shape: Shape, num_blocks: int, flat_bytes: int, owner: bool) -> None:
        import torch

        self.device = device
        self.shape = shape
        self.num_blocks = num_blocks
        dims = (2, num_blocks, BLOCK_SIZE, shape.kv_heads, shape.head_dim)
        self.caches = [torch.zeros(dims, dtype=torch.int16, device=device) for _ in range(shape.layers)]
        self.flat = torch.zeros(flat_bytes // 2, dtype=torch.int16, device=device)
        self.flat2 = torch.zeros_like(self.flat)  # B's copy source
        if owner:
            for i, cache in enumerate(self.caches):
                _fill(cache, i)
            _fill(self.flat, 10_000)
        self.dev_id = (torch.device(device).index or 0) if device != "cpu" else 0
        self.mem = "VRAM" if device != "cpu" else "DRAM"

    def regions(self) -> list[int]:
        """Region base addresses, vLLM's order: layer by layer, K then V."""
        return [c[half].data_ptr() for c in self.caches for half in (0, 1)]

    def register(self, agent: Any) -> None:
        tensors = [*self.caches, self.flat, self.flat2]
        descs = [(t.data_ptr(), t.numel() * t.element_size(), self.dev_id, "") for t in tensors]
        agent.register_memory(agent.get_reg_descs(descs, self.mem))

    def block_descs(self, bases: list[int]) -> list[tuple[int, int, int]]:
        bb = self.shape.block_bytes
        return [(base + b * bb, bb, self.dev_id) for base in bases for b in range(self.num_blocks)]


def _owner(conn: Connection, device: str, shape: Shape, num_blocks: int, flat_bytes: int, env: dict) -> None:
    """A: owns the filled caches, answers READs, drains notifications every millisecond."""
    _apply_env(env)
    try:
        if device != "cpu":
            import torch

            torch.cuda.set_device(0)
        side = _Side(device, shape, num_blocks, flat_bytes, owner=True)
        agent = _agent("kvvram-a")
        side.register(agent)
        conn.send(("ready", agent.get_agent_metadata(), side.regions(), side.flat.data_ptr()))
    except Exception:
        conn.send(("error", traceback.format_exc(limit=3)))
        return
    notifs = 0
    while True:
        notifs += sum(len(v) for v in agent.get_new_notifs().values())
        if conn.poll(0.001):
            conn.recv()
            deadline = time.monotonic() + 0.2
            while time.monotonic() < deadline:
                notifs += sum(len(v) for v in agent.get_new_notifs().values())
                time.sleep(0.001)
            conn.send(notifs)
            return


def _wait(agent: Any, handle: Any, t0: float) -> float:
    state = "PROC"
    while state == "PROC" and time.perf_counter() - t0 < READ_TIMEOUT_S:
        state = agent.check_xfer_state(handle)
    if state != "DONE":
        raise RuntimeError(f"READ ended in state {state} after {time.perf_counter() - t0:.1f} s")
    return time.perf_counter() - t0


class _Paths:
    """B's three timed paths for one token count (see the module docstring)."""

    def __init__(
        self, agent: Any, side: _Side, handles: tuple[Any, Any], peer: str, a_flat: int, n: int
    ) -> None:
        import torch

        self.torch = torch
        self.agent, self.side = agent, side
        self.local_h, self.remote_h = handles
        self.sync = torch.cuda.synchronize if side.device != "cpu" else (lambda: None)
        self.blocks = math.ceil(n / BLOCK_SIZE)
        self.nbytes = self.blocks * BLOCK_SIZE * side.shape.bytes_per_token
        self.ids = [r * side.num_blocks + b for r in range(2 * side.shape.layers) for b in range(self.blocks)]
        self.raw_h = agent.initialize_xfer(
            "READ",
            agent.get_xfer_descs([(side.flat.data_ptr(), self.nbytes, side.dev_id)], side.mem),
            agent.get_xfer_descs([(a_flat, self.nbytes, side.dev_id)], side.mem),
            peer,
            b"",
        )
        self.times: dict[str, list[float]] = {"copy": [], "raw": [], "handoff": [], "post": []}
        self.requests = 0

    def copy(self) -> None:
        u8 = self.torch.uint8
        self.sync()
        t0 = time.perf_counter()
        self.side.flat.view(u8)[: self.nbytes].copy_(self.side.flat2.view(u8)[: self.nbytes])
        self.sync()
        self.times["copy"].append(time.perf_counter() - t0)

    def raw(self) -> None:
        t0 = time.perf_counter()
        self.agent.transfer(self.raw_h)
        self.times["raw"].append(_wait(self.agent, self.raw_h, t0))

    def handoff(self) -> None:
        self.requests += 1
        t0 = time.perf_counter()
        notif = f"r{self.requests}".encode()
        h = self.agent.make_prepped_xfer(
            "READ", self.local_h, self.ids, self.remote_h, self.ids, notif_msg=notif
        )
        self.agent.transfer(h)
        self.times["post"].append(time.perf_counter() - t0)
        self.times["handoff"].append(_wait(self.agent, h, t0))
        self.agent.release_xfer_handle(h)

    def verify(self) -> None:
        """Zero B's buffers, READ once on both NIXL paths, compare with A's content regenerated here."""
        torch, side = self.torch, self.side
        for c in side.caches:
            c.zero_()
        side.flat.zero_()
        self.sync()
        self.handoff()
        self.raw()
        expect = torch.empty_like(side.caches[0])
        for i, c in enumerate(side.caches):
            _fill(expect, i)
            if not torch.equal(c[:, : self.blocks], expect[:, : self.blocks]):
                raise RuntimeError(f"handoff READ of {self.blocks} blocks: layer {i} differs from A's blocks")
        del expect
        expect_flat = torch.empty_like(side.flat)
        _fill(expect_flat, 10_000)
        u8 = torch.uint8
        if not torch.equal(side.flat.view(u8)[: self.nbytes], expect_flat.view(u8)[: self.nbytes]):
            raise RuntimeError(f"raw READ of {self.nbytes} bytes differs from A's buffer")

    def measure(self, reps: int) -> dict[str, Any]:
        self.verify()
        paths = [self.copy, self.raw, self.handoff]
        for _ in range(WARMUP):
            for p in paths:
                p()
        for t in self.times.values():
            t.clear()
        for rep in range(reps):
            for k in range(3):
                paths[(rep + k) % 3]()
        self.agent.release_xfer_handle(self.raw_h)
        return {
            "blocks": self.blocks,
            "bytes": self.nbytes,
            "descriptors": len(self.ids),
            "reps": reps,
            "median_s": {k: statistics.median(v) for k, v in self.times.items()},
            "p90_s": {k: sorted(v)[int(0.9 * (len(v) - 1))] for k, v in self.times.items()},
        }


def _reader(
    conn: Connection, device: str, shape: Shape, tokens: list[int], reps: int, env: dict, a_info: tuple
) -> None:
    """B: builds vLLM's descriptor lists against A and times the paths; sends a result dict."""
    _apply_env(env)
    out: dict[str, Any] = {"env": env, "cases": []}
    try:
        import torch

        if device != "cpu":
            torch.cuda.set_device(0)
        _, meta, a_regions, a_flat = a_info
        num_blocks = math.ceil(max(tokens) / BLOCK_SIZE)
        side = _Side(device, shape, num_blocks, num_blocks * BLOCK_SIZE * shape.bytes_per_token, owner=False)
        agent = _agent("kvvram-b")
        side.register(agent)
        peer = agent.add_remote_agent(meta)
        local = agent.get_xfer_descs(side.block_descs(side.regions()), side.mem)
        handles = (
            agent.prep_xfer_dlist("NIXL_INIT_AGENT", local),
            agent.prep_xfer_dlist(peer, agent.get_xfer_descs(side.block_descs(a_regions), side.mem)),
        )
        for n in tokens:
            out["cases"].append({"tokens": n, **_Paths(agent, side, handles, peer, a_flat, n).measure(reps)})
        if device != "cpu":
            out["interference"] = _interference(agent, *handles, shape, num_blocks, torch.cuda.synchronize)
    except Exception:
        out["error"] = traceback.format_exc(limit=4)
    conn.send(out)


def _interference(agent: Any, local_h: Any, remote_h: Any, shape: Shape, num_blocks: int, sync: Any) -> dict:
    """bf16 matrix products on B, alone and with the longest READ posted just before them, on the default
    stream and on a stream of their own. The products are launched without waiting, then the READ is polled
    to DONE (its time runs from before its post), then the products are waited for (their time runs from the
    end of the post)."""
    import contextlib

    import torch

    a = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    b = torch.randn(4096, 4096, dtype=torch.bfloat16, device="cuda")
    ids = [r * num_blocks + k for r in range(2 * shape.layers) for k in range(num_blocks)]

    def once(read: bool, products: bool, stream: Any) -> tuple[float, float]:
        sync()
        t0 = time.perf_counter()
        h = None
        if read:
            h = agent.make_prepped_xfer("READ", local_h, ids, remote_h, ids, notif_msg=b"interference")
            agent.transfer(h)
        t1 = time.perf_counter()
        if products:
            with torch.cuda.stream(stream) if stream is not None else contextlib.nullcontext():
                for _ in range(50):
                    a @ b
        read_s = _wait(agent, h, t0) if h is not None else 0.0
        sync()
        if h is not None:
            agent.release_xfer_handle(h)
        return time.perf_counter() - t1, read_s

    out: dict[str, Any] = {"read_bytes": num_blocks * BLOCK_SIZE * shape.bytes_per_token}
    for name, stream in (("default", None), ("side", torch.cuda.Stream())):
        for _ in range(3):
            once(False, True, stream)
        alone, both, read_alone, read_both = [], [], [], []
        for _ in range(10):
            alone.append(once(False, True, stream)[0])
            read_alone.append(once(True, False, stream)[1])
            t, r = once(True, True, stream)
            both.append(t)
            read_both.append(r)
        out[name] = {
            "products_alone_s": statistics.median(alone),
            "products_with_read_s": statistics.median(both),
            "read_alone_s": statistics.median(read_alone),
            "read_with_products_s": statistics.median(read_both),
        }
    return out


def run_config(name: str, device: str, shape: Shape, tokens: list[int], reps: int) -> dict[str, Any]:
    """One UCX configuration in a fresh pair of processes."""
    env = UCX_CONFIGS[name]
    if name == "dynaserve":
        from dynaserve.env import loopback_kv_env

        env = {k: v for k, v in loopback_kv_env().items() if k.startswith("UCX_")}
    ctx = mp.get_context("spawn")
    a_conn, a_child = ctx.Pipe()
    num_blocks = math.ceil(max(tokens) / BLOCK_SIZE)
    flat_bytes = num_blocks * BLOCK_SIZE * shape.bytes_per_token
    a = ctx.Process(target=_owner, args=(a_child, device, shape, num_blocks, flat_bytes, env), daemon=True)
    a.start()
    try:
        if not a_conn.poll(120):
            return {"config": name, "env": env, "error": "A did not start within 120 s"}
        a_info = a_conn.recv()
        if a_info[0] != "ready":
            return {"config": name, "env": env, "error": f"A failed: {a_info[1]}"}
        b_conn, b_child = ctx.Pipe()
        b = ctx.Process(target=_reader, args=(b_child, device, shape, tokens, reps, env, a_info), daemon=True)
        b.start()
        result = b_conn.recv() if b_conn.poll(600) else {"error": "B gave no result within 600 s"}
        b.join(10)
        a_conn.send("stop")
        result["notifications_at_a"] = a_conn.recv() if a_conn.poll(10) else None
        result["config"] = name
        return result
    finally:
        a.join(5)
        if a.is_alive():
            a.kill()


def _gbps(nbytes: int, s: float) -> float:
    return nbytes / s / 1e9


def report(results: list[dict[str, Any]]) -> str:
    """Markdown tables: times, bandwidths and ratios per configuration."""
    lines = []
    for res in results:
        lines.append(f"\n### UCX configuration `{res['config']}`: {res.get('env')}\n")
        if "error" in res and not res.get("cases"):
            lines.append(f"failed: `{res['error'].strip().splitlines()[-1]}`")
            continue
        if "error" in res:
            lines.append(f"stopped early: `{res['error'].strip().splitlines()[-1]}`\n")
        lines.append(
            "| tokens | MiB | descriptors | copy ms (GB/s) | raw READ ms (GB/s) | handoff READ ms p50 (p90) | "
            "handoff GB/s | raw / handoff | copy / handoff | post ms |"
        )
        lines.append("|---|---|---|---|---|---|---|---|---|---|")
        for c in res.get("cases", []):
            m, p = c["median_s"], c["p90_s"]
            lines.append(
                f"| {c['tokens']} | {c['bytes'] / 2**20:.1f} | {c['descriptors']} "
                f"| {m['copy'] * 1e3:.3f} ({_gbps(c['bytes'], m['copy']):.0f}) "
                f"| {m['raw'] * 1e3:.3f} ({_gbps(c['bytes'], m['raw']):.0f}) "
                f"| {m['handoff'] * 1e3:.3f} ({p['handoff'] * 1e3:.3f}) | {_gbps(c['bytes'], m['handoff']):.0f} "
                f"| {m['raw'] / m['handoff']:.2f} | {m['copy'] / m['handoff']:.2f} | {m['post'] * 1e3:.3f} |"
            )
        if "interference" in res:
            i = res["interference"]
            mib = i["read_bytes"] / 2**20
            for name, v in ((k, i[k]) for k in ("default", "side") if k in i):
                lines.append(
                    f"\n50 bf16 4096^3 products on B's {name} stream: {v['products_alone_s'] * 1e3:.2f} ms alone, "
                    f"{v['products_with_read_s'] * 1e3:.2f} ms with a {mib:.0f} MiB READ posted just before "
                    f"(ratio {v['products_with_read_s'] / v['products_alone_s']:.2f}); the READ took "
                    f"{v['read_alone_s'] * 1e3:.2f} ms alone and {v['read_with_products_s'] * 1e3:.2f} ms with them."
                )
        lines.append(f"\nnotifications A received: {res.get('notifications_at_a')}")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    ap.add_argument(
        "--preset", choices=tuple(PRESETS), default=None, help="default: tiny on cpu, llama3-8b on cuda"
    )
    ap.add_argument("--tokens", default="128,1000,2000,4000")
    ap.add_argument(
        "--ucx", default=None, help="comma list of " + ",".join(UCX_CONFIGS) + " (default: dynaserve)"
    )
    ap.add_argument("--reps", type=int, default=10)
    ap.add_argument("--out", default=None, help="also write the results as JSON here")
    args = ap.parse_args()
    preset = args.preset or ("tiny" if args.device == "cpu" else "llama3-8b")
    shape = PRESETS[preset]
    tokens = [int(t) for t in args.tokens.split(",")]
    if min(tokens) < 1 or args.reps < 1:
        ap.error("--tokens and --reps must be positive")
    configs = (args.ucx or "dynaserve").split(",")
    from tqdm import tqdm

    header = {
        "device": args.device,
        "preset": preset,
        "shape": asdict(shape),
        "block_size": BLOCK_SIZE,
        "host": platform.node(),
        "python": platform.python_version(),
    }
    if args.device == "cuda":
        import torch

        header["gpu"] = torch.cuda.get_device_name(0)
        header["torch"] = torch.__version__
    results = [
        run_config(c, args.device, shape, tokens, args.reps) for c in tqdm(configs, desc="UCX configs")
    ]
    print(json.dumps(header))
    print(report(results))
    if args.out:
        with open(args.out, "w") as f:
            json.dump({"header": header, "results": results}, f, indent=1)


if __name__ == "__main__":
    main()

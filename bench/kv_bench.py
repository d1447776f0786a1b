"""Benchmark NixlTransport reads against a raw single-descriptor NIXL READ of the same byte count.

Two processes: a sender (A) owning a filled pool and a NixlTransport that exports blocks and drains
confirmations every millisecond, and this process as the reader (B). For every case B times, in
rotating order within each repetition:

- one NixlTransport read: ``start_read`` -> ``poll`` until DONE -> ``release``, completion
  notification included;
- one raw READ through the same NIXL agent: a single descriptor covering the same number of bytes,
  handle prepared once and re-posted, no notification;
- for cases that need more than one descriptor, the same raw READ but with exactly the descriptors
  NixlTransport builds, which separates NIXL's per-descriptor cost from this layer's own cost.

Every path is verified byte for byte once per case before timing.

Usage: python -m bench.kv_bench [--reps-scale 1.0] [--seed 0] [--ucx-error-handling none|peer]
                                [--sender-period-ms 1]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import platform
import time
from dataclasses import dataclass
from multiprocessing.connection import Connection
from typing import Any

import numpy as np
from tqdm import tqdm

os.environ.setdefault("NIXL_LOG_LEVEL", "WARN")  # NIXL logs INFO lines to stdout otherwise

from workers.kv.base import XferState
from workers.kv.nixl import UCX_ERROR_HANDLING_MODES, NixlTransport, build_descriptors, nixl_available
from workers.kv.pool import KvBlockPool

BLOCK_TOKENS = 16
BYTES_PER_TOKEN = 1024  # 16 KiB blocks
POOL_BLOCKS = 4096  # 64 MiB per side
WARMUP = 5
POLL_TIMEOUT_S = 10.0


@dataclass(frozen=True)
class Case:
    """One benchmark case: which remote blocks land in which local blocks."""

    label: str
    remote_ids: list[int]
    local_ids: list[int]
    reps: int

    @property
    def nbytes(self) -> int:
        return len(self.remote_ids) * BLOCK_TOKENS * BYTES_PER_TOKEN


def make_cases(seed: int, scale: float) -> list[Case]:
    """64 KiB, 1 MiB and 16 MiB as consecutive blocks, plus 256 scattered 16 KiB blocks."""
    rng = np.random.default_rng(seed)

    def reps(n: int) -> int:
        return max(3, int(n * scale))

    cases = [
        Case("64 KiB (4 blocks)", list(range(100, 104)), list(range(2000, 2004)), reps(300)),
        Case("1 MiB (64 blocks)", list(range(200, 264)), list(range(1500, 1564)), reps(200)),
        Case("16 MiB (1024 blocks)", list(range(1024, 2048)), list(range(2560, 3584)), reps(40)),
    ]
    remote = rng.choice(POOL_BLOCKS, 256, replace=False).tolist()
    local = rng.choice(POOL_BLOCKS, 256, replace=False).tolist()
    cases.append(Case("256 x 16 KiB scattered", remote, local, reps(150)))
    return cases


def pool_data(seed: int) -> np.ndarray:
    """The sender's pool contents, reproducible on the reader side for verification."""
    rng = np.random.default_rng(seed + 1)
    return rng.integers(0, 256, (POOL_BLOCKS, BLOCK_TOKENS * BYTES_PER_TOKEN), dtype=np.uint8)


# --------------------------------------------------------------------------- sender (A)
def sender_main(conn: Connection, seed: int, err_mode: str, period: float) -> None:
    """A: fill the pool, export on request, drain confirmations every ``period`` s like a worker loop."""
    pool = KvBlockPool(POOL_BLOCKS, BLOCK_TOKENS, BYTES_PER_TOKEN)
    pool.buffer[:] = pool_data(seed)
    transport = NixlTransport("kvbench-a", ucx_error_handling=err_mode)
    transport.register_pool(pool)
    confirmed = 0
    conn.send("ready")
    try:
        while True:
            confirmed += len(transport.confirmed())
            if not conn.poll(period):
                continue
            cmd, *args = conn.recv()
            if cmd == "export":
                req_id, block_ids = args
                conn.send(transport.export(req_id, block_ids, len(block_ids) * BLOCK_TOKENS))
            elif cmd == "stop":
                deadline = time.monotonic() + 0.2  # let the last notifications land
                while time.monotonic() < deadline:
                    confirmed += len(transport.confirmed())
                    time.sleep(0.001)
                conn.send(confirmed)
                break
    finally:
        transport.close()


# --------------------------------------------------------------------------- reader (B)
class RawRead:
    """A raw NIXL READ of fixed descriptors, prepared once and re-posted per repetition (no notification)."""

    def __init__(self, transport: NixlTransport, peer: str, local: np.ndarray, remote: np.ndarray) -> None:
        agent = transport.agent
        self._agent = agent
        self._handle = agent.initialize_xfer(
            "READ", agent.get_xfer_descs(local, "DRAM"), agent.get_xfer_descs(remote, "DRAM"), peer, b""
        )

    def run(self) -> float:
        """One READ to completion; seconds."""
        t0 = time.perf_counter()
        state = self._agent.transfer(self._handle)
        deadline = t0 + POLL_TIMEOUT_S
        while state == "PROC" and time.perf_counter() < deadline:
            state = self._agent.check_xfer_state(self._handle)
        dt = time.perf_counter() - t0
        if state != "DONE":
            raise RuntimeError(f"raw READ ended in state {state}")
        return dt

    def close(self) -> None:
        self._handle.release()


def transport_read(transport: NixlTransport, params: dict[str, Any], local: list[int]) -> tuple[float, float]:
    """One NixlTransport read to completion, handle released; (total seconds, start_read seconds)."""
    t0 = time.perf_counter()
    xfer_id = transport.start_read("bench", params, local)
    t1 = time.perf_counter()
    deadline = t0 + POLL_TIMEOUT_S
    state = transport.poll(xfer_id)
    while not state.finished and time.perf_counter() < deadline:
        state = transport.poll(xfer_id)
    transport.release(xfer_id)
    dt = time.perf_counter() - t0
    if state is not XferState.DONE:
        raise RuntimeError(f"NixlTransport read ended in state {state}")
    return dt, t1 - t0


@dataclass
class Result:
    """Timings of one case, seconds."""

    case: Case
    ndescs: int
    ours: list[float]
    ours_post: list[float]
    raw: list[float]
    raw_same: list[float] | None
    """Raw READ with the same descriptors as NixlTransport (only measured when that is more than one)."""


def run_case(
    case: Case,
    transport: NixlTransport,
    pool: KvBlockPool,
    params: dict[str, Any],
    expected: np.ndarray,
    bar: tqdm,
) -> Result:
    """Verify every path once, warm up, then time the paths in rotating order."""
    block_bytes = pool.block_bytes
    nblocks = len(case.local_ids)
    # Verify NixlTransport first: its first read also connects the peer.
    pool.buffer[case.local_ids] = 0
    transport_read(transport, params, case.local_ids)
    if not np.array_equal(pool.buffer[case.local_ids], expected[case.remote_ids]):
        raise AssertionError(f"{case.label}: NixlTransport read returned wrong bytes")
    # Raw single descriptor: remote blocks from remote_ids[0] on, into one contiguous local run.
    raw_local = 0 if case.local_ids[0] >= nblocks else POOL_BLOCKS - nblocks
    r0 = case.remote_ids[0]
    single = RawRead(
        transport,
        params["agent"],
        np.array([[pool.base_addr + raw_local * block_bytes, case.nbytes, 0]], np.uint64),
        np.array([[params["base_addr"] + r0 * block_bytes, case.nbytes, 0]], np.uint64),
    )
    remote_d, local_d = build_descriptors(
        case.remote_ids, case.local_ids, params["base_addr"], pool.base_addr, block_bytes
    )
    same = RawRead(transport, params["agent"], local_d, remote_d) if len(remote_d) > 1 else None
    try:
        pool.buffer[raw_local : raw_local + nblocks] = 0
        single.run()
        if not np.array_equal(pool.buffer[raw_local : raw_local + nblocks], expected[r0 : r0 + nblocks]):
            raise AssertionError(f"{case.label}: raw READ returned wrong bytes")
        if same is not None:
            pool.buffer[case.local_ids] = 0
            same.run()
            if not np.array_equal(pool.buffer[case.local_ids], expected[case.remote_ids]):
                raise AssertionError(f"{case.label}: raw READ (same descriptors) returned wrong bytes")
        ours: list[float] = []
        posts: list[float] = []
        raws: list[float] = []
        raws_same: list[float] = []

        def run_ours() -> None:
            total, post = transport_read(transport, params, case.local_ids)
            ours.append(total)
            posts.append(post)

        paths = [run_ours, lambda: raws.append(single.run())]
        if same is not None:
            paths.append(lambda: raws_same.append(same.run()))
        for _ in range(WARMUP):
            for path in paths:
                path()
        del ours[:], posts[:], raws[:], raws_same[:]
        for i in range(case.reps):
            for k in range(len(paths)):
                paths[(i + k) % len(paths)]()
            bar.update(1)
    finally:
        single.close()
        if same is not None:
            same.close()
    return Result(case, len(remote_d), ours, posts, raws, raws_same if same is not None else None)


def fmt_us(seconds: float) -> str:
    us = seconds * 1e6
    return f"{us:,.0f}" if us >= 100 else f"{us:.1f}"


def table(results: list[Result]) -> str:
    """Markdown table of medians (p90 in parentheses)."""
    lines = [
        "| case | descriptors | NixlTransport µs p50 (p90) | of which start_read µs | NixlTransport GB/s "
        "| raw READ, 1 descriptor µs p50 (p90) | raw GB/s | ratio ours / raw "
        "| raw READ, same descriptors µs p50 |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        ours, raw = float(np.median(r.ours)), float(np.median(r.raw))
        same = fmt_us(float(np.median(r.raw_same))) if r.raw_same else "–"
        lines.append(
            f"| {r.case.label} | {r.ndescs} | {fmt_us(ours)} ({fmt_us(float(np.percentile(r.ours, 90)))}) "
            f"| {fmt_us(float(np.median(r.ours_post)))} | {r.case.nbytes / ours / 1e9:.2f} "
            f"| {fmt_us(raw)} ({fmt_us(float(np.percentile(r.raw, 90)))}) | {r.case.nbytes / raw / 1e9:.2f} "
            f"| {ours / raw:.2f} | {same} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    """Run all cases once and print the markdown table."""
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--reps-scale", type=float, default=1.0, help="multiply every case's repetitions")
    parser.add_argument("--seed", type=int, default=0, help="seed for block ids and pool contents")
    parser.add_argument(
        "--ucx-error-handling",
        choices=UCX_ERROR_HANDLING_MODES,
        default="none",
        help="UCX error mode, both ends",
    )
    parser.add_argument(
        "--sender-period-ms", type=float, default=1.0, help="how often the sender's loop makes progress"
    )
    args = parser.parse_args(argv)
    if not nixl_available():
        raise SystemExit("nixl is not importable: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1")

    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    sender = ctx.Process(
        target=sender_main,
        args=(child, args.seed, args.ucx_error_handling, args.sender_period_ms / 1000),
        daemon=True,
    )
    sender.start()
    child.close()
    pool = KvBlockPool(POOL_BLOCKS, BLOCK_TOKENS, BYTES_PER_TOKEN)
    transport = NixlTransport("kvbench-b", ucx_error_handling=args.ucx_error_handling)
    transport.register_pool(pool)
    try:
        expected = pool_data(args.seed)
        if not conn.poll(60) or conn.recv() != "ready":
            raise RuntimeError("sender did not start")
        cases = make_cases(args.seed, args.reps_scale)
        results: list[Result] = []
        with tqdm(total=sum(c.reps for c in cases), unit="rep", desc="kv reads") as bar:
            for i, case in enumerate(cases):
                conn.send(("export", f"case-{i}", case.remote_ids))
                params = conn.recv()
                bar.set_postfix_str(case.label)
                results.append(run_case(case, transport, pool, params, expected, bar))
        conn.send(("stop",))
        confirmations = conn.recv() if conn.poll(30) else -1
    finally:
        transport.close()
        sender.join(5)
        if sender.is_alive():
            sender.kill()
    print(table(results))
    reads = sum(len(r.ours) + WARMUP + 1 for r in results)  # + 1: the verifying read
    print(
        f"\n{os.cpu_count()} CPUs, {platform.python_implementation()} {platform.python_version()}; "
        f"16 KiB blocks, pools of {POOL_BLOCKS} blocks; ucx_error_handling={args.ucx_error_handling}, "
        f"sender progress every {args.sender_period_ms:g} ms; A confirmed {confirmations} of {reads} reads."
    )


if __name__ == "__main__":
    main()

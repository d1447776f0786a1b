"""The handoff gap while the broker relays other streams: A's direct StartDecode against the broker's relay.

A handoff's StartDecode reaches B either straight from A (a worker-to-worker ZeroMQ hop, the default) or
through the broker, which then also relays every token of every other stream. This benchmark measures
what that costs a split request as the broker gets busier.

Set-up: LocalCluster with two simulated-engine workers (real worker processes, NIXL KV pulls; steps priced
for Llama-3-8B on an A100 and slept at ``--time-scale``), ipc sockets, forced splits allowed. For each load
level, a child process keeps that many unsplit background streams in flight (16-token prompts, long
outputs, ``force_split = p + o``), and this process sends probe requests one at a time: a PD split
(``force_split = p``, 2 output tokens: A emits token 1, B pulls A's KV and emits token 2). The probe's
gap is B's token minus A's token at the client, so it holds the handoff (StartDecode, B's pick-up, the
KV pull), B's first step and both tokens' way through the broker. Both systems run in alternating
rounds (a cluster each, ``--no-direct-handoff`` for the relay alone), the load levels inside each.

Usage: python -m bench.handoff_load [--levels 0,64,192] [--seconds 6] [--rounds 3] [--time-scale 0.05]
                                    [--out docs/handoff_load]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing as mp
import os
import platform
import statistics
import time
from pathlib import Path
from typing import Any

from tqdm import tqdm

from dynaserve.client import DynaServeClient
from dynaserve.cluster import ClusterConfig, LocalCluster

MODES = ("direct", "relay")
PROBE_PROMPT = 128
BG_PROMPT, BG_OUTPUT = 16, 500  # 128 streams per instance fit its 131,072 KV tokens


def _tokens(n: int, seed: int) -> list[int]:
    return [3 + (seed * 7919 + i * 104729) % 31000 for i in range(n)]


def _background(addr: str, streams: int, stop: Any, started: Any) -> None:
    """Child process: keep ``streams`` unsplit requests in flight until ``stop`` is set."""

    async def one(c: DynaServeClient, seed: int) -> None:
        while not stop.is_set():
            async with c.generate(_tokens(BG_PROMPT, seed), max_tokens=BG_OUTPUT, ignore_eos=True,
                                  force_split=BG_PROMPT + BG_OUTPUT) as stream:
                async for _ in stream:
                    if stop.is_set():
                        return  # leaving the block aborts the request
            seed += 1000

    async def main() -> None:
        async with DynaServeClient(addr) as c:
            tasks = [asyncio.create_task(one(c, i)) for i in range(streams)]
            started.set()
            while not stop.is_set():
                await asyncio.sleep(0.05)
            await asyncio.gather(*tasks, return_exceptions=True)

    asyncio.run(main())


async def _probes(addr: str, seconds: float, seed: int) -> list[float]:
    """PD-split probes one after another for ``seconds``; the A -> B token gap of each, ms."""
    gaps: list[float] = []
    deadline = time.monotonic() + seconds
    async with DynaServeClient(addr) as c:
        while time.monotonic() < deadline:
            seed += 1
            async with c.generate(_tokens(PROBE_PROMPT, seed), max_tokens=2, ignore_eos=True,
                                  force_split=PROBE_PROMPT) as stream:
                await asyncio.wait_for(stream.collect(), 60)
            adm = stream.admitted
            if adm is None or adm.kind != "pd" or len(stream.token_ts) != 2:
                raise RuntimeError(f"probe not split as asked: {adm}, {len(stream.token_ts)} tokens")
            gaps.append((stream.token_ts[1] - stream.token_ts[0]) * 1000.0)
            await asyncio.sleep(0.02)
    return gaps


async def _relayed(addr: str) -> int:
    async with DynaServeClient(addr) as c:
        return int((await c.status()).stats["tokens_relayed"])


def _cpu_s(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as fh:
        fields = fh.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_level(cluster: LocalCluster, streams: int, seconds: float, seed: int) -> dict[str, Any]:
    ctx = mp.get_context("spawn")
    stop, started = ctx.Event(), ctx.Event()
    bg = ctx.Process(target=_background, args=(cluster.client_addr, streams, stop, started), daemon=True)
    if streams:
        bg.start()
        started.wait(60)
        time.sleep(1.0)  # the streams reach their steady state
    broker = cluster.procs["broker"].pid
    try:
        tok0, cpu0, t0 = asyncio.run(_relayed(cluster.client_addr)), _cpu_s(broker), time.monotonic()
        gaps = asyncio.run(_probes(cluster.client_addr, seconds, seed))
        tok1, cpu1, t1 = asyncio.run(_relayed(cluster.client_addr)), _cpu_s(broker), time.monotonic()
    finally:
        stop.set()
        if streams:
            bg.join(30)
            if bg.is_alive():
                bg.kill()
    return {"streams": streams, "gaps": gaps, "tokens_per_s": (tok1 - tok0) / (t1 - t0),
            "broker_cpu": (cpu1 - cpu0) / (t1 - t0)}


def _start(mode: str, time_scale: float) -> LocalCluster:
    cfg = ClusterConfig(workers=2, engine="sim", transport="ipc", http_port=0, engine_time_scale=time_scale)
    cluster = LocalCluster(cfg, broker_args=["--allow-forced-splits", *(["--no-direct-handoff"] if mode == "relay"
                                                                         else [])])
    cluster.start_ready()
    return cluster


def pct(xs: list[float], q: float) -> float:
    s = sorted(xs)
    return s[min(len(s) - 1, int(q * len(s)))] if s else float("nan")


def table(res: dict[str, Any]) -> str:
    lines = ["| background streams | tokens relayed/s (direct; relay) | broker CPU (direct; relay) | probes "
             "(direct / relay) | A -> B gap p50 ms: direct; relay | p90 ms: direct; relay | relay / direct, p50; p90 |",
             "|" + "---|" * 7]
    for lvl in res["levels"]:
        d, r = res["runs"]["direct"][str(lvl)], res["runs"]["relay"][str(lvl)]
        gd = [g for run in d for g in run["gaps"]]
        gr = [g for run in r for g in run["gaps"]]
        tps = [statistics.mean(run["tokens_per_s"] for run in x) for x in (d, r)]
        cpu = [statistics.mean(run["broker_cpu"] for run in x) for x in (d, r)]
        p50 = (statistics.median(gd), statistics.median(gr))
        p90 = (pct(gd, 0.9), pct(gr, 0.9))
        lines.append(f"| {lvl} | {tps[0]:,.0f}; {tps[1]:,.0f} | {cpu[0]:.0%}; {cpu[1]:.0%} | {len(gd)} / {len(gr)} "
                     f"| {p50[0]:.2f}; {p50[1]:.2f} | {p90[0]:.2f}; {p90[1]:.2f} "
                     f"| **{p50[1] / p50[0]:.2f}**; {p90[1] / p90[0]:.2f} |")
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    levels = res["levels"]
    fig, axes = plt.subplots(1, len(levels), figsize=(4.2 * len(levels), 3.4), squeeze=False)
    for ax, lvl in zip(axes[0], levels, strict=True):
        for mode, color in zip(MODES, ("tab:blue", "tab:orange"), strict=True):
            gaps = sorted(g for run in res["runs"][mode][str(lvl)] for g in run["gaps"])
            ax.plot(gaps, [(i + 1) / len(gaps) for i in range(len(gaps))], color=color,
                    label="direct StartDecode" if mode == "direct" else "broker relay alone")
        ax.set_title(f"{lvl} background streams")
        ax.set_xlabel("A -> B token gap at the client (ms)")
        ax.grid(alpha=0.3)
    axes[0][0].set_ylabel("fraction of probes")
    axes[0][0].legend(loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--levels", type=lambda s: [int(x) for x in s.split(",")], default=[0, 64, 192],
                    help="background streams in flight, one measurement each")
    ap.add_argument("--seconds", type=float, default=6.0, help="probing time per level and round")
    ap.add_argument("--rounds", type=int, default=3, help="alternating rounds of the two systems")
    ap.add_argument("--time-scale", type=float, default=0.05, help="simulated engine: real s per modelled s")
    ap.add_argument("--out", default="", help="write results.json, results.md and gaps.png here")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.seconds <= 0 or any(x < 0 for x in args.levels):
        ap.error("need --rounds >= 1, --seconds > 0 and levels >= 0")
    res: dict[str, Any] = {"levels": args.levels, "time_scale": args.time_scale, "seconds": args.seconds,
                           "runs": {m: {str(lvl): [] for lvl in args.levels} for m in MODES},
                           "load_start": os.getloadavg()[0]}
    t_start = time.monotonic()
    with tqdm(total=args.rounds * len(MODES) * len(args.levels), desc="handoff_load", unit="level") as bar:
        for rnd in range(args.rounds):
            for mode in (MODES if rnd % 2 == 0 else MODES[::-1]):
                bar.set_postfix_str(f"round {rnd + 1}, {mode}: starting")
                cluster = _start(mode, args.time_scale)
                try:
                    for lvl in args.levels:
                        bar.set_postfix_str(f"round {rnd + 1}, {mode}, {lvl} streams")
                        res["runs"][mode][str(lvl)].append(run_level(cluster, lvl, args.seconds, 1000 * rnd))
                        bar.update(1)
                finally:
                    cluster.stop()
    res["load_end"] = os.getloadavg()[0]
    res["wall_s"] = time.monotonic() - t_start
    md = table(res)
    foot = (f"\n\n{os.cpu_count()} CPUs, CPython {platform.python_version()}; simulated engine at time scale "
            f"{args.time_scale}; {args.rounds} rounds x {args.seconds:g} s per level and system; load average "
            f"{res['load_start']:.1f} at start, {res['load_end']:.1f} at end; {res['wall_s']:.0f} s.")
    print(md + foot)
    if args.out:
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / "results.json").write_text(json.dumps(res, indent=1))
        (out / "results.md").write_text(md + foot + "\n")
        plot(res, out / "gaps.png")
        print(f"wrote {out}/results.json, results.md, gaps.png")


if __name__ == "__main__":
    main()

"""What DynaServe's parts inside vLLM cost a decode step: bare vLLM against the same engine with DynaServe's KV
connector (and its NIXL agent), with the local scheduler's ``scheduler_cls``, and with both.

Each variant is its own process (bench.bench_vllm's ``_bare_main``, built and stepped in one worker thread,
as VllmEngine runs), all bound to ``--engine-core`` and alternating round by round, so the machine's drift
falls on all alike. No worker, broker or client: only what the connector and the scheduler subclass add to
vLLM's own step. Each round decodes N requests (128-token prompts) for ``--tokens`` tokens; a variant's
figure is the median over its rounds of the per-round median decode step (steps that decode all N).

Usage: python -m bench.engine_ab [--rounds 8] [--n 32] [--tokens 150] [--engine-core 0]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import tempfile
from typing import Any

from tqdm import tqdm

VARIANTS = {"bare": "", "conn": "conn", "sched": "sched", "conn+sched": "conn+sched"}
SIDE_PORT = 6690  # NIXL handshake ports (base + 10 i) of the variants with the connector


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=8, help="alternating rounds (each runs every variant)")
    ap.add_argument("--n", type=int, default=32, help="requests decoding together (128-token prompts)")
    ap.add_argument("--tokens", type=int, default=150, help="output tokens per request and run")
    ap.add_argument("--engine-core", type=int, default=0, help="the core every variant computes on")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.n < 1 or args.tokens < 8 or args.engine_core not in os.sched_getaffinity(0):
        ap.error("need --rounds >= 1, --n >= 1, --tokens >= 8 and an engine core this process may use")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vcache")
    os.environ.setdefault("UCX_NET_DEVICES", "lo")
    from bench.bench_vllm import _bare_main
    from dynaserve.tinymodel import DEFAULT_OUT, build

    model = str(build(DEFAULT_OUT))
    ctx = mp.get_context("spawn")
    log_dir = tempfile.mkdtemp(prefix="bench-engine-ab-")
    procs: dict[str, tuple[Any, Any]] = {}
    prompts = [[3 + (i * 31 + j * 7) % 4000 for j in range(128)] for i in range(args.n)]
    steps: dict[str, list[float]] = {v: [] for v in VARIANTS}
    names = list(VARIANTS)
    try:
        with tqdm(total=len(names) * (args.rounds + 1), desc="engine_ab", unit="run") as bar:
            for i, (name, parts) in enumerate(VARIANTS.items()):
                bar.set_postfix_str(f"starting {name}")
                conn, child = ctx.Pipe()
                proc = ctx.Process(target=_bare_main, daemon=True, args=(
                    child, model, "engine_thread", f"{log_dir}/{name}.log", str(args.engine_core), parts,
                    SIDE_PORT + 10 * i))
                proc.start()
                child.close()
                procs[name] = (proc, conn)
                if not conn.poll(300):
                    raise RuntimeError(f"{name} did not start (log: {log_dir}/{name}.log)")
                conn.recv()
                conn.send(("run", prompts, 32))  # warm-up
                conn.recv()
                bar.update(1)
            for rnd in range(args.rounds):
                k = rnd % len(names)
                for name in names[k:] + names[:k]:
                    bar.set_postfix_str(f"round {rnd + 1}/{args.rounds}, {name}")
                    conn = procs[name][1]
                    conn.send(("run", prompts, args.tokens))
                    _, step_ms = conn.recv()
                    steps[name].append(statistics.median(step_ms))
                    bar.update(1)
    finally:
        for proc, conn in procs.values():
            try:
                conn.send(("stop",))
            except OSError:
                pass
            proc.join(10)
            if proc.is_alive():
                proc.kill()
    base = steps["bare"]
    print(f"| variant | decode step p50 ms (median over {args.rounds} rounds) | / bare (median of per-round "
          "ratios) | per round |\n|---|---|---|---|")
    for name in names:
        per = [x / b for x, b in zip(steps[name], base, strict=True)]
        print(f"| {name} | {statistics.median(steps[name]):.3f} | {statistics.median(per):.3f} | "
              f"{', '.join(f'{x:.2f}' for x in per)} |")
    print(f"\nN = {args.n}, {args.tokens} tokens per run, every variant on core {args.engine_core}; load average "
          f"{os.getloadavg()[0]:.1f}; vLLM logs: {log_dir}")


if __name__ == "__main__":
    main()

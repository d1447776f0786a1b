"""How much load on the other cores slows a bare vLLM engine's decode step (no DynaServe involved).

The overhead phase of bench.bench_vllm compares DynaServe (an engine thread on its core, while the
worker's event loop, the broker and the client work on the other core) with bare vLLM engines whose client
is in-process (the other core idle). This measures what the second core's load alone costs: one bare
engine (built and stepped in one worker thread, bound to ``--engine-core``, as bench_vllm's ``bare_eng``)
decodes N requests in alternating rounds with the other cores idle and with a Python process on them that
spends ``--duty-ms`` of every ``--period-ms`` packing and unpacking MessagePack token batches and sorting
dictionaries: a load of the kind and size the broker and the client put there (about 15 % of a core at
N = 8 on the tiny model).

Usage: python -m bench.interference [--rounds 6] [--n 8] [--tokens 300] [--duty-ms 0.6] [--period-ms 3.6]
"""

from __future__ import annotations

import argparse
import multiprocessing as mp
import os
import statistics
import time
from typing import Any

from tqdm import tqdm


def antagonist(cores: set[int], duty_ms: float, period_ms: float) -> None:
    """Child process: MessagePack and dict work on ``cores`` for ``duty_ms`` of every ``period_ms``, forever."""
    import msgpack

    os.sched_setaffinity(0, cores)
    batch = [[f"{i:x}", [1234, 5678], None] for i in range(256)]
    table = {f"k{i}": list(range(50)) for i in range(200)}
    while True:
        t0 = time.perf_counter()
        while (time.perf_counter() - t0) * 1000.0 < duty_ms:
            msgpack.unpackb(msgpack.packb(batch))
            sorted(table.items())
        time.sleep(max(0.0, (period_ms - duty_ms) / 1000.0))


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=6, help="alternating rounds (each runs both, order rotated)")
    ap.add_argument("--n", type=int, default=8, help="requests decoding together (128-token prompts)")
    ap.add_argument("--tokens", type=int, default=300, help="output tokens per request and run")
    ap.add_argument("--engine-core", type=int, default=0, help="the core the engine computes on")
    ap.add_argument("--duty-ms", type=float, default=0.6, help="the antagonist's work per period")
    ap.add_argument("--period-ms", type=float, default=3.6, help="the antagonist's period")
    args = ap.parse_args(argv)
    others = os.sched_getaffinity(0) - {args.engine_core}
    if args.rounds < 1 or not others or args.engine_core not in os.sched_getaffinity(0):
        ap.error("need --rounds >= 1, an engine core this process may use, and at least one other core")
    os.environ.setdefault("VLLM_CACHE_ROOT", "/tmp/vcache")
    from bench.bench_vllm import _bare_main
    from dynaserve.tinymodel import DEFAULT_OUT, build

    model = str(build(DEFAULT_OUT))
    ctx = mp.get_context("spawn")
    conn, child = ctx.Pipe()
    engine = ctx.Process(target=_bare_main, args=(child, model, "engine_thread", "/tmp/bench-interference.log",
                                                   str(args.engine_core)), daemon=True)
    engine.start()
    conn.recv()
    prompts = [[3 + (i * 31 + j * 7) % 4000 for j in range(128)] for i in range(args.n)]
    conn.send(("run", prompts, 32))
    conn.recv()  # warm-up
    steps: dict[str, list[float]] = {"idle": [], "loaded": []}
    try:
        with tqdm(total=2 * args.rounds, desc="interference", unit="run") as bar:
            for rnd in range(args.rounds):
                for mode in ("idle", "loaded") if rnd % 2 == 0 else ("loaded", "idle"):
                    load: Any = None
                    if mode == "loaded":
                        load = ctx.Process(target=antagonist, args=(others, args.duty_ms, args.period_ms), daemon=True)
                        load.start()
                        time.sleep(0.3)
                    conn.send(("run", prompts, args.tokens))
                    _, step_ms = conn.recv()
                    steps[mode].append(statistics.median(step_ms))
                    if load is not None:
                        load.kill()
                        load.join()
                    bar.update(1)
    finally:
        conn.send(("stop",))
        engine.join(10)
    idle, loaded = statistics.median(steps["idle"]), statistics.median(steps["loaded"])
    print(f"| other cores | decode step p50 ms (median over {args.rounds} rounds) | per round |\n|---|---|---|")
    print(f"| idle | {idle:.3f} | {', '.join(f'{x:.2f}' for x in steps['idle'])} |")
    print(f"| {args.duty_ms:g} ms of work every {args.period_ms:g} ms | {loaded:.3f} | "
          f"{', '.join(f'{x:.2f}' for x in steps['loaded'])} |")
    per = [b / a for a, b in zip(steps["idle"], steps["loaded"], strict=True)]
    print(f"\nloaded / idle: {loaded / idle:.3f} (per round {', '.join(f'{x:.2f}' for x in per)}); N = {args.n}, "
          f"engine on core {args.engine_core}, load on {sorted(others)}; load average {os.getloadavg()[0]:.1f}")


if __name__ == "__main__":
    main()

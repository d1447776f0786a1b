"""What torch.distributed's idle poll threads cost vLLM's decode step on the engine's core.

vLLM's start-up creates gloo process groups even for one instance; each has a ``gloo_tcp_loop`` thread that
wakes every 10 ms. They inherit the affinity of the thread that builds the engine, so on a bound CPU engine
they share its core (13 of them on vLLM's CPU build: about 1,300 wake-ups a second). The DynaServe worker
moves them to its loop's cores (``workers.engines.vllm_engine._move_pollers``). This benchmark measures what
that is worth in one process, side by side: bare vLLM (the tiny model, N requests with 128-token prompts
decoding ``--tokens`` tokens) built and stepped from the main thread bound to ``--engine-core``, alternating
round by round between the poll threads on the engine's core (as created) and on ``--other-core``. Each
round's figure is the median decode step (steps that decode all N); the result is the median of the per-round
ratios, moved / on the engine core, with a 95 % bootstrap interval.

``--cluster`` measures the same in DynaServe as deployed: a one-worker cluster (``bench.engine_ab``'s
``cluster`` variant: the worker's engine on the engine core, its loop, the broker and this process as the SDK
client on the other), whose worker's poll threads this process moves between rounds (from outside, by thread
id); it also reports the client's TBT p50.

Usage: python -m bench.poll_threads [--rounds 12] [--n 8] [--tokens 300] [--engine-core 0] [--other-core 1]
       [--cluster]
"""

from __future__ import annotations

import argparse
import os
import statistics
import time
from typing import Any

from tqdm import tqdm

from bench.bench_vllm import median_ci


def _prompts(n: int) -> list[list[int]]:
    """``n`` distinct 128-token prompts."""
    return [[(j * 37 + i * 101) % 4000 + 3 for j in range(128)] for i in range(n)]


def _run(llm: Any, n: int, tokens: int, tag: str) -> float:
    """Decode ``n`` requests for ``tokens`` tokens; the median ms of the steps that decode all of them."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    for i, prompt in enumerate(_prompts(n)):
        llm.add_request(f"{tag}-{i}", {"prompt_token_ids": prompt},
                        SamplingParams(max_tokens=tokens, temperature=0.0, ignore_eos=True,
                                       output_kind=RequestOutputKind.DELTA, detokenize=False))
    steps: list[float] = []
    started = 0
    while llm.has_unfinished_requests():
        t0 = time.perf_counter()
        outs = llm.step()
        ms = (time.perf_counter() - t0) * 1000.0
        started += 1
        if started > 2 and len(outs) == n:
            steps.append(ms)
    return statistics.median(steps)


def _cluster_rounds(args: argparse.Namespace, model: str, placements: dict[str, set[int]], bar: Any,
                    ) -> tuple[dict[str, list[float]], dict[str, list[float]], int]:
    """The one-worker cluster's per-round decode step and client TBT p50 (ms), by placement."""
    import tempfile

    from bench.bench_vllm import records
    from bench.engine_ab import _ClusterVariant
    from dynaserve.metrics import summarize
    from workers.engines.vllm_engine import pin_poll_threads

    cluster = _ClusterVariant(model, args.engine_core, str(args.other_core), 7700, tempfile.mkdtemp(prefix="poll-"))
    steps: dict[str, list[float]] = {k: [] for k in placements}
    tbt: dict[str, list[float]] = {k: [] for k in placements}
    threads = 0
    try:
        pid = next(p.pid for name, p in cluster.cluster.procs.items() if name != "broker")
        os.sched_setaffinity(0, {args.other_core})  # the client off the engine core
        prompts = _prompts(args.n)
        cluster.run(prompts, 32, "warm-up")
        for r in range(args.rounds):
            for where in list(placements) if r % 2 == 0 else list(reversed(placements)):
                threads = pin_poll_threads(placements[where], pid)
                bar.set_postfix_str(f"round {r + 1}/{args.rounds}, poll threads on the {where}")
                out, step_ms = cluster.run(prompts, args.tokens, f"r{r}-{where}")
                steps[where].append(statistics.median(step_ms))
                tbt[where].append(summarize(records(out, 128, args.tokens, f"r{r}{where}")).tbt_p50_ms)
                bar.update()
    finally:
        cluster.close()
    return steps, tbt, threads


def _bare_rounds(args: argparse.Namespace, model: str, placements: dict[str, set[int]], bar: Any,
                 ) -> tuple[dict[str, list[float]], int]:
    """Bare vLLM's per-round decode step (ms), by placement, in this process."""
    from vllm import EngineArgs
    from vllm.v1.engine.llm_engine import LLMEngine

    from workers.engines.vllm_config import VllmEngineConfig
    from workers.engines.vllm_engine import _bind_engine_thread, pin_poll_threads

    cfg = VllmEngineConfig(model=model, cpu_bind=str(args.engine_core))
    _bind_engine_thread(cfg)  # this (main) thread builds and steps vLLM, as bare vLLM runs
    llm = LLMEngine.from_engine_args(EngineArgs(**cfg.engine_kwargs(connector=False, scheduler=False)))
    _run(llm, args.n, 16, "warm-up")
    got: dict[str, list[float]] = {k: [] for k in placements}
    threads = 0
    for r in range(args.rounds):
        for where in list(placements) if r % 2 == 0 else list(reversed(placements)):
            threads = pin_poll_threads(placements[where])
            bar.set_postfix_str(f"round {r + 1}/{args.rounds}, poll threads on the {where}")
            got[where].append(_run(llm, args.n, args.tokens, f"r{r}-{where}"))
            bar.update()
    return got, threads


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--rounds", type=int, default=12, help="alternating rounds (each runs both placements)")
    ap.add_argument("--n", type=int, default=8, help="requests decoding together")
    ap.add_argument("--tokens", type=int, default=300, help="tokens each request decodes")
    ap.add_argument("--engine-core", type=int, default=0)
    ap.add_argument("--other-core", type=int, default=1)
    ap.add_argument("--model", default="", help="model directory (default: the tiny model, built if missing)")
    ap.add_argument("--cluster", action="store_true", help="a one-worker DynaServe cluster instead of bare vLLM")
    args = ap.parse_args(argv)
    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    os.environ["VLLM_CPU_OMP_THREADS_BIND"] = "nobind"
    os.environ.setdefault("VLLM_LOGGING_LEVEL", "WARNING")
    from dynaserve.tinymodel import DEFAULT_OUT, build

    model = args.model or str(DEFAULT_OUT)
    if not args.model:
        build(DEFAULT_OUT)
    placements = {"engine core": {args.engine_core}, "other core": {args.other_core}}
    tbt: dict[str, list[float]] = {}
    with tqdm(total=2 * args.rounds, desc="poll_threads", unit="run") as bar:
        if args.cluster:
            got, tbt, threads = _cluster_rounds(args, model, placements, bar)
        else:
            got, threads = _bare_rounds(args, model, placements, bar)
    what = "a one-worker DynaServe cluster (client TBT too)" if args.cluster else "bare vLLM"
    print(f"\n{what}, {threads} poll threads; N = {args.n}, {args.tokens} tokens, {args.rounds} alternating rounds, "
          f"the engine on core {args.engine_core}\n")
    for name, table in (("decode step", got), ("client TBT", tbt)):
        if not table:
            continue
        ratios = [b / a for a, b in zip(table["engine core"], table["other core"], strict=True)]
        mid, lo, hi = median_ci(ratios)
        print(f"| poll threads on | {name} p50 ms (median over rounds) | per round |\n|---|---|---|")
        for where, xs in table.items():
            print(f"| the {where} | {statistics.median(xs):.3f} | {', '.join(f'{x:.3f}' for x in xs)} |")
        print(f"\n{name}, other core / engine core: {mid:.4f} ({lo:.4f}-{hi:.4f}), median of per-round ratios with "
              f"a 95 % bootstrap interval; per round {min(ratios):.3f}-{max(ratios):.3f}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

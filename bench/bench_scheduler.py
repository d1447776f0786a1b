"""Global scheduler decision time: ``policy.plan()`` + ``commit()`` per request, per policy and cluster size.

Each case builds a ClusterState of N instances with seeded, varied loads (running decode batches, queued
prefill, pending decode tokens, KV occupancy), then plans requests whose prompt and output lengths are drawn
from the shipped Azure conversation trace. Every decision (``plan`` and, when it returns a plan, ``commit``)
is timed with ``time.perf_counter_ns``. Every ``--reset-every`` requests the loads are redrawn (outside the
timed region), as a round of load reports would overwrite the optimistic accounting of ``commit``.

The machine may be shared: each case runs ``--repeat`` times and the run with the lowest median is
reported, with the mean process CPU time per decision next to it (time spent descheduled does not count).

Usage: python -m bench.bench_scheduler [--requests 4000] [--repeat 3] [--sizes 8,64,256] [--seed 0]
       python -m bench.bench_scheduler --dump-plans plans.txt   # every plan, to compare two versions
"""

from __future__ import annotations

import argparse
import gc
import platform
import random
import statistics
import time
from collections import Counter
from dataclasses import dataclass

from tqdm import tqdm

from bench.traces import load_trace
from broker.cluster_state import ClusterState, InstanceState, Pricing, RequestInfo
from broker.scheduler import GlobalPolicy, commit, make_policy
from dynaserve.costmodel import preset_step_model

POLICY_NAMES = ("colocate", "disagg", "dynaserve", "balance")
KV_CAPACITY = 131072  # tokens per instance (the simulated engine's default)
MAX_MODEL_LEN = 32768
TTFT_SLO_MS = 2000.0
TBT_SLO_MS = 100.0
TARGET_US = 50.0  # dynaserve, 64 instances, median


@dataclass(frozen=True)
class CaseResult:
    policy: str
    instances: int
    decisions: int
    median_us: float
    p99_us: float
    mean_us: float
    cpu_us: float
    unplaced: int
    kinds: dict[str, int]


def draw_loads(cluster: ClusterState, rng: random.Random) -> None:
    """Overwrite every instance's load with a plausible snapshot (as a round of LoadReports would)."""
    for inst in cluster.instances.values():
        busy = rng.random()
        if busy < 0.1:  # idle
            running, queued = 0, 0
        elif busy < 0.7:  # steady decode with a little prefill waiting
            running, queued = rng.randint(8, 96), rng.choice((0, 0, rng.randint(64, 4096)))
        else:  # heavily loaded
            running, queued = rng.randint(96, 256), rng.randint(1024, 16384)
        avg_ctx = rng.randint(200, max(200, min(4000, int(0.8 * KV_CAPACITY) // max(1, running))))
        ctx = running * avg_ctx
        pending = running * rng.randint(20, 400)
        used = min(int(KV_CAPACITY * 0.97), ctx + queued + pending)
        inst.running_seqs = running
        inst.decode_ctx_tokens = ctx
        inst.queued_prefill_tokens = queued
        inst.pending_decode_tokens = pending
        inst.kv_used_tokens = used
        inst.step_ms = 20.0 + 0.05 * running


def make_cluster(n: int) -> ClusterState:
    cluster = ClusterState()
    for k in range(n):
        cluster.add(InstanceState(
            id=f"w{k}", kv_capacity_tokens=KV_CAPACITY, max_model_len=MAX_MODEL_LEN, kv_bytes_per_token=131072,
            max_num_seqs=256,  # the engines' cap of running sequences (vLLM's default)
        ))
    return cluster


def make_requests(n: int, seed: int) -> list[RequestInfo]:
    """RequestInfos with (prompt, output) lengths sampled from the Azure conversation trace."""
    lengths = [(r.input_tokens, r.output_tokens) for r in load_trace("azure_conv")]
    rng = random.Random(seed)
    out = []
    for k in range(n):
        p, o = lengths[rng.randrange(len(lengths))]
        out.append(RequestInfo(format(k + 1, "x"), p, o, o, TTFT_SLO_MS, TBT_SLO_MS))
    return out


def run_case(
    policy: GlobalPolicy, n: int, requests: list[RequestInfo], seed: int, reset_every: int,
    plans_out: list[str] | None = None,
) -> CaseResult:
    cluster = make_cluster(n)
    rng = random.Random(seed * 1_000_003 + n)
    draw_loads(cluster, rng)
    times: list[int] = []
    kinds: Counter[str] = Counter()
    unplaced = 0
    clock = time.perf_counter_ns
    cpu_clock = time.process_time_ns
    cpu_ns = 0
    now = 0.0
    gc.collect()
    cpu0 = cpu_clock()
    for k, req in enumerate(requests):
        if k and k % reset_every == 0:
            cpu_ns += cpu_clock() - cpu0
            draw_loads(cluster, rng)
            cpu0 = cpu_clock()
        now += 0.001
        t0 = clock()
        plan = policy.plan(req, cluster, now)
        if plan is not None:
            commit(plan, req, cluster)
        t1 = clock()
        times.append(t1 - t0)
        if plan is None:
            unplaced += 1
            kinds["(none)"] += 1
        else:
            kinds[plan.kind] += 1
        if plans_out is not None:
            plans_out.append(f"{policy.name} {n} {req.req_id} {plan}")
    cpu_ns += cpu_clock() - cpu0
    us = sorted(t / 1000.0 for t in times)
    return CaseResult(
        policy=policy.name, instances=n, decisions=len(us), median_us=statistics.median(us),
        p99_us=us[min(len(us) - 1, int(0.99 * len(us)))], mean_us=statistics.fmean(us),
        cpu_us=cpu_ns / 1000.0 / len(us), unplaced=unplaced,
        kinds=dict(kinds),
    )


def markdown_table(results: list[CaseResult]) -> str:
    lines = [
        "| policy | instances | decisions | median µs | p99 µs | mean µs | CPU µs/decision | plan kinds |",
        "|---|---:|---:|---:|---:|---:|---:|---|",
    ]
    for r in results:
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(r.kinds.items()))
        lines.append(
            f"| {r.policy} | {r.instances} | {r.decisions} | {r.median_us:.1f} | {r.p99_us:.1f} | "
            f"{r.mean_us:.1f} | {r.cpu_us:.1f} | {kinds} |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--requests", type=int, default=4000, help="timed decisions per case")
    ap.add_argument("--warmup", type=int, default=300, help="untimed decisions before each case")
    ap.add_argument("--repeat", type=int, default=3, help="runs per case; the lowest median is reported")
    ap.add_argument("--sizes", default="8,64,256", help="comma-separated instance counts")
    ap.add_argument("--policies", default=",".join(POLICY_NAMES))
    ap.add_argument("--reset-every", type=int, default=50, help="redraw loads every this many requests")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--model", default="llama3-8b")
    ap.add_argument("--dump-plans", metavar="FILE", help="write every plan (one per line) to FILE")
    args = ap.parse_args(argv)

    sizes = [int(s) for s in args.sizes.split(",") if s]
    policies = [s for s in args.policies.split(",") if s]
    model, _ = preset_step_model(args.model)
    pricing = Pricing(model)
    requests = make_requests(args.requests, args.seed)
    warm = make_requests(args.warmup, args.seed + 1)
    plans: list[str] | None = [] if args.dump_plans else None
    results: list[CaseResult] = []
    cases = [(p, n) for p in policies for n in sizes]
    for name, n in tqdm(cases, desc="scheduler cases", unit="case"):
        opts = {"prefill_instances": max(1, n // 4)} if name == "disagg" else {}
        policy = make_policy(name, pricing, **opts)
        if warm:
            run_case(policy, n, warm, args.seed + 7, args.reset_every)
        runs = [run_case(policy, n, requests, args.seed, args.reset_every, plans)]
        runs += [run_case(policy, n, requests, args.seed, args.reset_every) for _ in range(args.repeat - 1)]
        results.append(min(runs, key=lambda r: r.median_us))

    print()
    print(f"Global scheduler decision time (plan + commit), model {args.model}, "
          f"Python {platform.python_version()}, {args.requests} requests per case (best of {args.repeat} runs), "
          f"loads redrawn every {args.reset_every} requests, seed {args.seed}")
    print()
    print(markdown_table(results))
    for r in results:
        if r.policy == "dynaserve" and r.instances == 64:
            verdict = "meets" if r.median_us < TARGET_US else "misses"
            print(f"\ndynaserve at 64 instances: median {r.median_us:.1f} µs {verdict} the {TARGET_US:.0f} µs target")
    if plans is not None and args.dump_plans:
        with open(args.dump_plans, "w") as f:
            f.write("\n".join(plans) + "\n")
        print(f"\n{len(plans)} plans written to {args.dump_plans}")


if __name__ == "__main__":
    main()

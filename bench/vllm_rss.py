"""Worker memory under repeated KV handoffs: does a vLLM worker's RSS settle, or grow with every split?

Starts the handoff phase's cluster of ``bench.bench_vllm`` (broker + two vLLM workers on the wide local
model, early pulls on, the defaults), then sends ``--rounds`` rounds of ``--per-round`` forced PD splits
(prompt lengths cycling through ``--sizes``, 2 output tokens each), one at a time, and after each round (once
the cluster is idle: no request, no held block) reads every worker's VmRSS. A worker that leaked per request
would grow by about the same amount every round; one that caches (allocator pools, per-shape workspaces)
grows in the first rounds and then stays flat.

Usage: python -m bench.vllm_rss [--rounds 8] [--per-round 12] [--sizes 1000,2000,4000] [--out DIR]
Prints a table (MiB per worker per round, growth over the first and the second half of the rounds) and
writes ``rss.json`` and ``rss.png`` into ``--out`` (default results/vllm_rss).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
from pathlib import Path
from typing import Any

from bench.bench_vllm import (
    SIDE_PORT_WIDE,
    WIDE_KV_CACHE_BYTES,
    WIDE_MAX_MODEL_LEN,
    build_wide_model,
    make_cluster,
    one_request,
    proc_mem_kib,
    prompt_ids,
    wait_idle,
)


async def measure(rounds: int, per_round: int, sizes: list[int]) -> dict[str, Any]:
    """RSS (KiB) of each worker when idle at start-up and after each round; plus the split kinds seen."""
    from tqdm import tqdm

    from dynaserve.client import DynaServeClient

    cluster = make_cluster(
        False, engine="vllm", model_dir=str(build_wide_model()), workers=2, policy="dynaserve",
        side_channel_base_port=SIDE_PORT_WIDE, tbt_slo_ms=10000.0, ttft_slo_ms=60000.0, ready_timeout_s=300.0,
        broker_args=["--allow-forced-splits"],
        worker_args=["--vllm-max-model-len", str(WIDE_MAX_MODEL_LEN), "--vllm-kv-cache-bytes",
                     str(WIDE_KV_CACHE_BYTES), "--vllm-max-num-batched-tokens", "4096"],
    )
    workers = ("w0", "w1")
    out: dict[str, Any] = {"rounds": [], "roles": {w: {"a": 0, "b": 0} for w in workers}, "errors": []}
    try:
        cluster.start()
        await cluster.wait_ready(300.0)

        def sample(label: str, done: int) -> None:
            out["rounds"].append({"label": label, "requests": done,
                                  "rss_kib": {w: proc_mem_kib(cluster.procs[w].pid)[0] for w in workers}})

        sample("idle", 0)
        done, seed = 0, 9000
        async with DynaServeClient(cluster.client_addr) as client:
            with tqdm(total=rounds * per_round, desc="vllm_rss", unit="split") as bar:
                for r in range(rounds):
                    for k in range(per_round):
                        p = sizes[k % len(sizes)]
                        seed += 1
                        run = await one_request(client, prompt_ids(p, seed), 2, p)
                        if run.kind != "pd" or len(run.token_ts) != 2:
                            out["errors"].append(f"p={p}: kind {run.kind}, {len(run.token_ts)} tokens")
                        for role, iid in (("a", run.a), ("b", run.b)):
                            if iid in out["roles"]:
                                out["roles"][iid][role] += 1
                        done += 1
                        bar.update(1)
                    await wait_idle(cluster.client_addr, 60)
                    sample(f"round {r + 1}", done)
    finally:
        cluster.stop()
    return out


def report(res: dict[str, Any]) -> str:
    rows = res["rounds"]
    workers = sorted(rows[0]["rss_kib"])
    roles = res["roles"]
    head = " | ".join(f"{w} (A {roles[w]['a']}, B {roles[w]['b']}) MiB" for w in workers)
    lines = [f"| after | requests | {head} |", "|---|---|" + "---|" * len(workers)]
    for row in rows:
        lines.append(f"| {row['label']} | {row['requests']} | "
                     + " | ".join(f"{row['rss_kib'][w] / 1024:,.0f}" for w in workers) + " |")
    rounds = rows[1:]
    if len(rounds) >= 2:
        half = len(rounds) // 2
        for w in workers:
            first = (rounds[half - 1]["rss_kib"][w] - rows[0]["rss_kib"][w]) / 1024
            second = (rounds[-1]["rss_kib"][w] - rounds[half - 1]["rss_kib"][w]) / 1024
            lines.append(f"\n{w}: +{first:,.0f} MiB from idle over rounds 1-{half}, "
                         f"{second:+,.0f} MiB over rounds {half + 1}-{len(rounds)}")
    if res["errors"]:
        lines.append("\nerrors: " + "; ".join(res["errors"]))
    return "\n".join(lines)


def plot(res: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = res["rounds"]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    roles = res["roles"]
    for w in sorted(rows[0]["rss_kib"]):
        label = f"{w} (A of {roles[w]['a']}, B of {roles[w]['b']})"
        ax.plot([r["requests"] for r in rows], [r["rss_kib"][w] / 1024 for r in rows], marker="o", label=label)
    ax.set_xlabel("PD splits served")
    ax.set_ylabel("VmRSS (MiB)")
    ax.set_title("vLLM worker RSS under repeated handoffs")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=8)
    ap.add_argument("--per-round", type=int, default=12)
    ap.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")], default=[1000, 2000, 4000])
    ap.add_argument("--out", default="results/vllm_rss")
    args = ap.parse_args(argv)
    if args.rounds < 1 or args.per_round < 1 or not args.sizes or max(args.sizes) > 4000 or min(args.sizes) < 2:
        ap.error("--rounds and --per-round must be >= 1, --sizes between 2 and 4000")
    res = asyncio.run(measure(args.rounds, args.per_round, args.sizes))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "rss.json").write_text(json.dumps(res, indent=1))
    plot(res, out / "rss.png")
    print(report(res))
    print(f"\nrss.json and rss.png in {out}/")
    return 1 if res["errors"] else 0


if __name__ == "__main__":
    sys.exit(main())

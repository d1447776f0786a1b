"""Bounded-time soak run: mixed open-loop load on a local simulated-engine cluster while workers are killed.

A seeded open-loop load (Poisson arrivals; prompts of 32-512 tokens, 16-300 output tokens, ``ignore_eos``)
mixes unsplit requests, requests the policy plans itself and forced prompt / prefill-decode / decode splits,
so KV handoffs are in flight all the time. Every ``--kill-every`` seconds a random worker is killed with
SIGKILL and restarted after ``--restart-delay`` seconds, so the cluster stays at strength. When the load
stops, the run waits for every stream to end and the cluster to drain, then checks:

- tokens lost: every completed stream must equal the failure-free greedy tokens of the simulated engine
  (``reference_tokens``); a wrong, duplicated or missing token counts;
- hung requests: streams that did not end within ``--request-timeout`` seconds;
- leaks: after the drain every instance must report no used KV, no held block and no active request;

and reports the broker's ``replanned`` / ``kv_recomputes`` counters and P50/P99 TTFT and TBT overall, for
requests in flight within ``--recovery-window`` seconds after a kill (recovery) and for the rest (steady).

Usage::

    python -m bench.soak [--duration 120] [--kill-every 15] [--rate 3] [--seed 0] [--out results/soak]

Exit status 0 when no token was lost, nothing hung and nothing leaked; 1 otherwise.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import math
import random
import signal
import sys
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.report import write_records
from dynaserve.client import DynaServeClient
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.errors import BrokerUnavailableError, DynaServeError
from dynaserve.metrics import RequestRecord, is_completed, summarize
from workers.engines.sim import reference_tokens

KINDS = ("none", "auto", "prompt", "pd", "decode")
"""Request mix: forced no split, the policy's own choice, forced prompt / PD / decode-handoff splits."""

KIND_WEIGHTS = (0.25, 0.15, 0.2, 0.2, 0.2)

LEAK_KEYS = ("kv_used_tokens", "held_blocks", "active_requests")


@dataclass(frozen=True)
class SoakConfig:
    """Settings of one soak run (the command-line flags)."""

    duration_s: float = 120.0  # how long new requests are sent
    kill_every_s: float = 15.0  # a random worker is SIGKILLed this often
    restart_delay_s: float = 2.0  # a killed worker is started again after this long
    rate: float = 3.0  # mean request arrival rate (req/s, Poisson)
    workers: int = 4  # simulated-engine workers
    policy: str = "dynaserve"  # global scheduling policy
    seed: int = 0  # seeds the load and the choice of victims
    prompt_min: int = 32
    prompt_max: int = 512
    output_min: int = 16
    output_max: int = 300
    request_timeout_s: float = 90.0  # a stream not ended after this long counts as hung
    drain_timeout_s: float = 45.0  # after the load: how long the cluster may take to free everything
    recovery_window_s: float = 3.0  # requests in flight this long after a kill count as "recovery"
    worker_timeout_ms: int = 800  # broker: a worker silent this long is declared dead
    out: str = "results/soak"


@dataclass
class Outcome:
    """What one request asked for and what its stream delivered."""

    req_id: str
    kind: str  # requested split kind (see KINDS)
    prompt: list[int]
    max_tokens: int
    force_split: int | None
    arrival_s: float
    submit_ts: float = 0.0
    end_ts: float = math.nan
    tokens: list[int] = field(default_factory=list)
    token_ts: list[float] = field(default_factory=list)
    finish: str | None = None
    error: str | None = None  # error code of a failed request
    error_message: str = ""
    hung: bool = False
    planned_kind: str | None = None  # first plan the broker announced
    split: int | None = None
    instance_a: str | None = None
    instance_b: str | None = None
    replans_seen: int = 0  # further plans the client was told about
    mismatches: int = 0  # wrong + missing + extra tokens against the reference

    @property
    def completed(self) -> bool:
        return self.error is None and not self.hung and self.finish not in (None, "abort", "error")


def token_mismatches(got: Sequence[int], want: Sequence[int], *, prefix_only: bool = False) -> int:
    """Positions where ``got`` differs from ``want`` plus the length difference (a duplicated or dropped token
    shifts the rest of the stream, so it shows as mismatches too). With ``prefix_only`` the stream may be
    shorter than the reference (a failed request): only the tokens it has are checked, and extra ones count."""
    wrong = sum(1 for a, b in zip(got, want, strict=False) if a != b)
    if prefix_only:
        return wrong + max(0, len(got) - len(want))
    return wrong + abs(len(got) - len(want))


def make_workload(cfg: SoakConfig) -> list[Outcome]:
    """The seeded open-loop request list (arrival offsets up to ``duration_s``)."""
    rng = random.Random(cfg.seed)
    out: list[Outcome] = []
    t = 0.0
    i = 0
    while True:
        t += rng.expovariate(cfg.rate)
        if t >= cfg.duration_s:
            return out
        p = rng.randint(cfg.prompt_min, cfg.prompt_max)
        o = rng.randint(cfg.output_min, cfg.output_max)
        kind = rng.choices(KINDS, KIND_WEIGHTS)[0]
        split: int | None
        if kind == "none":
            split = p + o
        elif kind == "auto":
            split = None
        elif kind == "prompt":
            split = rng.randint(1, p - 1)
        elif kind == "pd":
            split = p
        else:
            split = rng.randint(p + 1, p + o - 1)
        prompt = [rng.randrange(3, 32000) for _ in range(p)]
        out.append(Outcome(f"soak-{i}", kind, prompt, o, split, t))
        i += 1


async def run_request(client: DynaServeClient, oc: Outcome, timeout_s: float) -> None:
    """Send one request and read its stream to the end (or until ``timeout_s``, which marks it hung)."""
    oc.submit_ts = time.monotonic()
    stream = client.generate(oc.prompt, max_tokens=oc.max_tokens, ignore_eos=True, req_id=oc.req_id,
                             force_split=oc.force_split)
    seen_plan: Any = None

    async def read() -> None:
        nonlocal seen_plan
        async for tok in stream:
            oc.tokens.append(tok.token)
            oc.token_ts.append(tok.ts)
            adm = stream.admitted
            if adm is not None and adm is not seen_plan:
                if seen_plan is None:
                    oc.planned_kind, oc.split = adm.kind, adm.split
                    oc.instance_a, oc.instance_b = adm.instance_a, adm.instance_b
                else:
                    oc.replans_seen += 1
                seen_plan = adm

    try:
        async with stream:
            await asyncio.wait_for(read(), timeout_s)
        oc.finish = stream.finish_reason
    except TimeoutError:
        oc.hung = True
    except DynaServeError as exc:
        oc.error, oc.error_message = exc.code, str(exc)
    if oc.planned_kind is None and stream.admitted is not None:
        adm = stream.admitted
        oc.planned_kind, oc.split, oc.instance_a, oc.instance_b = adm.kind, adm.split, adm.instance_a, adm.instance_b
    oc.end_ts = time.monotonic()


async def killer(cluster: LocalCluster, cfg: SoakConfig, stop: asyncio.Event, kills: list[tuple[float, str]],
                 rng: random.Random) -> None:
    """SIGKILL a random worker every ``kill_every_s`` and start it again after ``restart_delay_s``."""
    while True:
        try:
            await asyncio.wait_for(stop.wait(), cfg.kill_every_s)
            return
        except TimeoutError:
            pass
        victim = rng.choice(cluster.instance_ids)
        kills.append((time.monotonic(), victim))
        await asyncio.to_thread(cluster.kill, victim, signal.SIGKILL)
        await asyncio.sleep(cfg.restart_delay_s)
        cluster.start_worker(victim)


async def drain(client: DynaServeClient, cluster: LocalCluster, timeout_s: float) -> tuple[float, Any]:
    """Wait until every worker is registered and idle; returns the seconds it took and the last status."""
    t0 = time.monotonic()
    want = set(cluster.instance_ids)
    st: Any = None
    while True:
        try:
            st = await client.status(timeout=2.0)
            loads = st.stats["instances"]
            if (want <= set(st.instances) and st.active == 0 and st.queued == 0
                    and all(all(v[k] == 0 for k in LEAK_KEYS) for v in loads.values())):
                return time.monotonic() - t0, st
        except BrokerUnavailableError:
            pass
        if time.monotonic() - t0 > timeout_s:
            return math.nan, st
        await asyncio.sleep(0.2)


def to_record(oc: Outcome, ttft_slo_ms: float, tbt_slo_ms: float) -> RequestRecord:
    finish = oc.finish if not oc.hung else None
    return RequestRecord(
        req_id=oc.req_id, arrival_s=oc.arrival_s, submit_ts=oc.submit_ts, prompt_tokens=len(oc.prompt),
        max_tokens=oc.max_tokens, token_ts=list(oc.token_ts), finish_reason=finish,
        error=oc.error or ("hung" if oc.hung else None), ttft_slo_ms=ttft_slo_ms, tbt_slo_ms=tbt_slo_ms,
        kind=oc.planned_kind, split=oc.split, instance_a=oc.instance_a, instance_b=oc.instance_b,
    )


def in_recovery(oc: Outcome, kills: Sequence[tuple[float, str]], window_s: float) -> bool:
    """True when the request was in flight at some time within ``window_s`` after a kill."""
    end = oc.end_ts if math.isfinite(oc.end_ts) else math.inf
    return any(oc.submit_ts < k + window_s and end > k for k, _ in kills)


def latency_rows(outcomes: Sequence[Outcome], kills: Sequence[tuple[float, str]], cfg: SoakConfig,
                 ttft_slo_ms: float, tbt_slo_ms: float) -> dict[str, dict[str, float]]:
    rec = {oc.req_id: to_record(oc, ttft_slo_ms, tbt_slo_ms) for oc in outcomes}
    groups = {
        "overall": list(outcomes),
        "recovery": [oc for oc in outcomes if in_recovery(oc, kills, cfg.recovery_window_s)],
        "steady": [oc for oc in outcomes if not in_recovery(oc, kills, cfg.recovery_window_s)],
    }
    rows: dict[str, dict[str, float]] = {}
    for name, ocs in groups.items():
        s = summarize([rec[oc.req_id] for oc in ocs], duration_s=cfg.duration_s)
        rows[name] = {"requests": s.n, "completed": s.completed, "ttft_p50_ms": s.ttft_p50_ms,
                      "ttft_p99_ms": s.ttft_p99_ms, "tbt_p50_ms": s.tbt_p50_ms, "tbt_p99_ms": s.tbt_p99_ms}
    return rows


def format_report(res: dict[str, Any]) -> str:
    """Plain-text tables of a result dict (see :func:`soak`)."""
    lines = ["| check | value |", "|---|---|"]
    counts = [
        ("requests sent", res["sent"]),
        ("completed", res["completed"]),
        ("failed", res["failed"]),
        *((f"  failed: {code}", n) for code, n in sorted(res["failed_by_code"].items())),
        ("hung (no end within timeout)", res["hung"]),
        ("tokens lost (completed)", res["tokens_lost"]),
        ("requests with wrong tokens", res["requests_with_wrong_tokens"]),
        ("wrong tokens before a failure", res["failed_prefix_mismatches"]),
        ("leaked KV tokens", res["leaked"]["kv_used_tokens"]),
        ("leaked held blocks", res["leaked"]["held_blocks"]),
        ("leaked active requests", res["leaked"]["active_requests"]),
        ("broker active / queued after drain", f"{res['broker_active']} / {res['broker_queued']}"),
        ("drain time (s)", _num(res["drain_s"], ".1f")),
        ("kills", len(res["kills"])),
        ("broker replanned", res["broker"].get("replanned")),
        ("broker kv_recomputes", res["broker"].get("kv_recomputes")),
        ("broker failed", res["broker"].get("failed")),
        ("split kinds planned", ", ".join(f"{k}={v}" for k, v in sorted(res["planned_kinds"].items()))),
    ]
    lines += [f"| {k} | {v} |" for k, v in counts]
    lines += ["", "| phase | requests | completed | TTFT P50 ms | TTFT P99 ms | TBT P50 ms | TBT P99 ms |",
              "|---|---:|---:|---:|---:|---:|---:|"]
    for name, r in res["latency"].items():
        lines.append(f"| {name} | {r['requests']} | {r['completed']} | {_num(r['ttft_p50_ms'])} | "
                     f"{_num(r['ttft_p99_ms'])} | {_num(r['tbt_p50_ms'])} | {_num(r['tbt_p99_ms'])} |")
    lines.append("")
    lines.append(f"verdict: {'PASS' if res['ok'] else 'FAIL'}")
    return "\n".join(lines)


def _num(v: float, fmt: str = ".1f") -> str:
    return "-" if isinstance(v, float) and math.isnan(v) else format(v, fmt)


async def soak(cfg: SoakConfig, cluster: LocalCluster) -> dict[str, Any]:
    """Run the load and the killer on a started cluster; returns the result dict."""
    outcomes = make_workload(cfg)
    rng = random.Random(cfg.seed + 1)
    kills: list[tuple[float, str]] = []
    stop = asyncio.Event()
    async with DynaServeClient(cluster.client_addr) as client:
        t0 = time.monotonic()
        kill_task = asyncio.create_task(killer(cluster, cfg, stop, kills, rng))
        tasks: list[asyncio.Task[None]] = []
        bar = tqdm(total=len(outcomes), desc="soak", unit="req", file=sys.stderr)
        done_count = 0

        def on_done(_: asyncio.Task[None]) -> None:
            nonlocal done_count
            done_count += 1
            bar.update(1)

        for oc in outcomes:
            delay = t0 + oc.arrival_s - time.monotonic()
            if delay > 0:
                await asyncio.sleep(delay)
            task = asyncio.create_task(run_request(client, oc, cfg.request_timeout_s))
            task.add_done_callback(on_done)
            tasks.append(task)
            bar.set_postfix(sent=len(tasks), kills=len(kills), refresh=False)
        rest = t0 + cfg.duration_s - time.monotonic()
        if rest > 0:
            await asyncio.sleep(rest)
        stop.set()
        await kill_task  # a restart in progress completes
        await asyncio.gather(*tasks)
        bar.close()
        drain_s, st = await drain(client, cluster, cfg.drain_timeout_s)

    completed = [oc for oc in outcomes if oc.completed]
    failed = [oc for oc in outcomes if not oc.completed and not oc.hung]
    for oc in outcomes:
        ref = reference_tokens(oc.prompt, oc.max_tokens)
        oc.mismatches = token_mismatches(oc.tokens, ref, prefix_only=not oc.completed)
    loads: dict[str, dict[str, int]] = st.stats["instances"] if st is not None else {}
    leaked = {k: sum(int(v.get(k, 0)) for v in loads.values()) for k in LEAK_KEYS}
    cc = cluster.config
    res: dict[str, Any] = {
        "config": cfg.__dict__,
        "run_dir": str(cluster.run_dir),
        "sent": len(outcomes),
        "completed": len(completed),
        "failed": len(failed),
        "failed_by_code": dict(Counter(oc.error or f"finish:{oc.finish}" for oc in failed)),
        "hung": sum(oc.hung for oc in outcomes),
        "hung_ids": [oc.req_id for oc in outcomes if oc.hung],
        "tokens_lost": sum(oc.mismatches for oc in completed),
        "requests_with_wrong_tokens": sum(1 for oc in completed if oc.mismatches),
        "wrong_token_ids": [oc.req_id for oc in completed if oc.mismatches],
        "failed_prefix_mismatches": sum(oc.mismatches for oc in failed),
        "leaked": leaked,
        "instances_after_drain": loads,
        "broker_active": st.active if st is not None else None,
        "broker_queued": st.queued if st is not None else None,
        "drain_s": drain_s,
        "kills": [[round(k - t0, 3), name] for k, name in kills],
        "broker": {k: v for k, v in (st.stats.items() if st is not None else ()) if k != "instances"},
        "planned_kinds": dict(Counter(oc.planned_kind or "unknown" for oc in outcomes)),
        "latency": latency_rows(outcomes, kills, cfg, cc.ttft_slo_ms, cc.tbt_slo_ms),
    }
    res["ok"] = (res["tokens_lost"] == 0 and res["failed_prefix_mismatches"] == 0 and res["hung"] == 0
                 and all(v == 0 for v in leaked.values()) and res["broker_active"] == 0
                 and math.isfinite(drain_s))
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "records.jsonl", (to_record(oc, cc.ttft_slo_ms, cc.tbt_slo_ms) for oc in outcomes))
    with (out / "requests.jsonl").open("w") as f:
        for oc in outcomes:
            f.write(json.dumps({
                "req_id": oc.req_id, "kind": oc.kind, "force_split": oc.force_split, "prompt_tokens": len(oc.prompt),
                "max_tokens": oc.max_tokens, "received": len(oc.tokens), "finish": oc.finish, "error": oc.error,
                "error_message": oc.error_message, "hung": oc.hung, "planned_kind": oc.planned_kind,
                "split": oc.split, "instance_a": oc.instance_a, "instance_b": oc.instance_b,
                "replans_seen": oc.replans_seen, "mismatches": oc.mismatches,
                "submit_s": round(oc.submit_ts - t0, 3), "end_s": round(oc.end_ts - t0, 3),
                "completed": is_completed(to_record(oc, cc.ttft_slo_ms, cc.tbt_slo_ms)),
            }) + "\n")
    (out / "summary.json").write_text(json.dumps(res, indent=2, default=str) + "\n")
    return res


def parse_args(argv: Sequence[str] | None) -> SoakConfig:
    d = SoakConfig()
    p = argparse.ArgumentParser(prog="python -m bench.soak", description=__doc__.split("\n\n")[0] if __doc__ else "")
    p.add_argument("--duration", type=float, default=d.duration_s, help="seconds of load (default %(default)s)")
    p.add_argument("--kill-every", type=float, default=d.kill_every_s, help="seconds between worker kills")
    p.add_argument("--restart-delay", type=float, default=d.restart_delay_s, help="seconds before a restart")
    p.add_argument("--rate", type=float, default=d.rate, help="mean arrival rate, req/s (Poisson)")
    p.add_argument("--workers", type=int, default=d.workers)
    p.add_argument("--policy", default=d.policy, choices=("colocate", "disagg", "dynaserve"))
    p.add_argument("--seed", type=int, default=d.seed)
    p.add_argument("--request-timeout", type=float, default=d.request_timeout_s,
                   help="seconds after which an unfinished stream counts as hung")
    p.add_argument("--drain-timeout", type=float, default=d.drain_timeout_s)
    p.add_argument("--recovery-window", type=float, default=d.recovery_window_s)
    p.add_argument("--worker-timeout-ms", type=int, default=d.worker_timeout_ms)
    p.add_argument("--out", default=d.out, help="folder for summary.json, records.jsonl, requests.jsonl")
    a = p.parse_args(argv)
    if a.duration <= 0 or a.kill_every <= 0 or a.rate <= 0:
        p.error("--duration, --kill-every and --rate must be > 0")
    return SoakConfig(
        duration_s=a.duration, kill_every_s=a.kill_every, restart_delay_s=a.restart_delay, rate=a.rate,
        workers=a.workers, policy=a.policy, seed=a.seed, request_timeout_s=a.request_timeout,
        drain_timeout_s=a.drain_timeout, recovery_window_s=a.recovery_window,
        worker_timeout_ms=a.worker_timeout_ms, out=a.out,
    )


def main(argv: Sequence[str] | None = None) -> int:
    cfg = parse_args(argv)
    ccfg = ClusterConfig(engine="sim", workers=cfg.workers, transport="ipc", http_port=0, policy=cfg.policy)
    cluster = LocalCluster(ccfg, broker_args=["--worker-timeout-ms", str(cfg.worker_timeout_ms),
                                              "--allow-forced-splits"])
    cluster.start()
    try:
        asyncio.run(cluster.wait_ready())
        res = asyncio.run(soak(cfg, cluster))
    finally:
        cluster.stop()
    print(format_report(res))
    print(f"\nlogs: {cluster.run_dir}   results: {cfg.out}/summary.json")
    return 0 if res["ok"] else 1


if __name__ == "__main__":
    sys.exit(main())

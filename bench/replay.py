"""Trace replay against a running DynaServe cluster, through the client SDK.

Open loop: request i is sent at its (scaled) trace arrival time whatever happened to earlier requests, and
its TTFT counts from that scheduled time, so a client that falls behind shows up as latency rather than
hiding it. Prompts are seeded random token ids of the trace's input length; every request asks for exactly
the trace's output length (ignore_eos). Raw per-token receive times go to ``records.jsonl``; the summary
table, ``summary.json`` and CDF plots are made by :mod:`bench.report`.

    python -m bench.replay --addr tcp://127.0.0.1:5555 --trace azure_conv --limit 200 --rate 4 --out results/run
"""

from __future__ import annotations

import argparse
import asyncio
import random
import sys
import time
from collections.abc import Sequence
from pathlib import Path

from tqdm import tqdm

from bench.report import make_report, write_records
from bench.traces import TraceRequest, load_trace, mean_rate, poisson_from_lengths, scale
from dynaserve.aio import run_event_loop
from dynaserve.client import DynaServeClient
from dynaserve.errors import DynaServeError
from dynaserve.metrics import RequestRecord, Summary


def prompt_tokens(n: int, seed: int, vocab: int = 32000) -> list[int]:
    """Seeded random prompt of ``n`` token ids (ids 0-2 are special and avoided)."""
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def fit_to_context(reqs: Sequence[TraceRequest], max_len: int) -> list[TraceRequest]:
    """Clip lengths so prompt + output fits a cluster's context (a small model serving a long trace):
    the output keeps at most a quarter of the context, the prompt the rest."""
    out = []
    for r in reqs:
        o = min(r.output_tokens, max(1, max_len // 4))
        p = min(r.input_tokens, max_len - o)
        out.append(TraceRequest(r.arrival_s, max(1, p), o))
    return out


async def replay(
    addr: str,
    reqs: Sequence[TraceRequest],
    *,
    ttft_slo_ms: float,
    tbt_slo_ms: float,
    seed: int = 0,
    vocab: int = 32000,
    timeout_s: float = 600.0,
    progress: bool = True,
    curve_dir: str = "",
    curve_name: str = "client",
) -> list[RequestRecord]:
    """Replay ``reqs`` open-loop; returns one record per request (errors recorded, never raised).
    ``curve_dir``: CURVE keys of a secured broker (client certificate ``clients/<curve_name>``)."""
    records: list[RequestRecord] = []
    bar = tqdm(total=len(reqs), desc="replay", unit="req", disable=not progress, file=sys.stderr)

    async with DynaServeClient(addr, curve_dir=curve_dir, curve_name=curve_name) as client:
        status = await client.status()  # fail fast when no broker answers
        vocab = int(status.stats.get("vocab_size", vocab))
        max_len = int(status.stats.get("max_model_len", 0))
        if max_len:
            reqs = fit_to_context(reqs, max_len)
        prompts = [prompt_tokens(r.input_tokens, seed * 1_000_003 + i, vocab) for i, r in enumerate(reqs)]
        t0 = time.monotonic() + 0.05

        async def one(i: int, r: TraceRequest) -> None:
            await asyncio.sleep(max(0.0, t0 + r.arrival_s - time.monotonic()))
            rec = RequestRecord(
                req_id=f"r{i}", arrival_s=r.arrival_s, submit_ts=t0 + r.arrival_s, prompt_tokens=r.input_tokens,
                max_tokens=r.output_tokens, ttft_slo_ms=ttft_slo_ms, tbt_slo_ms=tbt_slo_ms,
            )
            try:
                async with client.generate(prompts[i], max_tokens=r.output_tokens, ignore_eos=True) as stream:
                    await asyncio.wait_for(stream.collect(), timeout_s)
                    rec.token_ts = list(stream.token_ts)
                    rec.finish_reason = stream.finish_reason
                    if stream.admitted is not None:
                        rec.kind = stream.admitted.kind
                        rec.split = stream.admitted.split
                        rec.instance_a = stream.admitted.instance_a
                        rec.instance_b = stream.admitted.instance_b
            except DynaServeError as exc:
                rec.error = f"{exc.code}: {exc}"
            except TimeoutError:
                rec.error = f"timeout after {timeout_s} s"
            records.append(rec)
            bar.update(1)

        await asyncio.gather(*(one(i, r) for i, r in enumerate(reqs)))
    bar.close()
    records.sort(key=lambda rec: int(rec.req_id[1:]))
    return records


def build_requests(ns: argparse.Namespace) -> list[TraceRequest]:
    """The request list the flags describe (trace or lengths file, window, scaling)."""
    if ns.poisson_rate:
        reqs = poisson_from_lengths(ns.trace, ns.poisson_rate, ns.limit or 200, ns.seed)
    else:
        reqs = load_trace(ns.trace, limit=ns.limit, start_s=ns.start_s, duration_s=ns.duration_s)
    return scale(reqs, time_scale=ns.time_scale, rate=ns.rate, max_input=ns.max_input, max_output=ns.max_output,
                 token_scale=ns.token_scale)


def add_replay_args(p: argparse.ArgumentParser, slo_flags: bool = True) -> None:
    """Replay flags; ``slo_flags=False`` leaves --ttft-slo-ms/--tbt-slo-ms to the caller's own config."""
    g = p.add_argument_group("replay")
    g.add_argument("--trace", default="azure_conv",
                   help="trace name (azure_conv, azure_code, mooncake_conv) or a CSV/JSONL path; with "
                        "--poisson-rate a lengths file (sharegpt) (default: azure_conv)")
    g.add_argument("--limit", type=int, default=200, help="replay at most this many requests (default 200)")
    g.add_argument("--start-s", type=float, default=0.0, help="start this far into the trace")
    g.add_argument("--duration-s", type=float, default=None, help="replay only this much of the trace")
    g.add_argument("--rate", type=float, default=None, help="rescale arrivals to this mean rate (req/s)")
    g.add_argument("--time-scale", type=float, default=1.0, help="stretch (>1) or compress (<1) arrival times")
    g.add_argument("--poisson-rate", type=float, default=None,
                   help="ignore trace timing: Poisson arrivals at this rate over a lengths file")
    g.add_argument("--token-scale", type=float, default=1.0, help="multiply prompt and output lengths")
    g.add_argument("--max-input", type=int, default=8192, help="clip prompt lengths (default 8192)")
    g.add_argument("--max-output", type=int, default=1024, help="clip output lengths (default 1024)")
    if slo_flags:
        g.add_argument("--ttft-slo-ms", type=float, default=2000.0, help="TTFT SLO for attainment (default 2000)")
        g.add_argument("--tbt-slo-ms", type=float, default=100.0, help="TBT SLO, per-request P99 (default 100)")
    g.add_argument("--seed", type=int, default=0, help="prompt and Poisson seed")
    g.add_argument("--out", default="results/replay", help="output directory for records, summary, plots")
    g.add_argument("--label", default="run", help="label of this run in the report")


def run_replay(addr: str, ns: argparse.Namespace, curve_dir: str = "", curve_name: str = "client") -> Summary:
    """Replay per the flags, write records + report into ``ns.out``, return the summary."""
    reqs = build_requests(ns)
    if not reqs:
        raise SystemExit("the selected trace window holds no request")
    print(f"replaying {len(reqs)} requests at {mean_rate(reqs):.2f} req/s against {addr}", file=sys.stderr)
    records = run_event_loop(replay(addr, reqs, ttft_slo_ms=ns.ttft_slo_ms, tbt_slo_ms=ns.tbt_slo_ms, seed=ns.seed,
                                    curve_dir=curve_dir, curve_name=curve_name))
    out = Path(ns.out)
    out.mkdir(parents=True, exist_ok=True)
    write_records(out / "records.jsonl", records)
    summaries = make_report({ns.label: records}, out)
    print(f"records, summary.json and plots in {out}/", file=sys.stderr)
    return summaries[ns.label]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="dynaserve-replay", description=__doc__.split("\n\n")[0])
    p.add_argument("--addr", default="tcp://127.0.0.1:5555", help="broker client address")
    p.add_argument("--curve-dir", default="", help="CURVE key directory of a secured broker (default: off)")
    p.add_argument("--curve-name", default="client", help="client certificate name in the key directory")
    add_replay_args(p)
    ns = p.parse_args(argv)
    run_replay(ns.addr, ns, curve_dir=ns.curve_dir, curve_name=ns.curve_name)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

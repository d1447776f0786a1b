"""What the OpenAI-compatible HTTP front end costs: the same load through the client SDK directly and
through the front end, against one cluster in one run.

Each round runs ``--requests`` concurrent streams in a closed loop: a stream sends a request (seeded random
prompt of ``--prompt-tokens`` ids, exactly ``--output-tokens`` tokens: ignore_eos, greedy), reads it to
the end and sends the next, ``--per-stream`` times. The streams start spread over ``--ramp-s`` so their
requests run at staggered phases (a synchronized burst would make TTFT a function of where engine steps
happen to fall); each stream's first request is not counted. Rounds alternate between the two paths
(after one warm-up round of each, not counted), so both see the same cluster and any drift hits both.
The HTTP path sends the same token ids as the prompt and reads the server-sent events with aiohttp (one
event per token); the SDK path iterates the DynaServeClient stream. Both take a token's time when the
consumer sees it: TTFT from just before the request is sent to the first token, TBT every gap between two
consecutive tokens of a request.

    python -m bench.bench_frontend --requests 64 --prompt-tokens 256 --output-tokens 128 --rounds 3
"""

from __future__ import annotations

import argparse
import asyncio
import json
import socket
import sys
import time
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import aiohttp
import orjson

from bench.replay import prompt_tokens
from dynaserve.aio import run_event_loop
from dynaserve.client import DynaServeClient
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.metrics import percentile


@dataclass
class PathStats:
    """Raw timings of one path over all its counted rounds."""

    ttft_s: list[float] = field(default_factory=list)
    tbt_s: list[float] = field(default_factory=list)
    tokens: int = 0
    requests: int = 0

    def add(self, t_submit: float, token_ts: list[float]) -> None:
        self.requests += 1
        self.tokens += len(token_ts)
        if token_ts:
            self.ttft_s.append(token_ts[0] - t_submit)
            self.tbt_s.extend(b - a for a, b in zip(token_ts, token_ts[1:], strict=False))

    def row(self) -> dict[str, float]:
        return {
            "ttft_p50_ms": percentile(self.ttft_s, 50) * 1e3, "ttft_p99_ms": percentile(self.ttft_s, 99) * 1e3,
            "tbt_p50_ms": percentile(self.tbt_s, 50) * 1e3, "tbt_p99_ms": percentile(self.tbt_s, 99) * 1e3,
            "requests": self.requests, "tokens": self.tokens,
        }


class Senders:
    """How one request is sent and streamed: through the SDK or through the HTTP front end."""

    def __init__(self, client: DynaServeClient, session: aiohttp.ClientSession, url: str, model: str) -> None:
        self.client, self.session, self.url, self.model = client, session, url, model

    async def sdk(self, prompt: list[int], out_tokens: int) -> tuple[float, list[float]]:
        ts: list[float] = []
        t0 = time.monotonic()
        async with self.client.generate(prompt, max_tokens=out_tokens, ignore_eos=True) as stream:
            async for _ in stream:
                ts.append(time.monotonic())
        return t0, ts

    async def http(self, prompt: list[int], out_tokens: int) -> tuple[float, list[float]]:
        body = orjson.dumps({"model": self.model, "prompt": prompt, "max_tokens": out_tokens, "temperature": 0,
                             "stream": True, "ignore_eos": True})
        ts: list[float] = []
        t0 = time.monotonic()
        async with self.session.post(self.url, data=body, headers={"Content-Type": "application/json"}) as resp:
            if resp.status != 200:
                raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
            buf = b""
            async for data in resp.content.iter_any():
                now = time.monotonic()
                buf += data
                end = buf.rfind(b"\n\n") + 2
                if end >= 2:  # complete events: one per token, the finish event carries none
                    ts.extend([now] * buf.count(b'"finish_reason":null', 0, end))
                    buf = buf[end:]
        return t0, ts


async def run_round(send: Callable[[list[int], int], Awaitable[tuple[float, list[float]]]],
                    ns: argparse.Namespace, rnd: int, stats: PathStats | None) -> None:
    """``ns.requests`` closed-loop streams, started ``ramp_s / requests`` apart; each sends
    ``per_stream`` requests back to back. Requests after each stream's first are counted: by then all
    streams run, at staggered phases."""

    async def stream_loop(u: int) -> None:
        await asyncio.sleep(u * ns.ramp_s / ns.requests)
        for k in range(ns.per_stream):
            prompt = prompt_tokens(ns.prompt_tokens, ns.seed + rnd * 1_000_003 + u * 1000 + k)
            t0, ts = await send(prompt, ns.output_tokens)
            if len(ts) != ns.output_tokens:
                raise RuntimeError(f"a request got {len(ts)} tokens, expected {ns.output_tokens}")
            if stats is not None and k > 0:
                stats.add(t0, ts)

    await asyncio.gather(*(stream_loop(u) for u in range(ns.requests)))


async def run_bench(broker: str, http_url: str, model: str, ns: argparse.Namespace) -> dict[str, PathStats]:
    results = {"sdk": PathStats(), "http": PathStats()}
    connector = aiohttp.TCPConnector(limit=0)
    timeout = aiohttp.ClientTimeout(total=None, sock_read=120)
    async with DynaServeClient(broker) as client, aiohttp.ClientSession(connector=connector,
                                                                         timeout=timeout) as session:
        await client.status()
        paths = Senders(client, session, f"{http_url}/v1/completions", model)
        sends = {"sdk": paths.sdk, "http": paths.http}
        for rnd in range(ns.rounds + 1):  # round 0 warms both paths up and is not counted
            for name in (("sdk", "http") if rnd % 2 == 0 else ("http", "sdk")):
                t = time.monotonic()
                await run_round(sends[name], ns, rnd, results[name] if rnd > 0 else None)
                print(f"round {rnd} {name:4s} {time.monotonic() - t:6.2f} s", file=sys.stderr)
                await asyncio.sleep(ns.pause_s)
    return results


def format_table(results: dict[str, PathStats]) -> str:
    sdk, http = results["sdk"].row(), results["http"].row()
    keys = ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms")
    lines = ["| path | requests | TTFT P50 (ms) | TTFT P99 (ms) | TBT P50 (ms) | TBT P99 (ms) |",
             "|---|---|---|---|---|---|"]
    for name, row in (("SDK (ZeroMQ)", sdk), ("HTTP front end", http)):
        lines.append(f"| {name} | {row['requests']} | " + " | ".join(f"{row[k]:.2f}" for k in keys) + " |")
    lines.append("| HTTP / SDK | | " + " | ".join(f"{http[k] / sdk[k]:.3f}" for k in keys) + " |")
    return "\n".join(lines)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=64, help="concurrent streams (closed loop)")
    p.add_argument("--per-stream", type=int, default=4, help="requests each stream sends back to back per round")
    p.add_argument("--ramp-s", type=float, default=2.5, help="the streams start evenly spread over this time")
    p.add_argument("--prompt-tokens", type=int, default=256, help="prompt length of every request")
    p.add_argument("--output-tokens", type=int, default=128, help="output length of every request")
    p.add_argument("--rounds", type=int, default=3, help="counted rounds per path (after one warm-up round)")
    p.add_argument("--pause-s", type=float, default=0.5, help="pause between rounds")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--workers", type=int, default=2, help="workers of the cluster started here")
    p.add_argument("--policy", default="dynaserve", help="global policy of the cluster started here")
    p.add_argument("--engine", default="sim", help="worker engine of the cluster started here")
    p.add_argument("--broker", help="use this running broker (with --http) instead of starting a cluster")
    p.add_argument("--http", help="base URL of the running cluster's front end, e.g. http://127.0.0.1:8000")
    p.add_argument("--model", default="llama3-8b", help="model name the front end serves")
    p.add_argument("--out", help="write the raw summary as JSON here")
    ns = p.parse_args(argv)
    cluster = None
    if ns.broker and ns.http:
        broker, http_url = ns.broker, ns.http.rstrip("/")
    else:
        cluster = LocalCluster(ClusterConfig(workers=ns.workers, policy=ns.policy, engine=ns.engine,
                                             transport="ipc", http_port=_free_port(), model=ns.model))
        cluster.start()
        broker, http_url = cluster.client_addr, cluster.http_url or ""
    try:
        if cluster is not None:
            asyncio.run(cluster.wait_ready(60))
        results = run_event_loop(run_bench(broker, http_url, ns.model, ns))
    finally:
        if cluster is not None:
            cluster.stop()
    table = format_table(results)
    print(f"{ns.requests} concurrent streams (closed loop), prompt {ns.prompt_tokens} tokens, output "
          f"{ns.output_tokens} tokens, {ns.rounds} rounds per path")
    print(table)
    if ns.out:
        Path(ns.out).parent.mkdir(parents=True, exist_ok=True)
        Path(ns.out).write_text(json.dumps({"config": vars(ns), "sdk": results["sdk"].row(),
                                            "http": results["http"].row(), "table": table}, indent=2))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

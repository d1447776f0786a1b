"""Shared fixtures: real clusters (broker + worker processes over ZeroMQ) and request factories."""

from __future__ import annotations

import asyncio
import os
import random
import signal
import socket
import urllib.request
from collections.abc import Iterator

import pytest

from dynaserve.client import DynaServeClient, RequestStream
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.protocol import Admitted

os.environ.setdefault("UCX_NET_DEVICES", "lo")


def make_prompt(n: int, seed: int, vocab: int = 32000) -> list[int]:
    rng = random.Random(seed)
    return [rng.randrange(3, vocab) for _ in range(n)]


def start_cluster(policy: str, workers: int = 2, **kw: object) -> LocalCluster:
    broker_args = list(kw.pop("broker_args", []))  # type: ignore[arg-type]
    worker_args = list(kw.pop("worker_args", []))  # type: ignore[arg-type]
    kw.setdefault("http_port", 0)  # no HTTP front end unless a test asks for one (ports would collide)
    kw.setdefault("engine", "sim")  # the vLLM engine has its own end-to-end tests (tests/e2e)
    cfg = ClusterConfig(workers=workers, policy=policy, transport="ipc", **kw)  # type: ignore[arg-type]
    cluster = LocalCluster(cfg, broker_args=broker_args, worker_args=worker_args)
    cluster.start_ready()
    return cluster


async def instance_loads(cluster: LocalCluster) -> dict[str, dict]:
    async with DynaServeClient(cluster.client_addr) as c:
        return (await c.status()).stats["instances"]


async def collect_killing(cluster: LocalCluster, stream: RequestStream, after: int,
                          victim: str) -> tuple[list[int], Admitted]:
    """A stream's tokens, with its instance A or B (``victim``: "a" / "b") killed -9 once ``after`` arrived,
    and the placement it had then (a re-plan admits the rest anew)."""
    got: list[int] = []
    killed: Admitted | None = None
    async for tok in stream:
        got.append(tok.token)
        if len(got) == after:
            killed = stream.admitted
            assert killed is not None
            name = killed.instance_a if victim == "a" else killed.instance_b
            assert name is not None, killed
            cluster.kill(name, signal.SIGKILL)
    assert killed is not None, f"the stream ended after {len(got)} tokens, before the kill"
    return got, killed


async def wait_idle(cluster: LocalCluster, timeout: float = 10.0) -> dict[str, dict]:
    """Wait until every instance reports no request, no held block and no used KV; returns the loads."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    loads: dict[str, dict] = {}
    async with DynaServeClient(cluster.client_addr) as c:
        while loop.time() < deadline:
            st = await c.status()
            loads = st.stats["instances"]
            if st.active == 0 and all(
                v["active_requests"] == 0 and v["held_blocks"] == 0 and v["kv_used_tokens"] == 0
                for v in loads.values()
            ):
                return loads
            await asyncio.sleep(0.05)
    return loads


def free_base_port(n: int) -> int:
    """A port p such that p .. p+n-1 are free on 127.0.0.1."""
    rng = random.Random()
    for _ in range(200):
        base = rng.randrange(20000, 60000 - n)
        socks: list[socket.socket] = []
        try:
            for i in range(n):
                s = socket.socket()
                socks.append(s)
                s.bind(("127.0.0.1", base + i))
            return base
        except OSError:
            continue
        finally:
            for s in socks:
                s.close()
    raise RuntimeError("no free port range")


def metric_value(text: str, name: str, **labels: str) -> float:
    """Sum of the samples called ``name`` whose labels include ``labels``."""
    total, found = 0.0, False
    want = [f'{k}="{v}"' for k, v in labels.items()]
    for line in text.splitlines():
        if line.startswith("#") or not line.startswith(name):
            continue
        series, value = line.rsplit(" ", 1)
        if series.split("{", 1)[0] != name or not all(w in series for w in want):
            continue
        total += float(value)
        found = True
    assert found, f"metric {name} {labels} not found"
    return total


def scrape(url: str) -> str:
    """The body of a Prometheus endpoint."""
    with urllib.request.urlopen(url, timeout=10) as resp:
        return resp.read().decode()


@pytest.fixture(scope="module")
def forced_cluster() -> Iterator[LocalCluster]:
    """Two simulated workers; the broker honours forced split points."""
    cluster = start_cluster("dynaserve", broker_args=["--allow-forced-splits"])
    yield cluster
    cluster.stop()

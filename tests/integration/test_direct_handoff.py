"""Direct handoffs over real processes: A sends its StartDecode straight to B's handoff inbox as well as
through the broker; B starts on the first copy and drops the second, and the client's stream stays exact.
The workers' Prometheus counters say which copy started each B."""

from __future__ import annotations

import asyncio
from collections.abc import Iterator

import pytest
import zmq

from dynaserve import protocol as P
from dynaserve.client import DynaServeClient
from dynaserve.cluster import LocalCluster
from tests.conftest import (
    free_base_port,
    instance_loads,
    make_prompt,
    metric_value,
    scrape,
    start_cluster,
    wait_idle,
)
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration

# (split, kind) on a 64-token prompt with 24 output tokens: a prompt split, PD, a decode handoff
SPLITS = [(40, "prompt"), (64, "pd"), (70, "decode")]


def _cluster(direct: bool) -> LocalCluster:
    base = free_base_port(3)
    return start_cluster("dynaserve", metrics_base_port=base,
                         broker_args=["--allow-forced-splits", *([] if direct else ["--no-direct-handoff"])])


@pytest.fixture(scope="module")
def direct_cluster() -> Iterator[LocalCluster]:
    cluster = _cluster(direct=True)
    yield cluster
    cluster.stop()


def _starts(cluster: LocalCluster) -> dict[str, float]:
    """B micro-requests started, summed over the workers, by the copy of StartDecode that came first."""
    base = cluster.config.metrics_base_port
    texts = [scrape(f"http://127.0.0.1:{base + 1 + i}/metrics") for i in range(cluster.config.workers)]
    return {path: sum(metric_value(t, "dynaserve:worker_handoffs_started_total", path=path) for t in texts)
            for path in ("direct", "relay")}


async def _splits(cluster: LocalCluster, seed: int) -> None:
    async with DynaServeClient(cluster.client_addr) as c:
        for split, kind in SPLITS:
            prompt = make_prompt(64, seed=seed + split)
            async with c.generate(prompt, max_tokens=24, ignore_eos=True, force_split=split) as stream:
                assert await stream.collect() == reference_tokens(prompt, 24)
                assert stream.admitted is not None and stream.admitted.kind == kind
    loads = await wait_idle(cluster)
    assert all(v["held_blocks"] == 0 and v["kv_used_tokens"] == 0 for v in loads.values()), loads


def test_b_starts_on_a_direct_copy_and_streams_are_exact(direct_cluster: LocalCluster) -> None:
    before = _starts(direct_cluster)
    asyncio.run(_splits(direct_cluster, seed=100))
    after = _starts(direct_cluster)
    started = {path: after[path] - before[path] for path in after}
    # every B started once (the second copy was dropped, else the request would have failed), and A's
    # direct copy, one hop ahead of the broker's two, started at least one of them
    assert started["direct"] + started["relay"] == len(SPLITS), started
    assert started["direct"] >= 1, started


def test_handoff_inbox_survives_bad_frames_and_unknown_requests(direct_cluster: LocalCluster) -> None:
    """Garbage, a message type the inbox does not take, and a StartDecode for no request on that worker are
    dropped; the worker goes on serving handoffs."""
    loads = asyncio.run(instance_loads(direct_cluster))
    inbox = loads["w1"]["handoff_addr"]
    assert inbox.startswith("ipc://")
    ctx = zmq.Context()
    try:
        sock = ctx.socket(zmq.PUSH)
        sock.setsockopt(zmq.LINGER, 1000)
        sock.connect(inbox)
        sock.send(b"\xc1 not msgpack")
        sock.send_multipart([b"two", b"frames"])
        sock.send(P.encode(P.AbortMicro("1")))
        sock.send(P.encode(P.StartDecode("no-such-request", {}, 64, [5])))
        sock.close()
    finally:
        ctx.term()
    asyncio.run(_splits(direct_cluster, seed=200))
    direct_cluster.check_alive()
    log = direct_cluster.log("w1")
    assert "bad frame on the handoff inbox" in log and "Traceback" not in log


def test_relay_alone_when_direct_handoffs_are_off() -> None:
    cluster = _cluster(direct=False)
    try:
        loads = asyncio.run(instance_loads(cluster))
        assert all(v["handoff_addr"] for v in loads.values())  # the workers have inboxes; the broker names none
        asyncio.run(_splits(cluster, seed=300))
        assert _starts(cluster) == {"direct": 0.0, "relay": float(len(SPLITS))}
    finally:
        cluster.stop()

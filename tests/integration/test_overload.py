"""A flood of requests: admission control rejects the excess with a typed reason, everything admitted
completes correctly, and the broker's memory stays bounded."""

from __future__ import annotations

import asyncio

import pytest

from dynaserve.client import DynaServeClient
from dynaserve.errors import QueueFullError
from tests.conftest import make_prompt, start_cluster, wait_idle
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration


def _rss_kib(pid: int) -> int:
    with open(f"/proc/{pid}/status") as fh:
        for line in fh:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def test_flood_is_bounded_and_typed() -> None:
    cluster = start_cluster("dynaserve", workers=2, broker_args=["--max-queued", "16", "--max-active", "64"],
                            kv_capacity_tokens=4096)
    try:
        async def flood(c: DynaServeClient, n: int, seed: int) -> tuple[int, int]:
            prompts = [make_prompt(200, seed=seed + i) for i in range(n)]
            streams = [c.generate(p, max_tokens=20, ignore_eos=True) for p in prompts]
            ok = rejected = 0
            for prompt, stream in zip(prompts, streams, strict=True):
                try:
                    assert await asyncio.wait_for(stream.collect(), 60) == reference_tokens(prompt, 20)
                    ok += 1
                except QueueFullError:
                    rejected += 1
            return ok, rejected

        async def main() -> None:
            pid = cluster.procs["broker"].pid
            async with DynaServeClient(cluster.client_addr) as c:
                ok, rejected = await flood(c, 300, 0)
                assert ok >= 16 and rejected > 0 and ok + rejected == 300
                rss1 = _rss_kib(pid)
                ok2, rejected2 = await flood(c, 300, 1000)
                assert ok2 >= 16 and ok2 + rejected2 == 300
                rss2 = _rss_kib(pid)
                assert rss2 - rss1 < 20 * 1024, (rss1, rss2)  # a second flood does not grow the broker
                st = await c.status()
                assert st.queued == 0 and st.stats["rejected"] == rejected + rejected2
            await wait_idle(cluster, 30)

        asyncio.run(asyncio.wait_for(main(), 120))
    finally:
        cluster.stop()

"""Broker restart: clients with requests in flight get a clear error (no hang), workers re-register on their
own, and new requests are served."""

from __future__ import annotations

import asyncio
import signal

import pytest

from dynaserve.client import DynaServeClient
from dynaserve.errors import BrokerUnavailableError
from tests.conftest import make_prompt, start_cluster
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration


def test_broker_restart_fails_in_flight_requests_and_recovers() -> None:
    cluster = start_cluster("dynaserve", workers=2)
    try:
        async def main() -> None:
            async with DynaServeClient(cluster.client_addr, liveness_s=2.0) as c:
                stream = c.generate(make_prompt(64, seed=1), max_tokens=2000, ignore_eos=True)
                await stream.__anext__()
                cluster.kill("broker", signal.SIGKILL)
                await asyncio.sleep(0.5)
                cluster.start_broker()  # same addresses: clients and workers reconnect by themselves
                with pytest.raises(BrokerUnavailableError):
                    await asyncio.wait_for(stream.collect(), 20)
                for _ in range(100):  # workers re-register on their own
                    st = await c.status()
                    if sorted(st.instances) == ["w0", "w1"]:
                        break
                    await asyncio.sleep(0.1)
                assert sorted(st.instances) == ["w0", "w1"]
                prompt = make_prompt(40, seed=2)
                assert await c.generate(prompt, max_tokens=12, ignore_eos=True).collect() == reference_tokens(prompt, 12)
            loads = (await _status(cluster.client_addr)).stats["instances"]
            # the old broker's micro-requests were dropped by the workers when they re-registered
            assert all(v["active_requests"] == 0 and v["kv_used_tokens"] == 0 for v in loads.values()), loads

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        cluster.stop()


def test_silent_broker_ends_streams_with_an_error() -> None:
    cluster = start_cluster("dynaserve", workers=1)
    try:
        async def main() -> None:
            async with DynaServeClient(cluster.client_addr, liveness_s=1.0) as c:
                stream = c.generate(make_prompt(32, seed=3), max_tokens=2000, ignore_eos=True)
                await stream.__anext__()
                cluster.kill("broker", signal.SIGSTOP)  # alive but silent
                try:
                    with pytest.raises(BrokerUnavailableError):
                        await asyncio.wait_for(stream.collect(), 10)
                finally:
                    cluster.kill("broker", signal.SIGCONT)

        asyncio.run(asyncio.wait_for(main(), 30))
    finally:
        cluster.stop()


async def _status(addr: str):  # noqa: ANN202 - test helper
    async with DynaServeClient(addr) as c:
        for _ in range(50):
            st = await c.status()
            if st.active == 0 and all(v["active_requests"] == 0 for v in st.stats["instances"].values()):
                return st
            await asyncio.sleep(0.1)
        return st


def test_cluster_restart_brings_a_dead_worker_back() -> None:
    cluster = start_cluster("colocate", workers=2, broker_args=["--worker-timeout-ms", "600"])
    try:
        cluster.kill("w1", signal.SIGKILL)
        assert cluster.dead() == ["w1"]
        cluster.restart("w1")

        async def main() -> None:
            await cluster.wait_ready(30)
            prompt = make_prompt(24, seed=5)
            async with DynaServeClient(cluster.client_addr) as c:
                assert await c.generate(prompt, max_tokens=6, ignore_eos=True).collect() == reference_tokens(prompt, 6)

        asyncio.run(main())
        assert cluster.dead() == []
    finally:
        cluster.stop()

"""kill -9 a worker mid-stream: the broker re-plans the request on a live instance, continuing from the
tokens the client already has, so the stream completes with exactly the failure-free greedy tokens."""

from __future__ import annotations

import asyncio

import pytest

from dynaserve.client import DynaServeClient
from tests.conftest import collect_killing, make_prompt, start_cluster, wait_idle
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration

P_LEN, O_LEN = 64, 300


@pytest.mark.parametrize(
    "split,victim,after",
    [
        (P_LEN + O_LEN, "a", 20),  # unsplit: its only instance dies while decoding
        (P_LEN + 150, "a", 20),  # decode handoff planned; A dies while it decodes, before the handoff
        (P_LEN + 5, "b", 40),  # B dies while it decodes after the handoff
        (P_LEN, "b", 1),  # classic PD; B dies right after A's handoff
    ],
    ids=["whole", "a-decoding", "b-decoding", "pd-at-handoff"],
)
def test_killed_worker_stream_completes_exactly(split: int, victim: str, after: int) -> None:
    cluster = start_cluster("dynaserve", workers=3, broker_args=[
        "--allow-forced-splits", "--worker-timeout-ms", "600", "--heartbeat-ms", "20"])
    try:
        async def main() -> None:
            prompt = make_prompt(P_LEN, seed=split)
            async with DynaServeClient(cluster.client_addr) as c:
                stream = c.generate(prompt, max_tokens=O_LEN, ignore_eos=True, force_split=split)
                got, _ = await collect_killing(cluster, stream, after, victim)
                assert got == reference_tokens(prompt, O_LEN)
                assert stream.finish_reason == "length"
                st = await c.status()
                assert st.stats["replanned"] >= 1 and st.stats["failed"] == 0
            loads = await wait_idle(cluster, 20)
            assert len(loads) == 2 and all(v["kv_used_tokens"] == 0 for v in loads.values()), loads

        asyncio.run(asyncio.wait_for(main(), 60))
    finally:
        cluster.stop()

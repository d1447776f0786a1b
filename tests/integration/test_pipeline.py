"""End to end over real processes and real ZeroMQ: broker + simulated-engine workers + the client SDK,
with KV handoffs through NIXL."""

from __future__ import annotations

import asyncio
import time

import msgpack
import pytest

from dynaserve import protocol as P
from dynaserve.client import DynaServeClient, RequestStream, SyncClient
from dynaserve.errors import (
    InvalidRequestError,
    MalformedRequestError,
    PromptTooLongError,
    ProtocolVersionError,
)
from tests.conftest import make_prompt, start_cluster, wait_idle
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration


async def _run(client: DynaServeClient, prompt: list[int], max_tokens: int, **kw: object) -> tuple[list[int], object]:
    async with client.generate(prompt, max_tokens=max_tokens, ignore_eos=True, **kw) as stream:
        toks = await stream.collect()
        assert stream.finish_reason == "length"
        assert len(stream.token_ts) == len(toks)
        return toks, stream.admitted


@pytest.mark.parametrize("policy", ["colocate", "disagg", "dynaserve"])
def test_concurrent_streams_each_policy(policy: str) -> None:
    cluster = start_cluster(policy, workers=3)
    try:
        async def main() -> None:
            async with DynaServeClient(cluster.client_addr) as c:
                reqs = [(make_prompt(20 + 37 * i % 400, seed=i), 5 + (i * 13) % 40) for i in range(40)]
                results = await asyncio.gather(*[_run(c, p, o) for p, o in reqs])
                kinds = set()
                for (prompt, o), (toks, adm) in zip(reqs, results, strict=True):
                    assert toks == reference_tokens(prompt, o)
                    kinds.add(adm.kind)
                if policy == "colocate":
                    assert kinds == {"none"}
                if policy == "disagg":
                    assert kinds == {"pd"}
            loads = await wait_idle(cluster)
            assert all(v["kv_used_tokens"] == 0 for v in loads.values()), loads

        asyncio.run(main())
    finally:
        cluster.stop()


@pytest.mark.parametrize(
    "split,kind",
    [(1, "prompt"), (17, "prompt"), (32, "prompt"), (63, "prompt"), (64, "pd"), (65, "decode"), (80, "decode"),
     (95, "decode"), (96, "decode"), (64 + 40, "none")],
)
def test_split_equals_unsplit(forced_cluster, split: int, kind: str) -> None:
    """Prompt of 64 tokens, 40 output tokens; block size 16 makes 16, 32, 64, 80, 96 block-aligned."""
    prompt = make_prompt(64, seed=split)

    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            toks, adm = await _run(c, prompt, 40, force_split=split)
            assert adm.kind == kind
            if kind != "none":
                assert adm.instance_b is not None and adm.instance_b != adm.instance_a
            assert toks == reference_tokens(prompt, 40)
        await wait_idle(forced_cluster)

    asyncio.run(main())


def test_abort_frees_both_workers(forced_cluster) -> None:
    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            # decode handoff far into a long output: abort while A decodes, and while B decodes
            streams = [c.generate(make_prompt(200, seed=i), max_tokens=400, ignore_eos=True, force_split=260)
                       for i in range(4)]
            got = [0] * 4
            for i, s in enumerate(streams):
                async for _ in s:
                    got[i] += 1
                    if got[i] >= (5 if i % 2 == 0 else 80):  # 5: still on A; 80: on B after the handoff
                        break
                await s.abort()
            assert all(g > 0 for g in got)
        loads = await wait_idle(forced_cluster)
        for inst, ld in loads.items():
            assert ld["active_requests"] == 0 and ld["held_blocks"] == 0 and ld["kv_used_tokens"] == 0, (inst, ld)

    asyncio.run(main())


def test_cancelling_the_iterating_task_aborts(forced_cluster) -> None:
    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            stream = c.generate(make_prompt(100, seed=7), max_tokens=1000, ignore_eos=True, force_split=100)

            async def consume() -> None:
                async for _ in stream:
                    pass

            task = asyncio.create_task(consume())
            await asyncio.sleep(0.5)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert stream.finish_reason == "abort"
        loads = await wait_idle(forced_cluster)
        assert all(v["active_requests"] == 0 for v in loads.values()), loads

    asyncio.run(main())


def test_bad_input_gets_errors_and_broker_keeps_serving(forced_cluster) -> None:
    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            # malformed frames: not msgpack, wrong shape, unknown type, wrong field types, extra frames
            for frames in ([b"\xc1\xc1"], [msgpack.packb({"a": 1})], [msgpack.packb([P.PROTOCOL_VERSION, 77])],
                           [msgpack.packb([P.PROTOCOL_VERSION, 10, "x", "notalist", [16]])], [b"a", b"b"]):
                c.send_raw(frames)
            await asyncio.sleep(0.2)
            with pytest.raises(PromptTooLongError):
                await c.generate(make_prompt(40000, seed=1), max_tokens=10).collect()
            with pytest.raises(InvalidRequestError):
                await c.generate([5, 40000000], max_tokens=3).collect()
            with pytest.raises(InvalidRequestError):
                await c.generate([5, 6], max_tokens=0).collect()
            with pytest.raises(InvalidRequestError):
                await c.generate([5, 6], max_tokens=3, slo_class="platinum").collect()
            prompt = make_prompt(30, seed=3)
            toks, _ = await _run(c, prompt, 8)
            assert toks == reference_tokens(prompt, 8)
            st = await c.status()
            assert st.stats["bad_frames"] >= 5

    asyncio.run(main())


def test_malformed_frame_gets_an_error_reply(forced_cluster) -> None:
    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            got: list[P.ErrorReply] = []
            orig = c._on_frames

            def spy(frames: list[bytes]) -> None:
                msg = P.decode(frames[0])
                if isinstance(msg, P.ErrorReply):
                    got.append(msg)
                orig(frames)

            c._chan.handler = spy  # type: ignore[union-attr]
            c.send_raw([msgpack.packb([P.PROTOCOL_VERSION, 10, "x", [1, "two"], [16]])])
            for _ in range(50):
                if got:
                    break
                await asyncio.sleep(0.02)
            assert got and got[0].code == "bad_field", got

    asyncio.run(main())


def test_wrong_protocol_version_is_refused(forced_cluster) -> None:
    async def main() -> None:
        async with DynaServeClient(forced_cluster.client_addr) as c:
            frame = msgpack.packb([P.PROTOCOL_VERSION + 1, P.SubmitRequest.TYPE, "r1", [5, 6], [4]])
            c.send_raw([frame])
            for _ in range(100):
                if c.connection_error is not None:
                    break
                await asyncio.sleep(0.02)
            assert isinstance(c.connection_error, ProtocolVersionError)
            assert "protocol version" in str(c.connection_error)
            with pytest.raises(ProtocolVersionError):
                await c.generate([5, 6], max_tokens=2).collect()

    asyncio.run(main())


def test_text_prompt_and_sync_client(forced_cluster) -> None:
    with SyncClient(forced_cluster.client_addr) as sc:
        toks = sc.generate("hello world", max_tokens=6, ignore_eos=True, timeout=30)
        assert toks == reference_tokens([b + 3 for b in b"hello world"], 6)
        streamed = [t.token for t in sc.stream([9, 10, 11], max_tokens=5, ignore_eos=True)]
        assert streamed == reference_tokens([9, 10, 11], 5)
        with pytest.raises(MalformedRequestError):
            # a field of the wrong type never reaches the scheduler
            sc._call(_send_bad(sc._client))


async def _send_bad(client: DynaServeClient) -> None:
    stream = RequestStream(client, "bad-1", time.monotonic())
    client._streams["bad-1"] = stream
    client.send_raw([msgpack.packb([P.PROTOCOL_VERSION, P.SubmitRequest.TYPE, "bad-1", [1, 2], [1, "hot"]])])
    await asyncio.wait_for(stream.collect(), 10)


def test_a_mixed_cluster_prices_each_instance_with_its_own_model() -> None:
    """Simulated workers on an A100 (w0) and an H100 (w1): each advertises its own cost-table model, the
    broker prices each with it, so the H100, which prefills about three times as fast, gets more of a burst of equal
    prompts (colocate: the least projected work). Every stream stays exact."""
    cluster = start_cluster("colocate", workers=2, gpu="a100,h100")
    try:
        async def main() -> None:
            async with DynaServeClient(cluster.client_addr) as c:
                loads = (await c.status()).stats["instances"]
                a100, h100 = loads["w0"]["priced_step_model"], loads["w1"]["priced_step_model"]
                assert 1.5 < a100[1] / h100[1] < 4  # b: ms per prefill token
                reqs = [(make_prompt(1000, seed=i), 4) for i in range(24)]
                results = await asyncio.gather(*[_run(c, p, o) for p, o in reqs])
                placed = {"w0": 0, "w1": 0}
                for (prompt, o), (toks, adm) in zip(reqs, results, strict=True):
                    assert toks == reference_tokens(prompt, o)
                    placed[adm.instance_a] += 1
                assert placed["w1"] > placed["w0"], placed
            await wait_idle(cluster)

        asyncio.run(main())
    finally:
        cluster.stop()

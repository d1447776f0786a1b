"""dynaserve.sockets.Channel with sends from a second thread (a worker's engine thread ships its own steps):
real ZeroMQ sockets in one process."""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
import zmq

from dynaserve.sockets import Channel, make_socket


@pytest.fixture
def pair():
    ctx = zmq.Context()
    router = make_socket(ctx, zmq.ROUTER, bind="inproc://chan-test")
    dealer = make_socket(ctx, zmq.DEALER, connect="inproc://chan-test", identity=b"d")
    yield router, dealer
    router.close(0)
    dealer.close(0)
    ctx.term()


async def _until(cond, timeout: float = 5.0) -> None:
    end = time.monotonic() + timeout
    while not cond():
        assert time.monotonic() < end, "timed out"
        await asyncio.sleep(0.005)


async def test_input_that_arrives_around_a_send_from_another_thread_is_drained(pair) -> None:
    """ZeroMQ's FD is edge-triggered: a send from another thread can consume the edge of a message that
    arrived meanwhile. The loop must still drain it (the sending thread hands the drain to the loop)."""
    router, dealer = pair
    got: list[list[bytes]] = []
    chan = Channel(dealer, got.append, "test", threadsafe=True)
    chan.attach()
    chan.send([b"hello"])
    ident, hello = router.recv_multipart()
    assert hello == b"hello"
    await asyncio.sleep(0.05)
    # the loop is blocked (no reader callback can run) while the peer's message arrives and another thread
    # sends, which processes ZeroMQ's pending commands and leaves the FD unreadable
    router.send_multipart([ident, b"M"])
    time.sleep(0.05)
    t = threading.Thread(target=chan.send, args=([b"from-thread"],))
    t.start()
    t.join()
    assert router.recv_multipart() == [ident, b"from-thread"]
    await _until(lambda: got == [[b"M"]])
    chan.close()


async def test_concurrent_sends_from_the_loop_and_a_thread_all_arrive_in_order(pair) -> None:
    router, dealer = pair
    got: list[list[bytes]] = []
    chan = Channel(dealer, got.append, "test", threadsafe=True)
    chan.attach()
    n = 2000

    def engine() -> None:
        for i in range(n):
            chan.send([b"t%d" % i])

    t = threading.Thread(target=engine)
    t.start()
    for i in range(n):
        chan.send([b"l%d" % i])
        if i % 100 == 0:
            router.send_multipart([b"d", b"in%d" % i])  # input keeps arriving meanwhile
            await asyncio.sleep(0)
    await asyncio.to_thread(t.join)
    seen: list[bytes] = []
    while len(seen) < 2 * n:
        assert await asyncio.to_thread(router.poll, 5000), f"only {len(seen)} of {2 * n} messages arrived"
        seen.append(router.recv_multipart()[1])
    for tag in (b"t", b"l"):
        assert [m for m in seen if m.startswith(tag)] == [b"%s%d" % (tag, i) for i in range(n)]
    await _until(lambda: len(got) == n // 100)
    assert got == [[b"in%d" % i] for i in range(0, n, 100)]
    chan.close()

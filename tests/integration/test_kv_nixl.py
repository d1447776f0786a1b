"""NixlTransport between two real processes: a spawned sender (A) and this process as the reader (B)."""

from __future__ import annotations

import multiprocessing as mp
import os
import signal
import time
import uuid
from collections.abc import Callable, Iterator
from multiprocessing.connection import Connection
from typing import Any

import msgpack
import numpy as np
import pytest

from workers.kv.base import KvTransferError, XferState
from workers.kv.nixl import NixlTransport, build_descriptors, merge_runs, nixl_available
from workers.kv.pool import KvBlockPool

pytestmark = pytest.mark.integration

if not nixl_available():  # pragma: no cover - depends on the machine
    pytest.skip(
        "nixl is not importable (install: pip install --no-deps nixl nixl-cu12)", allow_module_level=True
    )

NUM_BLOCKS = 64
BLOCK_TOKENS = 16
BYTES_PER_TOKEN = 256
BLOCK_BYTES = BLOCK_TOKENS * BYTES_PER_TOKEN
CALL_TIMEOUT_S = 30.0
XFER_TIMEOUT_S = 10.0


# --------------------------------------------------------------------------- sender process (A)
def _sender_main(conn: Connection, agent_name: str, err_mode: str, period: float) -> None:
    """A: own pool and transport; serves commands from the test over a pipe until told to stop.

    Between commands it makes progress (``confirmed()``) every ``period`` seconds, like a worker loop.
    """
    pool = KvBlockPool(NUM_BLOCKS, BLOCK_TOKENS, BYTES_PER_TOKEN)
    transport = NixlTransport(agent_name, ucx_error_handling=err_mode)
    transport.register_pool(pool)
    confirmed: list[str] = []
    conn.send(("ready", os.getpid()))
    try:
        while True:
            confirmed += transport.confirmed()  # drives progress, as a worker loop would
            if not conn.poll(period):
                continue
            cmd, *args = conn.recv()
            if cmd == "export":
                req_id, block_ids, num_tokens, seed = args
                data = np.random.default_rng(seed).integers(0, 256, (len(block_ids), BLOCK_BYTES), np.uint8)
                pool.buffer[block_ids] = data
                conn.send((transport.export(req_id, block_ids, num_tokens), data))
            elif cmd == "confirmed":
                (wait_for, timeout) = args
                deadline = time.monotonic() + timeout
                while wait_for not in confirmed and time.monotonic() < deadline:
                    confirmed += transport.confirmed()
                    time.sleep(0.001)
                conn.send(list(confirmed))
                confirmed.clear()
            elif cmd == "stop":
                break
    finally:
        transport.close()
        conn.send(("stopped",))


class Sender:
    """Test-side handle of a sender process."""

    def __init__(self, agent_name: str, err_mode: str, period: float) -> None:
        ctx = mp.get_context("spawn")
        self.name = agent_name
        self.conn, child = ctx.Pipe()
        self.proc = ctx.Process(target=_sender_main, args=(child, agent_name, err_mode, period), daemon=True)
        self.proc.start()
        child.close()
        tag, self.pid = self._recv()
        assert tag == "ready"

    def _recv(self, timeout: float = CALL_TIMEOUT_S) -> Any:
        if not self.conn.poll(timeout):
            raise TimeoutError(f"sender {self.name} did not answer within {timeout}s")
        return self.conn.recv()

    def export(
        self, req_id: str, block_ids: list[int], num_tokens: int, seed: int
    ) -> tuple[dict, np.ndarray]:
        self.conn.send(("export", req_id, block_ids, num_tokens, seed))
        return self._recv()

    def confirmed(self, wait_for: str, timeout: float = 5.0) -> list[str]:
        self.conn.send(("confirmed", wait_for, timeout))
        return self._recv(timeout + CALL_TIMEOUT_S)

    def stop(self) -> None:
        if self.proc.is_alive():
            self.conn.send(("stop",))
            assert self._recv() == ("stopped",)
        self.proc.join(CALL_TIMEOUT_S)

    def kill(self) -> None:
        os.kill(self.pid, signal.SIGKILL)
        self.proc.join(CALL_TIMEOUT_S)
        assert not self.proc.is_alive()


@pytest.fixture
def err_mode() -> str:
    """UCX error handling mode of both ends; tests that matter in both modes parametrize it."""
    return "none"


@pytest.fixture
def spawn_sender(err_mode: str) -> Iterator[Callable[..., Sender]]:
    started: list[Sender] = []

    def spawn(name: str | None = None, period: float = 0.001) -> Sender:
        sender = Sender(name or f"kv-a-{uuid.uuid4().hex[:8]}", err_mode, period)
        started.append(sender)
        return sender

    yield spawn
    for sender in started:
        if sender.proc.is_alive():
            sender.proc.kill()
        sender.proc.join(CALL_TIMEOUT_S)


# --------------------------------------------------------------------------- reader (B, this process)
@pytest.fixture
def reader(err_mode: str) -> Iterator[tuple[NixlTransport, KvBlockPool]]:
    pool = KvBlockPool(NUM_BLOCKS, BLOCK_TOKENS, BYTES_PER_TOKEN)
    transport = NixlTransport(f"kv-b-{uuid.uuid4().hex[:8]}", ucx_error_handling=err_mode)
    transport.register_pool(pool)
    yield transport, pool
    assert transport.num_inflight == 0, "a transfer handle was leaked"
    transport.close()


def wait_finished(
    transport: NixlTransport, xfer_id: int, timeout: float = XFER_TIMEOUT_S
) -> XferState | None:
    """Poll until DONE/FAILED; None if the deadline passed first."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = transport.poll(xfer_id)
        if state.finished:
            return state
    return None


def read_all(transport: NixlTransport, params: dict, local: list[int]) -> XferState | None:
    xfer_id = transport.start_read(str(params["notif"], "ascii"), params, local)
    try:
        return wait_finished(transport, xfer_id)
    finally:
        transport.release(xfer_id)


# Remote ids: runs 2-5 and 17-18 plus single blocks; local ids are laid out differently.
REMOTE_IDS = [2, 3, 4, 5, 9, 17, 18, 30]
LOCAL_IDS = [40, 41, 7, 8, 9, 0, 50, 33]
NUM_TOKENS = len(REMOTE_IDS) * BLOCK_TOKENS - 5


def test_merge_runs_needs_both_sides_consecutive() -> None:
    assert merge_runs(REMOTE_IDS, LOCAL_IDS) == [
        (2, 40, 2),
        (4, 7, 2),
        (9, 9, 1),
        (17, 0, 1),
        (18, 50, 1),
        (30, 33, 1),
    ]


@pytest.mark.parametrize("n", [1, 5, 32, 33, 500])
def test_descriptor_paths_agree(n: int) -> None:
    """The plain-Python path (small lists) and the numpy path build the same descriptors."""
    rng = np.random.default_rng(n)
    remote = np.sort(rng.choice(4 * n + 8, n, replace=False))
    local = rng.permutation(n) if n % 2 else np.arange(100, 100 + n)
    base_r, base_l, bb = 1 << 40, 1 << 41, 4096
    r_py, l_py = build_descriptors(remote.tolist(), local.tolist(), base_r, base_l, bb)
    r_np, l_np = build_descriptors(remote, local, base_r, base_l, bb)
    if n <= 32:  # lists this short take the Python path
        np.testing.assert_array_equal(r_py, r_np)
        np.testing.assert_array_equal(l_py, l_np)
    runs = merge_runs(remote, local)
    assert len(r_np) == len(runs) and int(r_np[:, 1].sum()) == n * bb
    for (ra, la, k), r_row, l_row in zip(runs, r_np, l_np, strict=True):
        assert (int(r_row[0]), int(l_row[0]), int(r_row[1])) == (base_r + ra * bb, base_l + la * bb, k * bb)


@pytest.mark.parametrize("err_mode", ["none", "peer"])
def test_read_scattered_blocks_verified_and_confirmed(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool]
) -> None:
    transport, pool = reader
    sender = spawn_sender()
    for round_, local in enumerate([LOCAL_IDS, [60, 61, 62, 63, 1, 2, 3, 4]]):  # second read reuses the peer
        req_id = f"req-{round_}"
        params, expected = sender.export(req_id, REMOTE_IDS, NUM_TOKENS, seed=round_)
        params = msgpack.unpackb(msgpack.packb(params))  # what the dispatch message carries
        assert params["agent"] == sender.name and params["notif"] == req_id.encode()
        assert isinstance(params["meta"], bytes) and params["block_ids"] == REMOTE_IDS
        pool.buffer[:] = 0
        xfer_id = transport.start_read(req_id, params, local)
        assert transport.transfer_info(xfer_id)["nbytes"] == len(REMOTE_IDS) * BLOCK_BYTES
        assert wait_finished(transport, xfer_id) is XferState.DONE
        assert transport.poll(xfer_id) is XferState.DONE  # stays DONE
        transport.release(xfer_id)
        np.testing.assert_array_equal(pool.buffer[local], expected)
        untouched = np.setdiff1d(np.arange(NUM_BLOCKS), local)
        assert not pool.buffer[untouched].any()
        assert req_id in sender.confirmed(req_id)
    sender.stop()


def test_bad_params_raise_and_leave_transport_usable(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool]
) -> None:
    transport, pool = reader
    sender = spawn_sender()
    params, expected = sender.export("good", REMOTE_IDS, NUM_TOKENS, seed=7)
    # Connect once so that the bad-metadata case below hits a cached peer.
    assert read_all(transport, params, LOCAL_IDS) is XferState.DONE

    def bad(**changes: Any) -> dict:
        out = dict(params)
        for key, value in changes.items():
            if value is None:
                out.pop(key)
            else:
                out[key] = value
        return out

    cases: list[tuple[Any, list[int]]] = [
        (params, LOCAL_IDS[:-1]),  # wrong block count
        (bad(block_ids=REMOTE_IDS[:-1]), LOCAL_IDS),  # wrong block count, other side
        (bad(meta=os.urandom(422)), LOCAL_IDS),  # garbage metadata for a known peer
        (bad(meta=b"\x00garbage", agent="kv-nobody"), LOCAL_IDS),  # garbage metadata, unknown peer
        (bad(meta=b""), LOCAL_IDS),
        (bad(meta="text"), LOCAL_IDS),
        (bad(agent=None), LOCAL_IDS),
        (bad(agent=transport.name), LOCAL_IDS),
        (bad(notif=None), LOCAL_IDS),
        (bad(block_ids=None), LOCAL_IDS),
        (bad(block_ids=[str(b) for b in REMOTE_IDS]), LOCAL_IDS),
        (bad(block_ids=[-1] + REMOTE_IDS[1:]), LOCAL_IDS),
        (bad(block_ids=[3] + REMOTE_IDS[1:]), LOCAL_IDS),  # duplicate id
        (bad(block_ids=[NUM_BLOCKS + 100] + REMOTE_IDS[1:]), LOCAL_IDS),  # beyond A's registered pool
        (bad(block_bytes=BLOCK_BYTES * 2), LOCAL_IDS),
        (bad(block_bytes="4096"), LOCAL_IDS),
        (bad(num_tokens=NUM_TOKENS + 64), LOCAL_IDS),
        (bad(num_tokens=True), LOCAL_IDS),
        (bad(base_addr=0), LOCAL_IDS),
        (bad(base_addr=2**64 - 1), LOCAL_IDS),
        (params, [*LOCAL_IDS[:-1], NUM_BLOCKS]),  # local id out of range
        (params, [*LOCAL_IDS[:-1], LOCAL_IDS[0]]),  # local id twice
        (params, []),
        ("not a dict", LOCAL_IDS),
    ]
    for i, (case_params, local) in enumerate(cases):
        try:
            xfer_id = transport.start_read(f"bad-{i}", case_params, local)
        except KvTransferError:
            continue
        transport.release(xfer_id)
        pytest.fail(f"bad params case {i} was accepted")
    assert transport.num_inflight == 0

    # The peer still works after all of that.
    pool.buffer[:] = 0
    assert read_all(transport, params, [10, 11, 12, 13, 14, 15, 16, 17]) is XferState.DONE
    np.testing.assert_array_equal(pool.buffer[10:18], expected)
    sender.stop()


@pytest.mark.parametrize("err_mode", ["none", "peer"])
@pytest.mark.parametrize("connected_before", [True, False], ids=["cached-peer", "new-peer"])
def test_killed_peer_fails_instead_of_hanging(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool], connected_before: bool
) -> None:
    transport, _ = reader
    sender = spawn_sender()
    params, _ = sender.export("doomed", REMOTE_IDS, NUM_TOKENS, seed=3)
    if connected_before:
        assert read_all(transport, params, LOCAL_IDS) is XferState.DONE
    sender.kill()
    started = time.monotonic()
    try:
        xfer_id = transport.start_read("doomed", params, LOCAL_IDS)
    except KvTransferError:
        outcome: XferState | None = XferState.FAILED
    else:
        outcome = wait_finished(transport, xfer_id, timeout=5.0)  # None: timed out in our bounded loop
        transport.release(xfer_id)
    assert outcome is not XferState.DONE
    assert time.monotonic() - started < 10.0


def test_restarted_peer_with_same_name_is_reloaded(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool]
) -> None:
    transport, pool = reader
    name = f"kv-a-{uuid.uuid4().hex[:8]}"
    first = spawn_sender(name)
    params1, _ = first.export("r1", REMOTE_IDS, NUM_TOKENS, seed=1)
    assert read_all(transport, params1, LOCAL_IDS) is XferState.DONE
    first.stop()

    second = spawn_sender(name)
    params2, expected = second.export("r2", REMOTE_IDS, NUM_TOKENS, seed=2)
    assert params2["meta"] != params1["meta"]
    pool.buffer[:] = 0
    assert read_all(transport, params2, LOCAL_IDS) is XferState.DONE
    np.testing.assert_array_equal(pool.buffer[LOCAL_IDS], expected)
    assert "r2" in second.confirmed("r2")
    second.stop()


def test_release_in_flight_and_unknown_ids(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool]
) -> None:
    transport, _ = reader
    sender = spawn_sender()
    params, _ = sender.export("abort", REMOTE_IDS, NUM_TOKENS, seed=5)
    xfer_id = transport.start_read("abort", params, LOCAL_IDS)
    transport.release(xfer_id)  # whatever its state, releasing must not raise or leak
    with pytest.raises(KvTransferError):
        transport.poll(xfer_id)
    with pytest.raises(KvTransferError):
        transport.release(xfer_id)
    sender.stop()


def test_reads_do_not_wait_for_a_slow_sender(
    spawn_sender: Callable[..., Sender], reader: tuple[NixlTransport, KvBlockPool]
) -> None:
    """With the default settings a READ does not wait for the sender's loop to make progress."""
    transport, pool = reader
    sender = spawn_sender(period=0.5)  # A makes progress only every 0.5 s
    params, expected = sender.export("slow", REMOTE_IDS, NUM_TOKENS, seed=11)
    for _ in range(3):  # each read carries a notification that A has not yet picked up
        started = time.monotonic()
        assert read_all(transport, params, LOCAL_IDS) is XferState.DONE
        assert time.monotonic() - started < 0.25
    np.testing.assert_array_equal(pool.buffer[LOCAL_IDS], expected)
    assert "slow" in sender.confirmed("slow")
    sender.stop()

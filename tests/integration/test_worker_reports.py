"""Who sends a worker's load reports (heartbeats): the event loop on its timer, or, while an engine that ships
its own steps runs a burst, the engine's thread after its steps, with the loop as a fallback during a long step.

A real Worker shell on a real ZeroMQ connection to a stand-in broker (a ROUTER in this test); the engine is a
stand-in that runs scripted bursts on its own thread, the way the vLLM engine does."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Callable
from pathlib import Path

import zmq

from dynaserve import protocol as P
from workers.engine import EngineInfo, EngineLoad, StepOutput
from workers.server import BURST_REPORT_FALLBACK, Worker, WorkerConfig

HEARTBEAT_MS = 10


class BurstEngine:
    """Runs each queued burst (a list of step durations, s) on its own thread, shipping every step (one token)
    itself."""

    def __init__(self) -> None:
        self.info = EngineInfo(kind="burst", model="none", block_size=16, max_model_len=4096,
                               kv_capacity_tokens=1024, kv_bytes_per_token=2, vocab_size=100, eos_token_id=1)
        self.bursts: list[list[float]] = []
        self.ship: Callable[[StepOutput], None] | None = None
        self.spans: list[tuple[float, float]] = []  # (start, end) of every burst that ran, monotonic s
        self.last: StepOutput | None = None  # shipped as each burst's last step, when set

    def add(self, desc: P.MicroDescriptor, now: float) -> None: ...

    def start_decode(self, req_id: str, kv: dict, num_tokens: int, tokens: list[int], now: float) -> None: ...

    def abort(self, req_id: str) -> bool:
        return False

    def active_ids(self) -> list[str]:
        return []

    def has_work(self) -> bool:
        return bool(self.bursts)

    def set_shipper(self, ship: Callable[[StepOutput], None]) -> bool:
        self.ship = ship
        return True

    async def step(self, now: float) -> StepOutput:
        steps = self.bursts.pop(0)

        def burst() -> None:
            t0 = time.monotonic()
            for s in steps:
                time.sleep(s)
                assert self.ship is not None
                self.ship(StepOutput(step_ms=s * 1000.0, entries=[["r0", [5], None]]))
            if self.last is not None:
                assert self.ship is not None
                self.ship(self.last)
            self.spans.append((t0, time.monotonic()))

        await asyncio.to_thread(burst)
        return StepOutput()

    def housekeeping(self, now: float) -> StepOutput:
        return StepOutput()

    def load(self) -> EngineLoad:
        return EngineLoad(kv_capacity_tokens=1024)

    def close(self) -> None: ...


def _serve_and_record(tmp_path: Path, bursts: list[list[float]], last: StepOutput | None = None,
                      messages: list[list[str]] | None = None) -> tuple[BurstEngine, list[tuple[float, str]], list[int]]:
    """Run a worker against a stand-in broker until ``bursts`` are done; every report's (time, sending thread)
    and the sequence numbers the broker received."""
    addr = f"ipc://{tmp_path}/w.sock"
    ctx = zmq.Context()
    router = ctx.socket(zmq.ROUTER)
    router.bind(addr)
    engine = BurstEngine()
    engine.last = last
    worker = Worker(WorkerConfig(broker_addr=addr, instance_id="w0", handoff_bind=""), engine)
    sent: list[tuple[float, str]] = []
    report = worker._load_report

    def recording_report() -> bytes:
        sent.append((time.monotonic(), threading.current_thread().name))
        return report()

    worker._load_report = recording_report  # type: ignore[method-assign]
    seqs: list[int] = []

    async def broker() -> None:
        while True:
            if not router.poll(0):
                await asyncio.sleep(0.002)
                continue
            ident, *frames = router.recv_multipart()
            if messages is not None:
                messages.append([type(P.decode(f)).__name__ for f in frames])
            for frame in frames:
                msg = P.decode(frame, P.WORKER_TO_BROKER)
                if isinstance(msg, P.RegisterWorker):
                    router.send_multipart([ident, P.encode(P.RegisterAck("w0", True, "", HEARTBEAT_MS))])
                elif isinstance(msg, P.LoadReport):
                    seqs.append(msg.seq)

    async def main() -> None:
        b = asyncio.create_task(broker())
        run = asyncio.create_task(worker.run())
        await asyncio.wait_for(worker.registered.wait(), 10)
        await asyncio.sleep(0.1)
        engine.bursts.extend(bursts)
        worker._wake.set()
        for _ in range(500):
            if len(engine.spans) == len(bursts):
                break
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.1)
        worker.stop()
        await asyncio.wait_for(run, 10)
        b.cancel()

    try:
        asyncio.run(main())
    finally:
        router.close(0)
        ctx.term()
    assert len(engine.spans) == len(bursts)
    return engine, sent, seqs


def test_during_a_burst_the_engine_thread_sends_the_heartbeats(tmp_path: Path) -> None:
    messages: list[list[str]] = []
    engine, sent, seqs = _serve_and_record(tmp_path, [[0.01] * 40], messages=messages)
    t0, t1 = engine.spans[0]
    inside = [name for t, name in sent if t0 + 0.05 < t < t1]
    loop_thread = threading.main_thread().name
    assert len([n for n in inside if n != loop_thread]) >= 10  # about one per 10 ms step
    assert loop_thread not in inside  # the loop slept through the burst
    assert any(name == loop_thread for t, name in sent if t < t0)  # and sends them itself outside bursts
    assert seqs == sorted(seqs) and len(set(seqs)) == len(seqs)
    # the engine thread's reports ride with its steps' tokens: one message, one send
    assert messages.count(["TokenBatch", "LoadReport"]) >= 10


def test_a_long_step_still_gets_heartbeats_from_the_loop(tmp_path: Path) -> None:
    fallback_s = BURST_REPORT_FALLBACK * HEARTBEAT_MS / 1000.0
    engine, sent, _ = _serve_and_record(tmp_path, [[5 * fallback_s]])  # one step, five fallback periods long
    t0, t1 = engine.spans[0]
    loop_thread = threading.main_thread().name
    assert len([1 for t, name in sent if t0 < t < t1 and name == loop_thread]) >= 2


def test_a_steps_tokens_handoffs_and_failures_reach_the_broker_in_one_message(tmp_path: Path) -> None:
    """A's last tokens and its HandoffReady are one ZeroMQ message: a worker that dies after the tokens left has
    sent the handoff too."""
    from workers.engine import Handoff

    last = StepOutput(step_ms=1.0, entries=[["r1", [7, 8], P.FINISH_HANDOFF], ["r2", [9], None]],
                      handoffs=[Handoff("r1", {"k": 1}, 40, [7, 8])], failures=[("r3", "bad_handoff", "x")])
    messages: list[list[str]] = []
    _serve_and_record(tmp_path, [[0.01] * 3], last, messages)
    assert ["TokenBatch", "HandoffReady", "MicroFailed"] in messages
    assert all(m == ["LoadReport"] or m == ["RegisterWorker"] or m[0] in ("TokenBatch", "HandoffReady")
               for m in messages), messages

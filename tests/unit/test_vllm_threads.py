"""Moving vLLM's idle poll threads off the engine's cores (real threads of this process, renamed through
/proc as torch.distributed names its gloo loop threads; no vLLM needed)."""

from __future__ import annotations

import os
import threading
from collections.abc import Iterator

import pytest

from workers.engines.vllm_config import VllmEngineConfig
from workers.engines.vllm_engine import POLL_THREADS, _move_pollers, pin_poll_threads

CPUS = sorted(os.sched_getaffinity(0))
pytestmark = pytest.mark.skipif(len(CPUS) < 2 or not os.path.isdir("/proc/self/task"),
                                reason="needs Linux and two usable CPUs")


@pytest.fixture
def poller() -> Iterator[int]:
    """A thread named like gloo's poll loop, on every CPU of the process; yields its thread id."""
    stop = threading.Event()
    started = threading.Event()
    tid: list[int] = []

    def run() -> None:
        tid.append(threading.get_native_id())
        started.set()
        stop.wait(30)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    started.wait(5)
    with open(f"/proc/self/task/{tid[0]}/comm", "w") as fh:
        fh.write(POLL_THREADS[0])
    os.sched_setaffinity(tid[0], set(CPUS))
    yield tid[0]
    stop.set()
    t.join(5)


def test_pin_poll_threads_binds_only_the_named_threads(poller: int) -> None:
    me = os.sched_getaffinity(0)
    assert pin_poll_threads({CPUS[1]}) == 1
    assert os.sched_getaffinity(poller) == {CPUS[1]}
    assert os.sched_getaffinity(0) == me  # other threads keep theirs


def test_poll_threads_go_to_the_loop_cores_and_stay_without_them(poller: int) -> None:
    engine, loop = str(CPUS[0]), str(CPUS[1])
    assert _move_pollers(VllmEngineConfig(model="m", cpu_bind=engine)) == 0  # no loop cores: they stay
    assert os.sched_getaffinity(poller) == set(CPUS)
    assert _move_pollers(VllmEngineConfig(model="m", cpu_bind=engine, loop_bind=loop)) == 1
    assert os.sched_getaffinity(poller) == {CPUS[1]}

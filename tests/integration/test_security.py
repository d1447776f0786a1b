"""CURVE on, over real processes: only allow-listed clients and workers get through, and a worker can only
act as the instance its certificate names."""

from __future__ import annotations

import asyncio
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dynaserve import security
from dynaserve.client import DynaServeClient
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.errors import BrokerUnavailableError
from dynaserve.sockets import CurveOptions
from tests.conftest import make_prompt
from workers.engines.sim import reference_tokens

pytestmark = pytest.mark.integration

NO_REPLY_S = 1.5  # a bounded wait that an authorized client never needs (replies take milliseconds)


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return security.generate(tmp_path_factory.mktemp("curve"), ["client", "other"], ["w0", "w1", "w2"])


@pytest.fixture(scope="module")
def cluster(keys: Path) -> Iterator[LocalCluster]:
    cfg = ClusterConfig(workers=2, policy="dynaserve", transport="ipc", engine="sim", http_port=0)
    lc = LocalCluster(cfg, broker_args=["--curve-dir", str(keys), "--allow-forced-splits"],
                      worker_args=["--curve-dir", str(keys)], client_curve_dir=str(keys))
    lc.start()
    try:
        asyncio.run(lc.wait_ready())
        yield lc
    finally:
        lc.stop()


async def _stream(client: DynaServeClient, seed: int, split: int | None = None) -> None:
    prompt = make_prompt(40, seed=seed)
    async with client.generate(prompt, max_tokens=12, ignore_eos=True, force_split=split) as stream:
        toks = await stream.collect()
    assert toks == reference_tokens(prompt, 12)
    assert stream.finish_reason == "length"


async def _instances(cluster: LocalCluster, keys: Path) -> list[str]:
    async with DynaServeClient(cluster.client_addr, curve_dir=str(keys)) as c:
        return (await c.status()).instances


def _foreign_keys(base: Path, keys: Path) -> Path:
    """A key directory with the real broker's public key and nothing else yet."""
    base.mkdir(parents=True)
    shutil.copy(keys / "broker.key", base / "broker.key")
    (base / "workers").mkdir()
    return base


def test_authorized_client_streams(cluster: LocalCluster, keys: Path) -> None:
    async def main() -> None:
        async with DynaServeClient(cluster.client_addr, curve_dir=str(keys)) as c:
            await asyncio.gather(_stream(c, 1), _stream(c, 2, split=20), _stream(c, 3, split=45))
        async with DynaServeClient(cluster.client_addr, curve_dir=str(keys), curve_name="other") as c:
            await _stream(c, 4)

    asyncio.run(main())


def test_client_without_keys_or_with_unknown_key_gets_nothing(cluster: LocalCluster, keys: Path) -> None:
    public, secret = zmq.curve_keypair()
    unknown = CurveOptions(public, secret, security.broker_public_key(keys))

    async def refused(client: DynaServeClient) -> None:
        async with client as c:
            with pytest.raises(BrokerUnavailableError):
                await c.status(timeout=NO_REPLY_S)
            stream = c.generate(make_prompt(20, seed=9), max_tokens=4)
            with pytest.raises((TimeoutError, BrokerUnavailableError)):  # unanswered, or nothing to send on
                await asyncio.wait_for(stream.collect(), NO_REPLY_S)
            assert stream.admitted is None and not stream.tokens

    async def main() -> None:
        await refused(DynaServeClient(cluster.client_addr))
        await refused(DynaServeClient(cluster.client_addr, curve=unknown))
        # a worker's key is not a client key
        w0_pub, w0_sec = zmq.auth.load_certificate(keys / "workers" / "w0.key_secret")
        assert w0_sec is not None
        await refused(DynaServeClient(cluster.client_addr,
                                      curve=CurveOptions(w0_pub, w0_sec, security.broker_public_key(keys))))
        async with DynaServeClient(cluster.client_addr, curve_dir=str(keys)) as c:  # still serving
            await _stream(c, 5)

    asyncio.run(main())


def _spawn_worker(cluster: LocalCluster, name: str, instance_id: str, curve_dir: Path) -> None:
    cluster._spawn(name, ["-m", "workers", "--broker-addr", cluster.worker_addr, "--instance-id", instance_id,
                          "--engine", "sim", "--curve-dir", str(curve_dir)])


def test_worker_with_unknown_key_cannot_register(cluster: LocalCluster, keys: Path, tmp_path: Path) -> None:
    rogue = _foreign_keys(tmp_path / "rogue", keys)
    security.generate(rogue / "fresh", [], ["w2"])  # a well-formed key pair the broker never saw
    shutil.copy(rogue / "fresh" / "workers" / "w2.key_secret", rogue / "workers" / "w2.key_secret")
    _spawn_worker(cluster, "rogue", "w2", rogue)
    try:
        time.sleep(2 * NO_REPLY_S)
        assert cluster.procs["rogue"].poll() is None  # never heard back: still trying
        assert "registered as" not in cluster.log("rogue")
        assert "w2" not in asyncio.run(_instances(cluster, keys))
    finally:
        cluster.kill("rogue")


def test_worker_cannot_register_as_another_instance(cluster: LocalCluster, keys: Path, tmp_path: Path) -> None:
    """An allow-listed worker key (w0's) presented under another instance id (w2, allow-listed but not
    running) is refused: the broker binds each instance id to its own certificate."""
    imp = _foreign_keys(tmp_path / "impostor", keys)
    shutil.copy(keys / "workers" / "w0.key_secret", imp / "workers" / "w2.key_secret")
    _spawn_worker(cluster, "impostor", "w2", imp)
    try:
        deadline = time.monotonic() + 20
        while cluster.procs["impostor"].poll() is None and time.monotonic() < deadline:
            time.sleep(0.1)
        assert cluster.procs["impostor"].poll() is not None, cluster.log("impostor")  # it gave up
        log = cluster.log("impostor")
        assert "registration refused" in log and "cannot act as instance" in log, log
        assert "registered as" not in log
        instances = asyncio.run(_instances(cluster, keys))
        assert "w2" not in instances and {"w0", "w1"} <= set(instances)

        async def still_serving() -> None:
            async with DynaServeClient(cluster.client_addr, curve_dir=str(keys)) as c:
                await _stream(c, 6, split=30)

        asyncio.run(still_serving())
    finally:
        if cluster.procs["impostor"].poll() is None:
            cluster.kill("impostor")

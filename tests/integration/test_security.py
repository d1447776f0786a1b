"""CURVE on, over real processes: only allow-listed clients and workers get through, a worker can only
act as the instance its certificate names, a client key cannot touch another key's requests, and the
single-command cluster (``ClusterConfig.curve_dir``) secures every process, the SDK and the HTTP front end."""

from __future__ import annotations

import asyncio
import json
import shutil
import socket
import stat
import time
import urllib.request
from collections.abc import Iterator
from pathlib import Path

import pytest
import zmq

from dynaserve import protocol as P
from dynaserve import security
from dynaserve.client import DynaServeClient, SyncClient
from dynaserve.cluster import CLIENT_KEY, FRONTEND_KEY, ClusterConfig, LocalCluster
from dynaserve.errors import BrokerUnavailableError
from dynaserve.sockets import CurveOptions, make_socket
from dynaserve.tokenizer import ByteTokenizer
from tests.conftest import make_prompt, start_cluster
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


# ---------------------------------------------------------------- the single-command cluster with curve_dir


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def secured(tmp_path_factory: pytest.TempPathFactory) -> Iterator[LocalCluster]:
    """A cluster started only with ``curve_dir`` (an empty directory: every key is generated), front end on."""
    lc = start_cluster("dynaserve", workers=2, http_port=_free_port(),
                       curve_dir=str(tmp_path_factory.mktemp("generated") / "keys"))
    try:
        yield lc
    finally:
        lc.stop()
    assert "Traceback" not in lc.log("frontend"), lc.log("frontend")[-3000:]


def test_cluster_curve_dir_generates_the_keys(secured: LocalCluster) -> None:
    root = Path(secured.curve_dir)
    names = ["broker", f"clients/{CLIENT_KEY}", f"clients/{FRONTEND_KEY}", "workers/w0", "workers/w1"]
    for name in names:
        assert (root / f"{name}.key").is_file()
        assert stat.S_IMODE((root / f"{name}.key_secret").stat().st_mode) == 0o600
    assert secured.ensure_keys() == []  # present keys are kept
    for name in ("broker", "w0", "frontend"):
        argv = secured.procs[name].args
        assert argv[argv.index("--curve-dir") + 1] == str(root)
    assert "--curve-name" in secured.procs["frontend"].args


def test_secured_cluster_serves_sdk_sync_and_http(secured: LocalCluster) -> None:
    keys = secured.curve_dir

    async def sdk() -> None:
        async with DynaServeClient(secured.client_addr, curve_dir=keys) as c:
            await asyncio.gather(_stream(c, 11), _stream(c, 12))

    asyncio.run(sdk())
    prompt = make_prompt(30, seed=13)
    with SyncClient(secured.client_addr, curve_dir=keys) as sc:
        assert set(sc.status().instances) == {"w0", "w1"}
        assert sc.generate(prompt, max_tokens=10, ignore_eos=True) == reference_tokens(prompt, 10)
        assert [t.token for t in sc.stream(prompt, max_tokens=6, ignore_eos=True)] == reference_tokens(prompt, 6)

    tok = ByteTokenizer(32000)
    text = "secured front end"
    body = json.dumps({"model": "llama3-8b", "prompt": text, "max_tokens": 12, "temperature": 0,
                       "ignore_eos": True}).encode()
    req = urllib.request.Request(f"{secured.http_url}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    with opener.open(req, timeout=30) as resp:
        out = json.loads(resp.read())
    assert out["choices"][0]["text"] == tok.decode(reference_tokens(tok.encode(text), 12))


def test_secured_cluster_refuses_clients_without_keys(secured: LocalCluster) -> None:
    async def main() -> None:
        async with DynaServeClient(secured.client_addr) as c:
            with pytest.raises(BrokerUnavailableError):
                await c.status(timeout=NO_REPLY_S)

    asyncio.run(main())
    with SyncClient(secured.client_addr) as sc, pytest.raises(BrokerUnavailableError):
        sc.status(timeout=NO_REPLY_S)


# ---------------------------------------------------------------- client identities are bound to client keys


def _recv(sock: zmq.Socket, types: tuple[type, ...], timeout_s: float = 20.0) -> P.Message:
    """The next message of one of ``types`` (others are skipped); fails after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while (left := deadline - time.monotonic()) > 0:
        if sock.poll(int(left * 1000)):
            frames = sock.recv_multipart()
            msg = P.decode(frames[-1])
            if isinstance(msg, types):
                return msg
    raise AssertionError(f"no {[t.__name__ for t in types]} within {timeout_s} s")


def test_second_key_cannot_abort_or_take_over_requests(tmp_path: Path) -> None:
    """Client keys ``client`` and ``other``; one fake worker that holds every request without emitting a
    token, so a request stays running for as long as the test needs it."""
    keys = tmp_path / "keys"
    security.ensure_keys(keys, [CLIENT_KEY, "other"], ["w0"])
    cfg = ClusterConfig(workers=1, transport="ipc", engine="sim", http_port=0, curve_dir=str(keys))
    lc = LocalCluster(cfg, run_dir=tmp_path / "run", broker_args=["--worker-timeout-ms", "600000"])
    ctx = zmq.Context()
    lc.start_broker()
    try:
        worker = make_socket(ctx, zmq.DEALER, connect=lc.worker_addr, identity=b"w0",
                             curve=security.worker_options(keys, "w0"))
        worker.send(P.encode(P.RegisterWorker("w0", "fake", "llama3-8b", 131072, 16, 4096, "none", 32000, 2)))
        assert _recv(worker, (P.RegisterAck,), 60.0).ok  # type: ignore[attr-defined]

        def client(name: str, identity: bytes) -> zmq.Socket:
            return make_socket(ctx, zmq.DEALER, connect=lc.client_addr, identity=identity,
                               curve=security.client_options(keys, name))

        def submit(sock: zmq.Socket, rid: str) -> str:
            sock.send(P.encode(P.SubmitRequest(rid, make_prompt(20, seed=1), P.SamplingParams(max_tokens=8))))
            assert _recv(sock, (P.Admitted, P.ErrorReply)).req_id == rid  # type: ignore[attr-defined]
            return _recv(worker, (P.DispatchMicro,)).desc.req_id  # type: ignore[attr-defined]

        ident = b"shared-identity"
        owner = client(CLIENT_KEY, ident)
        submit(owner, "r1")
        # another key under its own identity: r1 is not its request
        stranger = client("other", b"stranger")
        stranger.send(P.encode(P.AbortRequest("r1")))
        err = _recv(stranger, (P.ErrorReply,))
        assert (err.code, err.req_id) == ("unknown_id", "r1")  # type: ignore[attr-defined]
        # another key under the owner's identity while the owner is connected: ZeroMQ refuses the connection
        twin = client("other", ident)
        twin.send(P.encode(P.AbortRequest("r1")))
        assert not twin.poll(int(NO_REPLY_S * 1000))
        twin.close(0)
        owner.send(P.encode(P.AbortRequest("r1")))  # r1 is still running: only its owner ends it
        assert _recv(owner, (P.TokenStream,)).entries == [["r1", [], P.FINISH_ABORT]]  # type: ignore[attr-defined]
        _recv(worker, (P.AbortMicro,))

        # the owner goes away with r2 running; another key takes its identity over
        r2 = submit(owner, "r2")
        owner.close(0)
        # ZeroMQ ignores a connection made while the owner's was still attached, for good: connect anew until
        # one gets through (all stay open and are polled, so a slow answer is never missed)
        poller, thieves = zmq.Poller(), []
        deadline = time.monotonic() + 60
        while not (ready := poller.poll(500)):
            assert time.monotonic() < deadline, "the broker never answered under the taken-over identity"
            thieves.append(client("other", ident))
            poller.register(thieves[-1], zmq.POLLIN)
            thieves[-1].send(P.encode(P.AbortRequest("r2")))
        thief = ready[0][0]
        err = P.decode(thief.recv_multipart()[-1])
        assert isinstance(err, P.ErrorReply) and (err.code, err.req_id) == ("forbidden", "r2"), err
        assert _recv(worker, (P.AbortMicro,)).req_id == r2  # type: ignore[attr-defined]  # the owner's request ended
        # the identity is free now: the new key's own requests work under it
        thief.send(P.encode(P.StatusRequest("n")))
        st = _recv(thief, (P.StatusReply,))
        assert isinstance(st, P.StatusReply) and st.active == 0 and st.queued == 0, st
        for sock in thieves:
            sock.close(0)
        stranger.close(0)
        worker.close(0)
    finally:
        ctx.term()
        lc.stop()
    assert "Traceback" not in lc.log("broker"), lc.log("broker")[-3000:]

"""CURVE keys and the ZAP authenticator, in process (the broker and workers are covered by
tests/integration/test_security.py)."""

from __future__ import annotations

import stat
from pathlib import Path

import pytest
import zmq

from dynaserve import security
from dynaserve.keys import main as keygen_main
from dynaserve.sockets import CurveOptions, _user_id, make_socket


def test_keygen_layout_and_permissions(tmp_path: Path) -> None:
    keygen_main([str(tmp_path / "k"), "--clients", "a", "b", "--workers", "w0", "w1"])
    root = tmp_path / "k"
    for path in [root / "broker.key_secret", root / "clients/a.key_secret", root / "workers/w1.key_secret"]:
        assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(root.stat().st_mode) == 0o700
    assert sorted(security.allow_list(root / "workers").values()) == ["w0", "w1"]
    assert sorted(security.allow_list(root / "clients").values()) == ["a", "b"]
    with pytest.raises(SystemExit):  # refuses to overwrite without --force
        keygen_main([str(root), "--workers", "w0"])
    keygen_main([str(root), "--workers", "w0", "--force"])


def test_missing_keys_are_clear_errors(tmp_path: Path) -> None:
    with pytest.raises(security.CurveKeyError, match="keygen"):
        security.worker_options(tmp_path, "w0")
    security.generate(tmp_path, [], ["w0"])
    (tmp_path / "workers" / "copy.key").write_bytes((tmp_path / "workers" / "w0.key").read_bytes())
    with pytest.raises(security.CurveKeyError, match="same public key"):
        security.allow_list(tmp_path / "workers")


def _roundtrip(ctx: zmq.Context, root: Path, curve: CurveOptions, addr: str) -> tuple[bytes, str | None] | None:
    server = make_socket(ctx, zmq.ROUTER, bind=addr, curve=security.server_options(root, security.WORKERS))
    client = make_socket(ctx, zmq.DEALER, connect=addr, identity=b"w1", curve=curve)
    try:
        client.send(b"hello")
        if not server.poll(1000):
            return None
        parts = server.recv_multipart(copy=False)
        return parts[0].bytes, _user_id(parts[-1])
    finally:
        client.close(0)
        server.close(0)


def test_authenticator_allow_list_and_user_id(tmp_path: Path) -> None:
    security.generate(tmp_path, ["c"], ["w0", "w1"])  # ipc, not inproc: inproc has no CURVE handshake
    ctx = zmq.Context()
    auth = security.start_authenticator(ctx, tmp_path)
    try:
        # an allow-listed worker key: its User-Id is the instance id of its certificate
        got = _roundtrip(ctx, tmp_path, security.worker_options(tmp_path, "w0"), f"ipc://{tmp_path}/a.sock")
        assert got == (b"w1", "w0")  # identity w1 with w0's key: the broker sees the mismatch
        # a client key is not on the worker socket's allow-list; neither is an unknown key
        assert _roundtrip(ctx, tmp_path, security.client_options(tmp_path, "c"), f"ipc://{tmp_path}/b.sock") is None
        pub, sec = zmq.curve_keypair()
        unknown = CurveOptions(pub, sec, security.broker_public_key(tmp_path))
        assert _roundtrip(ctx, tmp_path, unknown, f"ipc://{tmp_path}/c.sock") is None
    finally:
        auth.stop()
        ctx.term()


def test_ensure_keys_creates_only_what_is_missing(tmp_path: Path) -> None:
    root = tmp_path / "k"
    assert security.ensure_keys(root, ["client"], ["w0"]) == ["broker", "clients/client", "workers/w0"]
    broker_pub = security.broker_public_key(root)
    w0 = (root / "workers" / "w0.key").read_bytes()
    assert security.ensure_keys(root, ["client", "frontend"], ["w0", "w1"]) == ["clients/frontend", "workers/w1"]
    assert security.broker_public_key(root) == broker_pub and (root / "workers" / "w0.key").read_bytes() == w0
    assert stat.S_IMODE((root / "workers" / "w1.key_secret").stat().st_mode) == 0o600
    assert security.ensure_keys(root, ["client", "frontend"], ["w0", "w1"]) == []
    # a public key whose secret lives elsewhere is not replaced behind the operator's back
    (root / "workers" / "w1.key_secret").unlink()
    with pytest.raises(security.CurveKeyError, match="no w1.key_secret"):
        security.ensure_keys(root, [], ["w1"])


def test_a_key_is_a_client_or_a_worker_never_both(tmp_path: Path) -> None:
    security.generate(tmp_path, ["c"], ["w0"])
    (tmp_path / "clients" / "w0.key").write_bytes((tmp_path / "workers" / "w0.key").read_bytes())
    with pytest.raises(security.CurveKeyError, match="same public key"):
        security.start_authenticator(zmq.Context.instance(), tmp_path)

"""CURVE authentication and encryption for the broker's two sockets (off unless a key directory is given).

Key directory layout (``python -m dynaserve.keys DIR`` or ``scripts/keygen.py DIR`` writes it)::

    DIR/broker.key            broker public key (every client and worker needs it)
    DIR/broker.key_secret     broker key pair (broker host only)
    DIR/clients/NAME.key      allow-list of the client socket: one public key per client
    DIR/clients/NAME.key_secret   that client's key pair (copy to that client only)
    DIR/workers/ID.key        allow-list of the worker socket: the file name is the instance id
    DIR/workers/ID.key_secret     that worker's key pair (copy to that worker only)

The broker's ZAP authenticator accepts on the client socket only public keys in ``clients/`` and on the
worker socket only public keys in ``workers/``; a key may not be in both. Every key's User-Id is the name
of its certificate file. The broker accepts a worker message only when that User-Id equals the socket
identity (the instance id) it came with: a worker cannot register or speak as another instance. A client's
running requests belong to the key that submitted them: a message under the same socket identity from
another client key is refused (see broker/server.py).
"""

from __future__ import annotations

import logging
import os
from pathlib import Path

import zmq
import zmq.auth
from zmq.auth.thread import ThreadAuthenticator
from zmq.utils import z85

from dynaserve.sockets import CurveOptions

log = logging.getLogger("dynaserve.security")

CLIENTS = "clients"  # ZAP domain and allow-list directory of the client socket
WORKERS = "workers"  # ZAP domain and allow-list directory of the worker socket
BROKER = "broker"  # file name of the broker's certificate


class CurveKeyError(ValueError):
    """A key file is missing or unreadable."""


def _load(path: Path, *, secret: bool) -> tuple[bytes, bytes | None]:
    if not path.is_file():
        raise CurveKeyError(f"CURVE certificate {path} not found (create keys with scripts/keygen.py)")
    try:
        public, sec = zmq.auth.load_certificate(path)
    except (OSError, ValueError) as exc:
        raise CurveKeyError(f"cannot read CURVE certificate {path}: {exc}") from None
    if secret and sec is None:
        raise CurveKeyError(f"{path} holds no secret key")
    return public, sec


def _keypair(path: Path) -> tuple[bytes, bytes]:
    public, sec = _load(path, secret=True)
    assert sec is not None
    return public, sec


def broker_public_key(curve_dir: str | os.PathLike[str]) -> bytes:
    return _load(Path(curve_dir) / f"{BROKER}.key", secret=False)[0]


def server_options(curve_dir: str | os.PathLike[str], domain: str) -> CurveOptions:
    """CURVE options of one of the broker's sockets (``domain``: clients or workers)."""
    public, sec = _keypair(Path(curve_dir) / f"{BROKER}.key_secret")
    return CurveOptions(public, sec, None, domain)


def client_options(curve_dir: str | os.PathLike[str], name: str) -> CurveOptions:
    """CURVE options of a client (``clients/NAME``) connecting to the broker of ``curve_dir``."""
    public, sec = _keypair(Path(curve_dir) / CLIENTS / f"{name}.key_secret")
    return CurveOptions(public, sec, broker_public_key(curve_dir))


def worker_options(curve_dir: str | os.PathLike[str], instance_id: str) -> CurveOptions:
    """CURVE options of worker ``instance_id`` (its certificate is ``workers/<instance_id>.key_secret``)."""
    public, sec = _keypair(Path(curve_dir) / WORKERS / f"{instance_id}.key_secret")
    return CurveOptions(public, sec, broker_public_key(curve_dir))


def allow_list(directory: str | os.PathLike[str]) -> dict[bytes, str]:
    """Public key (z85) -> certificate name, for every ``*.key`` file in ``directory``."""
    d = Path(directory)
    if not d.is_dir():
        raise CurveKeyError(f"allow-list directory {d} not found")
    out: dict[bytes, str] = {}
    for path in sorted(d.glob("*.key")):
        public, _ = _load(path, secret=False)
        if public in out:
            raise CurveKeyError(f"{path}: the same public key is also {out[public]!r}")
        out[public] = path.stem
    return out


class KeyAuthenticator(ThreadAuthenticator):
    """ZAP handler: per-domain allow-lists; a key's User-Id is its certificate name (a worker's instance id)."""

    def __init__(self, ctx: zmq.Context, allowed: dict[str, dict[bytes, str]]) -> None:
        super().__init__(ctx, log=logging.getLogger("dynaserve.zap"))
        self.allowed = allowed
        self._names: dict[bytes, str] = {}
        for domain in (CLIENTS, WORKERS):
            for key, name in allowed.get(domain, {}).items():
                if key in self._names:  # one User-Id per key: a key is a client's or a worker's, never both
                    raise CurveKeyError(f"{domain}/{name}.key: the same public key is also {self._names[key]!r}")
                self._names[key] = name

    def start(self) -> None:
        for domain, keys in self.allowed.items():
            self.certs[domain] = dict.fromkeys(keys, True)
        super().start()

    def curve_user_id(self, client_public_key: bytes) -> str:
        return self._names.get(z85.encode(client_public_key), "")


def start_authenticator(ctx: zmq.Context, curve_dir: str | os.PathLike[str]) -> KeyAuthenticator:
    """Start the broker's ZAP authenticator for ``ctx`` (before its sockets bind)."""
    root = Path(curve_dir)
    auth = KeyAuthenticator(ctx, {CLIENTS: allow_list(root / CLIENTS), WORKERS: allow_list(root / WORKERS)})
    auth.start()
    log.info("CURVE on: %d client keys, %d worker keys", len(auth.allowed[CLIENTS]), len(auth.allowed[WORKERS]))
    return auth


def _create(directory: Path, name: str, metadata: dict[str, str] | None = None) -> None:
    directory.mkdir(parents=True, exist_ok=True)
    os.chmod(directory, 0o700)
    old = os.umask(0o077)  # the secret file is never readable by others, not even briefly
    try:
        public, secret = zmq.auth.create_certificates(directory, name, metadata)
    finally:
        os.umask(old)
    os.chmod(secret, 0o600)
    os.chmod(public, 0o644)


def ensure_keys(curve_dir: str | os.PathLike[str], clients: list[str], workers: list[str]) -> list[str]:
    """Create the key pairs of ``curve_dir`` that are missing (the broker's, and one per client name and per
    worker instance id); existing ones are kept. Returns the created certificates (``clients/NAME`` etc.).
    A public key without its secret file is an error: this host could not use it."""
    root = Path(curve_dir)
    missing = []
    for d, name, label in [(root, BROKER, BROKER), *[(root / CLIENTS, c, f"{CLIENTS}/{c}") for c in clients],
                           *[(root / WORKERS, w, f"{WORKERS}/{w}") for w in workers]]:
        if (d / f"{name}.key_secret").is_file():
            continue
        if (d / f"{name}.key").exists():
            raise CurveKeyError(f"{d / name}.key has no {name}.key_secret next to it; copy the secret file there "
                                "or remove the public key to have a new pair generated")
        missing.append((d, name, label))
    if missing:
        generate(root, [n for d, n, _ in missing if d == root / CLIENTS],
                 [n for d, n, _ in missing if d == root / WORKERS], broker=any(d == root for d, _, _ in missing))
    return [label for _, _, label in missing]


def generate(curve_dir: str | os.PathLike[str], clients: list[str], workers: list[str], force: bool = False,
             broker: bool = True) -> Path:
    """Write a broker key pair (unless ``broker`` is False) and one key pair per client name and per worker
    instance id."""
    root = Path(curve_dir)
    names: list[tuple[Path, str, dict[str, str] | None]] = [(root, BROKER, None)] if broker else []
    names += [(root / CLIENTS, c, None) for c in clients]
    names += [(root / WORKERS, w, {"instance_id": w}) for w in workers]
    for d, name, _ in names:
        if not name or "/" in name or name.startswith("."):
            raise ValueError(f"invalid certificate name {name!r}")
        if not force and (d / f"{name}.key").exists():
            raise FileExistsError(f"{d / name}.key exists (use --force to replace it)")
    root.mkdir(parents=True, exist_ok=True)
    os.chmod(root, 0o700)
    for d, name, meta in names:
        _create(d, name, meta)
    (root / CLIENTS).mkdir(exist_ok=True)
    (root / WORKERS).mkdir(exist_ok=True)
    return root

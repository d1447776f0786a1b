"""Worker-side KV-cache transfer: the block pool, the transport interface and its implementations."""

from __future__ import annotations

from workers.kv.base import KvTransferError, KvTransport, XferState
from workers.kv.pool import KvBlockPool

__all__ = [
    "KvBlockPool",
    "KvTransferError",
    "KvTransport",
    "XferState",
    "TRANSPORT_KINDS",
    "make_transport",
]

TRANSPORT_KINDS: tuple[str, ...] = ("nixl",)
"""Values accepted by :func:`make_transport`."""


def make_transport(kind: str, name: str) -> KvTransport:
    """Create the KV transport ``kind`` for the endpoint called ``name`` (unique in the cluster).

    Raises ValueError for an unknown kind and RuntimeError when the kind's library is not installed.
    """
    if kind == "nixl":
        from workers.kv.nixl import NixlTransport, nixl_available

        if not nixl_available():
            raise RuntimeError(
                "KV transport 'nixl' needs NIXL, which is not importable here; install it without its "
                "dependencies: pip install --no-deps nixl==1.5.1 nixl-cu12==1.5.1"
            )
        return NixlTransport(name)
    raise ValueError(f"unknown KV transport kind {kind!r}; expected one of {', '.join(TRANSPORT_KINDS)}")

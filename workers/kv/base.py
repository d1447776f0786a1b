"""The KV transfer interface: how instance B pulls the KV blocks of positions [0, s) from instance A.

Lifecycle of one handoff (A = sender/exporter, B = receiver/reader)::

    A: blocks = pool.alloc(k); compute KV into them
    A: params = transport.export(req_id, blocks, num_tokens)     # A keeps owning `blocks`
       params travel to B inside the dispatch message (msgpack-able dict)
    B: local = pool.alloc(len(params["block_ids"]))
    B: xid = transport.start_read(req_id, params, local)          # KvTransferError on bad params
    B: every loop step: state = transport.poll(xid)
         WAITING / TRANSFERRING -> keep polling (bounded by B's own deadline)
         DONE   -> transport.release(xid); `local` now holds the KV; continue decoding
         FAILED -> transport.release(xid); pool.free(local); recompute or re-plan the request
    B: reading completes -> the transport notifies A with the request's notification tag
    A: every loop step: for req_id in transport.confirmed(): pool.free(blocks of req_id)
    A: if no confirmation arrives within the lease, A frees the blocks anyway (lease expiry);
       a reader that is still pulling them after that reads stale data and must treat the
       transfer as failed, which is why B bounds every transfer by a deadline shorter than the lease.

Ownership and aborts:

- A transfer owns B's ``local`` blocks from ``start_read`` until ``release`` returns; only then
  may B free or reuse them. ``release`` on an in-flight transfer aborts it; an abort that the
  backend cannot complete at once is deferred and retried by later calls, never dropped.
- A owns the exported blocks until ``confirmed()`` reports the request or its lease expires. An
  abort on A's side is a lease expiry brought forward; an abort on B's side is ``release`` before
  DONE (A then gets no confirmation and frees on lease expiry).
- Transports are not thread-safe: one worker loop drives them. ``poll`` and ``confirmed`` also make
  the backend progress, so the loop must call them regularly.
"""

from __future__ import annotations

import enum
from typing import Any, Protocol, runtime_checkable

from workers.kv.pool import KvBlockPool


class XferState(enum.Enum):
    """State of one read on the receiving side, as returned by :meth:`KvTransport.poll`."""

    WAITING = "waiting"
    """Accepted but not yet moving (for example, a connection is being set up)."""
    TRANSFERRING = "transferring"
    """Bytes are moving."""
    DONE = "done"
    """Every byte has arrived in the local blocks."""
    FAILED = "failed"
    """The transfer ended with an error; the local blocks hold undefined data."""

    @property
    def finished(self) -> bool:
        """True for DONE and FAILED."""
        return self in (XferState.DONE, XferState.FAILED)


class KvTransferError(Exception):
    """A transfer could not be started: bad parameters, an unknown peer, or a backend error."""


@runtime_checkable
class KvTransport(Protocol):
    """A KV block mover. One instance per worker, used for both the sender and the receiver side."""

    name: str
    """This endpoint's name, unique across the cluster."""

    def register_pool(self, pool: KvBlockPool) -> None:
        """Make ``pool``'s buffer available for transfers. Called once, before any other call."""
        ...

    def export(self, req_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """Sender side: describe ``block_ids`` (holding ``num_tokens`` tokens) for a reader.

        Returns a msgpack-able dict (str keys; int, str, bytes or list[int] values) carrying all a
        reader needs, including this endpoint's name and connection metadata.
        """
        ...

    def start_read(self, req_id: str, params: dict[str, Any], local_block_ids: list[int]) -> int:
        """Receiver side: start pulling the blocks described by ``params`` into ``local_block_ids``.

        ``local_block_ids`` must have as many entries as ``params`` lists remote blocks; block i of
        the remote list lands in ``local_block_ids[i]``. Returns a transfer id for :meth:`poll`.
        Raises :class:`KvTransferError` if any field of ``params`` is missing or inconsistent.
        """
        ...

    def poll(self, xfer_id: int) -> XferState:
        """Receiver side: current state of a transfer. Cheap; also makes the backend progress."""
        ...

    def release(self, xfer_id: int) -> None:
        """Receiver side: forget a transfer, aborting it if it is still in flight."""
        ...

    def confirmed(self) -> list[str]:
        """Sender side: request ids whose exported blocks a reader finished reading since the last call."""
        ...

    def close(self) -> None:
        """Release every transfer, peer and registration. Idempotent."""
        ...

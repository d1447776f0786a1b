"""KV transfer over NIXL (UCX backend): B issues one-sided READs of A's registered pool.

Settings, all chosen for a host without the busy progress thread:

- ``enable_prog_thread=False``: NIXL's progress thread spins a full core; progress happens instead
  inside :meth:`NixlTransport.poll` (B) and :meth:`NixlTransport.confirmed` (A), which the worker
  loop calls every step.
- ``UCX_NET_DEVICES=lo`` unless already set: UCX otherwise spreads traffic over every interface.
  On one host the READ itself runs over cma (``process_vm_readv``).
- UCX error handling mode ``none`` by default. In NIXL's default mode (``peer``) notifications
  travel over tcp/lo, and after a READ that carries a notification the next operation towards the
  same peer waits until that peer makes progress: with a peer polling every 20 ms, every READ from
  it took about 20 ms. In mode ``none`` notifications use shared memory and nothing waits on the
  peer. A peer that dies is still detected on this host (the cma read fails, the transfer ends
  FAILED or ``start_read`` raises); where it is not, the caller's deadline bounds the transfer.
  ``ucx_error_handling="peer"`` restores NIXL's default.

nixl is imported lazily, so this module imports on machines without it (see :func:`nixl_available`).
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import itertools
import logging
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import numpy as np

from workers.kv.base import KvTransferError, XferState
from workers.kv.pool import KvBlockPool

logger = logging.getLogger(__name__)

_DEFAULT_ENV = {
    # Keep UCX on loopback: without this it also uses every other interface for tcp.
    "UCX_NET_DEVICES": "lo",
    # Same cap vLLM sets, against unbounded growth of UCX's registration cache.
    "UCX_RCACHE_MAX_UNRELEASED": "1024",
}

_MEM = "DRAM"
_ABORT_GRACE_S = 1.0
"""How long :meth:`NixlTransport.release` drives an in-flight transfer to an end before deferring it."""

_MAX_BLOCK_ID = 2**40
"""Upper bound for remote block ids (their pool size is not part of the parameters)."""

UCX_ERROR_HANDLING_MODES: tuple[str, ...] = ("none", "peer")
"""Accepted values of ``NixlTransport(ucx_error_handling=...)`` (see the module docstring)."""

_CLOSE_PROGRESS_S = 0.02
"""Progress time at close, before the agent is destroyed (see :meth:`NixlTransport.close`)."""

_nixl_api: Any = None
_nixl_import_error: BaseException | None = None


def _backend_to_import_directly() -> str | None:
    """The nixl backend package to import directly, or None to let ``nixl``'s package shim choose.

    The shim learns the CUDA version from torch. When torch is installed without CUDA (a CPU build)
    and not yet imported, it imports torch for that (2-3 s and a few hundred MB per process) and
    then picks the first installed backend anyway. Only in that case is the same pick made here
    without importing torch.
    """
    if any(m in sys.modules for m in ("torch", "cuda.bindings", "cupy")):
        return None
    try:
        if importlib.util.find_spec("torch") is None:
            return None
        from nixl_meta_utils import _torch_cuda_version_from_disk

        if _torch_cuda_version_from_disk() is not None:
            return None  # a CUDA build of torch: the shim matches its version without importing it
        return next(m for m in ("nixl_cu13", "nixl_cu12", "nixl_rocm") if importlib.util.find_spec(m))
    except Exception:  # helper missing in another nixl version, or no backend at all
        return None


def _import_nixl() -> Any:
    """Import nixl's Python API once, after setting the UCX defaults; raise ImportError if unavailable."""
    global _nixl_api, _nixl_import_error
    if _nixl_api is not None:
        return _nixl_api
    if _nixl_import_error is not None:
        raise ImportError(f"nixl is not usable: {_nixl_import_error}") from _nixl_import_error
    for key, value in _DEFAULT_ENV.items():
        os.environ.setdefault(key, value)
    try:
        backend = _backend_to_import_directly()
        if backend is not None:
            api = importlib.import_module(f"{backend}._api")
        else:
            from nixl import _api as api
    except Exception as exc:  # ImportError, or a broken install failing at load time
        _nixl_import_error = exc
        raise ImportError(f"nixl is not usable: {exc}") from exc
    _nixl_api = api
    return api


def nixl_available() -> bool:
    """True if ``nixl._api`` imports (importing it on first call)."""
    try:
        _import_nixl()
    except ImportError:
        return False
    return True


class _Xfer:
    """One receiver-side READ."""

    __slots__ = ("req_id", "peer", "handle", "state", "nbytes", "ndescs")

    def __init__(self, req_id: str, peer: str, handle: Any, nbytes: int, ndescs: int) -> None:
        self.req_id = req_id
        self.peer = peer
        self.handle = handle
        self.state = XferState.TRANSFERRING
        self.nbytes = nbytes
        self.ndescs = ndescs


def _int_field(params: dict[str, Any], key: str, *, minimum: int, maximum: int = 2**64 - 1) -> int:
    value = params.get(key)
    if isinstance(value, bool) or not isinstance(value, int):
        raise KvTransferError(f"params[{key!r}] must be an int, got {type(value).__name__}")
    if not minimum <= value <= maximum:
        raise KvTransferError(f"params[{key!r}]={value} outside [{minimum}, {maximum}]")
    return value


_SMALL = 32
"""Up to this many blocks, validation and run merging use plain Python (numpy's per-call cost dominates)."""

BlockIds = list[int] | np.ndarray


def _id_list(values: Any, what: str, *, limit: int | None = None) -> tuple[BlockIds, int]:
    """Validate a non-empty list of distinct block ids in ``[0, limit)``; return (ids, largest id)."""
    if not isinstance(values, list | tuple | np.ndarray):
        raise KvTransferError(f"{what} must be a list of ints, got {type(values).__name__}")
    upper = limit if limit is not None else _MAX_BLOCK_ID
    if len(values) == 0:
        raise KvTransferError(f"{what} is empty")
    if len(values) <= _SMALL and not isinstance(values, np.ndarray):
        for v in values:
            if isinstance(v, bool) or not isinstance(v, int | np.integer):
                raise KvTransferError(f"{what} must hold ints only, found {type(v).__name__}")
            if not 0 <= v < upper:
                raise KvTransferError(f"{what} holds block id {v}, expected [0, {upper})")
        if len(set(values)) != len(values):
            raise KvTransferError(f"{what} holds duplicate block ids")
        ids = [int(v) for v in values]
        return ids, max(ids)
    try:
        arr = np.asarray(values)
    except (ValueError, OverflowError) as exc:
        raise KvTransferError(f"{what} is not a flat list of ints: {exc}") from None
    if arr.ndim != 1:
        raise KvTransferError(f"{what} must be a flat list of ints")
    if arr.dtype.kind not in "iu":  # str, float, bool or object (mixed types, ints beyond 64 bits)
        raise KvTransferError(f"{what} must hold ints only, got dtype {arr.dtype}")
    lo, hi = int(arr.min()), int(arr.max())
    if lo < 0 or hi >= upper:
        raise KvTransferError(f"{what} holds block id {lo if lo < 0 else hi}, expected [0, {upper})")
    arr = arr.astype(np.int64, copy=False)
    ordered = np.sort(arr)
    if (ordered[1:] == ordered[:-1]).any():
        raise KvTransferError(f"{what} holds duplicate block ids")
    return arr, hi


def merge_runs(
    remote_ids: Sequence[int] | np.ndarray, local_ids: Sequence[int] | np.ndarray
) -> list[tuple[int, int, int]]:
    """Split a block mapping into runs that are consecutive on both sides.

    Returns ``(remote_start, local_start, length)`` per run: the run copies ``length`` blocks from
    ``remote_start`` onwards into ``local_start`` onwards.
    """
    r_start, l_start, length = _merge_runs_np(np.asarray(remote_ids), np.asarray(local_ids))
    return list(zip(r_start.tolist(), l_start.tolist(), length.tolist(), strict=True))


def _merge_runs_np(remote: np.ndarray, local: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    n = remote.size
    breaks = np.flatnonzero((np.diff(remote) != 1) | (np.diff(local) != 1)) + 1
    starts = np.concatenate(([0], breaks))
    lengths = np.diff(np.concatenate((starts, [n])))
    return remote[starts], local[starts], lengths


def _merge_runs_py(remote: Sequence[int], local: Sequence[int]) -> list[tuple[int, int, int]]:
    runs: list[tuple[int, int, int]] = []
    r0, l0, n = remote[0], local[0], 1
    for r, l_ in zip(remote[1:], local[1:], strict=True):
        if r == r0 + n and l_ == l0 + n:
            n += 1
        else:
            runs.append((r0, l0, n))
            r0, l0, n = r, l_, 1
    runs.append((r0, l0, n))
    return runs


def build_descriptors(
    remote: BlockIds, local: BlockIds, remote_base: int, local_base: int, block_bytes: int
) -> tuple[np.ndarray, np.ndarray]:
    """Nx3 uint64 (address, length, device) descriptor arrays, one row per merged run, for both sides."""
    if isinstance(remote, list) and isinstance(local, list):
        runs = _merge_runs_py(remote, local)
        r = np.array([(remote_base + a * block_bytes, k * block_bytes, 0) for a, _, k in runs], np.uint64)
        l_ = np.array([(local_base + b * block_bytes, k * block_bytes, 0) for _, b, k in runs], np.uint64)
        return r, l_
    r_start, l_start, length = _merge_runs_np(np.asarray(remote, np.int64), np.asarray(local, np.int64))
    bb = np.uint64(block_bytes)
    r = np.zeros((length.size, 3), np.uint64)
    l_ = np.zeros((length.size, 3), np.uint64)
    r[:, 0] = np.uint64(remote_base) + r_start.astype(np.uint64) * bb
    l_[:, 0] = np.uint64(local_base) + l_start.astype(np.uint64) * bb
    r[:, 1] = l_[:, 1] = length.astype(np.uint64) * bb
    return r, l_


class NixlTransport:
    """:class:`~workers.kv.base.KvTransport` over NIXL with the UCX backend, host (DRAM) memory.

    One NIXL agent per instance, named ``agent_name`` (unique across the cluster; a restarted peer
    may reuse its name, its new metadata then replaces the old). Both ends should use the same
    ``ucx_error_handling`` mode (mixed modes interoperated here, but the behaviour described in the
    module docstring is only measured for matching modes). Not thread-safe.

    Each read is one NIXL READ whose descriptors are the runs of blocks consecutive on both sides,
    carrying the exporter's notification tag. On one host UCX copies with cma inside the posting
    call, so ``start_read`` usually returns a transfer that is already DONE and takes as long as
    the copy itself (about 3 ms for 16 MiB here); split very large reads if the loop must not stall.
    """

    def __init__(self, agent_name: str, *, ucx_error_handling: str = "none") -> None:
        if not agent_name:
            raise ValueError("agent_name must be a non-empty string")
        if ucx_error_handling not in UCX_ERROR_HANDLING_MODES:
            raise ValueError(
                f"ucx_error_handling must be one of {UCX_ERROR_HANDLING_MODES}, got {ucx_error_handling!r}"
            )
        api = _import_nixl()
        self.name: str = agent_name
        self.ucx_error_handling: str = ucx_error_handling
        # backends=[] and an explicit create_backend: the config object cannot carry backend parameters.
        self._agent: Any = api.nixl_agent(
            agent_name, api.nixl_agent_config(enable_prog_thread=False, backends=[])
        )
        try:
            self._agent.create_backend("UCX", {"ucx_error_handling_mode": ucx_error_handling})
        except Exception as exc:
            raise KvTransferError(f"NIXL could not create its UCX backend: {exc}") from exc
        self._pool: KvBlockPool | None = None
        self._reg: Any = None
        self._meta: bytes = b""
        self._peers: dict[str, bytes] = {}
        self._xfers: dict[int, _Xfer] = {}
        self._deferred: list[_Xfer] = []
        self._pending_notifs: list[str] = []
        self._ids = itertools.count(1)
        self._closed = False

    # ------------------------------------------------------------------ setup
    def register_pool(self, pool: KvBlockPool) -> None:
        """Register ``pool``'s whole buffer with NIXL as one DRAM region. Only one pool per transport."""
        self._check_open()
        if self._pool is not None:
            if pool is self._pool:
                return
            raise KvTransferError("a pool is already registered with this transport")
        try:
            self._reg = self._agent.register_memory([(pool.base_addr, pool.nbytes, 0, "")], _MEM)
            self._meta = bytes(self._agent.get_agent_metadata())
        except Exception as exc:
            raise KvTransferError(f"registering the pool with NIXL failed: {exc}") from exc
        self._pool = pool

    @property
    def metadata(self) -> bytes:
        """This agent's NIXL metadata (valid once a pool is registered)."""
        return self._meta

    @property
    def agent(self) -> Any:
        """The underlying ``nixl_agent`` (for diagnostics and benchmarks; do not release its handles)."""
        self._check_open()
        return self._agent

    @property
    def num_inflight(self) -> int:
        """Transfers started and not yet released (including those whose abort is deferred)."""
        return len(self._xfers) + len(self._deferred)

    # ------------------------------------------------------------------ sender side
    def export(self, req_id: str, block_ids: list[int], num_tokens: int) -> dict[str, Any]:
        """Describe ``block_ids`` of the registered pool for a reader (see the interface)."""
        pool = self._require_pool()
        if not isinstance(req_id, str) or not req_id:
            raise ValueError("req_id must be a non-empty string")
        try:
            ids, _ = _id_list(block_ids, "block_ids", limit=pool.num_blocks)
        except KvTransferError as exc:
            raise ValueError(str(exc)) from None
        if isinstance(num_tokens, bool) or not isinstance(num_tokens, int) or num_tokens <= 0:
            raise ValueError(f"num_tokens must be a positive int, got {num_tokens!r}")
        if pool.blocks_for_tokens(num_tokens) != len(ids):
            raise ValueError(
                f"{num_tokens} tokens need {pool.blocks_for_tokens(num_tokens)} blocks, got {len(ids)}"
            )
        return {
            "agent": self.name,
            "meta": self._meta,
            "base_addr": pool.base_addr,
            "block_bytes": pool.block_bytes,
            "block_ids": ids if isinstance(ids, list) else ids.tolist(),
            "num_tokens": num_tokens,
            "notif": req_id.encode(),
        }

    def confirmed(self) -> list[str]:
        """Request ids whose reads completed since the last call (drains NIXL notifications)."""
        self._check_open()
        self._collect_notifs()
        out, self._pending_notifs = self._pending_notifs, []
        return out

    # ------------------------------------------------------------------ receiver side
    def start_read(self, req_id: str, params: dict[str, Any], local_block_ids: list[int]) -> int:
        """Validate ``params``, connect to the peer if needed and post one READ (see the interface)."""
        pool = self._require_pool()
        if not isinstance(params, dict):
            raise KvTransferError(f"params must be a dict, got {type(params).__name__}")
        agent = params.get("agent")
        if not isinstance(agent, str) or not agent:
            raise KvTransferError("params['agent'] must be a non-empty str")
        if agent == self.name:
            raise KvTransferError(
                f"params['agent'] is this agent ({agent!r}); loopback reads are not supported"
            )
        meta = params.get("meta")
        if not isinstance(meta, bytes | bytearray) or not meta:
            raise KvTransferError("params['meta'] must be non-empty bytes")
        notif = params.get("notif")
        if isinstance(notif, str):
            notif = notif.encode()
        if not isinstance(notif, bytes | bytearray) or not notif:
            raise KvTransferError("params['notif'] must be non-empty bytes")
        block_bytes = _int_field(params, "block_bytes", minimum=1)
        if block_bytes != pool.block_bytes:
            raise KvTransferError(
                f"remote blocks are {block_bytes} bytes, local blocks {pool.block_bytes}: layouts differ"
            )
        remote, remote_max = _id_list(params.get("block_ids"), "params['block_ids']")
        num_tokens = _int_field(params, "num_tokens", minimum=1)
        if pool.blocks_for_tokens(num_tokens) != len(remote):
            raise KvTransferError(
                f"params['num_tokens']={num_tokens} needs {pool.blocks_for_tokens(num_tokens)} blocks, "
                f"params['block_ids'] has {len(remote)}"
            )
        base_addr = _int_field(params, "base_addr", minimum=1)
        if base_addr + (remote_max + 1) * block_bytes > 2**64:
            raise KvTransferError("remote block addresses overflow 64 bits")
        local, _ = _id_list(local_block_ids, "local_block_ids", limit=pool.num_blocks)
        if len(local) != len(remote):
            raise KvTransferError(
                f"{len(local)} local blocks for {len(remote)} remote blocks (counts must match)"
            )

        self._connect(agent, bytes(meta))
        r_descs, l_descs = build_descriptors(remote, local, base_addr, pool.base_addr, block_bytes)
        nbytes = len(remote) * block_bytes
        handle = None
        try:
            handle = self._agent.initialize_xfer(
                "READ",
                self._agent.get_xfer_descs(l_descs, _MEM),
                self._agent.get_xfer_descs(r_descs, _MEM),
                agent,
                bytes(notif),
            )
            status = self._agent.transfer(handle)
        except Exception as exc:
            if handle is not None:
                self._release_handle(handle)
            raise KvTransferError(f"posting the READ from {agent!r} failed: {exc}") from exc
        xfer = _Xfer(req_id, agent, handle, nbytes, len(r_descs))
        if status == "DONE":
            xfer.state = XferState.DONE
        elif status == "ERR":
            xfer.state = XferState.FAILED
        xfer_id = next(self._ids)
        self._xfers[xfer_id] = xfer
        return xfer_id

    def poll(self, xfer_id: int) -> XferState:
        """State of a transfer; unfinished transfers are checked with NIXL (which also makes progress)."""
        xfer = self._xfers.get(xfer_id)
        if xfer is None:
            raise KvTransferError(f"unknown transfer id {xfer_id}")
        if self._deferred:
            self._retry_deferred()
        if xfer.state.finished:
            return xfer.state
        try:
            status = self._agent.check_xfer_state(xfer.handle)
        except Exception as exc:
            logger.warning("transfer %s (%s from %s) failed: %s", xfer_id, xfer.req_id, xfer.peer, exc)
            status = "ERR"
        if status == "DONE":
            xfer.state = XferState.DONE
        elif status == "ERR":
            xfer.state = XferState.FAILED
        return xfer.state

    def transfer_info(self, xfer_id: int) -> dict[str, Any]:
        """Request id, peer, byte count and descriptor count (after run merging) of a transfer."""
        xfer = self._xfers.get(xfer_id)
        if xfer is None:
            raise KvTransferError(f"unknown transfer id {xfer_id}")
        return {"req_id": xfer.req_id, "peer": xfer.peer, "nbytes": xfer.nbytes, "ndescs": xfer.ndescs}

    def release(self, xfer_id: int) -> None:
        """Free a transfer's handle; an in-flight transfer is aborted.

        If NIXL refuses to cancel an in-flight transfer, release drives it for up to a second and
        then keeps the handle in a deferred list, retried by later calls and counted by
        :attr:`num_inflight`; the local blocks of such a transfer must not be reused until
        :attr:`num_inflight` drops.
        """
        xfer = self._xfers.pop(xfer_id, None)
        if xfer is None:
            raise KvTransferError(f"unknown transfer id {xfer_id}")
        if not self._release_handle(xfer.handle):
            # Drive it to an end for a short while, then try again; keep it if it still will not go.
            deadline = time.monotonic() + _ABORT_GRACE_S
            while time.monotonic() < deadline:
                try:
                    if self._agent.check_xfer_state(xfer.handle) != "PROC":
                        break
                except Exception:
                    break
            if not self._release_handle(xfer.handle):
                logger.warning("abort of transfer %s (%s) deferred", xfer_id, xfer.req_id)
                self._deferred.append(xfer)
        if self._deferred:
            self._retry_deferred()

    # ------------------------------------------------------------------ teardown
    def close(self) -> None:
        """Release all transfers, forget peers, deregister the pool and drop the agent. Idempotent.

        Makes progress for a short while first: UCX aborts the process when a worker is destroyed
        while an endpoint to a dead peer still holds unsent operations (for example the completion
        notification of the last read), and progress lets it purge them.
        """
        if self._closed:
            return
        self._progress_for(_CLOSE_PROGRESS_S)
        for xfer_id in list(self._xfers):
            self.release(xfer_id)
        self._retry_deferred()
        if self._deferred:
            logger.warning("%d transfer handles could not be released at close", len(self._deferred))
        for peer in list(self._peers):
            self._forget_peer(peer)
        if self._reg is not None:
            try:
                self._agent.deregister_memory(self._reg)
            except Exception as exc:  # pragma: no cover - backend failure
                logger.warning("deregistering the pool failed: %s", exc)
            self._reg = None
        self._progress_for(_CLOSE_PROGRESS_S)
        self._deferred.clear()
        self._pending_notifs.clear()
        self._agent = None
        self._closed = True

    def __enter__(self) -> NixlTransport:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # ------------------------------------------------------------------ internals
    def _check_open(self) -> None:
        if self._closed:
            raise KvTransferError("transport is closed")

    def _require_pool(self) -> KvBlockPool:
        self._check_open()
        if self._pool is None:
            raise KvTransferError("register_pool() must be called first")
        return self._pool

    def _connect(self, agent: str, meta: bytes) -> None:
        """Load ``agent``'s metadata once; reload it when it changed (a restarted peer)."""
        known = self._peers.get(agent)
        if known == meta:
            return
        if known is not None:
            # NIXL refuses new metadata for a loaded name, so the old entry goes first.
            logger.info("metadata of peer %s changed; reloading it", agent)
            self._forget_peer(agent)
        try:
            loaded = self._load_remote(meta)
        except Exception as exc:
            if known is not None:  # bad metadata must not cost us a working peer
                with contextlib.suppress(Exception):
                    if self._load_remote(known) == agent:
                        self._peers[agent] = known
            raise KvTransferError(f"loading metadata of peer {agent!r} failed: {exc}") from exc
        if loaded != agent:
            if loaded not in self._peers and loaded != self.name:
                self._try_remove_remote(loaded)
            raise KvTransferError(f"params['meta'] belongs to agent {loaded!r}, not {agent!r}")
        self._peers[agent] = meta

    def _load_remote(self, meta: bytes) -> str:
        loaded = self._agent.add_remote_agent(meta)
        return loaded.decode(errors="replace") if isinstance(loaded, bytes) else str(loaded)

    def _collect_notifs(self) -> None:
        """Make progress and move new notifications into ``_pending_notifs``."""
        try:
            notifs = self._agent.get_new_notifs()
        except Exception as exc:  # pragma: no cover - backend failure
            logger.warning("reading NIXL notifications failed: %s", exc)
            return
        for peer, msgs in notifs.items():
            for msg in msgs:
                try:
                    self._pending_notifs.append(bytes(msg).decode())
                except UnicodeDecodeError:
                    logger.warning("dropping undecodable notification %r from %s", msg[:64], peer)

    def _progress_for(self, seconds: float) -> None:
        deadline = time.monotonic() + seconds
        while time.monotonic() < deadline:
            self._collect_notifs()

    def _forget_peer(self, agent: str) -> None:
        self._peers.pop(agent, None)
        self._try_remove_remote(agent)

    def _try_remove_remote(self, agent: str) -> None:
        try:
            self._agent.remove_remote_agent(agent)
        except Exception as exc:
            logger.warning("removing peer %s failed: %s", agent, exc)

    def _release_handle(self, handle: Any) -> bool:
        try:
            handle.release()
        except Exception as exc:
            logger.debug("releasing a NIXL transfer handle failed: %s", exc)
            return False
        return True

    def _retry_deferred(self) -> None:
        self._deferred = [x for x in self._deferred if not self._release_handle(x.handle)]

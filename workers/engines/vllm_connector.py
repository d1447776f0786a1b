"""DynaServe's KV connector for vLLM: vLLM's NIXL pull connector with DynaServe's handoff rules.

Loaded by vLLM through ``KVTransferConfig(kv_connector="DynaServeConnector",
kv_connector_module_path="workers.engines.vllm_connector")`` in the scheduler and in the worker.

What it changes on top of the stock connector:
* NIXL's progress thread is off (the stock agent busy-spins one core per instance); progress is made by
  the worker's polls in vLLM's steps (see the next point for when a step polls).
* UCX error handling mode ``none`` by default (extra config ``ucx_error_handling_mode``; NIXL's own default
  is ``peer``). In mode ``peer`` the READ after a notified one towards the same producer waits until the
  producer makes progress, and with the progress thread off a producer makes progress only between its
  steps: every handoff then waited for A's running step to end (a 50 ms prefill step on A stretched B's
  handoff by 50 ms; measured in docs/vllm_engine.md). In mode ``none`` nothing waits on the peer; a dead
  producer still fails the READ on one host (cma), and B's pull timeout covers the rest. ``peer`` is the
  choice where UCX must detect dead peers itself (multi-host RDMA).
* No per-step connector work while no handoff is in flight. The stock worker polls NIXL in every step
  (notifications, transfer states, lease reaping, peer clean-up) and walks the step's connector metadata
  in ``start_load_kv``. Here ``get_transfer_results`` returns at once unless something is in flight (a pull in
  any stage, blocks held for a reader, a handshake, a failed peer), with one full poll every
  ``IDLE_POLL_S`` that drains stray notifications (NIXL keeps them queued until then) and releases
  replaced peers; and ``start_load_kv`` returns at once on empty metadata. (vLLM also hashes every
  request's blocks once any connector is configured; the engine turns that off, see
  ``VllmEngine._start``.) A producer holding blocks for B and a
  consumer pulling still poll in every step, so B's READ (which needs the producer's progress), its
  confirmation, heartbeats and lease expiry are handled at the same step as by the stock connector.
  Measured on the tiny model, one core, 8 and 32 decoding sequences: the connector's in-step cost fell
  from about 90 to 35 us per step, and a step went from 70-155 us slower than bare vLLM to within noise
  of it (+-30 us).
* A consumer micro-request (``dynaserve_role == "B"``) frees its blocks when it finishes, like a plain
  decode instance, even though the prompt-split path runs it through the bidirectional code; its id also
  leaves the worker's ``_reqs_to_process`` then (the stock connector drops ids there only after a read, a
  lease expiry or an abort, so every finished B would stay listed).
* ``expire(req_id)`` ends a producer's hold on handed-off blocks now (an abort of a request whose KV
  nobody will read), instead of waiting for the lease.
* Host KV caches (the CPU build) are put on huge pages before NIXL registers them
  (workers.engines.hugepages): B's READ of 1000 tokens took 6.2 ms on 4 KiB pages, 3.2-4.3 ms on huge pages.
* The thread that builds it keeps its CPU affinity. vLLM's NIXL worker pins that thread to the last core
  of each NUMA node (a core it reserves for transfers, assuming a worker process of its own); in-process
  that thread is the engine thread, which would then run every forward pass on that one core.
* A handshake first checks that the producer's side channel accepts a TCP connection
  (``HANDSHAKE_PROBE_S``). vLLM's handshake talks to it over a ZeroMQ REQ socket, which keeps
  reconnecting to a closed port until its 5 s receive timeout; a producer that died after its handoff
  would cost B's request that long before the recompute. A dead process's port refuses at once. A failed
  handshake is reported to the engine (``on_producer_failure``), which recomputes the requests waiting on
  that producer at once.
* A consumer is admitted when the broker dispatches it, before its producer has run (``dynaserve_pending``
  in its transfer parameters, with the positions it will pull in ``remote_num_tokens``): vLLM allocates its
  blocks then and parks it waiting for remote KV, while the connector keeps it out of the pull until
  ``resume`` brings the producer's parameters (A's StartDecode). The READ is then posted at the next step,
  with no ``add_request`` or block allocation left on the handoff's path, and B's blocks are reserved from
  dispatch on (a handoff never waits for B's free blocks).
* Early pulls (``KvChunk``): while a producer still runs, the engine publishes the blocks its steps complete
  (``chunk_params``; each prefill step, and for a decode handoff one decode step where the tail begins),
  and a parked consumer pulls them at once (``prefetch``: a READ without notification, into the blocks it
  was allocated at dispatch). At the StartDecode, ``settle`` keeps the leading blocks whose early READ
  completed from the same producer blocks, with no preemption of the producer's request in between (its
  count travels with every chunk and with the handoff), and ``resume``
  pulls only the rest (the stock pull reads the tail of the producer's blocks when the consumer has fewer
  blocks left to fill, as after a local prefix hit). Only for one KV cache group, one producer rank and
  equal block sizes; otherwise nothing is pulled early.
* A consumer claims exactly the positions its producer computed (``remote_num_tokens``), never more.
  After a decode handoff B's sequence is one token longer than that (it ends with A's last token, whose
  position A never computed); the stock connector would claim the whole prompt, and vLLM would then
  compute its last position again just to sample.

Handoff shapes (built by workers.engines.vllm_engine): for a decode handoff or classic PD, A runs the
prompt with ``max_tokens = d`` and ``do_remote_decode`` and computes ``s = p + d - 1`` positions; B runs
``prompt + A's d tokens`` with A's returned parameters, pulls the ``s`` positions and computes position
``s`` (input: A's last token) in its first step, which samples B's first token. For a prompt split at k,
A runs ``prompt[:k]`` with ``max_tokens = 1``; B runs the whole prompt with A's parameters switched to the
bidirectional path, pulls k positions and computes the rest.
"""

from __future__ import annotations

import contextlib
import logging
import os
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, TypeVar

import vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker as _base_worker
from vllm.distributed import nixl_utils as _nixl_utils
from vllm.distributed.kv_transfer.kv_connector.v1.base import KVConnectorTransferResults
from vllm.distributed.kv_transfer.kv_connector.v1.metrics import KVConnectorStats
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlPullConnector
from vllm.distributed.kv_transfer.kv_connector.v1.nixl.metadata import NixlConnectorMetadata

from workers.engines.hugepages import advise_tensors
from workers.engines.vllm_config import PENDING_KEY, PREEMPTIONS_KEY, ROLE_KEY, UCX_ERROR_MODES

log = logging.getLogger("dynaserve.vllm")

_orig_agent_config = _nixl_utils.nixl_agent_config


def _agent_config_no_progress_thread(*args: Any, **kwargs: Any) -> Any:
    kwargs["enable_prog_thread"] = False
    return _orig_agent_config(*args, **kwargs)


_base_worker.nixl_agent_config = _agent_config_no_progress_thread

UCX_ERROR_MODE_KEY = "ucx_error_handling_mode"  # kv_connector_extra_config key: "none" (default) or "peer"
_ucx_error_mode = "none"  # of the connector being built (set by DynaServeConnector.__init__, read by _Agent)


if _base_worker.NixlWrapper is not None:  # None without NIXL (vLLM then refuses the connector itself)

    class _Agent(_base_worker.NixlWrapper):  # type: ignore[misc, name-defined]
        """vLLM's NIXL agent whose UCX backend gets the connector's error handling mode (NIXL's agent config
        cannot carry backend parameters)."""

        def create_backend(self, backend: str, initParams: dict[str, str] | None = None) -> None:  # noqa: N803
            params = dict(initParams or {})
            if backend == "UCX":
                params.setdefault(UCX_ERROR_MODE_KEY, _ucx_error_mode)
            super().create_backend(backend, params)

    _base_worker.NixlWrapper = _Agent

IDLE_POLL_S = 0.1  # while nothing is in flight the worker still polls NIXL this often (stray notifications)


HANDSHAKE_PROBE_S = 1.0  # the producer's side channel must accept a TCP connection within this

_T = TypeVar("_T")


def probed(handshake: Callable[..., _T], timeout_s: float = HANDSHAKE_PROBE_S,
           failed: Callable[[str], None] | None = None) -> Callable[..., _T]:
    """``handshake(host, port, remote_tp_size, expected_engine_id, ...)`` that fails at once when
    ``host:port`` does not accept a TCP connection within ``timeout_s`` (a dead producer), instead of after
    vLLM's 5 s receive timeout. A handshake that fails either way calls ``failed(expected_engine_id)``."""

    def run(host: str, port: int, *args: Any, **kwargs: Any) -> _T:
        try:
            try:
                with socket.create_connection((host, port), timeout=timeout_s):
                    pass
            except OSError as exc:
                raise RuntimeError(f"NIXL side channel {host}:{port} does not answer: {exc}") from exc
            return handshake(host, port, *args, **kwargs)
        except Exception:
            engine_id = kwargs.get("expected_engine_id", args[1] if len(args) > 1 else None)
            if failed is not None and engine_id is not None:
                failed(str(engine_id))
            raise

    return run


class DynaServeConnector(NixlPullConnector):
    """NIXL pull connector with DynaServe's handoff rules and idle fast paths (module docstring)."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        global _ucx_error_mode
        mode = str(vllm_config.kv_transfer_config.get_from_extra_config(UCX_ERROR_MODE_KEY, "none"))
        if mode not in UCX_ERROR_MODES:
            raise ValueError(f"{UCX_ERROR_MODE_KEY} must be one of {UCX_ERROR_MODES}, got {mode!r}")
        _ucx_error_mode = mode
        affinity = os.sched_getaffinity(0)
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        finally:
            os.sched_setaffinity(0, affinity)  # undo the NIXL worker's pin of this thread (module docstring)
        if self.connector_worker is not None:  # submitted to the handshake executor through this attribute
            w = self.connector_worker
            w._nixl_handshake = probed(w._nixl_handshake, failed=self._producer_failed)  # type: ignore[method-assign]
        # set by the engine: called (on a handshake thread) with the engine id of a producer whose handshake
        # failed. vLLM fails the waiting pulls of PD and decode handoffs itself, but not those of prompt
        # splits (its bidirectional path), which would wait out the engine's pull timeout.
        self.on_producer_failure: Callable[[str], None] | None = None
        self._parked: dict[str, tuple[Any, int]] = {}  # scheduler side: pending consumer -> (blocks, positions)
        self._prefetches: dict[str, list[_Prefetch]] = {}  # worker side: early READs by consumer request
        self._next_idle_poll = 0.0  # worker side: perf_counter time of the next full poll while idle
        self._polled = True  # worker side: this step's get_transfer_results polled NIXL

    def _producer_failed(self, engine_id: str) -> None:
        if self.on_producer_failure is not None:
            self.on_producer_failure(engine_id)

    def register_kv_caches(self, kv_caches: dict[str, Any]) -> None:
        """Host KV caches go on huge pages before NIXL registers them (workers.engines.hugepages)."""
        advised, collapsed = advise_tensors(kv_caches.values())
        if advised:
            log.info("KV cache: %d MiB advised for huge pages, %d MiB collapsed now", advised >> 20, collapsed >> 20)
        super().register_kv_caches(kv_caches)

    # ------------------------------------------------------------------ scheduler side

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        params = request.kv_transfer_params
        if params and params.get(PENDING_KEY):  # blocks now, the pull when the producer's parameters come
            count = max(0, int(params["remote_num_tokens"]) - num_computed_tokens)
            return count, count > 0
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        if count and params and params.get(ROLE_KEY) == "B" and params.get("remote_num_tokens") is not None:
            # only what A computed; B computes the rest, starting with the position after A's last
            count = max(0, min(count, int(params["remote_num_tokens"]) - num_computed_tokens))
            load_async = load_async and count > 0
        return count, load_async

    def update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> None:
        params = request.kv_transfer_params
        if params and params.get(PENDING_KEY):
            self._parked[request.request_id] = (blocks, num_external_tokens)
            return
        super().update_state_after_alloc(request, blocks, num_external_tokens)

    def is_parked(self, req_id: str) -> bool:
        """Whether a pending consumer holds its blocks and waits for ``resume`` (scheduler side)."""
        return req_id in self._parked

    def parked_block_ids(self, req_id: str) -> list[int] | None:
        """The blocks a parked consumer was allocated (one KV cache group), None if it is not parked."""
        parked = self._parked.get(req_id)
        if parked is None:
            return None
        groups = parked[0].get_unhashed_block_ids_all_groups()
        return list(groups[0]) if len(groups) == 1 else None

    def resume(self, request: Any, params: dict[str, Any], pulled_blocks: int = 0) -> None:
        """A pending consumer gets its producer's parameters (scheduler side, between steps). Parked (blocks
        allocated, waiting for remote KV): its pull is registered now and posted at the next step, for all
        but its first ``pulled_blocks`` blocks (pulled early, ``settle``). Not yet admitted (no free blocks
        then): the parameters are set and vLLM admits it like any consumer."""
        new = {k: v for k, v in (request.kv_transfer_params or {}).items() if k != PENDING_KEY}
        new.update(params)
        request.kv_transfer_params = new
        self.on_new_request(request)  # heartbeats to the producer, as for a consumer added with its parameters
        parked = self._parked.pop(request.request_id, None)
        if parked is not None:
            blocks, num_external_tokens = parked
            super().update_state_after_alloc(request, _Tail(blocks, pulled_blocks) if pulled_blocks else blocks,
                                             num_external_tokens)

    def chunk_params(self, request: Any, block_ids: list[int]) -> dict[str, Any]:
        """A producer's parameters for its first ``len(block_ids)`` blocks, while it still runs (a KvChunk)."""
        sched = self.connector_scheduler
        assert sched is not None
        return dict(remote_block_ids=[list(block_ids)], remote_engine_id=sched.engine_id,
                    remote_request_id=request.request_id, remote_host=sched.side_channel_host,
                    remote_port=sched.side_channel_port, tp_size=sched.transfer_tp_size,
                    **{PREEMPTIONS_KEY: request.num_preemptions})

    def _finish_consumer(self, request: Any) -> bool:
        """A finished B frees its blocks now: stop its heartbeats and have the worker forget it. False if
        ``request`` is no B."""
        params = request.kv_transfer_params
        if not (params and params.get(ROLE_KEY) == "B"):
            return False
        self._parked.pop(request.request_id, None)
        sched = self.connector_scheduler
        assert sched is not None
        sched._stop_heartbeat(request.request_id)
        sched._reqs_not_processed.add(request.request_id)  # the worker drops it from _reqs_to_process
        return True

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        if self._finish_consumer(request):
            return False, None
        return super().request_finished(request, block_ids)

    def request_finished_all_groups(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        if self._finish_consumer(request):
            return False, None
        return super().request_finished_all_groups(request, block_ids)

    def expire(self, req_id: str) -> None:
        """Release a producer's held blocks at the next step (scheduler side)."""
        assert self.connector_scheduler is not None
        self.connector_scheduler._reqs_need_send[req_id] = time.perf_counter()

    # ------------------------------------------------------------------ worker side

    def _worker_idle(self) -> bool:
        """Nothing in flight on the worker: no pull pending (handshake, read, failure, deferred notification),
        no blocks held for a reader (``_reqs_to_send``: B's READ, its confirmation and heartbeats, the lease),
        no handshake running, no failed peer. A poll would then find nothing but stray notifications.

        ``_reqs_to_process`` (requests that went through a batch with transfer parameters) is not looked at:
        a reader's confirmation can only follow the producer's finish, and the metadata of the step after it
        moves the request to ``_reqs_to_send`` before that step's poll."""
        w = self.connector_worker
        assert w is not None
        return not (w._recving_metadata or w._recving_transfers or w._reqs_to_send or w._recv_failures
                    or w._pending_recv_notifs or w._replicated_pcp_done_sending or w._handshake_futures
                    or w._failed_remote_engines or w._invalid_remote_engines
                    or not w._failed_recv_reqs.empty() or not w._ready_requests.empty())

    def start_load_kv(self, forward_context: Any, **kwargs: Any) -> None:
        """Start this step's pulls and take in its sends and heartbeats; nothing to do when the step's
        metadata is empty and no handshake has completed since the last step."""
        meta = self._connector_metadata
        assert isinstance(meta, NixlConnectorMetadata) and self.connector_worker is not None
        if (meta.reqs_to_recv or meta.reqs_to_send or meta.reqs_in_batch or meta.reqs_not_processed
                or meta.heartbeat_by_engine or meta.reqs_to_save
                or not self.connector_worker._ready_requests.empty()):
            super().start_load_kv(forward_context, **kwargs)

    def get_transfer_results(self, finished_req_ids: set[str]) -> KVConnectorTransferResults:
        """Poll NIXL (notifications, transfer states, leases, peers) unless nothing is in flight; then only
        every ``IDLE_POLL_S``."""
        if self._worker_idle():
            now = time.perf_counter()
            if now < self._next_idle_poll:
                self._polled = False
                return KVConnectorTransferResults()
            self._next_idle_poll = now + IDLE_POLL_S
        self._polled = True
        return super().get_transfer_results(finished_req_ids)

    def get_block_ids_with_load_errors(self) -> set[int]:
        """Failed loads are found by a poll: nothing new after a skipped one."""
        return super().get_block_ids_with_load_errors() if self._polled else set()

    def get_kv_connector_stats(self) -> KVConnectorStats | None:
        """Transfer statistics change with a poll: none after a skipped one (the next poll reports them)."""
        if self.connector_worker is not None and not self._polled:
            return None
        return super().get_kv_connector_stats()

    # ------------------------------------------------------------------ early pulls (worker side)

    def prefetch(self, req_id: str, local_block_ids: list[int], kv: dict[str, Any]) -> int:
        """Post a READ (no notification to the producer) of the producer blocks ``kv`` names that no earlier
        prefetch of ``req_id`` covered, into ``local_block_ids`` (the consumer's blocks, position for position).
        Returns the number of blocks posted: 0 when there is nothing new, when the producer is not known yet
        (no handshake: the StartDecode's pull makes it) or when the layout does not allow it."""
        w = self.connector_worker
        assert w is not None
        engine_id = str(kv["remote_engine_id"])
        groups = kv["remote_block_ids"]
        if engine_id not in w._remote_agents or len(groups) != 1 or w.transfer_topo is None:
            return 0
        info = w.transfer_topo.get_engine_info(engine_id)
        if (info.remote_block_size != w.block_size or info.remote_tp_size != w.world_size
                or info.remote_physical_blocks_per_logical != w._physical_blocks_per_logical_kv_block
                or w._physical_blocks_per_logical_kv_block != 1 or w._has_mamba or w.use_mla or w._mixed_mem_types
                or len(w.kv_cache_config.transfer_groups) != 1 or w.dcp_size > 1 or info.remote_dcp_size > 1):
            return 0
        remote = [int(b) for b in groups[0]]
        done = self._prefetches.setdefault(req_id, [])
        start = done[-1].end if done else 0
        end = min(len(remote), len(local_block_ids))
        if end <= start:
            return 0
        local_descs = w._compute_desc_ids(
            block_ids=[local_block_ids[start:end]], dst_num_blocks=w.dst_num_blocks[w.engine_id], block_size_ratio=None,
            physical_blocks_per_logical=1, region_num_blocks=(w.dst_region_num_blocks.get(w.engine_id) or None),
            region_group_ids=(w.region_group_ids or None), uses_region_group_mapping=w._uses_region_group_mapping)
        remote_descs = w._compute_desc_ids(
            block_ids=[remote[start:end]], dst_num_blocks=w.dst_num_blocks[engine_id], block_size_ratio=None,
            physical_blocks_per_logical=1, region_num_blocks=(w.dst_region_num_blocks.get(engine_id) or None),
            region_group_ids=(w.dst_region_group_ids.get(engine_id) or None),
            uses_region_group_mapping=w.dst_uses_region_group_mapping[engine_id])
        handle = w.nixl_wrapper.make_prepped_xfer(
            "READ", w.src_xfer_handles_by_block_size[w.block_size], local_descs,
            w.dst_xfer_side_handles[engine_id][0], remote_descs)
        done.append(_Prefetch(handle, engine_id, remote[:end], start, end, int(kv.get(PREEMPTIONS_KEY, -1))))
        w.nixl_wrapper.transfer(handle)
        return end - start

    def _wait(self, reads: list[_Prefetch], timeout_s: float) -> None:
        """Poll ``reads`` until none is in progress (or ``timeout_s`` passed), then release their handles."""
        w = self.connector_worker
        assert w is not None
        deadline = time.monotonic() + timeout_s
        for r in reads:
            while r.state == "PROC":
                try:
                    r.state = w.nixl_wrapper.check_xfer_state(r.handle)
                except Exception as exc:  # noqa: BLE001 - a failed read is only not kept
                    log.warning("early KV read failed: %s", exc)
                    r.state = "ERR"
                if r.state == "PROC":
                    if time.monotonic() > deadline:
                        log.error("early KV read still running after %.1f s; its blocks are not freed", timeout_s)
                        return
                    time.sleep(0.0002)
            with contextlib.suppress(Exception):
                w.nixl_wrapper.release_xfer_handle(r.handle)
            r.handle = -1

    def settle(self, req_id: str, kv: dict[str, Any], timeout_s: float) -> int:
        """At the StartDecode: wait for ``req_id``'s early READs and return how many leading blocks they
        filled with what the handoff ``kv`` names (same producer, same blocks, no preemption since)."""
        reads = self._prefetches.pop(req_id, [])
        if not reads:
            return 0
        self._wait(reads, timeout_s)
        final = [int(b) for b in kv["remote_block_ids"][0]] if len(kv.get("remote_block_ids") or ()) == 1 else []
        kept = 0
        for r in reads:
            if (r.state != "DONE" or r.start != kept or r.engine_id != str(kv.get("remote_engine_id"))
                    or r.preemptions != int(kv.get(PREEMPTIONS_KEY, -2)) or final[:r.end] != r.remote[:r.end]):
                break
            kept = r.end
        return kept

    def drop(self, req_id: str, timeout_s: float) -> bool:
        """An aborted consumer: wait for its early READs (they write into its blocks) before they are freed.
        False if one is still running after ``timeout_s``."""
        reads = self._prefetches.pop(req_id, [])
        self._wait(reads, timeout_s)
        return all(r.handle == -1 for r in reads)


class _Tail:
    """A consumer's blocks without the first ``skip`` (filled by early READs): vLLM's pull reads the producer's
    last blocks into them, as after a local prefix-cache hit."""

    def __init__(self, blocks: Any, skip: int) -> None:
        self.blocks = blocks.blocks
        self._all = blocks
        self._skip = skip

    def get_unhashed_block_ids_all_groups(self) -> list[list[int]]:
        return [list(group[self._skip:]) for group in self._all.get_unhashed_block_ids_all_groups()]


@dataclass(slots=True)
class _Prefetch:
    """One early READ of a consumer: producer blocks ``remote[start:end]`` into its blocks ``start:end``."""

    handle: int
    engine_id: str
    remote: list[int]
    start: int
    end: int
    preemptions: int
    state: str = "PROC"

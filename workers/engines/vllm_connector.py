"""DynaServe's KV connector for vLLM: vLLM's NIXL pull connector with DynaServe's handoff rules.

Loaded by vLLM through ``KVTransferConfig(kv_connector="DynaServeConnector",
kv_connector_module_path="workers.engines.vllm_connector")`` in the scheduler and in the worker.

What it changes on top of the stock connector:
* NIXL's progress thread is off (the stock agent busy-spins one core per instance); progress is made by
  the polls vLLM does every step.
* A consumer micro-request (``dynaserve_role == "B"``) frees its blocks when it finishes, like a plain
  decode instance, even though the prompt-split path runs it through the bidirectional code.
* ``expire(req_id)`` ends a producer's hold on handed-off blocks now (an abort of a request whose KV
  nobody will read), instead of waiting for the lease.
* The thread that builds it keeps its CPU affinity. vLLM's NIXL worker pins that thread to the last core
  of each NUMA node (a core it reserves for transfers, assuming a worker process of its own); in-process
  that thread is the engine thread, which would then run every forward pass on that one core.

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

import os
import time
from typing import Any

import vllm.distributed.kv_transfer.kv_connector.v1.nixl.base_worker as _base_worker
from vllm.distributed import nixl_utils as _nixl_utils
from vllm.distributed.kv_transfer.kv_connector.v1.nixl import NixlPullConnector

_orig_agent_config = _nixl_utils.nixl_agent_config


def _agent_config_no_progress_thread(*args: Any, **kwargs: Any) -> Any:
    kwargs["enable_prog_thread"] = False
    return _orig_agent_config(*args, **kwargs)


_base_worker.nixl_agent_config = _agent_config_no_progress_thread

ROLE_KEY = "dynaserve_role"


class DynaServeConnector(NixlPullConnector):
    """NIXL pull connector with DynaServe's consumer-side release and producer-side expiry."""

    def __init__(self, vllm_config: Any, role: Any, kv_cache_config: Any) -> None:
        affinity = os.sched_getaffinity(0)
        try:
            super().__init__(vllm_config, role, kv_cache_config)
        finally:
            os.sched_setaffinity(0, affinity)  # undo the NIXL worker's pin of this thread (module docstring)

    def get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> tuple[int | None, bool]:
        count, load_async = super().get_num_new_matched_tokens(request, num_computed_tokens)
        params = request.kv_transfer_params
        if count and params and params.get(ROLE_KEY) == "B" and params.get("remote_num_tokens") is not None:
            # only what A computed; B computes the rest, starting with the position after A's last
            count = max(0, min(count, int(params["remote_num_tokens"]) - num_computed_tokens))
            load_async = load_async and count > 0
        return count, load_async

    def request_finished(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if params and params.get(ROLE_KEY) == "B":
            assert self.connector_scheduler is not None
            self.connector_scheduler._stop_heartbeat(request.request_id)
            return False, None
        return super().request_finished(request, block_ids)

    def request_finished_all_groups(self, request: Any, block_ids: Any) -> tuple[bool, dict[str, Any] | None]:
        params = request.kv_transfer_params
        if params and params.get(ROLE_KEY) == "B":
            assert self.connector_scheduler is not None
            self.connector_scheduler._stop_heartbeat(request.request_id)
            return False, None
        return super().request_finished_all_groups(request, block_ids)

    def expire(self, req_id: str) -> None:
        """Release a producer's held blocks at the next step (scheduler side)."""
        assert self.connector_scheduler is not None
        self.connector_scheduler._reqs_need_send[req_id] = time.perf_counter()

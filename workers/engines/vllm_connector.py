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

Handoff shapes (built by workers.engines.vllm_engine): for a decode handoff or classic PD, A runs the
prompt with ``max_tokens = d`` and ``do_remote_decode``; B runs ``prompt + A's first d-1 tokens`` with A's
returned parameters, re-emits A's last token (dropped) and continues. For a prompt split at k, A runs
``prompt[:k]`` with ``max_tokens = 1``; B runs the whole prompt with A's parameters switched to the
bidirectional path, pulls k positions and computes the rest.
"""

from __future__ import annotations

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

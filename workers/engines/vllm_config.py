"""Settings of the vLLM engine (importable without vLLM, so the worker CLI can show them everywhere)."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


def parse_cpu_list(spec: str) -> set[int]:
    """CPU ids of a list like ``"0"``, ``"2-3"`` or ``"0,2-3"``."""
    cpus: set[int] = set()
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        lo, _, hi = part.partition("-")
        first, last = int(lo), int(hi or lo)
        if first < 0 or last < first:
            raise ValueError(f"bad CPU range {part!r}")
        cpus.update(range(first, last + 1))
    if not cpus:
        raise ValueError(f"empty CPU list {spec!r}")
    return cpus


UCX_ERROR_MODES = ("none", "peer")  # UCX error handling modes of the KV transfer (VllmEngineConfig.ucx_error_handling)


# keys DynaServe adds to a request's kv_transfer_params (the engine sets them, the connector reads them)
ROLE_KEY = "dynaserve_role"  # "A" (producer) or "B" (consumer)
PENDING_KEY = "dynaserve_pending"  # a consumer admitted before its producer's parameters exist (``resume``)
PREEMPTIONS_KEY = "dynaserve_preemptions"  # the producer request's preemption count (early pulls are kept only if equal)


@dataclass(frozen=True)
class VllmEngineConfig:
    """The vLLM engine's model and resources (flags --vllm-*; TOML section [vllm])."""

    model: str = ".models/tiny-llama"  # HF model directory (scripts/build_tiny_model.py makes the default)
    dtype: str = "float32"  # weights and activations: float32 on CPU for exact equality, bfloat16 on GPUs
    device: str = "cpu"  # cpu or cuda: where the KV cache lives (the KV transfer reads from there)
    max_model_len: int = 2048  # longest prompt + output
    kv_cache_bytes: int = 256 << 20  # KV cache memory of this instance
    max_num_batched_tokens: int = 2048  # static step size bound (the local scheduler sets the per-step budget)
    max_num_seqs: int = 64  # sequences per step at most
    enforce_eager: bool = True  # skip torch.compile (start-up in seconds; compile helps GPUs)
    side_channel_port: int = 5600  # NIXL handshake port of this instance (distinct per instance on a host)
    cpu_bind: str = ""  # CPU cores for this instance's compute threads, e.g. "0" or "2-3", one thread per core (CPU builds; empty = all cores of the process)
    loop_bind: str = ""  # CPU cores for the worker's event loop and socket threads, and for the idle poll threads vLLM's start-up leaves (gloo), e.g. "1", to keep them off the engine's cores (CPU builds; empty = not bound)
    kv_lease_s: float = 30.0  # handed-off blocks are freed after this long without the reader's confirmation
    admit_b_at_dispatch: bool = True  # a B enters vLLM when dispatched: its blocks are reserved then (for a decode handoff, through A's decode steps too), and A's StartDecode only posts the READ
    overlap_tail_tokens: int = 128  # with admit_b_at_dispatch, an A that hands its prompt's KV over (s <= p) prefills in two steps, the second the last >= this many tokens from a block boundary on, so B pulls the first step's blocks while A computes the rest (0 = one step when the budget allows); an A of a decode handoff (s > p) publishes its blocks at its prefill's end and once more where this tail begins; with --early-tail-auto the broker picks each request's tail for its link and A's load (MicroDescriptor.early_tail)
    kv_pull_timeout_s: float = 5.0  # a B still waiting for A's KV after this long recomputes it locally
    ucx_error_handling: str = "none"  # UCX error handling of the KV transfer: none (nothing waits on the peer; one host, or a fabric where B's pull timeout suffices) or peer (UCX detects dead peers; NIXL's default)
    seed: int = 0  # sampling seed of the engine
    fault_injection: str = ""  # testing only: scramble_prefix (B overwrites its copy of the handed-off positions) or dead_handoff_port (A advertises a closed handshake port)

    def __post_init__(self) -> None:
        if self.device not in ("cpu", "cuda"):
            raise ValueError("device must be cpu or cuda")
        if self.max_model_len < 2 or self.kv_cache_bytes <= 0:
            raise ValueError("max_model_len must be >= 2 and kv_cache_bytes > 0")
        if self.ucx_error_handling not in UCX_ERROR_MODES:
            raise ValueError(f"ucx_error_handling must be one of {UCX_ERROR_MODES}")
        if self.fault_injection not in ("", "scramble_prefix", "dead_handoff_port"):
            raise ValueError("fault_injection must be empty, scramble_prefix or dead_handoff_port")
        for spec in (self.cpu_bind, self.loop_bind):
            if spec:
                parse_cpu_list(spec)  # raises ValueError on a malformed list
        if self.overlap_tail_tokens < 0:
            raise ValueError("overlap_tail_tokens must be >= 0")
        if not 1 <= self.side_channel_port <= 65535:
            raise ValueError("side_channel_port must be a TCP port")

    def engine_kwargs(self, *, connector: bool = True, scheduler: bool = True) -> dict[str, Any]:
        """vLLM ``EngineArgs`` keyword arguments of this engine. ``connector``: DynaServe's KV connector over
        NIXL (workers.engines.vllm_connector); ``scheduler``: the local scheduler's ``scheduler_cls``
        (workers.engines.vllm_scheduler). Benchmarks build bare vLLM from the same arguments without both."""
        kw: dict[str, Any] = dict(
            model=self.model, dtype=self.dtype, enforce_eager=self.enforce_eager, max_model_len=self.max_model_len,
            seed=self.seed, kv_cache_memory_bytes=self.kv_cache_bytes, enable_prefix_caching=False,
            max_num_batched_tokens=self.max_num_batched_tokens, max_num_seqs=self.max_num_seqs,
            disable_log_stats=True,  # the worker reports its own metrics (workers/metrics.py)
        )
        if scheduler:
            kw["scheduler_cls"] = "workers.engines.vllm_scheduler.DynaServeScheduler"
            # VllmEngine pairs every step() with the batch it scheduled (its tokens, its measured time for the
            # local scheduler's step model): vLLM's async scheduling, on by default on CUDA, would schedule the
            # next batch before the last one's outputs are in. (The CPU build turns it off itself.)
            kw["async_scheduling"] = False
        if connector:
            from vllm.config import KVTransferConfig

            kw["kv_transfer_config"] = KVTransferConfig(
                kv_connector="DynaServeConnector",
                kv_connector_module_path="workers.engines.vllm_connector",
                kv_role="kv_both",
                kv_buffer_device=self.device,
                kv_load_failure_policy="recompute",
                kv_connector_extra_config={
                    "bidirectional_kv_xfer": True,
                    "kv_recompute_threshold": 0,
                    "kv_lease_duration": self.kv_lease_s,
                    "ucx_error_handling_mode": self.ucx_error_handling,
                },
            )
        return kw

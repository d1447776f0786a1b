"""Settings of a simulated cluster (frozen) and the derived per-instance quantities."""

from __future__ import annotations

import math
from dataclasses import dataclass
from functools import cached_property

from broker.cluster_state import Pricing
from dynaserve.costmodel import StepLatencyModel
from dynaserve.costtables import MODEL_PRESETS, ModelShape, build_step_model
from dynaserve.costtables_io import gpu_list
from workers.local_scheduler import LocalSchedulerConfig

GROUND_TRUTHS = ("linear", "detailed")
KV_ALLOCS = ("on_demand", "reserve")


@dataclass(frozen=True)
class SimConfig:
    """One simulated cluster: model, GPUs, instance count, local batching and the KV link."""

    model: str = "llama3-8b"  # preset of dynaserve.costtables.MODEL_PRESETS
    gpu: str = "a100"  # cost tables: a100 or h100; a comma list (a100,h100) gives instance i the i-th, cycled
    advertise_step_models: bool = True  # each instance advertises its step model to the global policy and reports
    # its scheduler's correction, as workers do (InstanceState.step_model); False: the policy prices every instance
    # with the first GPU's model, as a broker that knows one model would
    tp: int = 1  # tensor-parallel degree of one instance
    instances: int = 8  # unified instances in the cluster
    tbt_slo_ms: float = 100.0  # TBT SLO the local schedulers batch for
    margin: float = 0.1  # local scheduler: keep predicted steps under (1 - margin) * TBT SLO
    max_batched_tokens: int = 8192  # local scheduler: hard cap of tokens per step
    max_num_seqs: int = 256  # running sequences per instance (admission cap, as in vLLM)
    min_chunk_tokens: int = 16  # prefill progress guaranteed per step
    report_interval_ms: float = 20.0  # instances report their load this often (virtual time)
    exact_state: bool = False  # the policy sees every instance's current load at each placement (every
    # changed instance reports right before it), as no live broker can: for perfect-information references
    link_gbps: float = 25.0  # KV link bandwidth per direction, GB/s (one link per GPU of an instance)
    transfer_latency_ms: float = 1.0  # fixed cost of one KV handoff (setup, descriptor round trip)
    serialize_transfers: bool = True  # transfers into one instance share its link, one at a time
    early_pull_tail_tokens: int = 0  # > 0: B reads A's blocks before A's last this-many positions while A
    # computes those (a decode handoff: the prompt's as A prefills, its decode positions before them at one
    # decode step), and only the rest at the handoff (the vLLM workers' default is 128,
    # RegisterWorker.early_pull_tail_tokens); 0: the whole pull starts at the handoff
    early_tail_auto: bool = True  # the broker picks each split's tail for the link and A's load, as the live
    # broker does by default (Pricing.early_tail, MicroDescriptor.early_tail); False: every A uses early_pull_tail_tokens
    eager_pull: bool = False  # B admits and starts its pull when the handoff arrives (the live worker waits
    # for its next step boundary, as the default here)
    prefill_order: str = "deadline"  # order of prefill chunks in a step (workers.local_scheduler.prefill_rank):
    # "deadline" (earliest TTFT deadline first, the live worker's default) or "fcfs" (arrival, a stock engine)
    demote_late: bool = True  # deadline order: prefills past their TTFT deadline go behind the others
    gpu_memory_gb: float = 80.0  # memory of one GPU
    kv_memory_fraction: float = 0.9  # share of GPU memory the engine may use (weights + KV)
    block_size: int = 16  # KV block size in tokens (allocations round up to blocks)
    kv_alloc: str = "on_demand"  # "on_demand": blocks as tokens are written, preemption when out (vLLM);
    # "reserve": prompt + max_tokens at admission (the live simulated engine)
    ground_truth: str = "linear"  # step durations: "linear" (the schedulers' own model) or "detailed"
    handoff_ms: float = 2.0  # the global policies' fixed price of a handoff (Pricing.handoff_ms)
    # what a live engine adds to the model (not seen by the schedulers' model; measured, e.g. by bench.sim2real)
    step_overhead_ms: float = 0.0  # host-side work per step, added to every step's duration
    step_overhead_per_seq_ms: float = 0.0  # and per sequence in the step (decodes and prefill chunks)
    step_overhead_prefill_ms: float = 0.0  # and once more per step with prefill work (added after the noise)
    step_noise: tuple[float, ...] = ()  # measured / modelled step time at evenly spaced quantiles (0 .. 1), as
    # a calibration file's fit_error.ratio_quantiles; every step's modelled time is multiplied by a draw
    step_noise_prefill: tuple[float, ...] = ()  # the same for steps with prefill work, when they differ from
    # decode-only steps; set, step_noise applies to decode-only steps only
    noise_seed: int = 0
    path_latency_ms: float = 0.0  # client -> broker -> worker plus worker -> broker -> client, added to
    # every token's arrival at the client
    path_latency_per_prompt_token_ms: float = 0.0  # and per prompt token (the prompt's trip to the engine)
    delivery_jitter_ms: tuple[tuple[float, ...], ...] = ()  # measured runs of consecutive tokens' delay on
    # their way to the client, beyond the constant path (ms, may be negative): each request replays one run,
    # chosen at random, from a random token on (wrapping), so slow stretches stay together; in order (FIFO)
    max_sim_s: float = 7200.0  # stop the simulation at this virtual time (unfinished requests fail)

    def __post_init__(self) -> None:
        if self.model not in MODEL_PRESETS:
            raise ValueError(f"unknown model {self.model!r}; known: {sorted(MODEL_PRESETS)}")
        if self.instances < 1:
            raise ValueError("instances must be >= 1")
        gpu_list(self.gpu)  # raises ValueError on an unknown GPU
        if self.report_interval_ms <= 0:
            raise ValueError("report_interval_ms must be > 0")
        if self.early_pull_tail_tokens < 0:
            raise ValueError("early_pull_tail_tokens must be >= 0")
        if self.link_gbps <= 0 or self.transfer_latency_ms < 0:
            raise ValueError("link_gbps must be > 0 and transfer_latency_ms >= 0")
        if min(self.step_overhead_ms, self.step_overhead_per_seq_ms, self.step_overhead_prefill_ms,
               self.path_latency_ms, self.path_latency_per_prompt_token_ms) < 0:
            raise ValueError("the step overheads and path latencies must be >= 0")
        for name in ("step_noise", "step_noise_prefill"):
            sn = getattr(self, name)
            if sn and (len(sn) < 2 or sn[0] <= 0 or any(b < a for a, b in zip(sn, sn[1:], strict=False))):
                raise ValueError(f"{name} must be >= 2 positive, non-decreasing quantiles")
        if any(not run or not all(math.isfinite(x) for x in run) for run in self.delivery_jitter_ms):
            raise ValueError("delivery_jitter_ms must hold non-empty runs of finite numbers")
        if self.step_noise_prefill and not self.step_noise:
            raise ValueError("step_noise_prefill needs step_noise (for the decode-only steps)")
        if self.kv_alloc not in KV_ALLOCS:
            raise ValueError(f"kv_alloc must be one of {KV_ALLOCS}, got {self.kv_alloc!r}")
        if self.ground_truth not in GROUND_TRUTHS:
            raise ValueError(f"ground_truth must be one of {GROUND_TRUTHS}, got {self.ground_truth!r}")
        if self.kv_capacity_tokens < self.block_size:
            raise ValueError(f"{self.model} on {self.tp}x {self.gpu}: the weights leave no room for KV")

    @property
    def shape(self) -> ModelShape:
        return MODEL_PRESETS[self.model]

    @property
    def gpus(self) -> list[str]:
        """``gpu`` as a list: instance i runs on ``gpus[i % len(gpus)]``."""
        return gpu_list(self.gpu)

    def gpu_of(self, index: int) -> str:
        return self.gpus[index % len(self.gpus)]

    @cached_property
    def step_models(self) -> dict[str, StepLatencyModel]:
        """The linear step model of each GPU: what the local schedulers there use (and the ground truth when
        ``ground_truth="linear"``)."""
        return {g: build_step_model(self.shape, g, self.tp) for g in dict.fromkeys(self.gpus)}

    @property
    def step_model(self) -> StepLatencyModel:
        """The first GPU's step model: the pricing's own (:meth:`pricing`) and the one TTFT SLOs are set with."""
        return self.step_models[self.gpus[0]]

    @property
    def kv_bytes_per_token(self) -> int:
        """KV bytes of one token on one GPU of an instance (each GPU moves its own shard)."""
        return self.shape.kv_bytes_per_token(self.tp)

    @property
    def kv_capacity_tokens(self) -> int:
        """KV tokens one instance holds: (fraction x GPU memory - weights) / bytes per token, whole blocks."""
        free = self.kv_memory_fraction * self.gpu_memory_gb * 1e9 - self.shape.weight_bytes(self.tp)
        tokens = int(free // self.kv_bytes_per_token)
        return tokens // self.block_size * self.block_size

    def transfer_ms(self, tokens: int) -> float:
        """Time to move the KV of ``tokens`` positions from A to B (all TP shards in parallel)."""
        return self.transfer_latency_ms + tokens * self.kv_bytes_per_token / (self.link_gbps * 1e6)

    def early_pull_end(self, split: int, tail: int = 0) -> int:
        """Positions before ``split`` where A's early-pull tail begins: the last block boundary at least
        ``tail`` (the broker's choice for the request; 0: ``early_pull_tail_tokens``) before it (0: none). B of
        a split at ``split`` <= the prompt reads A's blocks up to here before the handoff; A of a decode handoff
        publishes its blocks up to here while decoding."""
        if self.early_pull_tail_tokens <= 0:
            return 0
        return max(0, (split - (tail or self.early_pull_tail_tokens)) // self.block_size * self.block_size)

    def local_config(self) -> LocalSchedulerConfig:
        return LocalSchedulerConfig(
            tbt_slo_ms=self.tbt_slo_ms,
            margin=self.margin,
            max_batched_tokens=self.max_batched_tokens,
            max_num_seqs=self.max_num_seqs,
            min_chunk_tokens=self.min_chunk_tokens,
            prefill_order=self.prefill_order,
            demote_late=self.demote_late,
        )

    def pricing(self) -> Pricing:
        """The global policies' pricing, consistent with the local schedulers and the link."""
        return Pricing(
            model=self.step_model,
            tbt_margin=self.margin,
            max_batched_tokens=self.max_batched_tokens,
            min_chunk_tokens=self.min_chunk_tokens,
            transfer_gbps=self.link_gbps,
            handoff_ms=self.handoff_ms,
            early_tail_auto=self.early_tail_auto,
        )

"""Sim-to-real check: one scaled-down trace on a live two-worker cluster and in the simulator, same cost model.

    python -m bench.sim2real --engine sim --policy dynaserve                     # simulated engine, A100 tables
    python -m bench.sim2real --engine vllm --step-model docs/sim2real/tiny-llama-cpu.json   # vLLM on CPU

Both sides get the same requests (lengths already fitted to the cluster's context, so the live replay clips
nothing), the same step model (a calibration file from ``python -m workers.calibrate``, or the cost tables of
``--model``/``--gpu``), the same instance count, local-scheduler limits, SLOs, KV capacity and the broker's
own pricing and policy. What the live cluster adds (step-time noise under serving, per-step overhead, message
path) is measured on it before the compared replay, from the workers' step logs, a replay of a disjoint
window of the trace and probes; never from the compared replay's results. The live side is :class:`dynaserve.cluster.LocalCluster` driven by
:func:`bench.replay.replay`; the simulated side is :class:`bench.sim.simulator.Simulator`. Output: a table of
P50/P99 TTFT and TBT (live, sim, sim/live) and completion counts, ``<engine>_<policy>.json`` and two CDF plots
in ``--out``. Without ``--rate`` the arrival rate is chosen in the simulator so the instances are busy a
``--utilization`` share of the trace span.
"""

from __future__ import annotations

import argparse
import bisect
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path
from typing import Any

from bench.replay import fit_to_context, replay
from bench.report import plot_tbt_cdf, plot_ttft_cdf, write_records
from bench.sim.config import SimConfig
from bench.sim.simulator import Simulator
from bench.traces import TraceRequest, load_trace, mean_rate, scale
from broker.cluster_state import Pricing
from broker.scheduler import make_policy
from dynaserve.aio import run_event_loop
from dynaserve.calibration import Sample, choose_step_model, parse_step_log, quantile, ratio_quantiles
from dynaserve.cluster import ClusterConfig, LocalCluster
from dynaserve.costmodel import StepLatencyModel
from dynaserve.metrics import RequestRecord, Summary, summarize
from dynaserve.split import tokens_emitted_by_a
from workers.engines.vllm_config import VllmEngineConfig

DEFAULT_VLLM_STEP_MODEL = "docs/sim2real/tiny-llama-cpu.json"
# quantiles of the live noise (every 0.5 %): the simulator interpolates linearly between neighbours, so with
# 21 (every 5 %) one 16x outlier among ~9,000 steps stretched the top 5 % of draws towards it
NOISE_POINTS = 201
# what the simulator draws from: every measured step (up to this many evenly spaced order statistics), so that
# one outlier keeps its own frequency; at 201 points a single 42x step among ~9,000 took the top 0.5 % of the
# draws towards it and the simulated TBT P99 came out 3.9x the live one (one run). Result files keep
# NOISE_POINTS quantiles.
MAX_NOISE_POINTS = 4001
# steps with prefill work run slower against the model than decode-only steps while serving (median 1.07-1.18x
# against 1.00x in one measured replay) but are ~1 % of the steps: they get noise of their own when the noise
# window has at least this many of them
MIN_PREFILL_STEPS = 50
PREFILL_REST_MIN_MS = 1e-3  # a step with prefill work that beat the model by more than the median extra
METRICS = ("ttft_p50_ms", "ttft_p99_ms", "tbt_p50_ms", "tbt_p99_ms")
# the live engines' median measured / modelled step during the compared replay, over the same in the noise
# window minutes before: past this far from 1 the machine changed speed between the two, and no simulator
# fed from the window can follow (vLLM on 2 CPU cores: one run measured 1.32; nine others 0.95-1.10)
DRIFT_LIMIT = 0.15
TARGET = 0.2  # the check's target: simulated within 20 % of live


@dataclass(frozen=True)
class Sim2RealConfig:
    """One comparison: engine, policy, trace window and the settings both sides share."""

    engine: str = "sim"  # live worker engine: sim (sleeps modelled step times) or vllm (CPU build, tiny model)
    policy: str = "dynaserve"  # global policy: colocate, disagg or dynaserve
    trace: str = "azure_conv"  # trace name or file (bench.traces)
    limit: int = 120  # first N requests of the trace
    rate: float = 0.0  # mean arrival rate, req/s; 0 = chosen in the simulator for ``utilization``
    utilization: float = 0.6  # target busy share of the instances when the rate is chosen
    token_scale: float = 1.0  # multiply prompt and output lengths
    max_input: int = 4096  # clip prompt lengths
    max_output: int = 512  # clip output lengths
    max_model_len: int = 0  # fit prompt + output into this context (0: the engine's: 32768 sim, 2048 vllm)
    step_model: str = ""  # step-model file for both sides; empty = cost tables of model/gpu (sim engine only)
    model: str = "llama3-8b"  # sim engine: cost-model preset
    gpu: str = "a100"  # sim engine: GPU of the cost tables
    ttft_slo_ms: float = 2000.0  # TTFT SLO of every request
    tbt_slo_ms: float = 100.0  # TBT SLO the local schedulers batch for
    kv_capacity_tokens: int = 131072  # KV cache per instance (vllm: 256 MiB of 2 KiB tokens)
    transfer_latency_ms: float = 2.0  # simulator: fixed cost of one KV handoff (the live NIXL pull + messages)
    link_gbps: float = 25.0  # simulator: KV link bandwidth (the broker prices handoffs with 25 GB/s too)
    probe: bool = True  # measure step overhead and message path on the live cluster first (off: the fields below)
    step_overhead_ms: float = 0.0  # simulator, without probe: added to every step's duration
    path_latency_ms: float = 0.0  # simulator, without probe: added to every token's arrival at the client
    noise: str = "live"  # simulator step noise: live (the live steps serving the next LIMIT requests first), file, off
    seed: int = 0  # prompt seed
    runs: int = 1  # live runs (each with its own cluster, noise window and probe); >1 compares medians over runs

    def __post_init__(self) -> None:
        if self.engine not in ("sim", "vllm"):
            raise ValueError("engine must be sim or vllm")
        if self.policy not in ("colocate", "disagg", "dynaserve"):
            raise ValueError("policy must be colocate, disagg or dynaserve")
        if self.limit < 2 or not 0 < self.utilization < 1 or self.rate < 0:
            raise ValueError("need limit >= 2, 0 < utilization < 1 and rate >= 0")
        if self.runs < 1:
            raise ValueError("runs must be >= 1")
        if self.noise not in ("live", "file", "off"):
            raise ValueError("noise must be live, file or off")

    @property
    def context(self) -> int:
        return self.max_model_len or (2048 if self.engine == "vllm" else 32768)

    @property
    def step_model_file(self) -> str:
        return self.step_model or (DEFAULT_VLLM_STEP_MODEL if self.engine == "vllm" else "")

    @property
    def worker_limits(self) -> tuple[int, int, int]:
        """(tokens per step, sequences per step, KV block size) the live engine enforces."""
        if self.engine == "vllm":  # VllmEngineConfig defaults; vLLM's CPU block size
            return 2048, 64, 128
        return 8192, 256, 16  # WorkerConfig and SimEngineConfig defaults


def step_model(cfg: Sim2RealConfig) -> tuple[StepLatencyModel, int]:
    return choose_step_model(cfg.step_model_file, cfg.model, cfg.gpu)


# ------------------------------------------------------------------ the simulated side


@dataclass(frozen=True)
class FittedSimConfig(SimConfig):
    """SimConfig whose step model, KV size and capacity are given rather than derived from a GPU preset."""

    fixed_model: StepLatencyModel = StepLatencyModel()
    fixed_kv_bytes: int = 2048
    fixed_kv_tokens: int = 131072

    @property  # type: ignore[override]
    def step_models(self) -> dict[str, StepLatencyModel]:
        """``fixed_model`` on every instance (``step_model``, the pricing's, follows)."""
        return {g: self.fixed_model for g in self.gpus}

    @property
    def kv_bytes_per_token(self) -> int:
        return self.fixed_kv_bytes

    @property
    def kv_capacity_tokens(self) -> int:
        return self.fixed_kv_tokens // self.block_size * self.block_size


@dataclass(frozen=True)
class LiveExtras:
    """What the live cluster adds to the step model, measured by :func:`probe_live` (ms)."""

    step_overhead_ms: float = 0.0  # fixed part of the per-step overhead (see probe_live)
    step_overhead_per_seq_ms: float = 0.0  # per sequence in the step
    path_latency_ms: float = 0.0  # median TTFT of a 1-token prompt minus its modelled step and the overhead
    path_latency_per_prompt_token_ms: float = 0.0  # the same for longer prompts, per extra prompt token
    gaps: int = 0  # decode gaps measured
    ttfts: int = 0  # first tokens measured
    step_noise: tuple[float, ...] = ()  # measured / modelled steps while serving the noise window (noise=live),
    # every one of them (MAX_NOISE_POINTS at most, sorted): of its decode-only steps when step_noise_prefill is
    # set, else of all
    noise_steps: int = 0  # steps those quantiles come from
    step_noise_prefill: tuple[float, ...] = ()  # the same for its steps with prefill work (MIN_PREFILL_STEPS or more),
    # less step_overhead_prefill_ms
    noise_prefill_steps: int = 0
    step_overhead_prefill_ms: float = 0.0  # median measured - modelled time of those steps (noise=live)
    delivery_jitter_ms: tuple[tuple[float, ...], ...] = ()  # per request of the noise window, its decode tokens'
    # delay from step to client minus the window's median (noise=live; SimConfig.delivery_jitter_ms)
    delivery_tokens: int = 0  # tokens those runs hold
    handoff_gap_ms: float = 0.0  # median gap at the client between A's last and B's first token of the noise
    # window's split requests (noise=live; the simulator's transfer latency is fitted to it)
    handoffs: int = 0  # split requests that median comes from
    transfer_latency_ms: float = 0.0  # the simulator's fixed handoff cost fitted to handoff_gap_ms (with handoffs)


def step_noise(cfg: Sim2RealConfig, extras: LiveExtras | None = None) -> tuple[float, ...]:
    """The step-time noise the simulator replays: the live cluster's (``extras.step_noise``), the calibration
    file's measured/modelled quantiles, or none."""
    if cfg.noise == "live":
        return extras.step_noise if extras is not None else ()
    if cfg.noise == "off" or not cfg.step_model_file:
        return ()
    from dynaserve.calibration import StepModelFile

    return StepModelFile.load(cfg.step_model_file).fit_error.ratio_quantiles


def sim_config(cfg: Sim2RealConfig, extras: LiveExtras | None = None) -> FittedSimConfig:
    """The simulated twin of the live cluster :func:`cluster_config` describes (with what the live cluster
    adds when ``extras`` is given: its measured per-step overhead and message path, and the step noise)."""
    model, kv_bytes = step_model(cfg)
    ex = extras or LiveExtras()
    live = cfg.noise == "live" and extras is not None  # the noise window's measurements apply
    tokens, seqs, block = cfg.worker_limits
    return FittedSimConfig(
        model="tiny-llama" if cfg.engine == "vllm" else cfg.model, gpu=cfg.gpu, instances=2,
        tbt_slo_ms=cfg.tbt_slo_ms, margin=0.1, max_batched_tokens=tokens, max_num_seqs=seqs, min_chunk_tokens=16,
        report_interval_ms=20.0, link_gbps=cfg.link_gbps,
        transfer_latency_ms=ex.transfer_latency_ms if ex.handoffs else cfg.transfer_latency_ms,
        # B's pick-up as each live engine does it: the simulated engine admits B at its next step boundary and
        # B joins that very step once the pull lands (eager); vLLM posts the pull in that step and schedules B
        # in the one after, when the step's output reports the pull done (not eager)
        eager_pull=cfg.engine == "sim", prefill_order="deadline", block_size=block,
        # the vLLM workers pull a PD split's blocks while A computes its prompt's last tokens (the simulated
        # engine pulls everything at the handoff)
        early_pull_tail_tokens=VllmEngineConfig.overlap_tail_tokens if cfg.engine == "vllm" else 0,
        kv_alloc="on_demand" if cfg.engine == "vllm" else "reserve", ground_truth="linear", max_sim_s=3600.0,
        fixed_model=model, fixed_kv_bytes=kv_bytes, fixed_kv_tokens=cfg.kv_capacity_tokens,
        step_overhead_ms=ex.step_overhead_ms, step_overhead_per_seq_ms=ex.step_overhead_per_seq_ms,
        step_overhead_prefill_ms=ex.step_overhead_prefill_ms if live else 0.0,
        path_latency_ms=ex.path_latency_ms, path_latency_per_prompt_token_ms=ex.path_latency_per_prompt_token_ms,
        step_noise=step_noise(cfg, extras) if extras is not None else (),
        step_noise_prefill=ex.step_noise_prefill if live else (),
        delivery_jitter_ms=ex.delivery_jitter_ms if live else (),
    )


def run_sim(cfg: Sim2RealConfig, reqs: Sequence[TraceRequest],
            extras: LiveExtras | None = None) -> tuple[list[RequestRecord], dict[str, Any]]:
    """Replay ``reqs`` in the simulator with the live broker's pricing and policy."""
    scfg = sim_config(cfg, extras)
    pricing = Pricing(scfg.step_model, transfer_gbps=25.0)  # as broker.server.Broker builds it
    opts: dict[str, object] = {"prefill_instances": 1} if cfg.policy == "disagg" else {}
    sim = Simulator(scfg, make_policy(cfg.policy, pricing, **opts))
    res = sim.run(reqs, cfg.ttft_slo_ms, cfg.tbt_slo_ms)
    span = max(res.span_s, 1e-9)
    stats = {"busy_share": {k: v / span for k, v in res.stats["busy_s"].items()},
             "transfers": res.stats["transfers"], "steps": res.stats["steps"]}
    return res.records, stats


def fit_transfer_latency(cfg: Sim2RealConfig, window: Sequence[TraceRequest], extras: LiveExtras) -> float:
    """The simulator's fixed handoff cost (``transfer_latency_ms``) at which its median handoff gap over the
    noise window, simulated with everything else measured, matches the live one (``extras.handoff_gap_ms``):
    bisection, the gap growing with the cost."""
    lo, hi = 0.0, max(50.0, 4.0 * extras.handoff_gap_ms)
    unfitted = replace(extras, handoffs=0)
    for _ in range(14):
        mid = (lo + hi) / 2.0
        recs, _ = run_sim(replace(cfg, transfer_latency_ms=mid), window, unfitted)
        gaps = handoff_gaps(recs)
        if not gaps:
            break  # the simulated policy split nothing in the window: keep the configured cost
        lo, hi = (mid, hi) if quantile(gaps, 0.5) < extras.handoff_gap_ms else (lo, mid)
    else:
        return round((lo + hi) / 2.0, 3)
    return cfg.transfer_latency_ms


def choose_rate(cfg: Sim2RealConfig, base: Sequence[TraceRequest]) -> float:
    """Arrival rate at which the simulated instances are busy about ``cfg.utilization`` of the span."""
    lo, hi = 0.01, 1000.0
    for _ in range(30):
        mid = (lo * hi) ** 0.5
        _, stats = run_sim(cfg, scale(base, rate=mid))
        busy = sum(stats["busy_share"].values()) / len(stats["busy_share"])
        lo, hi = (mid, hi) if busy < cfg.utilization else (lo, mid)
        if hi / lo < 1.05:
            break
    return round((lo * hi) ** 0.5, 3)


def _window(cfg: Sim2RealConfig, first: int) -> list[TraceRequest]:
    """Requests ``first`` .. ``first + limit - 1`` of the trace, re-based to start at 0, lengths scaled, clipped
    and fitted to the context."""
    base = load_trace(cfg.trace, limit=first + cfg.limit)[first:]
    if len(base) < 2:
        raise ValueError(f"trace {cfg.trace!r} has fewer than {first + 2} requests")
    t0 = base[0].arrival_s
    base = [replace(r, arrival_s=r.arrival_s - t0) for r in base]
    base = scale(base, token_scale=cfg.token_scale, max_input=cfg.max_input, max_output=cfg.max_output)
    return fit_to_context(base, cfg.context)


def build_trace(cfg: Sim2RealConfig) -> list[TraceRequest]:
    """The trace window, lengths scaled, clipped and fitted to the context, at ``cfg.rate`` (or the chosen one)."""
    base = _window(cfg, 0)
    rate = cfg.rate or choose_rate(cfg, base)
    return scale(base, rate=rate)


def noise_trace(cfg: Sim2RealConfig, rate: float) -> list[TraceRequest]:
    """The window the live cluster serves first to measure its step-time noise (noise=live): the next
    ``limit`` requests of the trace, at the compared replay's rate, so none of the compared requests is in it."""
    return scale(_window(cfg, cfg.limit), rate=rate)


# ------------------------------------------------------------------ the live side


def cluster_config(cfg: Sim2RealConfig, step_log_dir: str = "") -> ClusterConfig:
    return ClusterConfig(
        workers=2, policy=cfg.policy, engine=cfg.engine, transport="ipc", http_port=0, model=cfg.model,
        gpu=cfg.gpu, step_model=cfg.step_model_file, kv_capacity_tokens=cfg.kv_capacity_tokens,
        ttft_slo_ms=cfg.ttft_slo_ms, tbt_slo_ms=cfg.tbt_slo_ms, side_channel_base_port=5800,
        ready_timeout_s=240.0, step_log_dir=step_log_dir,
    )


class StepLogs:
    """The live workers' step logs (one file per instance in ``folder``), read incrementally: each call
    parses only the complete lines written since the last one."""

    def __init__(self, folder: Path) -> None:
        self.folder = folder
        self._read: dict[Path, tuple[int, list[tuple[float, Sample]]]] = {}  # file -> (bytes parsed, steps)

    def _all(self, path: Path) -> list[tuple[float, Sample]]:
        done, steps = self._read.get(path, (0, []))
        with open(path, "rb") as fh:
            fh.seek(done)
            new = fh.read()
        whole = new.rfind(b"\n") + 1  # a line still being written waits for the next call
        if whole:
            steps = steps + parse_step_log(new[:whole].decode(), str(path))
            self._read[path] = (done + whole, steps)
        return steps

    def steps(self, start: float, end: float, instance: str | None = None) -> list[Sample]:
        """Steps that ended in [start, end] (monotonic s) on ``instance`` (None: on every instance)."""
        files = [self.folder / f"{instance}.steps"] if instance else sorted(self.folder.glob("*.steps"))
        return [s for f in files if f.exists() for t, s in self._all(f) if start <= t <= end]

    def instances(self) -> list[str]:
        return sorted(f.stem for f in self.folder.glob("*.steps"))

    def times(self, start: float, end: float, instance: str) -> list[float]:
        """End times (as logged: right before the step's tokens are shipped) of the steps in [start, end]."""
        path = self.folder / f"{instance}.steps"
        return [t for t, _ in self._all(path) if start <= t <= end] if path.exists() else []

    def measured_ms(self, start: float, end: float, instance: str | None = None) -> list[float]:
        return [s[4] for s in self.steps(start, end, instance)]


PROBE_FIRST_TOKENS = 20  # 1-token prompts, one at a time, and as many PROBE_LONG_PROMPT-token ones
PROBE_LONG_PROMPT = 512
PROBE_DECODE = (16, 129)  # prompt and output tokens of each decoding request (128 gaps)
PROBE_BATCH = 16  # decoding requests of the second overhead probe (started together; the policy places them)


async def probe_live(addr: str, logs: StepLogs) -> LiveExtras:
    """Measure on the idle cluster what it adds to its engines' steps, with the steps' own durations from the
    workers' step logs. Per-step overhead: the median token gap of one lone decoding request, and of one of
    ``PROBE_BATCH`` requests started together (those the policy put on its instance decode with it), each
    minus the median measured step of its instance over its decode; a line through the two gives the fixed
    and the per-sequence part. Message path: the median TTFT of 1-token prompts, one at a time, minus the
    measured steps that computed them and the overhead, and how much more it is for ``PROBE_LONG_PROMPT``-token
    prompts (per extra prompt token)."""
    import asyncio
    from statistics import median

    from dynaserve.client import DynaServeClient

    p, o = PROBE_DECODE

    def measured(start: float, end: float, instance: str | None) -> list[float]:
        ms = logs.measured_ms(start, end, instance)
        if not ms:
            raise RuntimeError(f"no step of {instance} logged between {start:.3f} and {end:.3f} s")
        return ms

    async def decode_extra(c: DynaServeClient, n: int) -> tuple[int, float, int]:
        """Start ``n`` requests together; (sequences decoding on the first one's decoding instance, its median
        gap there minus the median step there, gaps). A split request decodes on B: only B's gaps count."""
        streams = [c.generate(list(range(1 + i, p + 1 + i)), max_tokens=o, ignore_eos=True) for i in range(n)]
        await asyncio.gather(*(s.collect() for s in streams))
        where = [_decoding_part(s.admitted, p, o)[0] for s in streams]
        k = where.count(where[0])  # the policy may spread them over the instances
        start = _decoding_part(streams[0].admitted, p, o)[1]
        ts = streams[0].token_ts[start:] if where[0] else []
        if len(ts) < 2:
            raise RuntimeError("the probe's decoding request made fewer than two tokens on one instance")
        gaps = [(b - a) * 1000.0 for a, b in zip(ts, ts[1:], strict=False)]
        return k, median(gaps) - median(measured(ts[0], ts[-1], where[0])), len(gaps)

    async with DynaServeClient(addr) as c:
        _, one, n_one = await decode_extra(c, 1)
        k, batch, n_batch = await decode_extra(c, PROBE_BATCH)
        per_seq = max(0.0, (batch - one) / (k - 1)) if k > 1 else 0.0
        fixed = max(0.0, one - per_seq)

        async def ttft_extra(n: int) -> list[float]:
            """TTFTs of ``n``-token prompts, one at a time, minus their measured steps and the overhead."""
            out = []
            for i in range(PROBE_FIRST_TOKENS):
                s = c.generate([100 + (i + j) % 400 for j in range(n)], max_tokens=1, ignore_eos=True)
                await s.collect()
                where = _decoding_part(s.admitted, n, 1)[0]  # a prompt split: B computes the rest and the token
                steps_ms = sum(measured(s.submit_ts, s.token_ts[0], where))
                out.append((s.token_ts[0] - s.submit_ts) * 1000.0 - steps_ms - fixed - per_seq)
            return out

        short, long = await ttft_extra(1), await ttft_extra(PROBE_LONG_PROMPT)
        path = max(0.0, median(short))
        per_tok = max(0.0, (median(long) - path) / (PROBE_LONG_PROMPT - 1))
    return LiveExtras(round(fixed, 3), round(per_seq, 4), round(path, 3), round(per_tok, 5), n_one + n_batch,
                      len(short) + len(long))


def _a_tokens(instance_b: str | None, split: int | None, prompt: int, max_tokens: int) -> int:
    """How many of ``max_tokens`` instance A emits (all of them when the request is not split)."""
    if not instance_b or split is None:
        return max_tokens
    return tokens_emitted_by_a(prompt, max_tokens, split)


def _emitted_by_a(admitted: Any, prompt: int, max_tokens: int) -> int:
    """Tokens instance A emits for an ``Admitted`` plan."""
    return _a_tokens(admitted.instance_b, admitted.split, prompt, max_tokens) if admitted else max_tokens


def _decoding_part(admitted: Any, prompt: int, max_tokens: int) -> tuple[str | None, int]:
    """Where a request's decode tokens come from and the index of its first token there: B, from the first
    token B emits, when B emits any; else A, from the first token."""
    if admitted is None:
        return None, 0
    ea = _emitted_by_a(admitted, prompt, max_tokens)
    if admitted.instance_b and ea < max_tokens:
        return str(admitted.instance_b), ea
    return str(admitted.instance_a), 0


def emitted_by_a(rec: RequestRecord) -> int:
    """How many of a record's tokens instance A made (all of them when the request was not split)."""
    return min(len(rec.token_ts), _a_tokens(rec.instance_b, rec.split, rec.prompt_tokens, rec.max_tokens))


def handoff_gaps(records: Sequence[RequestRecord]) -> list[float]:
    """Per split request whose A and B both emitted tokens: the gap at the client between A's last and B's
    first token (ms). It holds the handoff (A's message, B's pick-up, the pull) and B's first step."""
    out = []
    for rec in records:
        ea = emitted_by_a(rec)  # all of its tokens when unsplit: no gap
        if 1 <= ea < len(rec.token_ts):
            out.append((rec.token_ts[ea] - rec.token_ts[ea - 1]) * 1000.0)
    return out


def live_noise(model: StepLatencyModel, served: Sequence[Sample]) -> dict[str, Any]:
    """The LiveExtras noise fields from the steps the live cluster ran serving the noise window: quantiles of
    measured / modelled for decode-only steps and steps with prefill work apart when there are
    MIN_PREFILL_STEPS of the latter, else of all steps together.

    Steps with prefill work carry a fixed extra while serving that the model misses, the same for short
    and long chunks (one measured window: 2.8-2.9 ms over the model for chunks of up to 1,024 tokens, so
    1.4x the model at 256 tokens or fewer and 1.1x above); as a ratio it would be drawn too small for
    short chunks and too large for long ones. So their median excess over the model is its own constant
    (``step_overhead_prefill_ms``) and their noise is the ratio of what is left."""
    pre = [s for s in served if s[0] > 0]
    if len(pre) >= MIN_PREFILL_STEPS and len(pre) < len(served):
        dec = [s for s in served if s[0] == 0]
        extra = max(0.0, quantile([s[4] - model.step_ms(*s[:4]) for s in pre], 0.5))
        rest = [(*s[:4], max(s[4] - extra, PREFILL_REST_MIN_MS)) for s in pre]
        return {"step_noise": ratio_quantiles(model, dec, _points(dec)), "noise_steps": len(dec),
                "step_noise_prefill": ratio_quantiles(model, rest, _points(rest)), "noise_prefill_steps": len(pre),
                "step_overhead_prefill_ms": round(extra, 3)}
    if not served:
        return {}
    return {"step_noise": ratio_quantiles(model, served, _points(served)), "noise_steps": len(served)}


def _points(samples: Sequence[Sample]) -> int:
    """Quantile points that keep every sample (up to MAX_NOISE_POINTS; at least 2)."""
    return max(2, min(len(samples), MAX_NOISE_POINTS))


def noise_summary(q: Sequence[float]) -> list[float]:
    """A noise distribution (sorted quantiles) at NOISE_POINTS evenly spaced quantiles, for result files."""
    return [round(quantile(q, i / (NOISE_POINTS - 1)), 4) for i in range(NOISE_POINTS)] if q else []


def delivery_delays(records: Sequence[RequestRecord], step_times: dict[str, Sequence[float]]) -> list[list[float]]:
    """Per request of ``records`` on instances with step times: milliseconds from the step that made each
    decode token (its logged end, right before shipping) to the token's arrival at the client. Token j came
    from the last step of its instance that ended before it arrived, but from an earlier one than token j + 1
    (tokens held up on the way arrive together): assigned from the last token backwards. A split request's
    tokens are matched to A's steps up to the handoff and to B's after it (B's first token counts: only the
    request's first token, which the message path models, does not)."""
    out: list[list[float]] = []
    for rec in records:
        ea = emitted_by_a(rec)
        segments = [(rec.instance_a, rec.token_ts[:ea], 1)]
        if rec.instance_b and ea < len(rec.token_ts):
            segments.append((rec.instance_b, rec.token_ts[ea:], 1 if ea == 0 else 0))
        run: list[float] = []
        for inst, ts, first in segments:
            st = step_times.get(inst or "")
            if not st or len(ts) <= first:
                continue
            idx = [0] * len(ts)
            nxt = len(st)
            for j in range(len(ts) - 1, -1, -1):
                nxt = idx[j] = min(bisect.bisect_right(st, ts[j]) - 1, nxt - 1)
            run += [(ts[j] - st[idx[j]]) * 1000.0 for j in range(first, len(ts)) if idx[j] >= 0]
        if run:
            out.append(run)
    return out


def delivery_jitter(delays_ms: Sequence[Sequence[float]]) -> tuple[tuple[float, ...], ...]:
    """The runs of delays less their overall median, which the simulator adds to its constant message path
    (SimConfig.delivery_jitter_ms): whole runs, since a slow stretch holds up consecutive tokens together."""
    mid = quantile([d for run in delays_ms for d in run], 0.5)
    return tuple(tuple(round(d - mid, 3) for d in run) for run in delays_ms if run)


def extras_json(extras: LiveExtras) -> dict[str, Any]:
    """``extras`` for the result file, the delivery runs (one number per token) summarized by quantiles."""
    out = asdict(extras)
    out["step_noise"] = noise_summary(extras.step_noise)
    out["step_noise_prefill"] = noise_summary(extras.step_noise_prefill)
    flat = [d for run in extras.delivery_jitter_ms for d in run]
    out["delivery_jitter_ms"] = [round(quantile(flat, i / 20), 3) for i in range(21)] if flat else []
    return out


def run_live(cfg: Sim2RealConfig, reqs: Sequence[TraceRequest], progress: bool = True,
             log_dir: Path | None = None) -> tuple[list[RequestRecord], LiveExtras, dict[str, Any]]:
    """Start a two-worker cluster with step logs, serve the noise window first (``cfg.noise == "live"``),
    probe it (``cfg.probe``), replay ``reqs`` through the client SDK, stop it. Returns the records, what the
    cluster adds to the step model, and its measured / modelled step times during the compared replay (the
    latter reported, not given to the simulator)."""
    import tempfile

    model = step_model(cfg)[0]
    with tempfile.TemporaryDirectory(prefix="sim2real-steps-") as tmp:
        folder = log_dir or Path(tmp)
        logs = StepLogs(folder)
        cluster = LocalCluster(cluster_config(cfg, str(folder)))
        cluster.start()
        try:
            async def go() -> tuple[list[RequestRecord], LiveExtras, dict[str, Any]]:
                await cluster.wait_ready()
                common = {"ttft_slo_ms": cfg.ttft_slo_ms, "tbt_slo_ms": cfg.tbt_slo_ms, "timeout_s": 300.0,
                          "progress": progress}
                noise: dict[str, Any] = {}
                if cfg.noise == "live":
                    t0 = time.monotonic()
                    window = await replay(cluster.client_addr, noise_trace(cfg, mean_rate(reqs)), seed=cfg.seed + 1,
                                          **common)
                    t1 = time.monotonic()
                    noise = live_noise(model, logs.steps(t0, t1))
                    delays = delivery_delays(window, {i: logs.times(t0, t1, i) for i in logs.instances()})
                    if delays:
                        noise.update(delivery_jitter_ms=delivery_jitter(delays),
                                     delivery_tokens=sum(len(d) for d in delays))
                    gaps = handoff_gaps(window)
                    if gaps:
                        noise.update(handoff_gap_ms=round(quantile(gaps, 0.5), 3), handoffs=len(gaps))
                extras = (await probe_live(cluster.client_addr, logs) if cfg.probe
                          else LiveExtras(cfg.step_overhead_ms, 0.0, cfg.path_latency_ms, 0.0))
                extras = replace(extras, **noise)
                t0 = time.monotonic()
                recs = await replay(cluster.client_addr, reqs, seed=cfg.seed, **common)
                steps = logs.steps(t0, time.monotonic())
                pre = [st for st in steps if st[0] > 0]
                during = {"steps": len(steps), "ratio_quantiles": list(ratio_quantiles(model, steps)) if steps else [],
                          "prefill_steps": len(pre),
                          "prefill_ratio_quantiles": list(ratio_quantiles(model, pre)) if pre else []}
                return recs, extras, during

            return run_event_loop(go())
        finally:
            cluster.stop()


# ------------------------------------------------------------------ comparison


def compare(live: Summary, sim: Summary) -> dict[str, dict[str, float | None]]:
    """Per metric: live, sim and sim/live."""
    out: dict[str, dict[str, float | None]] = {}
    for m in METRICS:
        a, b = getattr(live, m), getattr(sim, m)
        out[m] = {"live": a, "sim": b, "ratio": b / a if a and a == a and b == b else None}
    return out


def table(result: dict[str, Any]) -> str:
    runs = result.get("runs", [])
    head = "| metric | live | sim | sim/live |" + (" per run |" if runs else "")
    rows = [head, "|---|---|---|---|" + ("---|" if runs else "")]
    for m, v in result["compare"].items():
        ratio = f"{v['ratio']:.2f}" if v["ratio"] is not None else "-"
        per = (" " + ", ".join(f"{r['compare'][m]['ratio']:.2f}" for r in runs) + " |") if runs else ""
        rows.append(f"| {m.removesuffix('_ms').replace('_', ' ')} (ms) | {v['live']:.1f} | {v['sim']:.1f} | {ratio} |{per}")
    lv, sm = result["live"], result["sim"]
    rows.append(f"| completed | {lv['completed']}/{lv['n']} | {sm['completed']}/{sm['n']} | |" + (" |" if runs else ""))
    if runs:
        rows.append(f"\nlive and sim: medians over {len(runs)} runs; completed: the last run")
        rep = reproducibility(runs)
        rows.append(f"\n| metric | runs with sim within {TARGET:.0%} of their live run | pairs of live runs within "
                    f"{TARGET:.0%} of each other | live max / min over the runs |\n|---|---|---|---|")
        for m, v in rep.items():
            rows.append(f"| {m.removesuffix('_ms').replace('_', ' ')} | {v['sim_within']:.0%} | {v['live_within']:.0%} "
                        f"| {v['live_spread']:.2f} |")
    for k, r in enumerate(runs or [result], 1):
        drift = r.get("engine_drift")
        if drift is not None and abs(drift - 1.0) > DRIFT_LIMIT:
            rows.append(f"\n{'run ' + str(k) if runs else 'this run'}: the live engines' steps ran {drift:.2f}x "
                        "their noise window's time against the model during the compared replay (medians): the "
                        "machine changed speed between the two, so this run's ratios measure that, not the simulator")
        hg, ex = r.get("handoff_gap_ms"), r.get("live_extras", {})
        if hg and hg.get("live") and hg.get("sim"):
            rows.append(f"\nhandoff gap (A's last -> B's first token), median / P90 ms: live {hg['live'][0]:.1f} / "
                        f"{hg['live'][1]:.1f} ({hg['live'][2]} splits), sim {hg['sim'][0]:.1f} / {hg['sim'][1]:.1f} "
                        f"({hg['sim'][2]}); " + (
                            f"simulator's handoff cost {ex['transfer_latency_ms']:.2f} ms, fitted to the noise "
                            f"window's {ex['handoff_gap_ms']:.1f} ms ({ex['handoffs']} splits)" if ex.get("handoffs")
                            else f"simulator's handoff cost {result['config']['transfer_latency_ms']:.2f} ms "
                                 "(configured; no split in the noise window)"))
    return "\n".join(rows)


def engine_drift(noise: Sequence[float], during: dict[str, Any]) -> float | None:
    """The live engines' median measured / modelled step in the compared replay over the noise window's
    (``noise``: its quantiles; decode-only steps when those with prefill have their own, and those are ~99 %
    of the replay's steps), or None without both."""
    q = during.get("ratio_quantiles") or []
    if not noise or not q:
        return None
    return round(q[len(q) // 2] / noise[len(noise) // 2], 3)


def reproducibility(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Per metric, over several runs of the same requests: the share of runs whose simulated value is within
    ``TARGET`` of its own live run, and the share of ordered pairs of live runs (i, j), i != j, with run j
    within ``TARGET`` of run i: how often another live run would meet the target against this one."""
    out: dict[str, dict[str, float]] = {}
    for m in METRICS:
        live = [r["compare"][m]["live"] for r in runs]
        sims = [r["compare"][m]["ratio"] for r in runs]
        pairs = [(a, b) for i, a in enumerate(live) for j, b in enumerate(live) if i != j and a]
        out[m] = {"sim_within": sum(1 for x in sims if x is not None and abs(x - 1.0) <= TARGET) / len(runs),
                  "live_within": (sum(1 for a, b in pairs if abs(b / a - 1.0) <= TARGET) / len(pairs)) if pairs
                  else float("nan"),
                  "live_spread": max(live) / min(live) if min(live) > 0 else float("nan")}
    return out


def compare_runs(runs: Sequence[dict[str, Any]]) -> dict[str, dict[str, float | None]]:
    """Per metric: the median over runs of the live and of the simulated value, and their ratio."""
    from statistics import median

    out: dict[str, dict[str, float | None]] = {}
    for m in METRICS:
        a = median(r["compare"][m]["live"] for r in runs)
        b = median(r["compare"][m]["sim"] for r in runs)
        out[m] = {"live": a, "sim": b, "ratio": b / a if a else None}
    return out


def run_once(cfg: Sim2RealConfig, reqs: Sequence[TraceRequest], progress: bool = True,
             records_dir: Path | None = None) -> tuple[dict[str, Any], list[RequestRecord], list[RequestRecord]]:
    """One live run and its simulated twin: (summary, live records, simulated records)."""
    load_before = os.getloadavg()
    t0 = time.monotonic()
    live_records, extras, during = run_live(cfg, reqs, progress,
                                            records_dir / "steps" if records_dir is not None else None)
    live_wall = time.monotonic() - t0
    load_after = os.getloadavg()
    if extras.handoffs:
        extras = replace(extras, transfer_latency_ms=fit_transfer_latency(cfg, noise_trace(cfg, mean_rate(reqs)),
                                                                          extras))
    sim_records, sim_stats = run_sim(cfg, reqs, extras)
    live, sim = summarize(live_records), summarize(sim_records)
    if records_dir is not None:
        records_dir.mkdir(parents=True, exist_ok=True)
        write_records(records_dir / f"{cfg.engine}_{cfg.policy}_live.jsonl", live_records)
        write_records(records_dir / f"{cfg.engine}_{cfg.policy}_sim.jsonl", sim_records)
    one = {"loadavg_before": load_before, "loadavg_after": load_after, "live_wall_s": live_wall,
           "live_extras": extras_json(extras), "step_noise": noise_summary(step_noise(cfg, extras)), "steps_during_replay": during,
           "sim_stats": sim_stats, "live": live.to_dict(), "sim": sim.to_dict(), "compare": compare(live, sim),
           "engine_drift": engine_drift(extras.step_noise, during)}
    gaps = {"live": handoff_gaps(live_records), "sim": handoff_gaps(sim_records)}
    if gaps["live"] or gaps["sim"]:  # split requests: their handoff gaps in the compared replay (median, P90, count)
        one["handoff_gap_ms"] = {k: [round(quantile(v, 0.5), 3), round(quantile(v, 0.9), 3), len(v)] if v else []
                                 for k, v in gaps.items()}
    return one, live_records, sim_records


def run(cfg: Sim2RealConfig, out: Path | None, progress: bool = True, records_dir: Path | None = None) -> dict[str, Any]:
    """Build the trace, run both sides (``cfg.runs`` times), summarize; write JSON and plots (of the last run)
    into ``out`` when given, and the raw per-token records of both sides into ``records_dir`` when given.
    With several runs, ``compare`` holds the medians over the runs and ``runs`` each run's summary."""
    reqs = build_trace(cfg)
    rate = mean_rate(reqs)
    print(f"{len(reqs)} requests at {rate:.2f} req/s; engine {cfg.engine}, policy {cfg.policy}", file=sys.stderr)
    runs: list[dict[str, Any]] = []
    for k in range(cfg.runs):
        if cfg.runs > 1:
            print(f"run {k + 1}/{cfg.runs}", file=sys.stderr)
        one, live_records, sim_records = run_once(cfg, reqs, progress, records_dir)
        runs.append(one)
    model, kv_bytes = step_model(cfg)
    result: dict[str, Any] = {
        "config": asdict(replace(cfg, rate=round(rate, 3))),
        "step_model": {**asdict(model), "kv_bytes_per_token": kv_bytes, "file": cfg.step_model_file},
        "requests": len(reqs), "rate_rps": rate,
        "mean_input": sum(r.input_tokens for r in reqs) / len(reqs),
        "mean_output": sum(r.output_tokens for r in reqs) / len(reqs),
        **runs[-1],
    }
    if cfg.runs > 1:
        result["runs"] = runs
        result["compare"] = compare_runs(runs)
    if out is not None:
        import json

        out.mkdir(parents=True, exist_ok=True)
        stem = f"{cfg.engine}_{cfg.policy}"
        (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
        both = {"live": live_records, "sim": sim_records}
        plot_ttft_cdf(both, out / f"{stem}_ttft_cdf.png")
        plot_tbt_cdf(both, out / f"{stem}_tbt_cdf.png")
    return result


def main(argv: Sequence[str] | None = None) -> int:
    from dynaserve import config as C

    p = argparse.ArgumentParser(prog="sim2real", description=__doc__.split("\n\n")[0])
    C.add_args(p, Sim2RealConfig)
    p.add_argument("--out", default="docs/sim2real", help="folder for <engine>_<policy>.json and the CDF plots")
    p.add_argument("--records", default="", help="folder for the raw records of both sides (default: not written)")
    ns = p.parse_args(argv)
    try:
        cfg = C.build(Sim2RealConfig, None, ns)
    except ValueError as exc:
        p.error(str(exc))
    result = run(cfg, Path(ns.out), records_dir=Path(ns.records) if ns.records else None)
    print(table(result))
    print(f"load average before/after the live run: {result['loadavg_before'][0]:.2f} / "
          f"{result['loadavg_after'][0]:.2f}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Side experiments of the study: simulator speed, per-instance load timelines, step-model error.

Usage::

    python -m bench.sim.extras speed [--instances 16] [--hours 1] [--rate 20]
    python -m bench.sim.extras timeline --workload azure_conv --rate 90 --policies colocate,dynaserve
    python -m bench.sim.extras model-error --workload azure_conv --rate 90
    python -m bench.sim.extras twin --model qwen2.5-32b --workload arxiv --rate 13
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.sim.config import SimConfig
from bench.sim.policies import build_policy
from bench.sim.simulator import Simulator
from bench.sim.study import DEADLINE, Spec, run_point
from bench.sim.workloads import MAX_TOKENS, TBT_SLO_MS, WORKLOADS, ttft_slo
from bench.traces import poisson_from_lengths
from dynaserve.predictor import HistoryPredictor


def speed(instances: int, hours: float, rate: float, policies: Sequence[str]) -> list[str]:
    """Wall time of simulating ``hours`` of Poisson arrivals with Azure-conversation lengths."""
    n = int(rate * hours * 3600)
    trace = poisson_from_lengths("azure_conv", rate, n, 11)
    lines = []
    for name in policies:
        cfg = SimConfig(instances=instances)
        sim = Simulator(cfg, build_policy(name, cfg.pricing()), HistoryPredictor())
        t0 = time.perf_counter()
        res = sim.run(trace, ttft_slo(cfg.step_model), TBT_SLO_MS, max_tokens=MAX_TOKENS)
        wall = time.perf_counter() - t0
        lines.append(f"{name}: {n} requests, {hours:g} h at {rate:g} req/s on {instances} instances: "
                     f"{wall:.1f} s wall, {res.stats['steps']} steps, {res.stats['events']} events")
    return lines


def timeline(workload: str, rate: float, policies: Sequence[str], out: Path, model: str = "llama3-8b") -> Path:
    """Per-instance queued prefill tokens and running decodes over time, one row per policy."""
    fig = Figure(figsize=(13, 3.4 * len(policies)))
    for k, name in enumerate(policies):
        pt = run_point(model, workload, Spec(name, name, name), rate, None, detail=True)
        ts = np.array([t for t, _ in pt["samples"]])
        qp = np.array([[row[0] for row in rows] for _, rows in pt["samples"]])
        rs = np.array([[row[1] for row in rows] for _, rows in pt["samples"]])
        ax1 = fig.add_subplot(len(policies), 2, 2 * k + 1)
        ax2 = fig.add_subplot(len(policies), 2, 2 * k + 2)
        for i in range(qp.shape[1]):
            ax1.plot(ts, qp[:, i], lw=0.7)
            ax2.plot(ts, rs[:, i], lw=0.7)
        ax1.set_title(f"{name}: queued prefill tokens per instance (attainment {pt['attainment']:.2f})", fontsize=9)
        ax2.set_title(f"{name}: running decodes per instance; kinds {pt['split_kinds']}", fontsize=9)
        ax1.set_xlabel("time (s)")
        ax2.set_xlabel("time (s)")
    fig.suptitle(f"{WORKLOADS[workload].title}, {model}, {rate:g} req/s")
    path = out / f"timeline_{workload}.png"
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=100, bbox_inches="tight")
    return path


def model_error(workload: str, rate: float, policies: Sequence[str]) -> list[str]:
    """The same runs with step times from the linear model and from the kernel tables."""
    lines = ["| policy | step times | attainment | TTFT p99 (ms) | TBT p99 (ms) |", "|---|---|---|---|---|"]
    for name in policies:
        for truth in ("linear", "detailed"):
            pt = run_point("llama3-8b", workload, Spec(name, name, name), rate, None, ground_truth=truth)
            lines.append(f"| {name} | {truth} | {pt['attainment']:.3f} | {pt['ttft_p99_ms']:.0f} | {pt['tbt_p99_ms']:.1f} |")
    return lines


TWIN_VARIANTS: tuple[tuple[str, tuple[tuple[str, object], ...], tuple[tuple[str, object], ...], str], ...] = (
    ("history predictor (DynaServe)", (), (), "history"),
    ("true lengths + exact state (the oracle's twin)", (), (("exact_state", True),), "noisy:0.0"),
    ("true lengths", (), (), "noisy:0.0"),
    ("history predictor + exact state", (), (("exact_state", True),), "history"),
    ("history predictor, host gate 102", (("host_min_output", 102),), (), "history"),
    ("true lengths + exact state, host gate 102", (("host_min_output", 102),), (("exact_state", True),),
     "noisy:0.0"),
)


def twin(model: str, workload: str, rate: float) -> list[str]:
    """The dynaserve policy (deadline-ordered prefill) at one rate with each piece of perfect information
    alone, and with decode concentration's output gate (``host_min_output``) at 102 tokens: which one
    moves attainment."""
    lines = ["| dynaserve policy with | attainment | split kinds |", "|---|---|---|"]
    for label, options, sim, predictor in TWIN_VARIANTS:
        spec = Spec("dynaserve", label, "dynaserve", options=options, sim=(DEADLINE, *sim), predictor=predictor)
        pt = run_point(model, workload, spec, rate, None)
        kinds = ", ".join(f"{k} {v}" for k, v in sorted(pt["split_kinds"].items()))
        lines.append(f"| {label} | {pt['attainment']:.3f} | {kinds} |")
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim.extras", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--instances", type=int, default=16)
    sp.add_argument("--hours", type=float, default=1.0)
    sp.add_argument("--rate", type=float, default=20.0)
    sp.add_argument("--policies", default="colocate,balance,dynaserve")
    tl = sub.add_parser("timeline")
    tl.add_argument("--workload", default="azure_conv")
    tl.add_argument("--rate", type=float, required=True)
    tl.add_argument("--policies", default="balance,dynaserve")
    tl.add_argument("--out", default="docs/study")
    me = sub.add_parser("model-error")
    me.add_argument("--workload", default="azure_conv")
    me.add_argument("--rate", type=float, required=True)
    me.add_argument("--policies", default="colocate,balance,dynaserve")
    tw = sub.add_parser("twin")
    tw.add_argument("--model", default="qwen2.5-32b")
    tw.add_argument("--workload", default="arxiv")
    tw.add_argument("--rate", type=float, required=True)
    args = ap.parse_args(argv)
    if args.cmd == "speed":
        print("\n".join(speed(args.instances, args.hours, args.rate, args.policies.split(","))))
    elif args.cmd == "timeline":
        print(timeline(args.workload, args.rate, args.policies.split(","), Path(args.out)))
    elif args.cmd == "twin":
        print("\n".join(twin(args.model, args.workload, args.rate)))
    else:
        print("\n".join(model_error(args.workload, args.rate, args.policies.split(","))))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

"""Side experiments of the study: simulator speed, per-instance load timelines, step-model error.

Usage::

    python -m bench.sim.extras speed [--instances 16] [--hours 1] [--rate 20]
    python -m bench.sim.extras timeline --workload azure_conv --rate 90 --policies colocate,dynaserve
    python -m bench.sim.extras model-error --workload azure_conv --rate 90
    python -m bench.sim.extras twin --model qwen2.5-32b --workload arxiv --rate 13
    python -m bench.sim.extras resolution --cells qwen2.5-32b/mooncake_conv,llama3-8b/azure_conv --seeds 5
    python -m bench.sim.extras migrate --cells llama3-8b/sharegpt,llama3-8b/azure_conv
"""

from __future__ import annotations

import argparse
import statistics
import time
from collections.abc import Sequence
from multiprocessing import Pool
from pathlib import Path

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure
from tqdm import tqdm

from bench.sim.config import SimConfig
from bench.sim.policies import build_policy, policy_names
from bench.sim.simulator import Simulator
from bench.sim.study import (
    DEADLINE,
    MODELS,
    RESULTS,
    Curve,
    Spec,
    best,
    capacity_curve,
    load_results,
    main_specs,
    rate_grid,
    reference_rate,
    run_point,
)
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


JITTER_MS = 1.0  # how far the resolution check moves each arrival, at most


def _resolution_curve(job: tuple[str, str, Spec, tuple[float, ...], int]) -> tuple[int, Curve]:
    model, workload, spec, rates, seed = job
    return seed, capacity_curve(model, workload, spec, rates, None, jitter=(JITTER_MS, seed) if seed else None)



def resolution(cells: Sequence[tuple[str, str]], seeds: int, study: Path, jobs: int) -> list[str]:
    """How far a capacity moves when every arrival moves by up to ``JITTER_MS`` (seeds 1..``seeds``; seed 0
    is the trace as the study runs it): the best colocation and disaggregation configurations of the study
    (when its results are there), DynaServe, each perfect-information policy of the oracle, and the oracle
    (the best of them per seed). Rates: the study's own grid for the cell (from ``study``'s results,
    else a fresh reference rate)."""
    refs: dict[str, float] = {}
    done: list[Curve] = []
    if (study / RESULTS).exists():
        meta, done = load_results(study)
        refs = meta["reference_rates"]
    specs = [sp for sp in main_specs(False) if sp.family in ("dynaserve", "oracle")]
    cell_specs: dict[tuple[str, str], list[Spec]] = {}
    work = []
    for model, workload in cells:
        ref = refs.get(f"{model}/{workload}") or reference_rate((model, workload, None, ()))[2]
        here = [c for c in done if (c.model, c.workload) == (model, workload)]
        baselines = [b.spec for b in (best(here, "colocate"), best(here, "disagg")) if b is not None]
        cell_specs[(model, workload)] = [*baselines, *specs]
        work += [(model, workload, sp, rate_grid(ref, False), seed) for sp in cell_specs[(model, workload)]
                 for seed in range(seeds + 1)]
    caps: dict[tuple[str, str, str, int], float] = {}
    with Pool(processes=jobs) as pool:
        for seed, c in tqdm(pool.imap_unordered(_resolution_curve, work), total=len(work), desc="resolution",
                            unit="curve"):
            caps[(c.model, c.workload, c.spec.label, seed)] = c.capacity
    lines = [f"Capacity (req/s) with every arrival moved by up to {JITTER_MS:g} ms; seed 0 = the trace as the "
             f"study runs it. Spread = (max - min) / median over seeds 0-{seeds}.", "",
             "| model | workload | policy | seed 0 | seeds 1-" + f"{seeds}: min / median / max | spread |",
             "|---|---|---|---|---|---|"]
    for model, workload in cells:
        rows = {sp.label: [caps[(model, workload, sp.label, k)] for k in range(seeds + 1)]
                for sp in cell_specs[(model, workload)]}
        oracle = [max(rows[sp.label][k] for sp in specs if sp.family == "oracle") for k in range(seeds + 1)]
        rows["oracle (best of the four)"] = oracle
        rows["dynaserve / oracle"] = [d / o if o else 0.0 for d, o in zip(rows["dynaserve"], oracle, strict=True)]
        for label, vals in rows.items():
            rest = vals[1:]
            med = statistics.median(vals)
            spread = (max(vals) - min(vals)) / med if med else 0.0
            lines.append(f"| {model} | {workload} | {label} | {vals[0]:.3f} | {min(rest):.3f} / "
                         f"{statistics.median(rest):.3f} / {max(rest):.3f} | {spread:.1%} |")
    return lines


MIGRATE_VARIANTS = (
    ("into full decode hosts", (("into", "full"),)),
    ("into full decode hosts, none while a queue > 1,024 tokens", (("into", "full"), ("max_queue_tokens", 1024))),
    ("into any prefill-idle instance", (("into", "idle"),)),
    ("into any prefill-idle instance, none while a queue > 1,024 tokens", (("into", "idle"), ("max_queue_tokens", 1024))),
)


def _curve(job: tuple[str, str, Spec, tuple[float, ...]]) -> Curve:
    return capacity_curve(*job, None)


def migrate(cells: Sequence[tuple[str, str]], study: Path, jobs: int) -> list[str]:
    """Capacity of the dynaserve policy without and with run-time decode handoffs (bench.sim.migration) on the
    study's rate grid of each cell, and the share of requests moved at the highest rate meeting 90 %."""
    refs = load_results(study)[0]["reference_rates"] if (study / RESULTS).exists() else {}
    specs = [Spec("dynaserve", "dynaserve", "dynaserve", sim=(DEADLINE,))]
    specs += [Spec("variant:migrate", f"dynaserve, run-time handoffs {label}", "dynaserve-migrate", options=opts,
                   sim=(DEADLINE,)) for label, opts in MIGRATE_VARIANTS]
    work = []
    for model, workload in cells:
        ref = refs.get(f"{model}/{workload}") or reference_rate((model, workload, None, ()))[2]
        work += [(model, workload, sp, rate_grid(ref, False)) for sp in specs]
    with Pool(processes=jobs) as pool:
        curves = list(tqdm(pool.imap(_curve, work), total=len(work), desc="migrate", unit="curve"))
    lines = ["| model | workload | policy | capacity (req/s) | moved at capacity |", "|---|---|---|---|---|"]
    for c in curves:
        ok = [p for p in c.points if p["attainment"] >= 0.9]
        moved = "-"
        if ok:
            top = max(ok, key=lambda p: p["rate"])
            kinds = top["split_kinds"]
            moved = f"{kinds.get('moved', 0) / max(1, sum(kinds.values())):.0%}"
        lines.append(f"| {c.model} | {c.workload} | {c.spec.label} | {c.capacity:.2f} | {moved} |")
    return lines


def _cells(text: str) -> list[tuple[str, str]]:
    """``--cells``: comma-separated MODEL/WORKLOAD."""
    cells = [tuple(c.split("/", 1)) for c in text.split(",") if c]
    for cell in cells:
        if len(cell) != 2 or cell[0] not in MODELS or cell[1] not in WORKLOADS:
            raise argparse.ArgumentTypeError(f"{'/'.join(cell)!r} is not MODEL/WORKLOAD with MODEL in "
                                             f"{', '.join(MODELS)} and WORKLOAD in {', '.join(WORKLOADS)}")
    return cells  # type: ignore[return-value]


def _policy_list(text: str) -> list[str]:
    """``--policies``: comma-separated names that :func:`build_policy` knows."""
    names = [n for n in text.split(",") if n]
    for name in names:
        if name not in policy_names():
            raise argparse.ArgumentTypeError(f"unknown policy {name!r}; known: {', '.join(policy_names())}")
    return names


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim.extras", description=__doc__.splitlines()[0])
    sub = ap.add_subparsers(dest="cmd", required=True)
    sp = sub.add_parser("speed")
    sp.add_argument("--instances", type=int, default=16)
    sp.add_argument("--hours", type=float, default=1.0)
    sp.add_argument("--rate", type=float, default=20.0)
    sp.add_argument("--policies", type=_policy_list, default="colocate,balance,dynaserve")
    tl = sub.add_parser("timeline")
    tl.add_argument("--workload", choices=list(WORKLOADS), default="azure_conv")
    tl.add_argument("--rate", type=float, required=True)
    tl.add_argument("--policies", type=_policy_list, default="balance,dynaserve")
    tl.add_argument("--out", default="docs/study")
    me = sub.add_parser("model-error")
    me.add_argument("--workload", choices=list(WORKLOADS), default="azure_conv")
    me.add_argument("--rate", type=float, required=True)
    me.add_argument("--policies", type=_policy_list, default="colocate,balance,dynaserve")
    tw = sub.add_parser("twin")
    tw.add_argument("--model", choices=list(MODELS), default="qwen2.5-32b")
    tw.add_argument("--workload", choices=list(WORKLOADS), default="arxiv")
    tw.add_argument("--rate", type=float, required=True)
    rs = sub.add_parser("resolution")
    rs.add_argument("--cells", type=_cells, default="qwen2.5-32b/mooncake_conv", help="comma-separated MODEL/WORKLOAD")
    rs.add_argument("--seeds", type=int, default=5)
    rs.add_argument("--study", default="docs/study", help="the study whose rate grids to use")
    rs.add_argument("--jobs", type=int, default=2)
    mg = sub.add_parser("migrate")
    mg.add_argument("--cells", type=_cells, default="llama3-8b/sharegpt,llama3-8b/azure_conv",
                    help="comma-separated MODEL/WORKLOAD")
    mg.add_argument("--study", default="docs/study", help="the study whose rate grids to use")
    mg.add_argument("--jobs", type=int, default=2)
    args = ap.parse_args(argv)
    if args.cmd == "resolution":
        if args.seeds < 1:
            ap.error("--seeds must be 1 or more (seed 0, the trace unmoved, always runs)")
        print("\n".join(resolution(args.cells, args.seeds, Path(args.study), args.jobs)))
    elif args.cmd == "migrate":
        print("\n".join(migrate(args.cells, Path(args.study), args.jobs)))
    elif args.cmd == "speed":
        print("\n".join(speed(args.instances, args.hours, args.rate, args.policies)))
    elif args.cmd == "timeline":
        print(timeline(args.workload, args.rate, args.policies, Path(args.out)))
    elif args.cmd == "twin":
        print("\n".join(twin(args.model, args.workload, args.rate)))
    else:
        print("\n".join(model_error(args.workload, args.rate, args.policies)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

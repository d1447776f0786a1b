"""The goodput study: SLO attainment vs request rate per workload, model and policy, in the simulator.

For each workload (:mod:`bench.sim.workloads`) and model setup (Llama-3-8B on one A100, Qwen2.5-32B on two
A100s with TP2), 8 instances, the base trace is rescaled to a grid of request rates around an estimate of
the cluster's capacity. Each policy configuration runs the rates in increasing order (stopping after two
rates below 50 % attainment) and gets its serving capacity (highest rate with attainment >= 90 %,
:func:`dynaserve.metrics.serving_capacity`). Colocation is swept over its token budget and TBT margin,
disaggregation over its prefill:decode ratio; the best configuration of each is the baseline.

Usage::

    python -m bench.sim.study [--quick] [--out docs/study] [--workloads a,b] [--models m1,m2] [--jobs 2]

Writes ``results.json.gz`` (every point), ``tables.md`` and the plots (:mod:`bench.sim.report`) under ``--out``.
"""

from __future__ import annotations

import argparse
import gzip
import json
import math
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field, fields, replace
from multiprocessing import Pool
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bench.sim.config import SimConfig
from bench.sim.policies import build_policy, policy_names
from bench.sim.predictors import NoisyOraclePredictor
from bench.sim.simulator import Simulator
from bench.sim.workloads import (
    MAX_TOKENS,
    TBT_SLO_MS,
    WORKLOADS,
    base_trace,
    jittered,
    ttft_slo,
    work_estimate_ms,
)
from bench.traces import scale
from dynaserve.metrics import serving_capacity, summarize
from dynaserve.predictor import HistoryPredictor, MaxTokensPredictor, OutputPredictor

MODELS: dict[str, tuple[str, int, str]] = {
    "llama3-8b": ("llama3-8b", 1, "Llama-3-8B, A100 TP1"),
    "qwen2.5-32b": ("qwen2.5-32b", 2, "Qwen2.5-32B, A100 TP2"),
}
INSTANCES = 8
FULL_FACTORS = (0.5, 0.65, 0.8, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0)
QUICK_FACTORS = (0.6, 0.8, 1.0, 1.2, 1.5, 2.0)
QUICK_LIMIT = 500  # requests of each base trace in quick mode
ABLATION_WORKLOADS = ("azure_conv", "mooncake_conv")


@dataclass(frozen=True)
class Spec:
    """One policy configuration: the policy, its options, the simulator overrides and the predictor."""

    family: str  # colocate / disagg / dynaserve / oracle / a variant name
    label: str
    policy: str
    options: tuple[tuple[str, Any], ...] = ()
    sim: tuple[tuple[str, Any], ...] = ()
    predictor: str = "history"  # history | max_tokens | noisy:<sigma>


@dataclass
class Curve:
    model: str
    workload: str
    spec: Spec
    points: list[dict[str, Any]] = field(default_factory=list)

    @property
    def capacity(self) -> float:
        pts = [(p["rate"], p["attainment"]) for p in self.points]
        return serving_capacity(pts) if pts else 0.0

    @property
    def peak_goodput(self) -> float:
        return max((p["goodput"] for p in self.points), default=0.0)


FCFS = ("prefill_order", "fcfs")  # a stock engine's local scheduling: prefill chunks in arrival order
DEADLINE = ("prefill_order", "deadline")  # DynaServe's local scheduler: earliest TTFT deadline first


def baseline_specs(quick: bool) -> list[Spec]:
    """Colocation and disaggregation as deployed today: stock engines (prefill in arrival order), each
    swept over its knob (token budget and margin; prefill:decode ratio)."""
    out: list[Spec] = []
    for mbt in (512, 2048, 8192):
        out.append(Spec("colocate", f"colocate budget={mbt}", "colocate", sim=(("max_batched_tokens", mbt), FCFS)))
    out.append(Spec("colocate", "colocate budget=8192 margin=0.3", "colocate",
                    sim=(("max_batched_tokens", 8192), ("margin", 0.3), FCFS)))
    for k in (1, 2, 3, 4, 5, 6, 7)[:: 2 if quick else 1]:
        out.append(Spec("disagg", f"disagg {k}P:{INSTANCES - k}D", "disagg", options=(("prefill_instances", k),),
                        sim=(FCFS,)))
    return out


ORACLE_SEARCH = "oracle search"
ORACLE_DYNASERVE = "dynaserve, exact lengths and state"
# the same with other settings of decode concentration: only outputs of 102 tokens or more on a host, and
# hosts filled to 80 % of their KV instead of 70 %
ORACLE_DYNASERVE_GATED = "dynaserve, exact lengths and state, host gate 102"
ORACLE_DYNASERVE_FULLER = "dynaserve, exact lengths and state, hosts 80 % full"


def main_specs(quick: bool) -> list[Spec]:
    """The baselines, DynaServe (its global policy and its local scheduler) and the oracle: the best of
    perfect-information policies (all with DynaServe's local scheduler, the exact state of every instance
    and true output lengths): the per-request split search of bench.sim.oracle and DynaServe's own
    placement in three configurations of decode concentration."""
    return [
        *baseline_specs(quick),
        Spec("dynaserve", "dynaserve", "dynaserve", sim=(DEADLINE,)),
        Spec("oracle", ORACLE_SEARCH, "oracle", sim=(DEADLINE,), predictor="max_tokens"),
        Spec("oracle", ORACLE_DYNASERVE, "dynaserve", sim=(DEADLINE, ("exact_state", True)), predictor="noisy:0.0"),
        Spec("oracle", ORACLE_DYNASERVE_GATED, "dynaserve", options=(("host_min_output", 102),),
             sim=(DEADLINE, ("exact_state", True)), predictor="noisy:0.0"),
        Spec("oracle", ORACLE_DYNASERVE_FULLER, "dynaserve", options=(("host_kv_frac", 0.2),),
             sim=(DEADLINE, ("exact_state", True)), predictor="noisy:0.0"),
    ]


LOCAL_ABLATION = "variant:baselines+deadline"
GLOBAL_ABLATION = "variant:dynaserve fcfs"
CONCENTRATION = ("off", "on")  # DynaServe with decode concentration pinned (the default is "auto")


def local_ablation_specs(quick: bool) -> list[Spec]:
    """Where DynaServe's gain comes from: the baselines with DynaServe's local scheduler (their best
    configuration of these), and DynaServe's global policy on stock engines."""
    out = [Spec(LOCAL_ABLATION, f"colocate budget={mbt} deadline", "colocate",
                sim=(("max_batched_tokens", mbt), DEADLINE)) for mbt in (2048, 8192)]
    for k in (1, 3, 5, 7) if not quick else (1, 5):
        out.append(Spec(LOCAL_ABLATION, f"disagg {k}P:{INSTANCES - k}D deadline", "disagg",
                        options=(("prefill_instances", k),), sim=(DEADLINE,)))
    out.append(Spec(GLOBAL_ABLATION, "dynaserve fcfs", "dynaserve", sim=(FCFS,)))
    for mode in CONCENTRATION:
        out.append(Spec(f"variant:concentrate {mode}", f"dynaserve concentrate={mode}", "dynaserve",
                        options=(("concentrate", mode),), sim=(DEADLINE,)))
    return out


def ablation_specs() -> list[Spec]:
    out = [Spec("dynaserve-pred", "dynaserve, max_tokens predictor", "dynaserve", sim=(DEADLINE,),
                predictor="max_tokens")]
    for sigma in (0.0, 0.25, 0.5, 1.0):
        out.append(Spec("dynaserve-pred", f"dynaserve, noisy oracle sigma={sigma}", "dynaserve", sim=(DEADLINE,),
                        predictor=f"noisy:{sigma}"))
    return out


def make_predictor(name: str) -> OutputPredictor | NoisyOraclePredictor:
    if name == "history":
        return HistoryPredictor()
    if name == "max_tokens":
        return MaxTokensPredictor()
    if name.startswith("noisy:"):
        return NoisyOraclePredictor(sigma=float(name.split(":", 1)[1]), seed=1)
    raise ValueError(f"unknown predictor {name!r}")


def sim_config(model_key: str, spec: Spec, **extra: Any) -> SimConfig:
    model, tp, _ = MODELS[model_key]
    return SimConfig(model=model, tp=tp, instances=INSTANCES, **dict(spec.sim), **extra)


def run_point(model_key: str, workload: str, spec: Spec, rate: float, limit: int | None,
              detail: bool = False, jitter: tuple[float, int] | None = None, **extra: Any) -> dict[str, Any]:
    """Simulate one (model, workload, policy, rate) point; returns its summary. ``jitter`` = (ms, seed)
    moves every arrival of the rescaled trace by up to ``ms`` (bench.sim.workloads.jittered)."""
    cfg = sim_config(model_key, spec, **extra)
    trace = scale(base_trace(workload, limit), rate=rate)
    if jitter is not None:
        trace = jittered(trace, *jitter)
    sim = Simulator(cfg, build_policy(spec.policy, cfg.pricing(), **dict(spec.options)), make_predictor(spec.predictor),
                    sample_interval_s=0.5 if detail else None)
    t0 = time.perf_counter()
    res = sim.run(trace, ttft_slo(cfg.step_model), TBT_SLO_MS, max_tokens=MAX_TOKENS)
    wall = time.perf_counter() - t0
    s = summarize(res.records, res.span_s)
    pt: dict[str, Any] = {
        "rate": rate, "attainment": s.attainment, "goodput": s.goodput_rps, "completed": s.completed,
        "ttft_p50_ms": s.ttft_p50_ms, "ttft_p99_ms": s.ttft_p99_ms, "tbt_p99_ms": s.tbt_p99_ms,
        "split_kinds": s.split_kinds, "wall_s": wall, "steps": res.stats["steps"],
        "transfers": res.stats["transfers"], "min_free_kv_tokens": res.stats["min_free_kv_tokens"],
    }
    if spec.family in ("dynaserve", "oracle") or spec.family.startswith("variant"):
        pt["splits"] = [(r.kind, round(r.split / r.prompt_tokens, 3)) for r in res.records
                        if r.kind not in (None, "none") and r.split is not None]
    if detail:
        pt["samples"] = res.samples
        pt["busy_s"] = res.stats["busy_s"]
        pt["end_s"] = res.end_s
        pt["span_s"] = res.span_s
    return pt


def run_curve(job: tuple[str, str, Spec, tuple[float, ...], int | None]) -> Curve:
    """``capacity_curve`` of one study job (a tuple, for a process pool)."""
    return capacity_curve(*job)


def capacity_curve(model_key: str, workload: str, spec: Spec, rates: tuple[float, ...], limit: int | None,
                   jitter: tuple[float, int] | None = None) -> Curve:
    """All rates of one configuration in increasing order, extended down while the lowest rate misses 90 %
    and up while the highest still meets it; stops after two rates below 50 % attainment; then the step
    where attainment crosses 90 % is bisected. ``jitter``: see ``run_point``."""
    curve = Curve(model_key, workload, spec)
    pts: dict[float, dict[str, Any]] = {}

    def at(r: float) -> dict[str, Any]:
        if r not in pts:
            pts[r] = run_point(model_key, workload, spec, r, limit, jitter=jitter)
        return pts[r]

    lo = rates[0]
    for _ in range(4):
        if at(lo)["attainment"] >= 0.9:
            break
        lo = _round2(lo / 1.6)
    low = 0
    r = rates[0]
    grid = list(rates)
    i = 0
    while i < len(grid) and low < 2:
        r = grid[i]
        low = low + 1 if at(r)["attainment"] < 0.5 else 0
        i += 1
        if i == len(grid) and at(r)["attainment"] >= 0.9 and len(grid) < len(rates) + 8:
            grid.append(_round2(r * 1.3))
    _refine(at, pts, REFINE_STEPS)
    curve.points = [pts[k] for k in sorted(pts)]
    return curve


REFINE_STEPS = 4  # bisections of the grid step where attainment crosses 90 % (1/16 of it: ~1-2 % of the rate)


def _refine(at: Callable[[float], dict[str, Any]], pts: dict[float, dict[str, Any]], steps: int) -> None:
    """Bisect between the highest rate meeting 90 % attainment and the next measured rate above it.

    Attainment falls off a cliff near capacity (queues grow without bound once the cluster is over its
    rate), so interpolating across a grid step of 20-30 % misplaces the capacity by up to that much.
    """
    rates = sorted(pts)
    ok = [r for r in rates if pts[r]["attainment"] >= 0.9]
    if not ok or ok[-1] == rates[-1]:
        return
    lo = ok[-1]
    hi = rates[rates.index(lo) + 1]
    for _ in range(steps):
        mid = round((lo + hi) / 2, 3)
        if mid in (lo, hi):
            return
        if at(mid)["attainment"] >= 0.9:
            lo = mid
        else:
            hi = mid


def reference_rate(job: tuple[str, str, int | None, tuple[tuple[str, Any], ...]]) -> tuple[str, str, float]:
    """Capacity of colocation (budget 8192) by bisection: the centre of the rate grid of a workload."""
    model_key, workload, limit, sim = job
    spec = Spec("colocate", "colocate", "colocate", sim=(FCFS, *sim))
    cfg = sim_config(model_key, spec)
    r = _round2(INSTANCES * 1000.0 / work_estimate_ms(cfg.step_model, base_trace(workload, limit)))

    def ok(x: float) -> bool:
        return bool(run_point(model_key, workload, spec, x, limit)["attainment"] >= 0.9)

    lo, hi = 0.0, 0.0
    for _ in range(8):
        if ok(r):
            lo, r = r, r * 2
        else:
            hi, r = r, r / 2
        if lo and hi:
            break
    if not (lo and hi):
        return model_key, workload, lo or hi
    for _ in range(5):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if ok(mid) else (lo, mid)
    return model_key, workload, lo


def rate_grid(ref: float, quick: bool) -> tuple[float, ...]:
    return tuple(sorted({_round2(ref * f) for f in (QUICK_FACTORS if quick else FULL_FACTORS)}))


def _round2(x: float) -> float:
    if x <= 0:
        return x
    mag = 10 ** (math.floor(math.log10(x)) - 1)
    return round(round(x / mag) * mag, 6)


def best(curves: Sequence[Curve], family: str) -> Curve | None:
    """The configuration of a family with the highest capacity (ties: the higher peak goodput)."""
    cands = [c for c in curves if c.spec.family == family]
    return max(cands, key=lambda c: (c.capacity, c.peak_goodput)) if cands else None


def curve_to_dict(c: Curve) -> dict[str, Any]:
    return {"model": c.model, "workload": c.workload, "spec": asdict(c.spec), "capacity": c.capacity,
            "peak_goodput": c.peak_goodput, "points": c.points}


def curve_from_dict(d: dict[str, Any]) -> Curve:
    sd = d["spec"]
    spec = Spec(sd["family"], sd["label"], sd["policy"], tuple(tuple(x) for x in sd["options"]),
                tuple(tuple(x) for x in sd["sim"]), sd["predictor"])
    return Curve(d["model"], d["workload"], spec, d["points"])


class StudyInputError(ValueError):
    """A study cannot run with these arguments (the message says why)."""


def load_results(out: Path) -> tuple[dict[str, Any], list[Curve]]:
    """The meta data and the curves of the study written under ``out``."""
    with gzip.open(out / RESULTS, "rt") as fh:
        data = json.load(fh)
    return data["meta"], [curve_from_dict(d) for d in data["curves"]]


def run_study(workloads: Sequence[str], models: Sequence[str], quick: bool, jobs: int, out: Path,
              extra_specs: Sequence[Spec] = (), ablations: bool = True,
              overrides: dict[str, Any] | None = None, only: Sequence[str] = ()) -> list[Curve]:
    """Run the study and write ``results.json.gz`` under ``out``. With ``only`` (spec labels), run just those
    configurations on the rate grids of the study already in ``out`` and put their curves in place of the
    ones it has for the same labels; every other curve is kept as it is."""
    limit = QUICK_LIMIT if quick else None
    work: list[tuple[str, str, Spec, tuple[float, ...], int | None]] = []
    kept: list[Curve] = []
    if only:
        old_meta, old_curves = load_results(out)
        if old_meta["quick"] != quick or (old_meta["overrides"] or {}) != (overrides or {}):
            raise StudyInputError(f"{out / RESULTS} was run with other settings (quick / --set); run the whole "
                                  "study")
        refs = {tuple(k.split("/", 1)): r for k, r in old_meta["reference_rates"].items()}
        kept = [c for c in old_curves if c.spec.label not in only or c.model not in models
                or c.workload not in workloads]
    else:
        with Pool(processes=jobs) as pool:
            refs = {(m, w): r for m, w, r in tqdm(
                pool.imap_unordered(reference_rate, [(m, w, limit, tuple((overrides or {}).items()))
                                                     for m in models for w in workloads]),
                total=len(models) * len(workloads), desc="reference rates", unit="workload")}
    for m in models:
        for w in workloads:
            rates = rate_grid(refs[(m, w)], quick)
            for spec in [*main_specs(quick), *(local_ablation_specs(quick) if ablations else ()), *extra_specs]:
                work.append((m, w, spec, rates, limit))
            if ablations and w in ABLATION_WORKLOADS and m == models[0]:
                for spec in ablation_specs():
                    work.append((m, w, spec, rates, limit))
    if only:
        all_work, work = work, [j for j in work if j[2].label in only]
        missing = set(only) - {j[2].label for j in work}
        if missing:
            raise StudyInputError(f"no configuration labelled {', '.join(sorted(missing))}; known: "
                                  f"{', '.join(sorted({j[2].label for j in all_work}))}")
    if overrides:
        work = [(m, w, with_sim(spec, **overrides), r, lim) for m, w, spec, r, lim in work]
    # the slow ones first, so the pool stays busy to the end
    work.sort(key=lambda j: (j[2].family != "oracle", j[1] != "mooncake_conv"))
    curves: list[Curve] = []
    with Pool(processes=jobs) as pool:
        for c in tqdm(pool.imap_unordered(run_curve, work), total=len(work), desc="study", unit="curve"):
            curves.append(c)
    curves += kept
    curves.sort(key=lambda c: (c.model, c.workload, c.spec.family, c.spec.label))
    out.mkdir(parents=True, exist_ok=True)
    meta = {"overrides": overrides or {}, "reference_rates": {f"{m}/{w}": r for (m, w), r in refs.items()},
            "quick": quick, "instances": INSTANCES, "max_tokens": MAX_TOKENS, "tbt_slo_ms": TBT_SLO_MS,
            "limit": limit, "sim_defaults": asdict(SimConfig())}
    with gzip.open(out / RESULTS, "wt") as fh:
        json.dump({"meta": meta, "curves": [curve_to_dict(c) for c in curves]}, fh, separators=(",", ":"), default=str)
    return curves


RESULTS = "results.json.gz"


def main(argv: Sequence[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python -m bench.sim.study", description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help=f"first {QUICK_LIMIT} requests per trace, fewer rates/configs")
    ap.add_argument("--out", default="docs/study", help="output folder (results.json.gz, tables.md, plots)")
    ap.add_argument("--workloads", default=",".join(WORKLOADS), help="comma-separated workload names")
    ap.add_argument("--models", default=",".join(MODELS), help="comma-separated model setups")
    ap.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    ap.add_argument("--no-ablations", action="store_true", help="skip the predictor ablation")
    ap.add_argument("--variants", default="", help="comma-separated extra policies of bench.sim.policies")
    ap.add_argument("--set", action="append", default=[], metavar="FIELD=VALUE",
                    help="SimConfig override for every run (e.g. prefill_order=deadline, eager_pull=true)")
    ap.add_argument("--report-only", action="store_true", help="redo tables and plots from results.json.gz")
    ap.add_argument("--only", action="append", default=[], metavar="LABEL",
                    help="re-run only this configuration (by label; repeatable) into the study already in --out")
    args = ap.parse_args(argv)
    from bench.sim.report import write_report

    out = Path(args.out)
    if (args.report_only or args.only) and not (out / RESULTS).exists():
        ap.error(f"{'--report-only' if args.report_only else '--only'} needs a study already run into --out, "
                 f"and {out / RESULTS} does not exist")
    if args.report_only:
        curves = load_results(out)[1]
    else:
        wl = [w for w in args.workloads.split(",") if w]
        ms = [m for m in args.models.split(",") if m]
        for w in wl:
            if w not in WORKLOADS:
                ap.error(f"unknown workload {w!r}; known: {', '.join(WORKLOADS)}")
        for m in ms:
            if m not in MODELS:
                ap.error(f"unknown model setup {m!r}; known: {', '.join(MODELS)}")
        known_policies = policy_names()
        for v in args.variants.split(","):
            if v and v not in known_policies:
                ap.error(f"--variants: unknown policy {v!r}; known: {', '.join(known_policies)}")
        extra = [Spec(f"variant:{v}", v, v) for v in args.variants.split(",") if v]
        overrides = dict(_parse_set(x) for x in args.set)
        sim_fields = [f.name for f in fields(SimConfig)]
        for key in overrides:
            if key not in sim_fields:
                ap.error(f"--set: {key!r} is not a SimConfig field; fields: {', '.join(sim_fields)}")
        t0 = time.perf_counter()
        try:
            curves = run_study(wl, ms, args.quick, args.jobs, out, extra, not args.no_ablations, overrides,
                               args.only)
        except StudyInputError as exc:
            ap.error(str(exc))
        print(f"simulated {sum(len(c.points) for c in curves)} points in {time.perf_counter() - t0:.0f} s")
    print(write_report(curves, out))
    return 0


def _parse_set(text: str) -> tuple[str, Any]:
    key, _, raw = text.partition("=")
    value: Any = raw
    if raw.lower() in ("true", "false"):
        value = raw.lower() == "true"
    else:
        try:
            value = float(raw) if "." in raw else int(raw)
        except ValueError:
            pass
    return key.strip(), value


def with_sim(spec: Spec, **overrides: Any) -> Spec:
    """The same spec with extra simulator overrides."""
    return replace(spec, sim=(*spec.sim, *overrides.items()))


if __name__ == "__main__":
    raise SystemExit(main())

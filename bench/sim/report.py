"""Tables (markdown) and plots (PNG) of the goodput study."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from bench.sim.study import MODELS, ORACLE_DYNASERVE, ORACLE_SEARCH, Curve, best
from bench.sim.workloads import WORKLOADS

KINDS = ("none", "prompt", "pd", "decode")
COLORS = {"colocate": "tab:blue", "disagg": "tab:orange", "dynaserve": "tab:green", "oracle": "black"}
VARIANT_COLORS = ("tab:red", "tab:purple", "tab:brown", "tab:pink")


def _ratio(a: float, b: float) -> str:
    return f"{a / b:.2f}x" if b > 0 else "-"


def _group(curves: Sequence[Curve]) -> dict[tuple[str, str], list[Curve]]:
    out: dict[tuple[str, str], list[Curve]] = {}
    for c in curves:
        out.setdefault((c.model, c.workload), []).append(c)
    return out


def _oracle_kind(c: Curve) -> str:
    """Which of the oracle's perfect-information policies a curve is."""
    if c.spec.label == ORACLE_SEARCH:
        return "search"
    return "exact dynaserve" + c.spec.label.removeprefix(ORACLE_DYNASERVE)


def _oracle_cell(c: Curve) -> str:
    return f"{c.capacity:.2f} ({_oracle_kind(c)})"


def _variants(curves: Sequence[Curve]) -> list[str]:
    return sorted({c.spec.family for c in curves if c.spec.family.startswith("variant:")})


def capacity_table(curves: Sequence[Curve]) -> str:
    groups = _group(curves)
    variants = _variants(curves)
    lines: list[str] = []
    for mk in MODELS:
        rows = [(w, groups[(mk, w)]) for w in WORKLOADS if (mk, w) in groups]
        if not rows:
            continue
        lines += [f"**{MODELS[mk][2]}**, serving capacity in req/s (attainment >= 90 %; TBT: P99 per request, no gap over 5x the SLO):", ""]
        head = ["workload", "best colocate", "best disagg", "dynaserve", *[v.split(":", 1)[1] for v in variants],
                "oracle", "dynaserve / best baseline", "dynaserve / oracle"]
        head += [f"{v.split(':', 1)[1]} / best baseline" for v in variants]
        head += [f"dynaserve / {v.split(':', 1)[1]}" for v in variants]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for w, cs in rows:
            col, dis = best(cs, "colocate"), best(cs, "disagg")
            dyn, ora = best(cs, "dynaserve"), best(cs, "oracle")
            base = max((c.capacity for c in (col, dis) if c is not None), default=0.0)
            cells = [WORKLOADS[w].title]
            for c in (col, dis):
                cells.append(f"{c.capacity:.2f} ({c.spec.label.split(' ', 1)[1]})" if c else "-")
            cells.append(f"{dyn.capacity:.2f}" if dyn else "-")
            vcs = [best(cs, v) for v in variants]
            cells += [f"{v.capacity:.2f}" if v else "-" for v in vcs]
            cells.append(_oracle_cell(ora) if ora else "-")
            cells.append(_ratio(dyn.capacity, base) if dyn else "-")
            cells.append(_ratio(dyn.capacity, ora.capacity) if dyn and ora else "-")
            cells += [_ratio(v.capacity, base) if v else "-" for v in vcs]
            cells += [_ratio(dyn.capacity, v.capacity) if v and dyn else "-" for v in vcs]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def goodput_table(curves: Sequence[Curve]) -> str:
    groups = _group(curves)
    lines: list[str] = []
    fams = ["colocate", "disagg", "dynaserve", *_variants(curves), "oracle"]
    for mk in MODELS:
        rows = [(w, groups[(mk, w)]) for w in WORKLOADS if (mk, w) in groups]
        if not rows:
            continue
        lines += [f"**{MODELS[mk][2]}**, peak goodput in req/s meeting both SLOs (best configuration of each):", ""]
        head = ["workload", *[f.split(":")[-1] for f in fams]]
        lines += ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
        for w, cs in rows:
            cells = [WORKLOADS[w].title]
            for f in fams:
                c = best(cs, f)
                cells.append(f"{c.peak_goodput:.2f}" if c else "-")
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")
    return "\n".join(lines)


def ablation_table(curves: Sequence[Curve]) -> str:
    groups = _group(curves)
    lines: list[str] = []
    for (mk, w), cs in groups.items():
        abl = [c for c in cs if c.spec.family == "dynaserve-pred"]
        if not abl:
            continue
        dyn = best(cs, "dynaserve")
        lines += [f"**{WORKLOADS[w].title}, {MODELS[mk][2]}**: DynaServe capacity (req/s) by output-length predictor", ""]
        lines += ["| predictor | capacity | vs history predictor |", "|---|---|---|"]
        if dyn:
            lines.append(f"| history (mean of the last 512 outputs; the default) | {dyn.capacity:.2f} | 1.00x |")
        for c in sorted(abl, key=lambda c: c.spec.label):
            lines.append(f"| {c.spec.label.split(', ', 1)[1]} | {c.capacity:.2f} | "
                         f"{_ratio(c.capacity, dyn.capacity) if dyn else '-'} |")
        for o in sorted((c for c in cs if c.spec.family == "oracle"), key=lambda c: c.spec.label):
            lines.append(f"| (oracle: {o.spec.label}) | {o.capacity:.2f} | "
                         f"{_ratio(o.capacity, dyn.capacity) if dyn else '-'} |")
        lines.append("")
    return "\n".join(lines)


def _at_capacity(c: Curve) -> dict[str, Any] | None:
    """The measured point closest below the curve's capacity (the highest rate still >= 90 %)."""
    ok = [p for p in c.points if p["attainment"] >= 0.9]
    return max(ok, key=lambda p: p["rate"]) if ok else (c.points[0] if c.points else None)


def split_table(curves: Sequence[Curve]) -> str:
    groups = _group(curves)
    fams = ["dynaserve", *_variants(curves), "oracle"]
    lines = ["Split kinds chosen at the highest rate still meeting 90 % attainment (share of requests):", "",
             "| model | workload | policy | rate | none | prompt | pd | decode |", "|---|---|---|---|---|---|---|---|"]
    for mk in MODELS:
        for w in WORKLOADS:
            cs = groups.get((mk, w))
            if not cs:
                continue
            rows = [(f.split(":")[-1], best(cs, f)) for f in fams if f != "oracle"]
            rows += [(f"oracle: {c.spec.label}", c) for c in sorted(cs, key=lambda c: c.spec.label)
                     if c.spec.family == "oracle"]
            for name, c in rows:
                pt = _at_capacity(c) if c else None
                if pt is None:
                    continue
                kinds = pt["split_kinds"]
                n = max(1, sum(kinds.values()))
                cells = [f"{100 * kinds.get(k, 0) / n:.0f}%" for k in KINDS]
                lines.append(f"| {mk} | {w} | {name} | {pt['rate']:.3g} | " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------- plots


def _save(fig: Figure, path: Path) -> None:
    FigureCanvasAgg(fig)
    fig.savefig(path, dpi=110, bbox_inches="tight")


def plot_attainment(curves: Sequence[Curve], mk: str, path: Path) -> None:
    groups = _group(curves)
    ws = [w for w in WORKLOADS if (mk, w) in groups]
    cols = 3
    rows = max(1, -(-len(ws) // cols))
    fig = Figure(figsize=(5 * cols, 3.6 * rows))
    variants = _variants(curves)
    for i, w in enumerate(ws):
        ax = fig.add_subplot(rows, cols, i + 1)
        for f in ["colocate", "disagg", "dynaserve", *variants, "oracle"]:
            c = best(groups[(mk, w)], f)
            if c is None or not c.points:
                continue
            xs = [p["rate"] for p in c.points]
            ys = [p["attainment"] for p in c.points]
            style = "--" if f == "oracle" else "-"
            lab = (c.spec.label if f in ("colocate", "disagg") else
                   f"oracle, {_oracle_kind(c)}" if f == "oracle" else f.split(":")[-1])
            color = COLORS.get(f) or VARIANT_COLORS[variants.index(f) % len(VARIANT_COLORS)]
            ax.plot(xs, ys, style, marker="o", ms=3, color=color, label=f"{lab} ({c.capacity:.2f})")
        ax.axhline(0.9, color="grey", lw=0.8, ls=":")
        ax.set_title(WORKLOADS[w].title)
        ax.set_xlabel("request rate (req/s)")
        ax.set_ylabel("SLO attainment")
        ax.set_ylim(-0.02, 1.02)
        ax.legend(fontsize=7)
    fig.suptitle(f"SLO attainment vs rate, {MODELS[mk][2]}, 8 instances (capacity in legend)")
    fig.tight_layout()
    _save(fig, path)


def plot_splits(curves: Sequence[Curve], mk: str, path: Path) -> None:
    groups = _group(curves)
    ws = [w for w in WORKLOADS if (mk, w) in groups]
    fig = Figure(figsize=(14, 4.2))
    ax1 = fig.add_subplot(1, 2, 1)
    ax2 = fig.add_subplot(1, 2, 2)
    labels: list[str] = []
    bottoms: list[np.ndarray] = []
    shares = []
    for w in ws:
        for f in ("dynaserve", "oracle"):
            c = best(groups[(mk, w)], f)
            pt = _at_capacity(c) if c else None
            kinds = pt["split_kinds"] if pt else {}
            n = max(1, sum(kinds.values()))
            shares.append([kinds.get(k, 0) / n for k in KINDS])
            labels.append(f"{w}\n{f}" if f != "oracle" or c is None else f"{w}\noracle, {_oracle_kind(c)}")
    arr = np.array(shares) if shares else np.zeros((0, len(KINDS)))
    bottom = np.zeros(len(labels))
    for j, k in enumerate(KINDS):
        ax1.bar(range(len(labels)), arr[:, j] if len(arr) else [], bottom=bottom, label=k)
        bottom = bottom + (arr[:, j] if len(arr) else 0)
    bottoms.append(bottom)
    ax1.set_xticks(range(len(labels)), labels, rotation=60, fontsize=7)
    ax1.set_ylabel("share of requests")
    ax1.set_title("split kinds at capacity")
    ax1.legend(fontsize=7)
    bins = np.linspace(0, 3, 61)
    for w in ws:
        c = best(groups[(mk, w)], "dynaserve")
        pt = _at_capacity(c) if c else None
        fr = [f for _, f in (pt or {}).get("splits", [])]
        if fr:
            ax2.hist(np.clip(fr, 0, 3), bins=bins, histtype="step", label=w)
    ax2.axvline(1.0, color="grey", lw=0.8, ls=":")
    ax2.set_xlabel("split point s / prompt length p (1 = PD; > 1: decode handoff; clipped at 3)")
    ax2.set_ylabel("requests")
    ax2.set_title("dynaserve split points at capacity")
    ax2.legend(fontsize=7)
    fig.suptitle(f"Split choices, {MODELS[mk][2]}")
    fig.tight_layout()
    _save(fig, path)


def write_report(curves: Sequence[Curve], out: Path) -> str:
    """Write ``tables.md`` and the plots; returns the tables."""
    out.mkdir(parents=True, exist_ok=True)
    text = "\n".join([capacity_table(curves), goodput_table(curves), ablation_table(curves), split_table(curves)])
    (out / "tables.md").write_text(text)
    for mk in MODELS:
        if any(c.model == mk for c in curves):
            plot_attainment(curves, mk, out / f"attainment_{mk}.png")
            plot_splits(curves, mk, out / f"splits_{mk}.png")
    return text

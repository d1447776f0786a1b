"""Offline report of one or more benchmark runs: summary table, ``summary.json`` and latency plots.

Each run is a raw records file (one :class:`~dynaserve.metrics.RequestRecord` as JSON per line) or a list
of records. Several labelled runs (e.g. the policies colocate, disagg and dynaserve on the same trace) are
compared side by side in the table and drawn in the same plots:

- ``ttft_cdf.png``: CDF of TTFT of completed requests;
- ``tbt_cdf.png``: CDF of all token gaps of completed requests (symmetric-log x axis, so zero gaps show);
- ``latency_scatter.png``: per-request TTFT and own P99 TBT against the scheduled arrival time.

Usage::

    python -m bench.report RUN.jsonl [RUN2.jsonl ...] [--labels a b ...] [--out DIR] [--tbt-form p99|max]
"""

from __future__ import annotations

import argparse
import json
import math
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from matplotlib.axes import Axes
from matplotlib.backends.backend_agg import FigureCanvasAgg
from matplotlib.figure import Figure

from dynaserve.metrics import (
    TBT_FORMS,
    RequestRecord,
    Summary,
    format_table,
    is_completed,
    request_tbt_ms,
    summarize,
    tbt_gaps_ms,
    ttft_ms,
)

PLOT_FILES = ("ttft_cdf.png", "tbt_cdf.png", "latency_scatter.png")
"""Names of the PNG files written by :func:`make_report`."""

_MAX_CDF_POINTS = 4000

RunInput = str | Path | Sequence[RequestRecord]


def load_records(path: str | Path) -> list[RequestRecord]:
    """Read a raw records JSONL file; blank lines are skipped.

    Raises ``ValueError`` naming the file and line for invalid JSON or an invalid record.
    """
    path = Path(path)
    out: list[RequestRecord] = []
    with path.open() as f:
        for lineno, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                obj = json.loads(line)
            except json.JSONDecodeError as e:
                raise ValueError(f"{path}:{lineno}: invalid JSON: {e.msg}") from None
            if not isinstance(obj, dict):
                raise ValueError(f"{path}:{lineno}: expected a JSON object")
            try:
                out.append(RequestRecord.from_dict(obj))
            except ValueError as e:
                raise ValueError(f"{path}:{lineno}: {e}") from None
    return out


def write_records(path: str | Path, records: Iterable[RequestRecord]) -> None:
    """Write records as JSON lines (the format :func:`load_records` reads)."""
    with Path(path).open("w") as f:
        for rec in records:
            f.write(json.dumps(rec.to_dict(), separators=(",", ":")))
            f.write("\n")


def make_report(
    runs: Mapping[str, RunInput],
    out_dir: str | Path,
    *,
    tbt_form: str = "p99",
    duration_s: float | None = None,
    echo: bool = True,
) -> dict[str, Summary]:
    """Summarize labelled runs, write ``summary.json`` and the plots into ``out_dir``, and return the summaries.

    ``runs`` maps a label to a records file or a list of records. The comparison table is printed when
    ``echo`` is true. ``duration_s`` overrides each run's duration (see :func:`~dynaserve.metrics.summarize`).
    """
    if not runs:
        raise ValueError("make_report needs at least one run")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    records = {label: _as_records(run) for label, run in runs.items()}
    summaries = {label: summarize(recs, duration_s, tbt_form) for label, recs in records.items()}
    if echo:
        print(format_table(summaries))
    doc = {"tbt_form": tbt_form, "runs": {label: s.to_dict() for label, s in summaries.items()}}
    (out / "summary.json").write_text(json.dumps(doc, indent=2) + "\n")
    plot_ttft_cdf(records, out / PLOT_FILES[0])
    plot_tbt_cdf(records, out / PLOT_FILES[1])
    plot_latency_scatter(records, out / PLOT_FILES[2], tbt_form=tbt_form)
    return summaries


def _as_records(run: RunInput) -> list[RequestRecord]:
    if isinstance(run, (str, Path)):
        return load_records(run)
    return list(run)


# ---------------------------------------------------------------------------------------------- plots


def _new_figure(ncols: int = 1) -> tuple[Figure, list[Axes]]:
    fig = Figure(figsize=(6.4 * ncols, 4.4), layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, ncols, i + 1) for i in range(ncols)]
    return fig, axes


def _cdf_xy(values: Sequence[float]) -> tuple[np.ndarray, np.ndarray]:
    """Sorted values and their empirical CDF, thinned to at most a few thousand points."""
    xs = np.sort(np.asarray(values, dtype=float))
    ys = np.arange(1, len(xs) + 1) / len(xs)
    if len(xs) > _MAX_CDF_POINTS:
        idx = np.unique(np.linspace(0, len(xs) - 1, _MAX_CDF_POINTS).astype(int))
        xs, ys = xs[idx], ys[idx]
    return xs, ys


def _common_slo(records: Mapping[str, Sequence[RequestRecord]], attr: str) -> float | None:
    vals = {getattr(r, attr) for recs in records.values() for r in recs}
    if len(vals) == 1:
        v = vals.pop()
        return v if math.isfinite(v) else None
    return None


def plot_ttft_cdf(records: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> None:
    """Draw the CDF of TTFT (completed requests) of every labelled run into one PNG."""
    fig, (ax,) = _new_figure()
    for label, recs in records.items():
        vals = [t for r in recs if is_completed(r) and (t := ttft_ms(r)) is not None]
        if vals:
            xs, ys = _cdf_xy(vals)
            ax.step(xs, ys, where="post", label=f"{label} (n={len(vals)})")
    slo = _common_slo(records, "ttft_slo_ms")
    if slo is not None:
        ax.axvline(slo, color="gray", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
    ax.set_xscale("symlog", linthresh=10.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("TTFT (ms)")
    ax.set_ylabel("fraction of requests")
    ax.set_ylim(0, 1.02)
    ax.set_title("Time to first token")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, format="png", dpi=120)


def plot_tbt_cdf(records: Mapping[str, Sequence[RequestRecord]], path: str | Path) -> None:
    """Draw the CDF of all token gaps (completed requests) of every labelled run into one PNG.

    The x axis is symmetric-log (linear below 1 ms) so the zero gaps of batched token delivery stay visible.
    """
    fig, (ax,) = _new_figure()
    for label, recs in records.items():
        vals = [g for r in recs if is_completed(r) for g in tbt_gaps_ms(r)]
        if vals:
            xs, ys = _cdf_xy(vals)
            ax.step(xs, ys, where="post", label=f"{label} ({len(vals)} gaps)")
    slo = _common_slo(records, "tbt_slo_ms")
    if slo is not None:
        ax.axvline(slo, color="gray", linestyle="--", linewidth=1, label=f"SLO {slo:g} ms")
    ax.set_xscale("symlog", linthresh=1.0)
    ax.set_xlim(left=0.0)
    ax.set_xlabel("time between tokens (ms)")
    ax.set_ylabel("fraction of token gaps")
    ax.set_ylim(0, 1.02)
    ax.set_title("Time between tokens")
    ax.grid(True, alpha=0.3)
    ax.legend(loc="lower right", fontsize="small")
    fig.savefig(path, format="png", dpi=120)


def plot_latency_scatter(
    records: Mapping[str, Sequence[RequestRecord]], path: str | Path, *, tbt_form: str = "p99"
) -> None:
    """Per-request scatter against scheduled arrival: TTFT (left) and the request's own TBT (right).

    Completed requests are dots; requests that did not complete are drawn as crosses at the bottom of the
    TTFT panel so they are not lost.
    """
    fig, (ax_ttft, ax_tbt) = _new_figure(2)
    for i, (label, recs) in enumerate(records.items()):
        color = f"C{i % 10}"
        done = [r for r in recs if is_completed(r)]
        ax_ttft.scatter(
            [r.arrival_s for r in done], [ttft_ms(r) for r in done], s=6, alpha=0.6, color=color, label=label
        )
        tbt = [(r.arrival_s, request_tbt_ms(r, tbt_form)) for r in done]
        tbt = [(a, t) for a, t in tbt if not math.isnan(t)]
        ax_tbt.scatter([a for a, _ in tbt], [t for _, t in tbt], s=6, alpha=0.6, color=color, label=label)
        bad = [r.arrival_s for r in recs if not is_completed(r)]
        if bad:
            ax_ttft.scatter(
                bad,
                [0.0] * len(bad),
                marker="x",
                s=18,
                color=color,
                label=f"{label} not completed ({len(bad)})",
                clip_on=False,
            )
    for ax, attr in ((ax_ttft, "ttft_slo_ms"), (ax_tbt, "tbt_slo_ms")):
        slo = _common_slo(records, attr)
        if slo is not None:
            ax.axhline(slo, color="gray", linestyle="--", linewidth=1)
            ax.annotate(
                f"SLO {slo:g} ms",
                xy=(1.0, slo),
                xycoords=("axes fraction", "data"),
                ha="right",
                va="bottom",
                fontsize="small",
                color="dimgray",
            )
        ax.set_yscale("symlog", linthresh=1.0)
        ax.set_ylim(bottom=0.0)
        ax.set_xlabel("scheduled arrival (s)")
        ax.grid(True, alpha=0.3)
    handles, labels = ax_ttft.get_legend_handles_labels()
    fig.legend(
        handles,
        labels,
        loc="outside lower center",
        ncols=min(len(labels), 6),
        fontsize="small",
        markerscale=2,
    )
    ax_ttft.set_ylabel("TTFT (ms)")
    ax_ttft.set_title("TTFT per request")
    ax_tbt.set_ylabel(f"{'P99' if tbt_form == 'p99' else 'max'} TBT of the request (ms)")
    ax_tbt.set_title("TBT per request")
    fig.savefig(path, format="png", dpi=120)


# ------------------------------------------------------------------------------------------------ CLI


def main(argv: Sequence[str] | None = None) -> int:
    """Command-line entry point; returns the process exit status."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.report", description="Summarize and plot raw request records of benchmark runs."
    )
    parser.add_argument("runs", nargs="+", type=Path, help="raw records JSONL files, one per run")
    parser.add_argument("--labels", nargs="+", help="one label per run (default: file names without suffix)")
    parser.add_argument("--out", type=Path, default=Path("results/report"), help="output folder")
    parser.add_argument(
        "--tbt-form", choices=TBT_FORMS, default="p99", help="per-request TBT used for the SLO"
    )
    parser.add_argument("--duration", type=float, default=None, help="run duration in s for the rates")
    args = parser.parse_args(argv)
    labels = args.labels or [p.stem for p in args.runs]
    if len(labels) != len(args.runs):
        parser.error(f"got {len(labels)} labels for {len(args.runs)} runs")
    if len(set(labels)) != len(labels):
        parser.error("labels must be distinct")
    try:
        make_report(
            dict(zip(labels, args.runs, strict=True)),
            args.out,
            tbt_form=args.tbt_form,
            duration_s=args.duration,
        )
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    print(f"wrote {args.out / 'summary.json'} and {', '.join(PLOT_FILES)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())

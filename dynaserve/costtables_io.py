"""Packaged GPU cost tables: loading, interpolation and (re)export from the upstream CSVs.

The tables live in ``dynaserve/data/cost/`` (origin, commit and license of each file in
``dynaserve/data/cost/LICENSES.md``). Kernel tables are stored in a wide layout: one row per
``(n, k)`` GEMM shape or ``(num_heads, num_kv_heads, batch_size)`` attention configuration and one
latency column (milliseconds) per token count, which keeps them small.

:class:`LogGrid` interpolates a table multilinearly in log-log space (latencies follow power laws
between grid points) and extrapolates past the top of an axis with a fixed power (1 for work that
grows linearly, 2 for causal attention over the sequence length).

``python -m dynaserve.costtables_io SRC_COST_DIR`` rebuilds the packaged files from a checkout of the
upstream data (the ``cost/`` folder described in LICENSES.md).
"""

from __future__ import annotations

import csv
import io
import itertools
import math
import statistics
import sys
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cache
from importlib import resources
from pathlib import Path

import numpy as np

GPUS = ("a100", "h100")


def gpu_list(text: str) -> list[str]:
    """A GPU, or a comma list of them (``a100,h100``: a mixed cluster, instance i on the i-th, cycled), as a
    list; ValueError unless every entry is one of ``GPUS``."""
    gpus = [g.strip() for g in text.split(",") if g.strip()]
    if not gpus or any(g not in GPUS for g in gpus):
        raise ValueError(f"gpu must be one of {GPUS} or a comma list of them, got {text!r}")
    return gpus
_SRC_GPU = {"a100": "a100_sxm", "h100": "h100_sxm"}

# Effective bandwidth of element-wise kernels (bytes/s) and the floor of one small kernel (ms),
# from Vidur's mlp.csv for Llama-2-7B TP1: silu-and-mul on 4,096 tokens moves 270 MB in 0.265 ms
# (A100) and 0.138 ms (H100); norms, rotary and adds on 1-64 tokens take 2-7 us.
ELEMENTWISE_BW = {"a100": 1.0e12, "h100": 1.9e12}
KERNEL_FLOOR_MS = 0.004
GPU_MEMORY_BYTES = {"a100": 80e9, "h100": 80e9}
# The GEMM tables are isolated kernel benchmarks. Inside a running model the compute-bound part
# t(m) - t(1) is slower: over 4,448 (model, TP, tokens >= 1,024) points of Vidur's in-model
# profiles (Llama-2-7B, Llama-3-8B, CodeLlama-34B, Llama-2-70B; TP 1-8) the median ratio of that
# excess is 1.155 on A100 and 1.216 on H100. The weight-read floor t(1) matches (ratio 0.93-1.03).
GEMM_SUSTAINED_FACTOR = {"a100": 1.16, "h100": 1.22}


# ---------------------------------------------------------------------------------------------
# interpolation


class LogGrid:
    """Multilinear interpolation of positive values on a positive grid, in log-log space.

    ``axes`` are strictly increasing 1-D arrays; ``values`` has shape ``[len(a) for a in axes]`` and
    must be finite and positive. Below an axis the value is clamped; above it the value grows as
    ``(x / x_max) ** power`` for that axis.
    """

    def __init__(self, axes: Sequence[Sequence[float]], values: np.ndarray, powers: Sequence[float]) -> None:
        self._lax = [np.log(np.asarray(a, dtype=float)) for a in axes]
        vals = np.asarray(values, dtype=float)
        if vals.shape != tuple(len(a) for a in self._lax):
            raise ValueError(f"grid values shape {vals.shape} does not match axes")
        if not np.all(np.isfinite(vals)) or np.any(vals <= 0):
            raise ValueError("grid values must be finite and > 0")
        self._lv = np.log(vals)
        self._powers = tuple(float(p) for p in powers)

    def __call__(self, *coords: float) -> float:
        """Interpolated value at ``coords`` (one per axis)."""
        lo_idx: list[int] = []
        weights: list[float] = []
        extra = 0.0
        for lax, power, x in zip(self._lax, self._powers, coords, strict=True):
            lx = math.log(max(float(x), 1e-12))
            if lx >= lax[-1]:
                extra += power * (lx - lax[-1])
                lx = float(lax[-1])
            lx = max(lx, float(lax[0]))
            if len(lax) == 1:
                lo_idx.append(0)
                weights.append(0.0)
                continue
            i = min(int(np.searchsorted(lax, lx, side="right")) - 1, len(lax) - 2)
            lo_idx.append(i)
            weights.append((lx - lax[i]) / (lax[i + 1] - lax[i]))
        acc = 0.0
        for corner in itertools.product((0, 1), repeat=len(lo_idx)):
            w = 1.0
            for bit, wt in zip(corner, weights, strict=True):
                w *= wt if bit else 1.0 - wt
            if w:
                acc += w * self._lv[tuple(i + bit for i, bit in zip(lo_idx, corner, strict=True))]
        return math.exp(acc + extra)


def fill_missing(values: np.ndarray, axis_values: Sequence[float], axis: int, power: float) -> np.ndarray:
    """Fill NaN cells along ``axis``: log-log interpolation between measured cells, power-law
    extrapolation (exponent ``power``) past the last one, clamping before the first."""
    lx = np.log(np.asarray(axis_values, dtype=float))
    moved = np.ascontiguousarray(np.moveaxis(np.asarray(values, dtype=float), axis, -1))
    lines = moved.reshape(-1, moved.shape[-1])
    for line in lines:
        ok = np.isfinite(line)
        if ok.all() or not ok.any():
            continue
        lxo, lvo = lx[ok], np.log(line[ok])
        miss = ~ok
        filled = np.interp(lx[miss], lxo, lvo)
        above = lx[miss] > lxo[-1]
        filled[above] = lvo[-1] + power * (lx[miss][above] - lxo[-1])
        line[miss] = np.exp(filled)
    return np.moveaxis(lines.reshape(moved.shape), -1, axis)


def regularize(values: np.ndarray, axis_values: Sequence[float], axis: int, power: float) -> np.ndarray:
    """Remove measurement spikes along a growth axis: each cell is clipped to at most the previous
    cell scaled by ``(x_i / x_{i-1}) ** power`` (work cannot get less efficient as it grows) and
    to at least the previous cell (more work never takes less time)."""
    x = np.asarray(axis_values, dtype=float)
    out = np.moveaxis(np.array(values, dtype=float), axis, 0)
    for i in range(1, len(x)):
        out[i] = np.clip(out[i], out[i - 1], 1.25 * out[i - 1] * (x[i] / x[i - 1]) ** power)
    return np.moveaxis(out, 0, axis)


# ---------------------------------------------------------------------------------------------
# packaged tables


def _read_packaged(name: str) -> list[list[str]]:
    text = resources.files("dynaserve").joinpath("data", "cost", name).read_text(encoding="utf-8")
    return list(csv.reader(io.StringIO(text)))


@dataclass(frozen=True)
class AttnTable:
    """Attention latencies of one GPU: ``grids[(num_heads, num_kv_heads)]`` over (batch, length)."""

    grids: dict[tuple[int, int], LogGrid]

    def nearest(self, heads: float, kv_heads: float) -> tuple[int, int]:
        """The configuration closest to ``(heads, kv_heads)`` (log distance, kv heads first)."""

        def dist(key: tuple[int, int]) -> tuple[float, float]:
            return (abs(math.log(key[1] / kv_heads)), abs(math.log(key[0] / heads)))

        return min(self.grids, key=dist)


@dataclass(frozen=True)
class GpuTables:
    """Everything the step model needs about one GPU."""

    gpu: str
    gemm: LogGrid  # (m, n, k) -> ms
    context_attn: AttnTable  # (batch, isl) -> ms, one causal prefill without prefix
    generation_attn: AttnTable  # (batch, kv_len) -> ms, one decode token per sequence
    allreduce: dict[tuple[str, int], LogGrid]  # (backend, num_gpus) -> (message elements) -> ms
    elementwise_bw: float
    kernel_floor_ms: float
    gemm_factor: float

    def gemm_ms(self, m: float, n: float, k: float) -> float:
        """One ``m x k @ k x n`` bf16 GEMM inside a running model (sustained-load correction applied)."""
        floor = self.gemm(1, n, k)
        return floor + self.gemm_factor * max(0.0, self.gemm(m, n, k) - floor)


def _wide_attn(name: str, length_offset: int, length_power: float) -> AttnTable:
    rows = _read_packaged(name)
    lengths = [int(v) + length_offset for v in rows[0][3:]]
    cells: dict[tuple[int, int], dict[int, list[float]]] = defaultdict(dict)
    for r in rows[1:]:
        h, kv, b = int(r[0]), int(r[1]), int(r[2])
        cells[(h, kv)][b] = [float(v) if v else math.nan for v in r[3:]]
    grids = {}
    for key, by_batch in cells.items():
        batches = sorted(by_batch)
        vals = np.array([by_batch[b] for b in batches])
        vals = fill_missing(vals, lengths, axis=1, power=length_power)
        vals = fill_missing(vals, batches, axis=0, power=1.0)
        vals = regularize(regularize(vals, lengths, 1, length_power), batches, 0, 1.0)
        grids[key] = LogGrid([batches, lengths], vals, powers=(1.0, length_power))
    return AttnTable(grids)


@cache
def load_gpu_tables(gpu: str) -> GpuTables:
    """Load (once) and interpolate the packaged kernel tables of ``gpu`` ("a100" or "h100")."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {GPUS}")
    rows = _read_packaged(f"{gpu}_gemm_bf16.csv")
    ms = [int(v) for v in rows[0][2:]]
    ns = sorted({int(r[0]) for r in rows[1:]})
    ks = sorted({int(r[1]) for r in rows[1:]})
    vals = np.full((len(ms), len(ns), len(ks)), math.nan)
    for r in rows[1:]:
        j, k = ns.index(int(r[0])), ks.index(int(r[1]))
        vals[:, j, k] = [float(v) if v else math.nan for v in r[2:]]
    vals = fill_missing(vals, ms, axis=0, power=1.0)
    vals = regularize(fill_missing(vals, ns, axis=1, power=1.0), ms, 0, 1.0)
    gemm = LogGrid([ms, ns, ks], vals, powers=(1.0, 1.0, 1.0))

    ar_rows = _read_packaged(f"{gpu}_custom_allreduce.csv")
    ar: dict[tuple[str, int], list[tuple[int, float]]] = defaultdict(list)
    for backend, n, size, lat in ar_rows[1:]:
        ar[(backend, int(n))].append((int(size), float(lat)))
    allreduce = {
        key: LogGrid([[s for s, _ in sorted(pts)]], np.array([v for _, v in sorted(pts)]), powers=(1.0,))
        for key, pts in ar.items()
    }
    return GpuTables(
        gpu=gpu,
        gemm=gemm,
        context_attn=_wide_attn(f"{gpu}_context_attention_bf16.csv", 0, 2.0),
        # a generation row keyed by ``step`` attends to about step + 1 cached tokens
        generation_attn=_wide_attn(f"{gpu}_generation_attention_bf16.csv", 1, 1.0),
        allreduce=allreduce,
        elementwise_bw=ELEMENTWISE_BW[gpu],
        kernel_floor_ms=KERNEL_FLOOR_MS,
        gemm_factor=GEMM_SUSTAINED_FACTOR[gpu],
    )


@cache
def cpu_overhead_ms() -> tuple[float, float]:
    """Per-step CPU engine overhead on A100 as ``(fixed_ms, per_seq_ms)``.

    Least-squares line of schedule + sampler + prepare_inputs + process_model_outputs (medians)
    against batch size, over the TP1 rows (Llama-2-7B, phi-2) of Vidur's cpu_overheads profile.
    """
    rows = _read_packaged("a100_cpu_overheads_tp1.csv")
    head = rows[0]
    parts = [head.index(c) for c in ("schedule_median", "sampler_e2e_median",
                                      "prepare_inputs_e2e_median", "process_model_outputs_median")]
    bs = np.array([float(r[head.index("batch_size")]) for r in rows[1:]])
    tot = np.array([sum(float(r[i]) for i in parts) for r in rows[1:]])
    slope, intercept = np.polyfit(bs, tot, 1)
    return float(intercept), float(slope)


def load_whole_model(name: str) -> list[dict[str, str]]:
    """Rows of a packaged whole-model measurement file, as dicts of strings."""
    rows = _read_packaged(name)
    return [dict(zip(rows[0], r, strict=True)) for r in rows[1:]]


# ---------------------------------------------------------------------------------------------
# export from the upstream CSVs


def _read_csv(path: Path) -> list[dict[str, str]]:
    with path.open(newline="", encoding="utf-8") as f:
        return list(csv.DictReader(f))


def _write_rows(path: Path, header: Sequence[str], rows: Sequence[Sequence[object]]) -> None:
    with path.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f, lineterminator="\n")
        w.writerow(header)
        w.writerows(rows)


def _fmt(vals: list[str]) -> str:
    """One cell from (possibly duplicated) measurements: the value itself, or the mean of repeats."""
    if len(vals) == 1:
        return vals[0]
    return f"{statistics.fmean(float(v) for v in vals):.6g}"


def _pivot(rows: list[dict[str, str]], key_cols: Sequence[str], col: str) -> tuple[list[int], list[list[object]]]:
    cols = sorted({int(r[col]) for r in rows})
    cells: dict[tuple[int, ...], dict[int, list[str]]] = defaultdict(lambda: defaultdict(list))
    for r in rows:
        cells[tuple(int(r[c]) for c in key_cols)][int(r[col])].append(r["latency_ms"])
    out = []
    for key in sorted(cells):
        out.append([*key, *(_fmt(cells[key][c]) if c in cells[key] else "" for c in cols)])
    return cols, out


def export_packaged_tables(src: Path, dst: Path) -> list[Path]:
    """Rebuild the packaged CSVs in ``dst`` from the upstream ``cost/`` folder ``src``."""
    dst.mkdir(parents=True, exist_ok=True)
    written: list[Path] = []
    for gpu, sg in _SRC_GPU.items():
        aic = src / "aiconfigurator"
        gemm = [r for r in _read_csv(aic / f"{sg}_vllm0.14_gemm.csv") if r["gemm_dtype"] == "bfloat16"]
        cols, out = _pivot(gemm, ("n", "k"), "m")
        _write_rows(dst / f"{gpu}_gemm_bf16.csv", ["n", "k", *cols], out)
        for kind, col in (("context", "isl"), ("generation", "step")):
            rows = [r for r in _read_csv(aic / f"{sg}_vllm0.14_{kind}_attention.csv")
                    if r["kv_cache_dtype"] == "bfloat16" and r["head_dim"] == "128"]
            cols, out = _pivot(rows, ("num_heads", "num_key_value_heads", "batch_size"), col)
            _write_rows(dst / f"{gpu}_{kind}_attention_bf16.csv",
                        ["num_heads", "num_kv_heads", "batch_size", *cols], out)
        ar = _read_csv(aic / f"{sg}_vllm0.14_custom_allreduce.csv")
        _write_rows(dst / f"{gpu}_custom_allreduce.csv", ["backend", "num_gpus", "message_size", "latency_ms"],
                    [[r["backend"], r["num_gpus"], r["message_size"], r["latency_ms"]] for r in ar])
        written += [dst / f"{gpu}_{n}.csv" for n in ("gemm_bf16", "context_attention_bf16",
                                                       "generation_attention_bf16", "custom_allreduce")]
    cpu_cols = ["model_name", "batch_size", "tensor_parallel_degree", "schedule_median", "sampler_e2e_median",
                "prepare_inputs_e2e_median", "process_model_outputs_median"]
    cpu = [r for r in _read_csv(src / "vidur" / "legacy_2024-05" / "a100_cpu_overheads.csv")
           if r["tensor_parallel_degree"] == "1"]
    _write_rows(dst / "a100_cpu_overheads_tp1.csv", cpu_cols, [[r[c] for c in cpu_cols] for r in cpu])
    mux_cols = ["model", "num_gpus", "sm_percent", "batch_size", "seq_len", "prefill_ms", "decode_ms"]
    mux = [r for r in _read_csv(src / "whole_model" / "muxserve_llama_a100_80g.csv")
           if r["model"] in ("llama-7b", "llama-13b") and r["num_gpus"] == "1" and r["sm_percent"] == "100"]
    _write_rows(dst / "muxserve_llama_a100_80g_tp1.csv", mux_cols, [[r[c] for c in mux_cols] for r in mux])
    sw_cols = ["model", "hardware", "prompt_size", "batch_size", "token_size", "prompt_time", "token_time",
               "tensor_parallel"]
    sw = [r for r in _read_csv(src / "whole_model" / "splitwise_perf_model.csv")
          if r["model"] == "llama2-70b" and r["hardware"] == "a100-80gb"]
    _write_rows(dst / "splitwise_llama2-70b_a100.csv", sw_cols, [[r[c] for c in sw_cols] for r in sw])
    written += [dst / n for n in ("a100_cpu_overheads_tp1.csv", "muxserve_llama_a100_80g_tp1.csv",
                                  "splitwise_llama2-70b_a100.csv")]
    return written


if __name__ == "__main__":
    if len(sys.argv) != 2:
        sys.exit("usage: python -m dynaserve.costtables_io SRC_COST_DIR")
    target = Path(__file__).resolve().parent / "data" / "cost"
    for p in export_packaged_tables(Path(sys.argv[1]), target):
        print(f"{p.stat().st_size:>8}  {p}")

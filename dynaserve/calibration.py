"""Calibrated step models: fitting measured engine steps and the JSON file every process loads.

A calibration run (``python -m workers.calibrate``) measures engine steps of known batch composition,
fits :class:`~dynaserve.costmodel.StepLatencyModel` to them and writes a :class:`StepModelFile`. The
worker (``--step-model``), the broker (``--step-model``) and the local cluster (``ClusterConfig.step_model``)
load that file instead of pricing steps from the GPU cost tables.

File format (JSON object, version 1)::

    {"version": 1, "a": ms, "b": ms, "c": ms, "d": ms, "e": ms, "kv_bytes_per_token": int,
     "model": str, "device": str, "engine": str, "samples": int,
     "fit_error": {"median": float, "p90": float, "holdout": int, "ratio_quantiles": [float, ...]},
     "note": str}

``ratio_quantiles`` (optional): measured / predicted step time of the held-out steps at the quantiles
0, 0.05, ..., 1, the step-time noise the simulator can replay (``SimConfig.step_noise``).

Step logs: a worker started with ``--step-log FILE`` appends one line per engine step that ran the model
(``t_monotonic_s measured_ms prefill_tokens decode_seqs decode_ctx_tokens prefill_attn``, after a ``#``
header), so a model can be fitted to, or checked against, the steps of a serving engine under its real
traffic (``python -m workers.calibrate --engine log --from-log FILE``; :func:`read_step_log`).

Pure (numpy for the fit); no engine is imported here.
"""

from __future__ import annotations

import json
import math
import random
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, TextIO

from dynaserve.costmodel import StepLatencyModel

FORMAT_VERSION = 1

Sample = tuple[int, int, int, float, float]
"""One measured step: (prefill_tokens, decode_seqs, decode_ctx_tokens, prefill_attn, measured_ms)."""


STEP_LOG_HEADER = ("# dynaserve step log v1: t_monotonic_s measured_ms prefill_tokens decode_seqs "
                   "decode_ctx_tokens prefill_attn\n")


class StepModelFileError(ValueError):
    """A step-model file that cannot be read or does not hold a valid model."""


@dataclass(frozen=True)
class FitError:
    """Relative error |predicted - measured| / measured of a fit on samples it was not fitted on."""

    median: float = 0.0
    p90: float = 0.0
    holdout: int = 0  # number of held-out samples the error is measured on
    ratio_quantiles: tuple[float, ...] = ()  # measured / predicted at quantiles 0, 1/20, ..., 1 (held out)


@dataclass(frozen=True)
class StepModelFile:
    """A step model with what it was measured on; ``save``/``load`` read and write the JSON file."""

    model: StepLatencyModel
    kv_bytes_per_token: int  # KV bytes of one token of the model (all layers, K and V)
    model_name: str = ""  # the model the steps ran (directory name or preset)
    device: str = ""  # what ran them (e.g. "cpu: 2 cores, <cpu model>")
    engine: str = ""  # engine measured: vllm, or tables (written from the cost tables, not measured)
    samples: int = 0  # measured steps the coefficients were fitted to
    fit_error: FitError = field(default_factory=FitError)
    note: str = ""  # free text: settings of the run

    def to_json(self) -> dict[str, Any]:
        m = self.model
        return {
            "version": FORMAT_VERSION, "a": m.a, "b": m.b, "c": m.c, "d": m.d, "e": m.e,
            "kv_bytes_per_token": self.kv_bytes_per_token, "model": self.model_name, "device": self.device,
            "engine": self.engine, "samples": self.samples, "fit_error": asdict(self.fit_error), "note": self.note,
        }

    def save(self, path: str | Path) -> None:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(self.to_json(), indent=2) + "\n")

    @classmethod
    def from_json(cls, obj: object, source: str = "step model") -> StepModelFile:
        """Validate a parsed file; every problem raises :class:`StepModelFileError` naming ``source``."""
        if not isinstance(obj, dict):
            raise StepModelFileError(f"{source}: expected a JSON object, got {type(obj).__name__}")
        if obj.get("version") != FORMAT_VERSION:
            raise StepModelFileError(f"{source}: unsupported version {obj.get('version')!r} (expected {FORMAT_VERSION})")
        missing = [k for k in ("a", "b", "c", "d", "e", "kv_bytes_per_token") if k not in obj]
        if missing:
            raise StepModelFileError(f"{source}: missing field(s) {', '.join(missing)}")
        coef = []
        for k in ("a", "b", "c", "d", "e"):
            v = obj[k]
            if isinstance(v, bool) or not isinstance(v, (int, float)):
                raise StepModelFileError(f"{source}: {k} must be a number, got {v!r}")
            coef.append(float(v))
        try:
            model = StepLatencyModel(*coef)
        except ValueError as exc:
            raise StepModelFileError(f"{source}: {exc}") from None
        kvb = obj["kv_bytes_per_token"]
        if isinstance(kvb, bool) or not isinstance(kvb, int) or kvb <= 0:
            raise StepModelFileError(f"{source}: kv_bytes_per_token must be an integer > 0, got {kvb!r}")
        fe = obj.get("fit_error") or {}
        if not isinstance(fe, dict):
            raise StepModelFileError(f"{source}: fit_error must be an object")
        try:
            rq = tuple(float(x) for x in fe.get("ratio_quantiles", ()))
            fit_error = FitError(float(fe.get("median", 0.0)), float(fe.get("p90", 0.0)), int(fe.get("holdout", 0)),
                                 rq)
        except (TypeError, ValueError):
            raise StepModelFileError(f"{source}: bad fit_error {fe!r}") from None
        if rq and (len(rq) < 2 or rq[0] <= 0 or any(b < a for a, b in zip(rq, rq[1:], strict=False))):
            raise StepModelFileError(f"{source}: ratio_quantiles must be >= 2 positive, non-decreasing numbers")
        return cls(
            model=model, kv_bytes_per_token=kvb, model_name=str(obj.get("model", "")),
            device=str(obj.get("device", "")), engine=str(obj.get("engine", "")),
            samples=int(obj.get("samples", 0)), fit_error=fit_error, note=str(obj.get("note", "")),
        )

    @classmethod
    def load(cls, path: str | Path) -> StepModelFile:
        try:
            text = Path(path).read_text()
        except OSError as exc:
            raise StepModelFileError(f"cannot read step model file {path}: {exc.strerror or exc}") from None
        try:
            obj = json.loads(text)
        except json.JSONDecodeError as exc:
            raise StepModelFileError(f"step model file {path} is not JSON: {exc}") from None
        return cls.from_json(obj, f"step model file {path}")


def load_step_model(path: str | Path) -> tuple[StepLatencyModel, int]:
    """The step model and KV bytes per token of a step-model file (shape of ``preset_step_model``)."""
    f = StepModelFile.load(path)
    return f.model, f.kv_bytes_per_token


def choose_step_model(step_model_file: str, model: str, gpu: str = "a100", tp: int = 1) -> tuple[StepLatencyModel, int]:
    """The file's model when ``step_model_file`` is set, else the cost-table model of ``model`` on ``gpu``."""
    if step_model_file:
        return load_step_model(step_model_file)
    from dynaserve.costmodel import preset_step_model

    return preset_step_model(model, gpu, tp)


# ------------------------------------------------------------------ step logs


def open_step_log(path: str | Path) -> TextIO:
    """Open a step log for appending; a new or empty file gets the header. Writes are buffered (a write per
    line would be a system call on the engine's thread at every step): the writer flushes when it wants its
    lines readable (the worker: before the tokens of a step that ends a request leave), and a killed writer
    loses what it had not flushed."""
    fh = open(path, "a")  # noqa: SIM115 - the worker keeps it open for its lifetime
    if fh.tell() == 0:
        fh.write(STEP_LOG_HEADER)
    return fh


def format_step(t: float, ms: float, prefill_tokens: int, decode_seqs: int, decode_ctx_tokens: int,
                prefill_attn: float) -> str:
    """One step-log line."""
    return f"{t:.6f} {ms:.4f} {prefill_tokens} {decode_seqs} {decode_ctx_tokens} {prefill_attn:.1f}\n"


def parse_step_log(text: str, source: str = "step log") -> list[tuple[float, Sample]]:
    """The steps in ``text`` (step-log lines), as (end time, sample). A malformed line raises
    :class:`StepModelFileError` naming ``source`` and the line; a torn last line (a killed writer: the text
    does not end with a newline) is skipped."""
    out: list[tuple[float, Sample]] = []
    lines = text.split("\n")
    for no, line in enumerate(lines, 1):
        if not line.strip() or line.startswith("#"):
            continue
        parts = line.split()
        try:
            if len(parts) != 6:
                raise ValueError(f"{len(parts)} fields, expected 6")
            t, ms, p, n, ctx, attn = float(parts[0]), float(parts[1]), int(parts[2]), int(parts[3]), \
                int(parts[4]), float(parts[5])
        except ValueError as exc:
            if no == len(lines):
                break
            raise StepModelFileError(f"{source}:{no}: not a step-log line ({exc})") from None
        out.append((t, (p, n, ctx, attn, ms)))
    return out


def read_step_log(path: str | Path, start: float = -math.inf, end: float = math.inf) -> list[tuple[float, Sample]]:
    """The steps of a step log that ended in [start, end] (monotonic seconds), as (end time, sample)
    (:func:`parse_step_log`)."""
    return [(t, s) for t, s in parse_step_log(Path(path).read_text(), str(path)) if start <= t <= end]


def ratio_quantiles(model: StepLatencyModel, samples: Sequence[Sample], points: int = 21) -> tuple[float, ...]:
    """Measured / predicted step time of ``samples`` at ``points`` evenly spaced quantiles (0 .. 1)."""
    ratios = sorted(ms / model.step_ms(p, n, ctx, attn) for p, n, ctx, attn, ms in samples if ms > 0)
    if not ratios:
        raise ValueError("quantile of an empty sequence")
    last = len(ratios) - 1
    out = []
    for i in range(points):  # quantile(), on the list sorted once
        pos = i / (points - 1) * last
        lo = int(pos)
        hi = min(lo + 1, last)
        out.append(round(ratios[lo] + (ratios[hi] - ratios[lo]) * (pos - lo), 4))
    return tuple(out)


# ------------------------------------------------------------------ fitting


def fit(samples: Sequence[Sample]) -> StepLatencyModel:
    """Non-negative least squares on relative error (the cost tables' fit), so 3 ms and 100 ms steps
    weigh alike. Needs at least 5 samples with positive times."""
    import numpy as np

    from dynaserve.costtables import _nnls_relative

    good = [s for s in samples if s[4] > 0 and math.isfinite(s[4])]
    if len(good) < 5:
        raise ValueError(f"need at least 5 step samples with a positive time to fit, got {len(good)}")
    arr = np.asarray(good, dtype=float)
    x = np.column_stack([np.ones(len(arr)), arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]])
    coef = _nnls_relative(x, arr[:, 4])
    coef[1] = max(coef[1], 1e-6)
    return StepLatencyModel(*(float(v) for v in coef))


def relative_errors(model: StepLatencyModel, samples: Sequence[Sample]) -> list[float]:
    """|predicted - measured| / measured of each sample."""
    return [abs(model.step_ms(p, n, ctx, attn) - ms) / ms for p, n, ctx, attn, ms in samples if ms > 0]


def quantile(xs: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (``q`` in [0, 1]) of a non-empty sequence."""
    s = sorted(xs)
    if not s:
        raise ValueError("quantile of an empty sequence")
    pos = q * (len(s) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(s) - 1)
    return s[lo] + (s[hi] - s[lo]) * (pos - lo)


def fit_with_holdout(
    samples: Sequence[Sample], holdout: float = 0.25, seed: int = 0
) -> tuple[StepLatencyModel, FitError]:
    """Hold out a seeded random share of the samples, measure the error of a fit on the rest on them,
    then fit the returned model on every sample."""
    if not 0 < holdout < 1:
        raise ValueError("holdout must be in (0, 1)")
    idx = list(range(len(samples)))
    random.Random(seed).shuffle(idx)
    k = max(1, int(len(idx) * holdout))
    test = [samples[i] for i in idx[:k]]
    train = [samples[i] for i in idx[k:]]
    trained = fit(train)
    errs = relative_errors(trained, test)
    err = FitError(median=quantile(errs, 0.5), p90=quantile(errs, 0.9), holdout=len(errs),
                   ratio_quantiles=ratio_quantiles(trained, test))
    return fit(samples), err

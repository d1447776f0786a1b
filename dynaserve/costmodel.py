"""Step-latency model shared by the global scheduler, the local scheduler and the simulated engine.

One engine step runs a batch of prefill chunks and decode sequences. Its time is modelled as

    t_ms = a + b * prefill_tokens + c * decode_seqs + d * decode_ctx_tokens + e * prefill_attn

where ``prefill_attn`` is the sum over prefill chunks of ``chunk_tokens * (ctx_before + chunk_tokens / 2)``
(the causal attention work of the chunk, in token pairs). Coefficients come from GPU kernel tables
(:mod:`dynaserve.costtables`) or from a fit to measured step times (``fit``).

Everything here is pure and cheap: the schedulers call it in their hot paths.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass


@dataclass(frozen=True)
class StepLatencyModel:
    """Linear step-time model; all coefficients in milliseconds."""

    a: float = 5.0  # fixed per-step cost (launch, sampling, scheduling)
    b: float = 0.02  # per prefill token (linear GEMM work)
    c: float = 0.05  # per decode sequence
    d: float = 2e-5  # per token of decode context (KV read)
    e: float = 0.0  # per prefill attention token-pair

    def __post_init__(self) -> None:
        for name in ("a", "b", "c", "d", "e"):
            v = getattr(self, name)
            if not (isinstance(v, (int, float)) and math.isfinite(v) and v >= 0):
                raise ValueError(f"StepLatencyModel.{name} must be a finite number >= 0, got {v!r}")
        if self.b <= 0:
            raise ValueError("StepLatencyModel.b must be > 0")

    def step_ms(
        self,
        prefill_tokens: int = 0,
        decode_seqs: int = 0,
        decode_ctx_tokens: int = 0,
        prefill_attn: float = 0.0,
    ) -> float:
        """Predicted time of one step with this batch composition."""
        return (
            self.a
            + self.b * prefill_tokens
            + self.c * decode_seqs
            + self.d * decode_ctx_tokens
            + self.e * prefill_attn
        )

    @staticmethod
    def chunk_attn(chunk_tokens: int, ctx_before: int) -> float:
        """Attention work (token pairs) of a prefill chunk of ``chunk_tokens`` after ``ctx_before`` tokens."""
        return chunk_tokens * (ctx_before + chunk_tokens / 2.0)

    def prefill_ms(self, tokens: int, ctx_before: int = 0) -> float:
        """Marginal time of prefilling ``tokens`` after ``ctx_before`` tokens (no fixed step cost)."""
        return self.b * tokens + self.e * self.chunk_attn(tokens, ctx_before)

    def prefill_alone_ms(self, prompt: int, chunk: int = 8192) -> float:
        """Time to prefill ``prompt`` tokens alone on an idle instance, in chunks of ``chunk`` tokens."""
        t, done = 0.0, 0
        while done < prompt:
            n = min(chunk, prompt - done)
            t += self.step_ms(n, 0, 0, self.chunk_attn(n, done))
            done += n
        return t

    def decode_token_ms(self, ctx: int) -> float:
        """Marginal time one decode sequence with ``ctx`` context tokens adds to a step."""
        return self.c + self.d * ctx

    def max_prefill_tokens(
        self, budget_ms: float, decode_seqs: int, decode_ctx_tokens: int, ctx_before: int = 0
    ) -> int:
        """Largest prefill chunk (one sequence, after ``ctx_before`` tokens) whose step fits ``budget_ms``."""
        return self.max_chunk(budget_ms - self.step_ms(0, decode_seqs, decode_ctx_tokens), ctx_before)

    def max_chunk(self, room_ms: float, ctx_before: int) -> int:
        """Largest prefill chunk after ``ctx_before`` tokens whose marginal time fits ``room_ms``."""
        if room_ms <= 0:
            return 0
        if self.e == 0:
            return int(room_ms / self.b)
        qa = self.e / 2.0
        qb = self.b + self.e * ctx_before
        return max(0, int((-qb + math.sqrt(qb * qb + 4 * qa * room_ms)) / (2 * qa)))

    def coefficients(self) -> tuple[float, float, float, float, float]:
        """``(a, b, c, d, e)``: what ``StepLatencyModel(*coefficients)`` rebuilds (RegisterWorker.step_model)."""
        return (self.a, self.b, self.c, self.d, self.e)

    def scaled(self, factor: float) -> StepLatencyModel:
        """The same model with every coefficient multiplied by ``factor``."""
        return StepLatencyModel(*(factor * v for v in (self.a, self.b, self.c, self.d, self.e)))

    @classmethod
    def fit(cls, samples: Sequence[tuple[int, int, int, float, float]]) -> StepLatencyModel:
        """Least-squares fit (non-negative, by clipping) to samples of
        ``(prefill_tokens, decode_seqs, decode_ctx_tokens, prefill_attn, measured_ms)``."""
        import numpy as np

        if len(samples) < 5:
            raise ValueError(f"need at least 5 step samples to fit, got {len(samples)}")
        arr = np.asarray(samples, dtype=float)
        x = np.column_stack([np.ones(len(arr)), arr[:, 0], arr[:, 1], arr[:, 2], arr[:, 3]])
        y = arr[:, 4]
        coef, *_ = np.linalg.lstsq(x, y, rcond=None)
        coef = np.clip(coef, 0.0, None)
        if coef[1] <= 0:
            coef[1] = 1e-6
        return cls(*(float(v) for v in coef))


def preset_step_model(model: str, gpu: str = "a100", tp: int = 1) -> tuple[StepLatencyModel, int]:
    """Step model and KV bytes per token of a model preset, or of an HF model directory (its config.json),
    on a GPU (from the packaged cost tables)."""
    from pathlib import Path

    from dynaserve.costtables import MODEL_PRESETS, ModelShape, build_step_model

    if (Path(model) / "config.json").is_file():
        shape = ModelShape.from_hf_config(Path(model) / "config.json")
    elif model in MODEL_PRESETS:
        shape = MODEL_PRESETS[model]
    else:
        raise ValueError(f"unknown model {model!r}: not a preset ({sorted(MODEL_PRESETS)}) nor an HF model directory")
    return build_step_model(shape, gpu=gpu, tp=tp), shape.kv_bytes_per_token(tp)

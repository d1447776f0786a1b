"""Step-latency models for real model shapes on real GPUs, built from kernel cost tables.

The detailed model (:func:`detailed_step_ms`) prices one engine step operator by operator with the
packaged NVIDIA AIConfigurator tables (vLLM 0.14 kernels, bf16) of an A100-SXM4-80GB or an
H100-SXM-80GB:

* per layer: the QKV, O, gate+up and down projection GEMMs of one tensor-parallel shard over all
  tokens of the step; prefill attention (context table) and decode attention (generation table);
  five element-wise kernels (two fused add+RMSNorm, rotary, KV-cache write, SiLU-and-mul), priced
  as a floor plus bytes over an effective bandwidth; two all-reduces of the hidden states when
  ``tp > 1``;
* per step: the LM-head GEMM for one token per sequence, the embedding and final norm, and a
  fixed CPU engine overhead (scheduling, input preparation, sampling, output processing).

:func:`build_step_model` evaluates the detailed model on a grid of realistic batch compositions and
fits the five coefficients of :class:`~dynaserve.costmodel.StepLatencyModel` by non-negative
least squares on relative error. :func:`validate_whole_model` compares both with published
whole-model measurements (``python -m dynaserve.costtables --validate``).
"""

from __future__ import annotations

import argparse
import json
import math
import statistics
from collections import defaultdict
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path
from typing import Any

import numpy as np

from dynaserve.costmodel import StepLatencyModel
from dynaserve.costtables_io import (
    GPU_MEMORY_BYTES,
    GPUS,
    cpu_overhead_ms,
    load_gpu_tables,
    load_whole_model,
)

__all__ = [
    "MODEL_PRESETS",
    "Chunk",
    "ModelShape",
    "build_step_model",
    "detailed_step_ms",
    "fit_compositions",
    "main",
    "predict_ms",
    "step_breakdown",
    "summarize",
    "validate_whole_model",
]

Chunk = tuple[int, int]  # (new tokens, tokens already in the KV cache)

_DTYPE_BYTES = {"bfloat16": 2, "float16": 2, "half": 2, "float32": 4, "float": 4}
_TABLE_HEAD_DIM = 128  # every attention row in the tables has head_dim 128
_GRAPH_MAX_TOKENS = 512  # vLLM's largest CUDA-graph capture size; larger steps run eager
_KV_CACHE_MEMORY_FRACTION = 0.9


@dataclass(frozen=True)
class ModelShape:
    """Dimensions of a decoder-only transformer (Llama-style: gated MLP, RMSNorm, RoPE, GQA)."""

    name: str
    num_layers: int
    hidden_size: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    intermediate_size: int
    vocab_size: int
    dtype_bytes: int = 2
    tie_word_embeddings: bool = False

    def __post_init__(self) -> None:
        for f in ("num_layers", "hidden_size", "num_heads", "num_kv_heads", "head_dim",
                  "intermediate_size", "vocab_size", "dtype_bytes"):
            v = getattr(self, f)
            if not isinstance(v, int) or v <= 0:
                raise ValueError(f"ModelShape.{f} must be a positive int, got {v!r}")
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads ({self.num_heads}) must be a multiple of num_kv_heads "
                             f"({self.num_kv_heads})")

    @classmethod
    def from_hf_config(cls, config: str | Path | Mapping[str, Any], name: str | None = None) -> ModelShape:
        """Shape from a Hugging Face ``config.json`` (a path to the file or its folder, or the parsed dict).

        ``head_dim`` defaults to ``hidden_size // num_attention_heads`` and ``num_key_value_heads`` to
        ``num_attention_heads``; a multimodal config's ``text_config`` is used when present.
        """
        if isinstance(config, (str, Path)):
            path = Path(config)
            if path.is_dir():
                path = path / "config.json"
            cfg: Mapping[str, Any] = json.loads(path.read_text(encoding="utf-8"))
            default_name = path.parent.name
        else:
            cfg = config
            default_name = "model"
        if "num_hidden_layers" not in cfg and isinstance(cfg.get("text_config"), Mapping):
            cfg = {**cfg, **cfg["text_config"]}
        heads = int(cfg["num_attention_heads"])
        hidden = int(cfg["hidden_size"])
        dtype = str(cfg.get("torch_dtype") or cfg.get("dtype") or "bfloat16").removeprefix("torch.")
        return cls(
            name=name or str(cfg.get("_name_or_path") or default_name),
            num_layers=int(cfg["num_hidden_layers"]),
            hidden_size=hidden,
            num_heads=heads,
            num_kv_heads=int(cfg.get("num_key_value_heads") or heads),
            head_dim=int(cfg.get("head_dim") or hidden // heads),
            intermediate_size=int(cfg["intermediate_size"]),
            vocab_size=int(cfg["vocab_size"]),
            dtype_bytes=_DTYPE_BYTES.get(dtype, 2),
            tie_word_embeddings=bool(cfg.get("tie_word_embeddings", False)),
        )

    def heads_per_gpu(self, tp: int = 1) -> tuple[int, int]:
        """(query heads, KV heads) on one GPU; KV heads are replicated when ``tp`` exceeds them."""
        _check_tp(tp)
        return math.ceil(self.num_heads / tp), max(1, math.ceil(self.num_kv_heads / tp))

    def kv_bytes_per_token(self, tp: int = 1) -> int:
        """KV-cache bytes one token occupies on one GPU (K and V, all layers)."""
        kv = self.heads_per_gpu(tp)[1]
        return 2 * self.num_layers * kv * self.head_dim * self.dtype_bytes

    def weight_bytes(self, tp: int = 1) -> int:
        """Weight bytes on one GPU (projections, MLP and vocabulary sharded ``tp`` ways, norms replicated)."""
        q, kv = self.heads_per_gpu(tp)
        h, hd = self.hidden_size, self.head_dim
        inter = math.ceil(self.intermediate_size / tp)
        layer = h * (q + 2 * kv) * hd + q * hd * h + 3 * h * inter + 2 * h
        vocab = math.ceil(self.vocab_size / tp) * h * (1 if self.tie_word_embeddings else 2)
        return (self.num_layers * layer + vocab + h) * self.dtype_bytes


MODEL_PRESETS: dict[str, ModelShape] = {
    s.name: s
    for s in (
        ModelShape("llama3-8b", 32, 4096, 32, 8, 128, 14336, 128256),
        ModelShape("qwen2.5-32b", 64, 5120, 40, 8, 128, 27648, 152064),
        ModelShape("tiny-llama", 4, 128, 4, 2, 32, 352, 4096),
        # LLaMA-1 and Llama-2 shapes of the published whole-model measurements
        ModelShape("llama-7b", 32, 4096, 32, 32, 128, 11008, 32000),
        ModelShape("llama-13b", 40, 5120, 40, 40, 128, 13824, 32000),
        ModelShape("llama2-70b", 80, 8192, 64, 8, 128, 28672, 32000),
    )
}


def _check_tp(tp: int) -> None:
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")


def _resolve(shape: ModelShape | str) -> ModelShape:
    if isinstance(shape, ModelShape):
        return shape
    try:
        return MODEL_PRESETS[shape]
    except KeyError:
        raise ValueError(f"unknown model preset {shape!r}; known: {sorted(MODEL_PRESETS)}") from None


# ---------------------------------------------------------------------------------------------
# detailed, table-based step cost


def step_breakdown(
    shape: ModelShape | str,
    gpu: str = "a100",
    tp: int = 1,
    prefill_chunks: Sequence[Chunk] = (),
    decode_ctxs: Sequence[int] = (),
) -> dict[str, float]:
    """Milliseconds of one step by component (``gemm``, ``prefill_attn``, ``decode_attn``,
    ``elementwise``, ``allreduce``, ``lm_head``, ``cpu``); see :func:`detailed_step_ms`."""
    shape = _resolve(shape)
    _check_tp(tp)
    tab = load_gpu_tables(gpu)
    chunks = [(int(c), int(p)) for c, p in prefill_chunks if c > 0]
    ctxs = [max(1, int(x)) for x in decode_ctxs]
    if any(p < 0 for _, p in chunks):
        raise ValueError("prefill ctx_before must be >= 0")
    out = dict.fromkeys(("gemm", "prefill_attn", "decode_attn", "elementwise", "allreduce", "lm_head"), 0.0)
    out["cpu"] = cpu_overhead_ms()[0]
    tokens = sum(c for c, _ in chunks) + len(ctxs)
    if tokens == 0:
        return out
    layers = shape.num_layers
    q, kv = shape.heads_per_gpu(tp)
    h, hd, s = shape.hidden_size, shape.head_dim, shape.dtype_bytes
    inter = math.ceil(shape.intermediate_size / tp)
    gemm = tab.gemm_ms

    out["gemm"] = layers * (
        gemm(tokens, (q + 2 * kv) * hd, h) + gemm(tokens, h, q * hd)
        + gemm(tokens, 2 * inter, h) + gemm(tokens, h, inter)
    )
    out["lm_head"] = gemm(len(chunks) + len(ctxs), math.ceil(shape.vocab_size / tp), h)

    if chunks:  # one varlen call; priced as a uniform batch with the same causal token pairs
        pairs = sum(StepLatencyModel.chunk_attn(c, p) for c, p in chunks)
        eq_len = math.sqrt(2.0 * pairs / len(chunks))
        key = tab.context_attn.nearest(q, kv)
        scale = (q / key[0]) * (hd / _TABLE_HEAD_DIM)
        out["prefill_attn"] = layers * scale * tab.context_attn.grids[key](len(chunks), eq_len)
    if ctxs:  # KV-bandwidth bound: extra KV heads or a wider head_dim act like a larger batch
        kv_ref = max(k for k in (1, 2, 4, 8) if k <= kv)
        key = tab.generation_attn.nearest(q / kv * kv_ref, kv_ref)
        eff_batch = len(ctxs) * (kv / key[1]) * (hd / _TABLE_HEAD_DIM)
        mean_ctx = sum(ctxs) / len(ctxs)
        out["decode_attn"] = layers * tab.generation_attn.grids[key](eff_batch, mean_ctx)

    def ew(nbytes: float) -> float:
        return tab.kernel_floor_ms + nbytes / tab.elementwise_bw * 1e3

    per_layer = (
        2 * ew(4 * tokens * h * s)  # fused residual-add + RMSNorm
        + ew(2 * tokens * (q + kv) * hd * s)  # rotary embedding on q and k
        + ew(4 * tokens * kv * hd * s)  # write k and v into the paged cache
        + ew(3 * tokens * inter * s)  # SiLU-and-mul
    )
    out["elementwise"] = layers * per_layer + ew(2 * tokens * h * s) + ew(4 * tokens * h * s)

    if tp > 1:
        backend = "vllm_graph" if tokens <= _GRAPH_MAX_TOKENS else "vllm_eager"
        sizes = sorted(n for b, n in tab.allreduce if b == backend)
        n_gpus = next((n for n in sizes if n >= tp), sizes[-1])
        ar = tab.allreduce[(backend, n_gpus)](tokens * h) * (tp / n_gpus if tp > n_gpus else 1.0)
        out["allreduce"] = layers * 2 * ar
    return out


def detailed_step_ms(
    shape: ModelShape | str,
    gpu: str = "a100",
    tp: int = 1,
    prefill_chunks: Sequence[Chunk] = (),
    decode_ctxs: Sequence[int] = (),
) -> float:
    """Time (ms) of one step of ``shape`` on ``tp`` GPUs of kind ``gpu`` ("a100" or "h100").

    ``prefill_chunks`` lists ``(new_tokens, ctx_before)`` per prefill chunk; ``decode_ctxs`` the
    context length of each decoding sequence. Priced operator by operator from the kernel tables.
    """
    return sum(step_breakdown(shape, gpu, tp, prefill_chunks, decode_ctxs).values())


# ---------------------------------------------------------------------------------------------
# linear fit


def _features(chunks: Sequence[Chunk], ctxs: Sequence[int]) -> tuple[int, int, int, float]:
    return (
        sum(c for c, _ in chunks),
        len(ctxs),
        sum(ctxs),
        sum(StepLatencyModel.chunk_attn(c, p) for c, p in chunks),
    )


def fit_compositions(shape: ModelShape | str, gpu: str = "a100", tp: int = 1) -> list[tuple[list[Chunk], list[int]]]:
    """The batch compositions the linear model is fitted on: decode-only batches (1-256 sequences,
    128-8k context), single and multiple prefill chunks (16-8k tokens, 0-8k cached prefix) and
    mixed chunk + decode steps, limited to what fits in the KV cache of ``tp`` GPUs."""
    shape = _resolve(shape)
    free = _KV_CACHE_MEMORY_FRACTION * GPU_MEMORY_BYTES[gpu] - shape.weight_bytes(tp)
    cap = max(16384, int(free / shape.kv_bytes_per_token(tp)))
    comps: list[tuple[list[Chunk], list[int]]] = []
    for b in (1, 2, 4, 8, 16, 32, 64, 128, 256):
        comps += [([], [ctx] * b) for ctx in (128, 512, 1024, 2048, 4096, 8192) if b * ctx <= cap]
    for c in (16, 64, 128, 256, 512, 1024, 2048, 4096, 8192):
        comps += [([(c, p)], []) for p in (0, 512, 2048, 8192) if c + p <= cap]
    comps += [([(c, 0)] * n, []) for n, c in ((2, 256), (4, 512), (8, 1024), (4, 2048))]
    for c in (128, 512, 2048):
        for b in (8, 32, 128):
            comps += [([(c, 0)], [ctx] * b) for ctx in (512, 2048) if c + b * ctx <= cap]
    return comps


def _nnls_relative(x: np.ndarray, y: np.ndarray) -> np.ndarray:
    """Least squares of ``x @ coef ~ y`` on relative error with ``coef >= 0`` (active set)."""
    xw = x / y[:, None]
    norm = np.maximum(np.abs(xw).max(axis=0), 1e-30)
    active = list(range(x.shape[1]))
    coef = np.zeros(x.shape[1])
    while active:
        sol, *_ = np.linalg.lstsq(xw[:, active] / norm[active], np.ones(len(y)), rcond=None)
        sol = sol / norm[active]
        if (sol >= 0).all():
            coef[active] = sol
            break
        active.pop(int(np.argmin(sol)))
    return coef


@lru_cache(maxsize=256)
def _build_cached(shape: ModelShape, gpu: str, tp: int) -> StepLatencyModel:
    comps = fit_compositions(shape, gpu, tp)
    feats = np.array([[1.0, *_features(ch, cx)] for ch, cx in comps])
    y = np.array([detailed_step_ms(shape, gpu, tp, ch, cx) for ch, cx in comps])
    coef = _nnls_relative(feats, y)
    coef[1] = max(coef[1], 1e-6)
    return StepLatencyModel(*(float(v) for v in coef))


def build_step_model(shape: ModelShape | str, gpu: str = "a100", tp: int = 1) -> StepLatencyModel:
    """Linear :class:`StepLatencyModel` for ``shape`` (or a preset name) on ``tp`` GPUs of kind ``gpu``,
    fitted to :func:`detailed_step_ms` over :func:`fit_compositions`. Cached per argument set."""
    if gpu not in GPUS:
        raise ValueError(f"unknown gpu {gpu!r}; expected one of {GPUS}")
    _check_tp(tp)
    return _build_cached(_resolve(shape), gpu, tp)


def predict_ms(model: StepLatencyModel, prefill_chunks: Sequence[Chunk] = (), decode_ctxs: Sequence[int] = ()) -> float:
    """The linear model's time for a step given as chunks and decode contexts."""
    return model.step_ms(*_features(list(prefill_chunks), list(decode_ctxs)))


# ---------------------------------------------------------------------------------------------
# validation against whole-model measurements

# Splitwise TP2, 64 x 512-token prompt: 794 ms, against 6,633 ms for 32 x 512 (a failed measurement).
_SPLITWISE_EXCLUDED = {(2, 512, 64, 128)}


def _validation_cases() -> list[tuple[str, str, int, str, int, int, float, list[Chunk], list[int]]]:
    cases = []
    for r in load_whole_model("muxserve_llama_a100_80g_tp1.csv"):
        bs, seq = int(r["batch_size"]), int(r["seq_len"])
        for phase in ("prefill", "decode"):
            ms = float(r[f"{phase}_ms"])
            if ms > 0:  # -1 marks out-of-memory configurations
                chunks, ctxs = ([(seq, 0)] * bs, []) if phase == "prefill" else ([], [seq] * bs)
                cases.append(("muxserve", r["model"], 1, phase, bs, seq, ms, chunks, ctxs))
    runs: dict[tuple[int, int, int, int], list[tuple[float, float]]] = defaultdict(list)
    for r in load_whole_model("splitwise_llama2-70b_a100.csv"):
        key = (int(r["tensor_parallel"]), int(r["prompt_size"]), int(r["batch_size"]), int(r["token_size"]))
        runs[key].append((float(r["prompt_time"]), float(r["token_time"])))
    for (tp, prompt, bs, out_len), vals in sorted(runs.items()):
        if (tp, prompt, bs, out_len) in _SPLITWISE_EXCLUDED:
            continue
        if out_len == 128:  # prompt_time does not depend on the output length
            cases.append(("splitwise", "llama2-70b", tp, "prefill", bs, prompt,
                          statistics.median(v[0] for v in vals), [(prompt, 0)] * bs, []))
        ctx = prompt + out_len // 2  # token_time is the mean over the whole generation
        cases.append(("splitwise", "llama2-70b", tp, "decode", bs, ctx,
                      statistics.median(v[1] for v in vals), [], [ctx] * bs))
    return cases


def validate_whole_model() -> list[dict[str, Any]]:
    """Predicted (detailed and fitted) against measured whole-model step times on A100.

    Sources: MuxServe LLaMA-7B/13B TP1 (full GPU) prefill and decode, and Splitwise Llama-2-70B on
    TP 2/4/8 (median of repeated runs). A prefill row is ``batch_size`` prompts of ``tokens``; a
    decode row is ``batch_size`` sequences with ``tokens`` of context each.
    """
    rows = []
    for source, model, tp, phase, bs, tokens, measured, chunks, ctxs in _validation_cases():
        shape = MODEL_PRESETS[model]
        pred = detailed_step_ms(shape, "a100", tp, chunks, ctxs)
        fitted = predict_ms(build_step_model(shape, "a100", tp), chunks, ctxs)
        rows.append({
            "source": source, "model": model, "gpu": "a100", "tp": tp, "phase": phase,
            "batch_size": bs, "tokens": tokens, "measured_ms": measured,
            "predicted_ms": pred, "fitted_ms": fitted,
            "rel_err": (pred - measured) / measured, "fitted_rel_err": (fitted - measured) / measured,
        })
    return rows


def summarize(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (source, model, tp, phase): count and median / max absolute relative error."""
    groups: dict[tuple[str, str, int, str], list[Mapping[str, Any]]] = defaultdict(list)
    for r in rows:
        groups[(r["source"], r["model"], r["tp"], r["phase"])].append(r)
    return [
        {"source": k[0], "model": k[1], "tp": k[2], "phase": k[3], "n": len(g),
         "median_err": statistics.median(abs(r["rel_err"]) for r in g),
         "max_err": max(abs(r["rel_err"]) for r in g),
         "median_signed_err": statistics.median(r["rel_err"] for r in g),
         "median_fitted_err": statistics.median(abs(r["fitted_rel_err"]) for r in g)}
        for k, g in groups.items()
    ]


def _print_validation(rows: Sequence[Mapping[str, Any]], every_row: bool) -> None:
    if every_row:
        print("| source | model | tp | phase | batch | tokens | measured ms | predicted ms | err | fitted ms | err |")
        print("|---|---|---|---|---|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['source']} | {r['model']} | {r['tp']} | {r['phase']} | {r['batch_size']} | {r['tokens']} "
                  f"| {r['measured_ms']:.1f} | {r['predicted_ms']:.1f} | {r['rel_err']:+.1%} "
                  f"| {r['fitted_ms']:.1f} | {r['fitted_rel_err']:+.1%} |")
        print()
    print("| source | model | tp | phase | rows | median abs err | max abs err | median signed err | median abs err (fit) |")
    print("|---|---|---|---|---|---|---|---|---|")
    for s in summarize(rows):
        print(f"| {s['source']} | {s['model']} | {s['tp']} | {s['phase']} | {s['n']} | {s['median_err']:.1%} "
              f"| {s['max_err']:.1%} | {s['median_signed_err']:+.1%} | {s['median_fitted_err']:.1%} |")
    print()
    print(f"median abs relative error over {len(rows)} rows: detailed "
          f"{statistics.median(abs(r['rel_err']) for r in rows):.1%}, fitted "
          f"{statistics.median(abs(r['fitted_rel_err']) for r in rows):.1%}")


def main(argv: Sequence[str] | None = None) -> int:
    """Command line: ``--validate`` prints the error table; otherwise the fitted coefficients."""
    ap = argparse.ArgumentParser(prog="python -m dynaserve.costtables", description=__doc__.splitlines()[0])
    ap.add_argument("--validate", action="store_true", help="compare with whole-model measurements")
    ap.add_argument("--rows", action="store_true", help="with --validate: print every row, not only the summary")
    ap.add_argument("--model", default="llama3-8b", help=f"preset ({', '.join(MODEL_PRESETS)}) or config.json path")
    ap.add_argument("--gpu", default="a100", choices=GPUS, help="GPU kind")
    ap.add_argument("--tp", type=int, default=1, help="tensor-parallel degree")
    args = ap.parse_args(argv)
    if args.validate:
        _print_validation(validate_whole_model(), args.rows)
        return 0
    shape = MODEL_PRESETS.get(args.model) or ModelShape.from_hf_config(args.model)
    m = build_step_model(shape, args.gpu, args.tp)
    print(f"{shape.name} on {args.tp}x {args.gpu}: a={m.a:.4g} b={m.b:.4g} c={m.c:.4g} d={m.d:.4g} e={m.e:.4g} (ms)")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())

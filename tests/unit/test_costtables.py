from __future__ import annotations

import json
import math
from pathlib import Path

import pytest

import dynaserve.costtables as ct
import dynaserve.costtables_io as ctio
from dynaserve.costmodel import StepLatencyModel
from dynaserve.costtables import (
    MODEL_PRESETS,
    ModelShape,
    build_step_model,
    detailed_step_ms,
    predict_ms,
    validate_whole_model,
)

LLAMA3_8B_CONFIG = {
    "_name_or_path": "meta-llama/Meta-Llama-3-8B",
    "architectures": ["LlamaForCausalLM"],
    "hidden_size": 4096,
    "intermediate_size": 14336,
    "num_attention_heads": 32,
    "num_hidden_layers": 32,
    "num_key_value_heads": 8,
    "torch_dtype": "bfloat16",
    "vocab_size": 128256,
    "tie_word_embeddings": False,
}


def test_presets() -> None:
    s = MODEL_PRESETS["llama3-8b"]
    assert (s.num_layers, s.hidden_size, s.num_heads, s.num_kv_heads, s.head_dim) == (32, 4096, 32, 8, 128)
    assert (s.intermediate_size, s.vocab_size, s.dtype_bytes) == (14336, 128256, 2)
    q = MODEL_PRESETS["qwen2.5-32b"]
    assert (q.num_layers, q.hidden_size, q.num_heads, q.num_kv_heads, q.head_dim) == (64, 5120, 40, 8, 128)
    assert (q.intermediate_size, q.vocab_size) == (27648, 152064)
    t = MODEL_PRESETS["tiny-llama"]
    assert (t.num_layers, t.hidden_size, t.num_heads, t.num_kv_heads, t.head_dim) == (4, 128, 4, 2, 32)
    assert (t.intermediate_size, t.vocab_size) == (352, 4096)


def test_kv_bytes_per_token() -> None:
    s = MODEL_PRESETS["llama3-8b"]
    assert s.kv_bytes_per_token(1) == 131072
    assert s.kv_bytes_per_token(2) == 131072 // 2
    assert s.kv_bytes_per_token(8) == 131072 // 8
    assert s.kv_bytes_per_token(16) == 131072 // 8  # one KV head per GPU at least


def test_weight_bytes() -> None:
    s = MODEL_PRESETS["llama3-8b"]
    assert 15.5e9 < s.weight_bytes() < 16.5e9  # 8.03 B parameters in bf16
    assert s.weight_bytes(2) < 0.51 * s.weight_bytes(1)


def test_from_hf_dict_and_file(tmp_path: Path) -> None:
    shape = ModelShape.from_hf_config(LLAMA3_8B_CONFIG)
    ref = MODEL_PRESETS["llama3-8b"]
    assert shape.head_dim == 128  # absent: hidden / heads
    assert shape.kv_bytes_per_token(1) == ref.kv_bytes_per_token(1)
    assert shape.weight_bytes() == ref.weight_bytes()
    (tmp_path / "config.json").write_text(json.dumps({**LLAMA3_8B_CONFIG, "head_dim": 64}))
    from_dir = ModelShape.from_hf_config(tmp_path)
    from_file = ModelShape.from_hf_config(tmp_path / "config.json", name="x")
    assert from_dir.head_dim == from_file.head_dim == 64
    assert from_file.name == "x"
    mha = ModelShape.from_hf_config({**LLAMA3_8B_CONFIG, "num_key_value_heads": None, "torch_dtype": "float32"})
    assert (mha.num_kv_heads, mha.dtype_bytes) == (32, 4)


def test_invalid_shape_and_args() -> None:
    with pytest.raises(ValueError):
        ModelShape("bad", 0, 128, 4, 2, 32, 352, 4096)
    with pytest.raises(ValueError):
        ModelShape("bad", 2, 128, 4, 3, 32, 352, 4096)
    with pytest.raises(ValueError):
        build_step_model("llama3-8b", "v100")
    with pytest.raises(ValueError):
        build_step_model("no-such-model")
    with pytest.raises(ValueError):
        build_step_model("llama3-8b", "a100", 0)


@pytest.mark.parametrize("gpu", ["a100", "h100"])
def test_detailed_monotone(gpu: str) -> None:
    s = MODEL_PRESETS["llama3-8b"]
    prefill = [detailed_step_ms(s, gpu, 1, [(n, 0)]) for n in (64, 256, 1024, 4096)]
    assert prefill == sorted(prefill) and prefill[0] < prefill[-1]
    decodes = [detailed_step_ms(s, gpu, 1, [], [1024] * b) for b in (1, 16, 64, 256)]
    assert decodes == sorted(decodes) and decodes[0] < decodes[-1]
    ctx = [detailed_step_ms(s, gpu, 1, [], [c] * 32) for c in (256, 1024, 4096, 16384)]
    assert ctx == sorted(ctx) and ctx[0] < ctx[-1]
    prefix = [detailed_step_ms(s, gpu, 1, [(512, p)]) for p in (0, 2048, 8192)]
    assert prefix == sorted(prefix) and prefix[0] < prefix[-1]


def test_fitted_monotone_and_valid() -> None:
    m = build_step_model("llama3-8b", "a100", 1)
    assert isinstance(m, StepLatencyModel)
    assert m.a > 0 and m.b > 0 and m.c > 0 and m.d > 0 and m.e > 0
    assert m.step_ms(100) < m.step_ms(1000)
    assert m.step_ms(0, 8, 8000) < m.step_ms(0, 64, 64000)
    assert m.step_ms(0, 8, 8000) < m.step_ms(0, 8, 80000)


@pytest.mark.parametrize(("model", "tp"), [("llama3-8b", 1), ("qwen2.5-32b", 2)])
def test_fitted_close_to_detailed_on_held_out(model: str, tp: int) -> None:
    m = build_step_model(model, "a100", tp)
    held_out = [
        ([(300, 100), (700, 0), (200, 3000)], [1500] * 50),
        ([(1536, 600)], []),
        ([], [700] * 24 + [3000] * 24),
        ([(384, 0)], [1200] * 96),
    ]
    for chunks, ctxs in held_out:
        want = detailed_step_ms(model, "a100", tp, chunks, ctxs)
        got = predict_ms(m, chunks, ctxs)
        assert abs(got - want) / want < 0.2, (chunks[:1], len(ctxs), got, want)


def test_h100_faster_than_a100() -> None:
    for model in ("llama3-8b", "qwen2.5-32b"):
        for comp in (([(2048, 0)], []), ([], [2048] * 64), ([(512, 1024)], [1024] * 32)):
            assert detailed_step_ms(model, "h100", 2, *comp) < detailed_step_ms(model, "a100", 2, *comp)
        a, h = build_step_model(model, "a100", 2), build_step_model(model, "h100", 2)
        assert h.step_ms(2048, 32, 32 * 1024) < a.step_ms(2048, 32, 32 * 1024)


def test_tensor_parallel_speeds_up_large_steps() -> None:
    s = MODEL_PRESETS["qwen2.5-32b"]
    t1 = detailed_step_ms(s, "a100", 1, [(4096, 0)])
    t2 = detailed_step_ms(s, "a100", 2, [(4096, 0)])
    assert t2 < 0.7 * t1
    assert ct.step_breakdown(s, "a100", 2, [(4096, 0)])["allreduce"] > 0
    assert ct.step_breakdown(s, "a100", 1, [(4096, 0)])["allreduce"] == 0


def test_tiny_model_and_empty_step() -> None:
    m = build_step_model("tiny-llama", "a100", 1)
    assert m.a < 3  # a 4-layer model is dominated by fixed costs
    empty = detailed_step_ms("tiny-llama", "a100", 1)
    assert empty == pytest.approx(ctio.cpu_overhead_ms()[0])


def test_build_is_cached() -> None:
    assert build_step_model("llama3-8b", "h100", 1) is build_step_model(MODEL_PRESETS["llama3-8b"], "h100", 1)


def test_log_grid_interpolation() -> None:
    g = ctio.LogGrid([[1, 4], [10, 1000]], [[1.0, 100.0], [4.0, 400.0]], powers=(1.0, 2.0))
    assert g(1, 10) == pytest.approx(1.0)
    assert g(2, 10) == pytest.approx(2.0)  # power law between points
    assert g(1, 100) == pytest.approx(10.0)
    assert g(0.5, 10) == pytest.approx(1.0)  # clamped below
    assert g(8, 2000) == pytest.approx(400.0 * 2 * 4)  # extrapolated with the axis powers


def test_validation_rows() -> None:
    rows = validate_whole_model()
    assert {r["source"] for r in rows} == {"muxserve", "splitwise"}
    assert all(r["measured_ms"] > 0 and math.isfinite(r["predicted_ms"]) for r in rows)
    mux = [abs(r["rel_err"]) for r in rows if r["source"] == "muxserve"]
    assert sorted(mux)[len(mux) // 2] < 0.15


def test_modules_do_not_reference_shared_data() -> None:
    for mod in (ct, ctio):
        src = Path(mod.__file__).read_text(encoding="utf-8")
        assert "/work/shared" not in src and "shared/data" not in src

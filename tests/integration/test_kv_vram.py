"""bench.kv_vram on host memory: vLLM's descriptor layout READ between two real processes, verified."""

from __future__ import annotations

import pytest

from bench.kv_vram import BLOCK_SIZE, PRESETS, report, run_config
from workers.kv.nixl import nixl_available

pytestmark = pytest.mark.integration

if not nixl_available():  # pragma: no cover - depends on the machine
    pytest.skip("nixl is not importable", allow_module_level=True)


def test_vllm_shaped_reads_are_verified_and_notify_a() -> None:
    shape = PRESETS["tiny"]
    tokens = [100, 256]  # a partial last block and an aligned one
    res = run_config("dynaserve", "cpu", shape, tokens, reps=2)
    assert "error" not in res, res.get("error")
    cases = {c["tokens"]: c for c in res["cases"]}
    assert set(cases) == set(tokens)
    for n, case in cases.items():
        blocks = -(-n // BLOCK_SIZE)
        assert case["blocks"] == blocks
        assert case["descriptors"] == 2 * shape.layers * blocks
        assert case["bytes"] == blocks * BLOCK_SIZE * shape.bytes_per_token
        assert all(t > 0 for t in case["median_s"].values())
    # one verified READ, 2 warm-ups and 2 timed ones per case, each with its notification
    assert res["notifications_at_a"] == len(tokens) * (1 + 2 + 2)
    assert "| 256 |" in report([res])


def test_a_backend_refused_is_reported_per_configuration(monkeypatch: pytest.MonkeyPatch) -> None:
    # As on a GPU host with host-only UCX_TLS: A's UCX backend cannot be created; the run reports it and ends.
    import bench.kv_vram as kv_vram

    monkeypatch.setitem(kv_vram.UCX_CONFIGS, "bad", {"UCX_TLS": "no_such_transport"})
    res = run_config("bad", "cpu", PRESETS["tiny"], [32], reps=1)
    assert res["error"].startswith("A failed") and "NIXL_ERR_BACKEND" in res["error"]
    assert "failed: `nixl" in report([res])

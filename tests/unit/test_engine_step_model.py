"""The step model a vLLM worker's local scheduler starts from, and advertises to the broker."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import pytest

from dynaserve.calibration import StepModelFile
from dynaserve.costmodel import StepLatencyModel, preset_step_model
from workers.engines import CPU_TINY_STEP_MODEL, gpu_tables, vllm_step_model
from workers.engines.vllm_config import VllmEngineConfig

LLAMA_8B = {  # the shape of Llama-3-8B's config.json
    "architectures": ["LlamaForCausalLM"], "hidden_size": 4096, "intermediate_size": 14336,
    "num_attention_heads": 32, "num_hidden_layers": 32, "num_key_value_heads": 8, "vocab_size": 128256,
    "torch_dtype": "bfloat16",
}


@pytest.fixture
def model_dir(tmp_path: Path) -> Path:
    (tmp_path / "config.json").write_text(json.dumps(LLAMA_8B))
    return tmp_path


@pytest.mark.parametrize(("name", "tables"), [
    ("NVIDIA H100 80GB HBM3", "h100"), ("NVIDIA H200", "h100"), ("NVIDIA H800", "h100"), ("NVIDIA GH200 480GB", "h100"),
    ("NVIDIA A100-SXM4-80GB", "a100"), ("NVIDIA L40S", "a100"), ("Tesla V100-SXM2-16GB", "a100"),
])
def test_gpu_tables(name: str, tables: str) -> None:
    assert gpu_tables(name) == tables


def test_cpu_starts_from_the_tiny_cpu_model(model_dir: Path) -> None:
    model, origin = vllm_step_model(VllmEngineConfig(model=str(model_dir)))
    assert model == StepLatencyModel(*CPU_TINY_STEP_MODEL) and origin == "CPU_TINY_STEP_MODEL"


def test_cuda_starts_from_the_gpus_cost_tables(model_dir: Path) -> None:
    cfg = VllmEngineConfig(model=str(model_dir), device="cuda", dtype="bfloat16")
    h100, origin = vllm_step_model(cfg, device_name="NVIDIA H200")
    assert h100 == preset_step_model(str(model_dir), "h100")[0] and origin.startswith("h100 cost tables")
    a100, _ = vllm_step_model(cfg, device_name="NVIDIA A100-SXM4-80GB")
    assert a100 == preset_step_model(str(model_dir), "a100")[0]
    assert a100.b > h100.b  # an H100 prefills faster
    assert a100 != StepLatencyModel(*CPU_TINY_STEP_MODEL)


def test_a_file_wins_and_an_unreadable_config_falls_back(model_dir: Path, tmp_path: Path,
                                                         caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cal.json"
    StepModelFile(StepLatencyModel(2.5, 0.02, 0.08, 1e-4, 0.0), 2048, "m").save(path)
    cfg = VllmEngineConfig(model=str(model_dir), device="cuda")
    model, origin = vllm_step_model(cfg, str(path), device_name="NVIDIA H100")
    assert model == StepLatencyModel(2.5, 0.02, 0.08, 1e-4, 0.0) and origin == f"file {path}"
    (model_dir / "config.json").write_text(json.dumps({"architectures": ["X"]}))  # no shape in it
    with caplog.at_level(logging.WARNING, logger="dynaserve.worker"):
        model, origin = vllm_step_model(cfg, device_name="NVIDIA H100")
    assert model == StepLatencyModel(*CPU_TINY_STEP_MODEL) and "no cost-table step model" in caplog.text

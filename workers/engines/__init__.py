"""Engine backends behind the one interface in workers.engine. Only workers/engines/vllm* imports vllm."""

from __future__ import annotations

import logging

from dynaserve.costmodel import StepLatencyModel
from workers.engine import Engine
from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig

ENGINES = ("sim", "vllm")
log = logging.getLogger("dynaserve.worker")


def make_sim_engine(
    sim_cfg: object, sched_cfg: LocalSchedulerConfig, instance_id: str, kv_transport: str, step_model: str = ""
) -> Engine:
    """The simulated engine and a KV transport; its step model (and KV bytes per token) come from the
    ``step_model`` file when one is given, else from the cost tables of its model and GPU."""
    from dynaserve.calibration import choose_step_model
    from workers.engines.sim import SimEngine, SimEngineConfig
    from workers.kv import make_transport

    assert isinstance(sim_cfg, SimEngineConfig)
    model, kv_bytes = choose_step_model(step_model, sim_cfg.model, sim_cfg.gpu, sim_cfg.tp)
    transport = make_transport(kv_transport, instance_id)
    return SimEngine(sim_cfg, LocalScheduler(model, sched_cfg), transport, model, kv_bytes)


# Step model the local scheduler starts from on vLLM's CPU build with the tiny model when no calibrated file
# is given (python -m workers.calibrate writes one); the correction factor (LocalScheduler.observe) adapts
# it to the measured step times.
CPU_TINY_STEP_MODEL = (3.0, 0.04, 0.08, 1e-4, 0.0)


def gpu_tables(device_name: str) -> str:
    """The packaged cost tables ("a100" or "h100") closest to a CUDA device name: the Hopper parts (H100,
    H200, H800, GH200) get H100's, every other GPU A100's (the correction factor absorbs the difference)."""
    name = device_name.upper()
    return "h100" if any(k in name for k in ("H100", "H200", "H800", "GH200")) else "a100"


def vllm_step_model(
    vllm_cfg: object, step_model: str = "", device_name: str | None = None,
) -> tuple[StepLatencyModel, str]:
    """The step model a vLLM worker's local scheduler starts from (and advertises to the broker), and where it
    came from: the ``step_model`` file when one is given; on CUDA the cost tables of the model's shape on the
    GPU's tables (:func:`gpu_tables` of ``device_name``, default the first CUDA device's name); otherwise, or
    when the model's config cannot be read, ``CPU_TINY_STEP_MODEL``."""
    from dynaserve.calibration import load_step_model
    from dynaserve.costmodel import preset_step_model
    from workers.engines.vllm_config import VllmEngineConfig

    assert isinstance(vllm_cfg, VllmEngineConfig)
    if step_model:
        return load_step_model(step_model)[0], f"file {step_model}"
    if vllm_cfg.device == "cuda":
        if device_name is None:
            import torch

            device_name = torch.cuda.get_device_name(0)
        gpu = gpu_tables(device_name)
        try:
            return preset_step_model(vllm_cfg.model, gpu)[0], f"{gpu} cost tables of {vllm_cfg.model}"
        except (OSError, ValueError, KeyError, TypeError) as exc:
            log.warning("no cost-table step model for %s (%s); starting from CPU_TINY_STEP_MODEL", vllm_cfg.model, exc)
    return StepLatencyModel(*CPU_TINY_STEP_MODEL), "CPU_TINY_STEP_MODEL"


def make_vllm_engine(vllm_cfg: object, sched_cfg: LocalSchedulerConfig, step_model: str = "") -> Engine:
    """The vLLM engine (imports vllm) with DynaServe's local scheduler setting its token budgets, starting from
    :func:`vllm_step_model`."""
    from workers.engines.vllm_engine import VllmEngine

    model, origin = vllm_step_model(vllm_cfg, step_model)
    log.info("local scheduler's step model: %s (%s)", model, origin)
    return VllmEngine(vllm_cfg, LocalScheduler(model, sched_cfg))  # type: ignore[arg-type]  # checked above

"""Engine backends behind the one interface in workers.engine. Only workers/engines/vllm* imports vllm."""

from __future__ import annotations

from workers.engine import Engine
from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig

ENGINES = ("sim", "vllm")


def make_sim_engine(sim_cfg: object, sched_cfg: LocalSchedulerConfig, instance_id: str, kv_transport: str) -> Engine:
    """The simulated engine with its step model from the cost tables and a KV transport."""
    from dynaserve.costmodel import preset_step_model
    from workers.engines.sim import SimEngine, SimEngineConfig
    from workers.kv import make_transport

    assert isinstance(sim_cfg, SimEngineConfig)
    model, kv_bytes = preset_step_model(sim_cfg.model, sim_cfg.gpu, sim_cfg.tp)
    transport = make_transport(kv_transport, instance_id)
    return SimEngine(sim_cfg, LocalScheduler(model, sched_cfg), transport, model, kv_bytes)


# Step model the local scheduler starts from on vLLM's CPU build with the tiny model; the correction factor
# (LocalScheduler.observe) adapts it to the measured step times.
CPU_TINY_STEP_MODEL = (3.0, 0.04, 0.08, 1e-4, 0.0)


def make_vllm_engine(vllm_cfg: object, sched_cfg: LocalSchedulerConfig) -> Engine:
    """The vLLM engine (imports vllm) with DynaServe's local scheduler setting its token budgets."""
    from dynaserve.costmodel import StepLatencyModel
    from workers.engines.vllm_config import VllmEngineConfig
    from workers.engines.vllm_engine import VllmEngine

    assert isinstance(vllm_cfg, VllmEngineConfig)
    model = StepLatencyModel(*CPU_TINY_STEP_MODEL)
    return VllmEngine(vllm_cfg, LocalScheduler(model, sched_cfg))

"""Engine backends behind the one interface in workers.engine. Only workers/engines/vllm* imports vllm."""

from __future__ import annotations

from workers.engine import Engine
from workers.local_scheduler import LocalScheduler, LocalSchedulerConfig

ENGINES = ("sim", "vllm")


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


def make_vllm_engine(vllm_cfg: object, sched_cfg: LocalSchedulerConfig, step_model: str = "") -> Engine:
    """The vLLM engine (imports vllm) with DynaServe's local scheduler setting its token budgets; the
    scheduler's step model comes from the ``step_model`` file when one is given."""
    from dynaserve.calibration import load_step_model
    from dynaserve.costmodel import StepLatencyModel
    from workers.engines.vllm_config import VllmEngineConfig
    from workers.engines.vllm_engine import VllmEngine

    assert isinstance(vllm_cfg, VllmEngineConfig)
    model = load_step_model(step_model)[0] if step_model else StepLatencyModel(*CPU_TINY_STEP_MODEL)
    return VllmEngine(vllm_cfg, LocalScheduler(model, sched_cfg))

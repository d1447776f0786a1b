"""``python -m workers``: run one worker (one instance, one GPU)."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal
from pathlib import Path

from dynaserve import config as C
from dynaserve.aio import run_event_loop
from dynaserve.calibration import load_step_model
from dynaserve.env import apply_loopback_kv_env, log_level
from workers.engines import make_sim_engine, make_vllm_engine
from workers.engines.sim import SimEngineConfig
from workers.engines.vllm_config import VllmEngineConfig
from workers.local_scheduler import LocalSchedulerConfig
from workers.server import Worker, WorkerConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dynaserve-worker", description="DynaServe worker")
    parser.add_argument("--config", help="TOML file; its [worker], [sim] and [vllm] sections set defaults")
    C.add_args(parser, WorkerConfig)
    C.add_args(parser, SimEngineConfig, prefix="sim_")
    C.add_args(parser, VllmEngineConfig, prefix="vllm_")
    ns = parser.parse_args(argv)
    try:
        toml = C.load_toml(ns.config)
        wcfg = C.build(WorkerConfig, toml.get("worker"), ns)
        scfg = C.build(SimEngineConfig, toml.get("sim"), ns, prefix="sim_")
        vcfg = C.build(VllmEngineConfig, toml.get("vllm"), ns, prefix="vllm_")
        sched_cfg = LocalSchedulerConfig(
            tbt_slo_ms=wcfg.tbt_slo_ms, margin=wcfg.margin, max_batched_tokens=wcfg.max_batched_tokens,
            max_num_seqs=wcfg.max_num_seqs, prefill_order=wcfg.prefill_order,
            demote_late=wcfg.demote_late,
        )
    except ValueError as exc:
        parser.error(str(exc))
    if wcfg.engine not in ("sim", "vllm"):
        parser.error(f"unknown engine {wcfg.engine!r} (choose sim or vllm)")
    model = Path(vcfg.model).expanduser()
    if wcfg.engine == "vllm" and not model.is_dir() and vcfg.model.startswith(("/", ".", "~")):
        parser.error(f"--vllm-model: no model directory at {vcfg.model} (a path; anything else is a model hub id)")
    logging.basicConfig(level=log_level(), format=f"%(asctime)s {wcfg.instance_id} %(levelname)s %(message)s")
    apply_loopback_kv_env()
    if wcfg.step_model:
        try:
            load_step_model(wcfg.step_model)  # a bad file fails here, before an engine starts
        except ValueError as exc:
            parser.error(str(exc))
    if wcfg.engine == "sim":
        engine = make_sim_engine(scfg, sched_cfg, wcfg.instance_id, wcfg.kv_transport, wcfg.step_model)
    else:
        engine = make_vllm_engine(vcfg, sched_cfg, wcfg.step_model)

    async def _run() -> None:
        worker = Worker(wcfg, engine)
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, worker.stop)
        await worker.run()

    run_event_loop(_run())


if __name__ == "__main__":
    main()

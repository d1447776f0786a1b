"""``python -m broker``: run the broker."""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from broker.server import Broker, BrokerConfig
from dynaserve import config as C
from dynaserve.aio import run_event_loop
from dynaserve.calibration import load_step_model
from dynaserve.env import log_level


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dynaserve-broker", description="DynaServe broker")
    parser.add_argument("--config", help="TOML file; its [broker] section sets defaults")
    C.add_args(parser, BrokerConfig)
    ns = parser.parse_args(argv)
    try:
        cfg = C.build(BrokerConfig, C.load_toml(ns.config).get("broker"), ns)
        if cfg.step_model:
            load_step_model(cfg.step_model)  # a bad file fails here, with its reason
        broker = Broker(cfg)  # unknown policy, predictor, model, GPU or tensor-parallel degree: fails here
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s %(levelname)s %(message)s")

    async def _run() -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, broker.stop)
        await broker.run()

    run_event_loop(_run())


if __name__ == "__main__":
    main()

"""``python -m dynaserve.frontend``: serve the OpenAI-compatible HTTP API in front of a broker.

    python -m dynaserve.frontend --broker tcp://127.0.0.1:5555 --host 127.0.0.1 --port 8000 --model NAME
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import signal

from dynaserve import config as C
from dynaserve.aio import run_event_loop
from dynaserve.env import log_level
from dynaserve.frontend.config import FrontendConfig


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="dynaserve-frontend", description="DynaServe OpenAI-compatible HTTP API")
    parser.add_argument("--config", help="TOML file; its [frontend] section sets defaults")
    C.add_args(parser, FrontendConfig)
    ns = parser.parse_args(argv)
    try:
        cfg = C.build(FrontendConfig, C.load_toml(ns.config).get("frontend"), ns)
    except ValueError as exc:
        parser.error(str(exc))
    logging.basicConfig(level=log_level(), format="%(asctime)s %(name)s %(levelname)s %(message)s")
    from dynaserve.frontend.server import Frontend  # after argument errors: aiohttp imports take a moment

    async def _run() -> None:
        frontend = Frontend(cfg)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await frontend.start()
        try:
            await stop.wait()
        finally:
            await frontend.stop()

    run_event_loop(_run())


if __name__ == "__main__":
    main()

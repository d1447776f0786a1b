#!/usr/bin/env python3
"""Start, inspect and stop a local DynaServe cluster with one command.

    scripts/cluster.py start [--workers 3] [--policy dynaserve] [--config cluster.toml]
        starts the broker and the workers, waits until every worker has registered, prints where to
        connect, and serves until Ctrl-C (then stops everything it started). With --detach it returns
        and leaves the cluster running; `scripts/cluster.py stop` ends it.
    scripts/cluster.py start --replay azure_conv --limit 100 --rate 2
        the same, then replays a trace through the client SDK, prints the report and stops.
    scripts/cluster.py status | stop

Settings come from flags over an optional TOML file (sections [cluster], [broker], [worker], [sim],
[frontend]). The OpenAI-compatible HTTP front end listens on 127.0.0.1:8000 (--http-port, 0 = off).
With --curve-dir DIR every process authenticates and encrypts with CURVE keys from DIR (the keys DIR lacks
are generated); status and --replay use DIR's client key.
Every process runs in its own process group; stop signals whole groups, so nothing is orphaned.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))

from bench.replay import add_replay_args, run_replay  # noqa: E402
from dynaserve import config as C  # noqa: E402
from dynaserve.client import DynaServeClient  # noqa: E402
from dynaserve.cluster import CLIENT_KEY, ClusterConfig, LocalCluster  # noqa: E402
from dynaserve.errors import BrokerUnavailableError  # noqa: E402

STATE = ROOT / ".dynaserve" / "cluster.json"


def _toml_args(section: dict, prefix: str = "") -> list[str]:
    out: list[str] = []
    for key, val in section.items():
        flag = "--" + (prefix + key).replace("_", "-")
        if isinstance(val, bool):
            out.append(flag if val else "--no-" + flag[2:])
        else:
            out += [flag, str(val)]
    return out


def cmd_start(ns: argparse.Namespace) -> int:
    toml = C.load_toml(ns.config)
    cfg = C.build(ClusterConfig, toml.get("cluster"), ns)
    broker_args = _toml_args(toml.get("broker", {}))
    worker_args = _toml_args(toml.get("worker", {})) + _toml_args(toml.get("sim", {}), "sim_")
    frontend_args = _toml_args(toml.get("frontend", {}))
    run_dir = ROOT / ".dynaserve" / time.strftime("run-%Y%m%d-%H%M%S")
    cluster = LocalCluster(cfg, run_dir=run_dir, broker_args=broker_args, worker_args=worker_args,
                           frontend_args=frontend_args)
    cluster.ensure_keys()  # logs what it generates
    print(f"starting broker and {cfg.workers} {cfg.engine} workers (policy {cfg.policy}"
          + (f", CURVE keys {cluster.curve_dir}" if cluster.curve_dir else "") + f"); logs in {run_dir}",
          file=sys.stderr)
    cluster.start()
    stopping = False

    def _stop(*_: object) -> None:
        nonlocal stopping
        if not stopping:
            stopping = True
            print("\nstopping cluster", file=sys.stderr)
            cluster.stop()
            STATE.unlink(missing_ok=True)
            raise SystemExit(130)

    signal.signal(signal.SIGINT, _stop)
    signal.signal(signal.SIGTERM, _stop)
    try:
        ids = asyncio.run(cluster.wait_ready())
    except (TimeoutError, RuntimeError) as exc:
        print(f"cluster failed to start: {exc}", file=sys.stderr)
        cluster.stop()
        return 1
    STATE.parent.mkdir(exist_ok=True)
    STATE.write_text(json.dumps({
        "client_addr": cluster.client_addr, "run_dir": str(run_dir), "curve_dir": cluster.curve_dir,
        "pids": {name: p.pid for name, p in cluster.procs.items()},
    }))
    print(f"ready: {len(ids)} instances {ids}; clients connect to {cluster.client_addr}"
          + (f"; OpenAI API at {cluster.http_url}/v1" if cluster.http_url else ""), file=sys.stderr)
    if ns.replay:
        ns.trace = ns.replay
        ns.ttft_slo_ms, ns.tbt_slo_ms = cfg.ttft_slo_ms, cfg.tbt_slo_ms
        try:
            # prints the summary table
            run_replay(cluster.client_addr, ns, curve_dir=cluster.curve_dir, curve_name=CLIENT_KEY)
        finally:
            cluster.stop()
            STATE.unlink(missing_ok=True)
        return 0
    if ns.detach:
        print("detached; stop with: scripts/cluster.py stop", file=sys.stderr)
        return 0
    print("serving; Ctrl-C stops the cluster (a process that dies is restarted)", file=sys.stderr)
    restarts: dict[str, int] = {}
    while True:
        time.sleep(1.0)
        for name in cluster.dead():
            restarts[name] = restarts.get(name, 0) + 1
            if restarts[name] > ns.max_restarts:
                print(f"{name} died {restarts[name]} times; stopping the cluster (log: {run_dir}/{name}.log)",
                      file=sys.stderr)
                cluster.stop()
                STATE.unlink(missing_ok=True)
                return 1
            print(f"{name} exited; restarting it ({restarts[name]}/{ns.max_restarts})", file=sys.stderr)
            cluster.restart(name)


def cmd_stop(ns: argparse.Namespace) -> int:
    if not STATE.exists():
        print("no cluster state file; nothing to stop", file=sys.stderr)
        return 0
    state = json.loads(STATE.read_text())
    for name, pid in state["pids"].items():
        for sig in (signal.SIGTERM,):
            try:
                os.killpg(pid, sig)
                print(f"stopped {name} (process group {pid})", file=sys.stderr)
            except ProcessLookupError:
                pass
    time.sleep(2.0)
    for pid in state["pids"].values():
        try:
            os.killpg(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
    STATE.unlink(missing_ok=True)
    return 0


def cmd_status(ns: argparse.Namespace) -> int:
    addr, curve_dir = ns.addr, ns.curve_dir
    if STATE.exists():
        state = json.loads(STATE.read_text())
        addr = addr or state["client_addr"]
        curve_dir = state.get("curve_dir", "") if curve_dir is None else curve_dir
    addr = addr or "tcp://127.0.0.1:5555"

    async def _status() -> None:
        async with DynaServeClient(addr, curve_dir=curve_dir or "", curve_name=ns.curve_name) as c:
            st = await c.status(timeout=3.0)
            print(json.dumps({"instances": st.instances, "policy": st.policy, "active": st.active,
                              "queued": st.queued, "stats": st.stats}, indent=2))

    try:
        asyncio.run(_status())
    except BrokerUnavailableError as exc:
        hint = "" if curve_dir else " (a CURVE-secured broker answers only clients with keys: --curve-dir DIR)"
        print(f"{exc}{hint}", file=sys.stderr)
        return 1
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="cluster.py", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter, epilog=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    ps = sub.add_parser("start", help="start a cluster (and optionally replay a trace)")
    ps.add_argument("--config", help="TOML file with [cluster], [broker], [worker], [sim], [frontend] sections")
    ps.add_argument("--detach", action="store_true", help="leave the cluster running and return")
    ps.add_argument("--replay", metavar="TRACE", help="replay this trace, report, then stop")
    ps.add_argument("--max-restarts", type=int, default=5,
                    help="restart a dead broker, worker or front end at most this many times (default 5)")
    C.add_args(ps, ClusterConfig)
    add_replay_args(ps, slo_flags=False)
    sub.add_parser("stop", help="stop a detached cluster")
    pst = sub.add_parser("status", help="print the broker's view of the cluster")
    pst.add_argument("--addr", help="broker client address (default: the running cluster's)")
    pst.add_argument("--curve-dir", help="CURVE key directory (default: the running cluster's; '' = off)")
    pst.add_argument("--curve-name", default=CLIENT_KEY, help=f"client certificate name (default {CLIENT_KEY})")
    ns = p.parse_args(argv)
    try:
        return {"start": cmd_start, "stop": cmd_stop, "status": cmd_status}[ns.cmd](ns)
    except ValueError as exc:
        p.error(str(exc))
        return 2


if __name__ == "__main__":
    raise SystemExit(main())

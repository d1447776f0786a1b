"""Start and stop a local DynaServe cluster: one broker, N workers and the OpenAI-compatible HTTP front end
(unless ``http_port`` is 0), each in its own process group.

Used by ``scripts/cluster.py`` (the single-command start) and by the integration tests. Every process is
started with ``start_new_session=True``; ``stop`` signals whole process groups, so nothing a worker spawned
(an engine's helper processes) is left behind.
"""

from __future__ import annotations

import asyncio
import importlib.util
import logging
import os
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path

from dynaserve import security
from dynaserve.client import DynaServeClient
from dynaserve.costtables_io import gpu_list
from dynaserve.errors import BrokerUnavailableError
from dynaserve.tinymodel import DEFAULT_OUT as DEFAULT_MODEL_DIR

log = logging.getLogger("dynaserve.cluster")

CLIENT_KEY = "client"  # certificate (clients/NAME) of the SDK clients: readiness checks, status, replay
FRONTEND_KEY = "frontend"  # certificate of the HTTP front end's broker connection


@dataclass(frozen=True)
class ClusterConfig:
    """Local cluster settings (flags of scripts/cluster.py; TOML section [cluster])."""

    workers: int = 2  # number of worker processes (instances)
    policy: str = "dynaserve"  # global scheduling policy: colocate, disagg or dynaserve
    engine: str = "auto"  # worker engine: vllm, sim, or auto (vllm when installed, else sim)
    model_dir: str = ""  # vllm engine: HF model directory; empty = the tiny local model (built on first use)
    side_channel_base_port: int = 5600  # vllm engine: NIXL handshake port of worker i is base + 10 * i
    transport: str = "tcp"  # tcp (127.0.0.1 ports) or ipc (unix sockets in the run directory)
    client_port: int = 5555  # tcp: port clients connect to
    worker_port: int = 5556  # tcp: port workers connect to
    prefill_instances: int = 1  # disagg policy: prefill pool size
    model: str = "llama3-8b"  # cost-model preset of the simulated engine and the scheduler
    gpu: str = "a100"  # GPU whose cost tables price steps; a comma list (a100,h100) gives simulated worker i the
    # i-th, cycled: a mixed cluster, each instance priced with its own (the broker's own model: the first)
    step_model: str = ""  # step-model file (python -m workers.calibrate) for the broker and every worker; empty = cost tables
    engine_time_scale: float = 1.0  # simulated engine: real seconds per modeled second
    kv_capacity_tokens: int = 131072  # KV cache per instance, tokens
    ttft_slo_ms: float = 2000.0  # TTFT SLO of the default class
    tbt_slo_ms: float = 100.0  # TBT SLO of the default class
    ready_timeout_s: float = 60.0  # how long to wait for every worker to register
    http_port: int = 8000  # OpenAI-compatible HTTP front end on 127.0.0.1:PORT; 0 = no front end
    metrics_base_port: int = 0  # Prometheus: broker on this port, worker i on port + 1 + i; 0 = off
    curve_dir: str = ""  # CURVE key directory of every process and client (missing keys are generated); empty = off
    step_log_dir: str = ""  # every worker appends its engine steps to DIR/<instance>.steps (workers.calibrate --engine log)

    def __post_init__(self) -> None:
        if self.engine not in ("auto", "sim", "vllm"):
            raise ValueError("engine must be auto, sim or vllm")
        if not 1 <= self.workers <= 64:
            raise ValueError("workers must be in 1..64")
        if self.transport not in ("tcp", "ipc"):
            raise ValueError("transport must be tcp or ipc")
        if not 0 <= self.http_port <= 65535 or not 0 <= self.metrics_base_port <= 65535 - 1 - self.workers:
            raise ValueError("http_port and metrics_base_port (+ workers) must be valid ports (0 = off)")
        if self.model_dir and not Path(self.model_dir).expanduser().is_dir():
            raise ValueError(f"model_dir: no directory at {self.model_dir}")
        gpu_list(self.gpu)  # raises ValueError on an unknown GPU

    @property
    def gpus(self) -> list[str]:
        """``gpu`` as a list: simulated worker i runs on the i-th, cycled."""
        return gpu_list(self.gpu)


def _last_line(path: Path, tail_bytes: int = 4096) -> str:
    """The last non-empty line of a log (a process that exits on bad arguments says why there), or ''."""
    try:
        with open(path, "rb") as fh:
            fh.seek(max(0, fh.seek(0, os.SEEK_END) - tail_bytes))
            lines = fh.read().decode(errors="replace").splitlines()
    except OSError:
        return ""
    return next((ln.strip() for ln in reversed(lines) if ln.strip()), "")


@dataclass
class LocalCluster:
    """A running local cluster; use as a context manager or call start()/stop()."""

    config: ClusterConfig
    run_dir: Path | None = None
    broker_args: list[str] = field(default_factory=list)
    worker_args: list[str] = field(default_factory=list)
    frontend_args: list[str] = field(default_factory=list)
    procs: dict[str, subprocess.Popen] = field(default_factory=dict)
    client_curve_dir: str = ""  # CURVE keys wait_ready connects with (default: config.curve_dir)

    def __post_init__(self) -> None:
        if self.run_dir is None:
            self.run_dir = Path(tempfile.mkdtemp(prefix="dynaserve-"))
        self.run_dir.mkdir(parents=True, exist_ok=True)
        cfg = self.config
        if cfg.transport == "ipc":
            self.client_addr = f"ipc://{self.run_dir}/client.sock"
            self.worker_addr = f"ipc://{self.run_dir}/worker.sock"
        else:
            self.client_addr = f"tcp://127.0.0.1:{cfg.client_port}"
            self.worker_addr = f"tcp://127.0.0.1:{cfg.worker_port}"
        # absolute: the processes run in the repository root, the path may be relative to the caller's cwd
        self.curve_dir = str(Path(cfg.curve_dir).resolve()) if cfg.curve_dir else ""
        if not self.client_curve_dir:
            self.client_curve_dir = self.curve_dir

    def curve_flags(self, name: str = "") -> list[str]:
        """``--curve-dir`` (and ``--curve-name NAME`` for a client process) when CURVE is on."""
        if not self.curve_dir:
            return []
        return ["--curve-dir", self.curve_dir, *(["--curve-name", name] if name else [])]

    def ensure_keys(self) -> list[str]:
        """Generate the key pairs ``curve_dir`` lacks (broker, clients, every worker); returns what was made."""
        if not self.curve_dir:
            return []
        made = security.ensure_keys(self.curve_dir, [CLIENT_KEY, FRONTEND_KEY], self.instance_ids)
        if made:
            log.warning("generated CURVE keys in %s: %s", self.curve_dir, ", ".join(made))
        return made

    @property
    def instance_ids(self) -> list[str]:
        return [f"w{i}" for i in range(self.config.workers)]

    def _spawn(self, name: str, argv: list[str]) -> None:
        assert self.run_dir is not None
        log = open(self.run_dir / f"{name}.log", "ab")
        env = dict(os.environ)
        env.setdefault("PYTHONUNBUFFERED", "1")
        self.procs[name] = subprocess.Popen(
            [sys.executable, *argv], stdout=log, stderr=subprocess.STDOUT, start_new_session=True, env=env,
            cwd=str(Path(__file__).resolve().parent.parent),
        )
        log.close()

    def start_broker(self) -> None:
        cfg = self.config
        self._spawn("broker", [
            "-m", "broker", "--client-addr", self.client_addr, "--worker-addr", self.worker_addr,
            "--policy", cfg.policy, "--prefill-instances", str(cfg.prefill_instances), "--model", self.cost_model,
            "--gpu", cfg.gpus[0], "--ttft-slo-ms", str(cfg.ttft_slo_ms), "--tbt-slo-ms", str(cfg.tbt_slo_ms),
            *self.metrics_flag(0), *self.step_model_flags(), *self.curve_flags(), *self.broker_args,
        ])

    @property
    def engine(self) -> str:
        """The engine workers run: ``auto`` resolves to vllm when it is installed."""
        if self.config.engine != "auto":
            return self.config.engine
        return "vllm" if importlib.util.find_spec("vllm") is not None else "sim"

    @property
    def model_dir(self) -> str:
        return self.config.model_dir or str(DEFAULT_MODEL_DIR)

    def _engine_args(self, index: int) -> list[str]:
        cfg = self.config
        if self.engine == "vllm":
            return ["--engine", "vllm", "--vllm-model", self.model_dir,
                    "--vllm-side-channel-port", str(cfg.side_channel_base_port + 10 * index),
                    "--vllm-cpu-bind", str(index % (os.cpu_count() or 1))]
        return ["--engine", "sim", "--sim-model", cfg.model, "--sim-gpu", cfg.gpus[index % len(cfg.gpus)],
                "--sim-time-scale", str(cfg.engine_time_scale), "--sim-kv-capacity-tokens", str(cfg.kv_capacity_tokens)]

    def step_model_flags(self) -> list[str]:
        """``--step-model FILE`` (absolute: the processes run in the repository root) when one is set."""
        return ["--step-model", str(Path(self.config.step_model).resolve())] if self.config.step_model else []

    def start_worker(self, instance_id: str) -> None:
        cfg = self.config
        self._spawn(instance_id, [
            "-m", "workers", "--broker-addr", self.worker_addr, "--instance-id", instance_id,
            "--tbt-slo-ms", str(cfg.tbt_slo_ms), *self._engine_args(self.instance_ids.index(instance_id)),
            *self.metrics_flag(1 + self.instance_ids.index(instance_id)), *self.step_model_flags(), *self.curve_flags(),
            *self.step_log_flags(instance_id), *self.handoff_flags(instance_id), *self.worker_args,
        ])

    def handoff_flags(self, instance_id: str) -> list[str]:
        """The worker's handoff inbox beside the broker's sockets (ipc); tcp keeps the worker's default."""
        return ["--handoff-bind", f"ipc://{self.run_dir}/handoff-{instance_id}.sock"] \
            if self.config.transport == "ipc" else []

    def step_log_path(self, instance_id: str) -> Path | None:
        """The step log of ``instance_id`` (None when step logs are off)."""
        d = self.config.step_log_dir
        return Path(d).resolve() / f"{instance_id}.steps" if d else None

    def step_log_flags(self, instance_id: str) -> list[str]:
        path = self.step_log_path(instance_id)
        if path is None:
            return []
        path.parent.mkdir(parents=True, exist_ok=True)
        return ["--step-log", str(path)]

    def metrics_flag(self, offset: int) -> list[str]:
        """``--metrics-port`` for the process at ``offset`` from metrics_base_port (none when off)."""
        base = self.config.metrics_base_port
        return ["--metrics-port", str(base + offset)] if base else []

    @property
    def http_url(self) -> str | None:
        """Base URL of the HTTP front end (None when it is off)."""
        return f"http://127.0.0.1:{self.config.http_port}" if self.config.http_port else None

    def start_frontend(self) -> None:
        cfg = self.config
        self._spawn("frontend", [
            "-m", "dynaserve.frontend", "--broker", self.client_addr, "--host", "127.0.0.1",
            "--port", str(cfg.http_port), "--model", self.model_dir if self.engine == "vllm" else cfg.model,
            *self.curve_flags(FRONTEND_KEY), *self.frontend_args,
        ])

    @property
    def cost_model(self) -> str:
        """Cost-model preset the broker prices work with."""
        return self.model_dir if self.engine == "vllm" else self.config.model

    def start(self) -> None:
        if self.engine == "vllm" and not self.config.model_dir:
            from dynaserve.tinymodel import build

            build(DEFAULT_MODEL_DIR)
        self.ensure_keys()
        self.start_broker()
        for iid in self.instance_ids:
            self.start_worker(iid)
        if self.config.http_port:
            self.start_frontend()

    def start_ready(self, timeout: float | None = None) -> list[str]:
        """``start()`` and wait (outside any event loop) until the cluster is ready (``wait_ready``); a cluster
        that does not get ready is stopped before the error propagates. Returns the instance ids."""
        self.start()
        try:
            return asyncio.run(self.wait_ready(timeout))
        except BaseException:
            self.stop()
            raise

    async def _http_healthy(self) -> bool:
        """True when the front end is off or its /health answers 200."""
        url = self.http_url
        if url is None:
            return True

        def probe() -> bool:
            opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
            try:
                with opener.open(url + "/health", timeout=2.0) as resp:
                    return resp.status == 200
            except OSError:  # URLError and HTTPError (503) included
                return False

        return await asyncio.to_thread(probe)

    async def wait_ready(self, timeout: float | None = None) -> list[str]:
        """Wait until every worker has registered and the HTTP front end (if on) answers /health; returns
        the instance ids. Raises on timeout or if a process died."""
        deadline = time.monotonic() + (timeout or self.config.ready_timeout_s)
        want = set(self.instance_ids)
        async with DynaServeClient(self.client_addr, curve_dir=self.client_curve_dir, curve_name=CLIENT_KEY) as client:
            while True:
                self.check_alive()
                try:
                    st = await client.status(timeout=1.0)
                    if want <= set(st.instances) and await self._http_healthy():
                        return sorted(st.instances)
                except BrokerUnavailableError:
                    pass
                if time.monotonic() > deadline:
                    raise TimeoutError(f"cluster not ready after {timeout or self.config.ready_timeout_s} s; "
                                       f"logs in {self.run_dir}")
                await asyncio.sleep(0.1)

    def dead(self) -> list[str]:
        """Names of the processes that have exited."""
        return [name for name, proc in self.procs.items() if proc.poll() is not None]

    def restart(self, name: str) -> None:
        """Start a (dead) process again with its original arguments: the broker, the front end or a worker."""
        if name == "broker":
            self.start_broker()
        elif name == "frontend":
            self.start_frontend()
        else:
            self.start_worker(name)

    def check_alive(self) -> None:
        for name, proc in self.procs.items():
            if proc.poll() is not None:
                log_path = Path(f"{self.run_dir}/{name}.log")
                last = _last_line(log_path)
                raise RuntimeError(f"{name} exited with code {proc.returncode}{': ' + last if last else ''}; "
                                   f"log: {log_path}")

    def kill(self, name: str, sig: int = signal.SIGKILL) -> None:
        """Signal one process's whole group (e.g. kill -9 a worker)."""
        proc = self.procs[name]
        try:
            os.killpg(proc.pid, sig)
        except ProcessLookupError:
            pass
        if sig == signal.SIGKILL:
            proc.wait(10)

    def stop(self, grace_s: float = 5.0) -> None:
        """SIGTERM every process group, then SIGKILL what is left after ``grace_s``."""
        for proc in self.procs.values():
            if proc.poll() is None:
                try:
                    os.killpg(proc.pid, signal.SIGTERM)
                except ProcessLookupError:
                    pass
        deadline = time.monotonic() + grace_s
        for proc in self.procs.values():
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                pass
        for proc in self.procs.values():
            try:
                os.killpg(proc.pid, signal.SIGKILL)  # the group may hold children even if the leader exited
            except (ProcessLookupError, PermissionError):
                pass
            if proc.poll() is None:
                proc.wait(5)

    def log(self, name: str) -> str:
        assert self.run_dir is not None
        path = self.run_dir / f"{name}.log"
        return path.read_text(errors="replace") if path.exists() else ""

    def __enter__(self) -> LocalCluster:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

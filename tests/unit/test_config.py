"""Config plumbing: flags generated from the config dataclasses, TOML sections, overrides and validation."""

from __future__ import annotations

import argparse
import dataclasses
import importlib
from pathlib import Path

import pytest

from broker.server import BrokerConfig
from dynaserve import config as C
from workers.engines.sim import SimEngineConfig
from workers.engines.vllm_config import VllmEngineConfig
from workers.server import WorkerConfig


def parser_for(cls: type, prefix: str = "") -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="t")
    C.add_args(p, cls, prefix)
    return p


def flag(name: str, prefix: str = "") -> str:
    return "--" + (prefix + name).replace("_", "-")


# ----------------------------------------------------------------------------------- help and flags


@pytest.mark.parametrize(
    "cls", [BrokerConfig, WorkerConfig, SimEngineConfig], ids=lambda c: c.__name__
)
def test_every_field_has_help_text(cls: type) -> None:
    helps = C.field_help(cls)
    for f in dataclasses.fields(cls):
        assert helps.get(f.name, "").strip(), f"{cls.__name__}.{f.name} has no help comment"


def test_field_help_reads_the_trailing_comments() -> None:
    assert C.field_help(BrokerConfig)["client_addr"] == "ZeroMQ address clients connect to"
    assert C.field_help(WorkerConfig)["instance_id"] == "unique name of this instance in the cluster"


@pytest.mark.parametrize(
    ("cls", "prefix"),
    [(BrokerConfig, ""), (WorkerConfig, ""), (SimEngineConfig, "sim_")],
    ids=["broker", "worker", "sim"],
)
def test_one_flag_per_field_with_help_and_default(cls: type, prefix: str) -> None:
    p = parser_for(cls, prefix)
    by_flag = {opt: a for a in p._actions for opt in a.option_strings}
    helps = C.field_help(cls)
    for f in dataclasses.fields(cls):
        action = by_flag[flag(f.name, prefix)]
        assert action.dest == prefix + f.name
        assert action.default is None  # absent flags keep the TOML / dataclass value
        assert helps[f.name] in action.help
        assert f"(default: {f.default!r})" in action.help
    text = p.format_help()
    assert cls.__name__ in text  # one argument group per config class


def test_flags_are_typed() -> None:
    p = parser_for(BrokerConfig)
    ns = p.parse_args(["--heartbeat-ms", "50", "--tbt-slo-ms", "80", "--policy", "colocate", "--allow-remote-bind"])
    assert ns.heartbeat_ms == 50 and type(ns.heartbeat_ms) is int
    assert ns.tbt_slo_ms == 80.0 and type(ns.tbt_slo_ms) is float
    assert ns.policy == "colocate"
    assert ns.allow_remote_bind is True
    assert ns.worker_timeout_ms is None
    assert p.parse_args(["--no-allow-forced-splits"]).allow_forced_splits is False
    with pytest.raises(SystemExit):
        p.parse_args(["--heartbeat-ms", "fast"])


def test_prefixed_flags() -> None:
    p = parser_for(SimEngineConfig, "sim_")
    ns = p.parse_args(["--sim-time-scale", "0.5", "--sim-kv-capacity-tokens", "2048"])
    cfg = C.build(SimEngineConfig, None, ns, prefix="sim_")
    assert (cfg.time_scale, cfg.kv_capacity_tokens, cfg.block_size) == (0.5, 2048, 16)


# ----------------------------------------------------------------------------------- build


def test_defaults_without_section_or_flags() -> None:
    assert C.build(BrokerConfig) == BrokerConfig()
    assert C.build(WorkerConfig, {}, parser_for(WorkerConfig).parse_args([])) == WorkerConfig()


def test_toml_section_then_flags_override(tmp_path: Path) -> None:
    path = tmp_path / "cluster.toml"
    path.write_text(
        '[broker]\npolicy = "colocate"\nheartbeat-ms = 50\ntbt_slo_ms = 80\nallow_forced_splits = true\n'
        '[worker]\ninstance_id = "w7"\nmax_num_seqs = 64\n'
    )
    toml = C.load_toml(path)
    ns = parser_for(BrokerConfig).parse_args(["--policy", "disagg", "--no-allow-forced-splits"])
    cfg = C.build(BrokerConfig, toml["broker"], ns)
    assert cfg.policy == "disagg"  # flag wins
    assert cfg.heartbeat_ms == 50  # from TOML (dashes accepted in keys)
    assert cfg.tbt_slo_ms == 80.0 and type(cfg.tbt_slo_ms) is float  # TOML int -> float field
    assert cfg.allow_forced_splits is False  # an explicit --no-flag overrides TOML true
    assert cfg.worker_timeout_ms == BrokerConfig().worker_timeout_ms
    wns = parser_for(WorkerConfig).parse_args(["--max-num-seqs", "8"])
    wcfg = C.build(WorkerConfig, toml["worker"], wns)
    assert (wcfg.instance_id, wcfg.max_num_seqs) == ("w7", 8)


def test_unknown_keys_name_the_key() -> None:
    with pytest.raises(ValueError, match="'heartbeat' for BrokerConfig"):
        C.build(BrokerConfig, {"heartbeat": 10})
    with pytest.raises(ValueError, match="'gpus' for WorkerConfig"):
        C.build(WorkerConfig, {"gpus": 2})


@pytest.mark.parametrize(
    ("cls", "section", "name"),
    [
        (BrokerConfig, {"heartbeat_ms": "20"}, "BrokerConfig.heartbeat_ms"),
        (BrokerConfig, {"tp": 1.5}, "BrokerConfig.tp"),
        (BrokerConfig, {"tbt_slo_ms": "fast"}, "BrokerConfig.tbt_slo_ms"),
        (BrokerConfig, {"tbt_slo_ms": True}, "BrokerConfig.tbt_slo_ms"),
        (BrokerConfig, {"policy": 3}, "BrokerConfig.policy"),
        (BrokerConfig, {"allow_remote_bind": "yes"}, "BrokerConfig.allow_remote_bind"),
        (BrokerConfig, {"allow_remote_bind": 1}, "BrokerConfig.allow_remote_bind"),
        (WorkerConfig, {"max_num_seqs": [8]}, "WorkerConfig.max_num_seqs"),
        (WorkerConfig, {"margin": "0.1"}, "WorkerConfig.margin"),
    ],
)
def test_wrong_types_name_the_field(cls: type, section: dict, name: str) -> None:
    with pytest.raises(ValueError, match=name.replace(".", r"\.")):
        C.build(cls, section)


def test_bool_is_not_an_int_setting() -> None:
    with pytest.raises(ValueError, match=r"BrokerConfig\.heartbeat_ms"):
        C.build(BrokerConfig, {"heartbeat_ms": True})


def test_validation_errors_surface_as_value_errors() -> None:
    with pytest.raises(ValueError, match="heartbeat_ms"):
        C.build(BrokerConfig, {"heartbeat_ms": 5000})  # not below worker_timeout_ms
    with pytest.raises(ValueError, match="pool"):
        C.build(WorkerConfig, {"pool": "gpu"})
    with pytest.raises(ValueError, match="instance_id"):
        C.build(WorkerConfig, {"instance_id": ""})
    with pytest.raises(ValueError, match="time_scale"):
        C.build(SimEngineConfig, {"time_scale": 0})
    for name in ("cpu_bind", "loop_bind"):
        with pytest.raises(ValueError, match="CPU"):
            C.build(VllmEngineConfig, {name: "3-1"})
    assert C.build(VllmEngineConfig, {"cpu_bind": "0", "loop_bind": "1-3"}).loop_bind == "1-3"
    with pytest.raises(ValueError, match="ucx_error_handling"):
        C.build(VllmEngineConfig, {"ucx_error_handling": "fast"})
    assert C.build(VllmEngineConfig, {"ucx_error_handling": "peer"}).ucx_error_handling == "peer"


def test_load_toml_errors_name_the_file(tmp_path: Path) -> None:
    assert C.load_toml(None) == {}
    bad = tmp_path / "bad.toml"
    bad.write_text("[broker\npolicy = ")
    with pytest.raises(ValueError, match="bad.toml"):
        C.load_toml(bad)
    with pytest.raises(ValueError, match="missing.toml"):
        C.load_toml(tmp_path / "missing.toml")


# ----------------------------------------------------------------------------------- bind addresses


@pytest.mark.parametrize(
    "addr",
    ["tcp://127.0.0.1:5555", "tcp://localhost:6000", "tcp://[::1]:7000", "ipc:///tmp/dynaserve.sock", "inproc://b"],
)
def test_loopback_and_local_addresses_are_fine(addr: str) -> None:
    assert BrokerConfig(client_addr=addr).client_addr == addr
    assert C.build(BrokerConfig, {"worker_addr": addr}).worker_addr == addr


@pytest.mark.parametrize(
    "addr", ["tcp://0.0.0.0:5555", "tcp://*:5555", "tcp://10.1.2.3:5555", "tcp://eth0:5555", "tcp://127.0.0.1.nip.io:1"]
)
def test_remote_bind_needs_permission(addr: str) -> None:
    with pytest.raises(ValueError, match="allow-remote-bind"):
        BrokerConfig(client_addr=addr)
    with pytest.raises(ValueError, match="allow-remote-bind"):
        C.build(BrokerConfig, {"worker_addr": addr})
    assert BrokerConfig(client_addr=addr, allow_remote_bind=True).client_addr == addr
    ns = parser_for(BrokerConfig).parse_args(["--worker-addr", addr, "--allow-remote-bind"])
    assert C.build(BrokerConfig, None, ns).worker_addr == addr


@pytest.mark.parametrize("addr", ["udp://127.0.0.1:5555", "127.0.0.1:5555", "http://localhost:80"])
def test_unsupported_transports(addr: str) -> None:
    with pytest.raises(ValueError, match="unsupported address"):
        BrokerConfig(client_addr=addr, allow_remote_bind=True)


def test_configs_are_frozen() -> None:
    cfg = BrokerConfig()
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.policy = "colocate"  # type: ignore[misc]


@pytest.mark.parametrize("module, argv, says", [
    ("broker", ["--policy", "nope"], "unknown policy 'nope'"),
    ("broker", ["--concentrate", "nope"], "concentrate must be one of"),
    ("broker", ["--predictor", "nope"], "unknown predictor 'nope'"),
    ("broker", ["--model", "nope"], "unknown model 'nope'"),
    ("broker", ["--gpu", "nope"], "unknown gpu 'nope'"),
    ("broker", ["--tp", "0"], "tp must be a positive int"),
    ("broker", ["--prefill-instances", "0"], "prefill_instances must be 1 or more"),
    ("workers", ["--tbt-slo-ms", "-1"], "tbt_slo_ms must be > 0"),
    ("workers", ["--kv-transport", "nope"], "kv_transport must be one of nixl"),
    ("workers", ["--handoff-bind", "udp://x"], "handoff_bind must be a tcp:// or ipc:// address"),
    ("workers", ["--handoff-bind", "tcp://10.0.0.5:*"], "off loopback without --allow-remote-bind"),
    ("workers", ["--engine", "vllm", "--vllm-model", "/no/such/model"], "no model directory at /no/such/model"),
    ("workers", ["--engine", "nope"], "unknown engine 'nope'"),
])
def test_cli_refuses_bad_settings_before_serving(
        module: str, argv: list[str], says: str, capsys: pytest.CaptureFixture[str]) -> None:
    """The broker's and the worker's command lines: exit 2 with the reason, before any socket or engine."""
    main = importlib.import_module(f"{module}.__main__").main
    with pytest.raises(SystemExit) as exc:
        main(argv)
    assert exc.value.code == 2 and says in capsys.readouterr().err


def test_cluster_refuses_a_missing_model_dir() -> None:
    from dynaserve.cluster import ClusterConfig

    with pytest.raises(ValueError, match="model_dir: no directory at /no/such/model"):
        ClusterConfig(engine="vllm", model_dir="/no/such/model")


def test_a_process_that_exits_at_start_is_reported_with_its_last_log_line(tmp_path: Path) -> None:
    """A broker refusing its arguments: the cluster's error carries the broker's own message."""
    from dynaserve.cluster import ClusterConfig, LocalCluster

    cluster = LocalCluster(ClusterConfig(engine="sim", transport="ipc", http_port=0), run_dir=tmp_path,
                           broker_args=["--policy", "nope"])
    try:
        cluster.start_broker()
        cluster.procs["broker"].wait(60)
        with pytest.raises(RuntimeError, match=r"broker exited with code 2: .*unknown policy 'nope'.*; log: "):
            cluster.check_alive()
    finally:
        cluster.stop()


def test_worker_handoff_inbox_off_loopback_needs_allow_remote_bind() -> None:
    from workers.server import WorkerConfig

    assert WorkerConfig(handoff_bind="tcp://10.0.0.5:*", allow_remote_bind=True).handoff_bind == "tcp://10.0.0.5:*"
    assert WorkerConfig(handoff_bind="ipc:///tmp/inbox.sock").handoff_bind.startswith("ipc://")
    assert WorkerConfig(handoff_bind="").handoff_bind == ""  # off: relay only


def test_vllm_engine_kwargs_with_and_without_dynaserve_parts() -> None:
    cfg = VllmEngineConfig(model="/m", kv_cache_bytes=1 << 20, max_num_seqs=8)
    bare = cfg.engine_kwargs(connector=False, scheduler=False)
    assert bare["model"] == "/m" and bare["kv_cache_memory_bytes"] == 1 << 20 and bare["max_num_seqs"] == 8
    assert bare["enable_prefix_caching"] is False
    assert "scheduler_cls" not in bare and "kv_transfer_config" not in bare and "async_scheduling" not in bare
    sched = cfg.engine_kwargs(connector=False)
    assert sched["scheduler_cls"] == "workers.engines.vllm_scheduler.DynaServeScheduler"
    # the engine pairs each step() with the batch it scheduled: vLLM's async scheduling stays off
    assert sched["async_scheduling"] is False
    assert {k: v for k, v in sched.items() if k not in ("scheduler_cls", "async_scheduling")} == bare

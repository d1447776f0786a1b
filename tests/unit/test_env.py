"""The loopback KV transport defaults (dynaserve/env.py)."""

from __future__ import annotations

import pytest

from dynaserve.env import loopback_kv_env

_KEYS = ("UCX_NET_DEVICES", "UCX_TLS", "VLLM_HOST_IP", "UCX_CUDA_IPC_ENABLE_GET_ZCOPY")


@pytest.fixture(autouse=True)
def _clean(monkeypatch: pytest.MonkeyPatch) -> None:
    for key in _KEYS:
        monkeypatch.delenv(key, raising=False)


def test_cpu_host_stays_on_host_transports() -> None:
    env = loopback_kv_env(gpus=False)
    assert env == {"UCX_NET_DEVICES": "lo", "UCX_TLS": "tcp,sm,self", "VLLM_HOST_IP": "127.0.0.1"}


def test_gpu_host_adds_cuda_transports_and_ipc_get() -> None:
    env = loopback_kv_env(gpus=True)
    tls = env["UCX_TLS"].split(",")
    assert {"cuda_ipc", "cuda_copy"} <= set(tls) and {"tcp", "sm", "self"} <= set(tls)
    assert env["UCX_CUDA_IPC_ENABLE_GET_ZCOPY"] == "y"
    assert env["UCX_NET_DEVICES"] == "lo"


@pytest.mark.parametrize("gpus", [False, True])
def test_operator_settings_win(monkeypatch: pytest.MonkeyPatch, gpus: bool) -> None:
    monkeypatch.setenv("UCX_TLS", "rc,cuda_copy")
    monkeypatch.setenv("UCX_NET_DEVICES", "mlx5_0:1")
    env = loopback_kv_env(gpus=gpus)
    assert env["UCX_TLS"] == "rc,cuda_copy" and env["UCX_NET_DEVICES"] == "mlx5_0:1"


def test_gpu_detection_follows_the_nvidia_driver(monkeypatch: pytest.MonkeyPatch) -> None:
    import dynaserve.env as env

    seen: dict[str, list[str]] = {"/proc/driver/nvidia/gpus/*": [], "/dev/nvidia[0-9]*": []}
    monkeypatch.setattr(env.glob, "glob", lambda pattern: seen[pattern])
    assert not env.nvidia_gpus_present()
    assert loopback_kv_env()["UCX_TLS"] == "tcp,sm,self"
    seen["/dev/nvidia[0-9]*"] = ["/dev/nvidia0"]
    assert env.nvidia_gpus_present()
    assert loopback_kv_env()["UCX_TLS"].startswith("cuda_ipc,cuda_copy")

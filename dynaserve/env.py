"""The one module that reads environment variables."""

from __future__ import annotations

import os


def log_level() -> str:
    """DYNASERVE_LOG_LEVEL: logging level of broker and workers (default INFO)."""
    return os.environ.get("DYNASERVE_LOG_LEVEL", "INFO").upper()


def loopback_kv_env() -> dict[str, str]:
    """Settings that keep UCX (NIXL's transport) on loopback unless the operator chose otherwise."""
    env = {}
    for key, val in (("UCX_NET_DEVICES", "lo"), ("UCX_TLS", "tcp,sm,self"), ("VLLM_HOST_IP", "127.0.0.1")):
        env[key] = os.environ.get(key, val)
    return env


def apply_loopback_kv_env() -> None:
    """Set the loopback UCX defaults in this process (before NIXL is imported)."""
    for key, val in loopback_kv_env().items():
        os.environ.setdefault(key, val)

"""The one module that reads environment variables."""

from __future__ import annotations

import glob
import os


def log_level() -> str:
    """DYNASERVE_LOG_LEVEL: logging level of broker and workers (default INFO)."""
    return os.environ.get("DYNASERVE_LOG_LEVEL", "INFO").upper()


_LOOPBACK_KV = {"UCX_NET_DEVICES": "lo", "UCX_TLS": "tcp,sm,self", "VLLM_HOST_IP": "127.0.0.1"}
_LOOPBACK_KV_GPU = {
    # NIXL refuses to create its UCX backend on a host with NVIDIA GPUs when UCX_TLS has no CUDA
    # transport ("does not enable CUDA memory support"), even for host-memory transfers.
    "UCX_TLS": "cuda_ipc,cuda_copy,tcp,sm,self",
    # UCX turns cuda_ipc's get (NIXL's READ) off when the GPU has no NVLink peers; B's READ then runs as
    # software emulation through host memory (about 1 GB/s on an H200, against 2 TB/s with this on).
    "UCX_CUDA_IPC_ENABLE_GET_ZCOPY": "y",
}


def nvidia_gpus_present() -> bool:
    """True when the NVIDIA kernel driver shows a GPU on this host."""
    return bool(glob.glob("/proc/driver/nvidia/gpus/*") or glob.glob("/dev/nvidia[0-9]*"))


def loopback_kv_env(gpus: bool | None = None) -> dict[str, str]:
    """Settings that keep UCX (NIXL's transport) on loopback unless the operator chose otherwise.

    On a host with NVIDIA GPUs (``gpus``; detected when None) the transports include UCX's CUDA ones.
    Each value set in the environment wins over its default.
    """
    if gpus is None:
        gpus = nvidia_gpus_present()
    defaults = {**_LOOPBACK_KV, **(_LOOPBACK_KV_GPU if gpus else {})}
    return {key: os.environ.get(key, val) for key, val in defaults.items()}


def apply_loopback_kv_env() -> None:
    """Set the loopback UCX defaults in this process (before NIXL is imported)."""
    for key, val in loopback_kv_env().items():
        os.environ.setdefault(key, val)

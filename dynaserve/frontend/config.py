"""Settings of the OpenAI-compatible HTTP front end (flags of ``python -m dynaserve.frontend``)."""

from __future__ import annotations

from dataclasses import dataclass

_LOOPBACK = ("127.0.0.1", "localhost", "::1")


@dataclass(frozen=True)
class FrontendConfig:
    """HTTP front end settings (flags: --broker, --host, --port, --model etc.; TOML section [frontend])."""

    broker: str = "tcp://127.0.0.1:5555"  # the broker's client address
    host: str = "127.0.0.1"  # address the HTTP server binds
    port: int = 8000  # HTTP port
    model: str = "llama3-8b"  # model name served; also the tokenizer directory when it is one
    tokenizer: str = ""  # tokenizer directory with HF files; empty = the model name (byte tokenizer if none)
    vocab_size: int = 32000  # vocabulary size of the byte tokenizer (simulated model)
    max_model_len: int = 0  # prompt + max_tokens accepted at most; 0 = leave the check to the broker
    default_max_tokens: int = 16  # max_tokens of a completion request that gives none
    default_chat_max_tokens: int = 1024  # max_tokens of a chat request that gives none
    health_timeout_s: float = 1.0  # /health: how long to wait for the broker's status reply
    monitor_interval_s: float = 1.0  # how often the front end checks that the broker answers
    broker_timeout_s: float = 5.0  # broker silent this long: requests fail with 503 broker_unavailable
    max_body_bytes: int = 8 << 20  # largest request body accepted
    allow_remote_bind: bool = False  # permit binding the HTTP server to a non-loopback address
    curve_dir: str = ""  # CURVE keys for the broker connection (clients/<curve_name>.key_secret); empty = off
    curve_name: str = "client"  # client certificate name in curve_dir/clients

    def __post_init__(self) -> None:
        if not self.host:
            raise ValueError("host must not be empty")
        if self.host not in _LOOPBACK and not self.allow_remote_bind:
            raise ValueError(f"refusing to bind {self.host} off loopback without --allow-remote-bind")
        if not 0 <= self.port <= 65535:
            raise ValueError("port must be in 0..65535")
        if not self.broker.startswith(("tcp://", "ipc://", "inproc://")):
            raise ValueError(f"unsupported broker address {self.broker!r}: use tcp://, ipc:// or inproc://")
        if not self.model:
            raise ValueError("model must not be empty")
        if self.vocab_size < 259:
            raise ValueError("vocab_size must be >= 259")
        if self.max_model_len < 0:
            raise ValueError("max_model_len must be >= 0")
        if self.default_max_tokens < 1 or self.default_chat_max_tokens < 1:
            raise ValueError("default_max_tokens and default_chat_max_tokens must be >= 1")
        if self.health_timeout_s <= 0 or self.monitor_interval_s <= 0 or self.broker_timeout_s <= 0:
            raise ValueError("health_timeout_s, monitor_interval_s and broker_timeout_s must be > 0")
        if self.max_body_bytes < 1024:
            raise ValueError("max_body_bytes must be >= 1024")

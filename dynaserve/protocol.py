"""Every wire message of DynaServe, defined once, and the one codec.

Wire format: one ZeroMQ frame per message, a MessagePack array ``[PROTOCOL_VERSION, type_id, *fields]``.
Fields are positional and only ever appended: a decoder accepts trailing fields it does not know.
A peer speaking another protocol version is refused (``ProtocolError(code="protocol_version")``), unknown
type ids are an error, and every field is type-checked on decode. No pickle anywhere.

Message groups by destination:
  client -> broker: SubmitRequest, AbortRequest, StatusRequest
  broker -> client: Admitted, TokenStream, ErrorReply, StatusReply
  worker -> broker: RegisterWorker, LoadReport, TokenBatch, HandoffReady, MicroFailed
  broker -> worker: RegisterAck, DispatchMicro, StartDecode, AbortMicro, Shutdown
  worker A -> worker B (its handoff inbox): StartDecode (a copy of what the broker relays), KvChunk (blocks A
      finished while it still runs, for B to pull early; advisory)
"""

from __future__ import annotations

import dataclasses
import sys
import types
import typing
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, ClassVar, Union

import msgpack

PROTOCOL_VERSION = 1
MAX_FRAME_BYTES = 16 << 20  # default message size limit on every socket

# Finish reasons carried in token entries.
FINISH_STOP = "stop"  # stop token or EOS
FINISH_LENGTH = "length"  # max_tokens reached
FINISH_ABORT = "abort"  # aborted by the client or the broker
FINISH_ERROR = "error"
FINISH_HANDOFF = "handoff"  # micro-request A is done; B continues (never shown to clients)

ROLE_FULL = "full"  # the whole request on one instance
ROLE_A = "A"  # computes positions [0, s) and hands its KV over
ROLE_B = "B"  # continues from position s with A's KV


class ProtocolError(ValueError):
    """A frame that cannot be decoded; ``code`` is machine-readable, the message says what is wrong."""

    def __init__(self, code: str, message: str, req_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.req_id = req_id


# --------------------------------------------------------------------------------------------
# Field checkers, compiled once per message type from its annotations.

Checker = Callable[[Any, str], Any]


def _fail(path: str, want: str, got: Any) -> typing.NoReturn:
    raise ProtocolError("bad_field", f"{path}: expected {want}, got {type(got).__name__}")


def _check_int(v: Any, path: str) -> int:
    if type(v) is not int:
        _fail(path, "int", v)
    return v


def _check_float(v: Any, path: str) -> float:
    if type(v) is float:
        return v
    if type(v) is int:
        return float(v)
    _fail(path, "float", v)


def _check_str(v: Any, path: str) -> str:
    if type(v) is not str:
        _fail(path, "str", v)
    return v


def _check_bool(v: Any, path: str) -> bool:
    if type(v) is not bool:
        _fail(path, "bool", v)
    return v


def _check_bytes(v: Any, path: str) -> bytes:
    if type(v) is not bytes:
        _fail(path, "bytes", v)
    return v


def _check_dict(v: Any, path: str) -> dict:
    if type(v) is not dict or any(type(k) is not str for k in v):
        _fail(path, "map with str keys", v)
    return v


def _check_list(v: Any, path: str) -> list:
    if type(v) is not list:
        _fail(path, "list", v)
    return v


def _check_int_list(v: Any, path: str) -> list[int]:
    if type(v) is not list:
        _fail(path, "list of int", v)
    for x in v:
        if type(x) is not int:
            raise ProtocolError("bad_field", f"{path}: expected list of int, found {type(x).__name__}")
    return v


def _compile(tp: Any, ns: dict[str, Any]) -> Checker:
    origin = typing.get_origin(tp)
    if origin in (Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        inner = _compile(args[0], ns)

        def check_opt(v: Any, path: str) -> Any:
            return None if v is None else inner(v, path)

        return check_opt
    if origin is list:
        (arg,) = typing.get_args(tp)
        if arg is int:
            return _check_int_list
        inner = _compile(arg, ns)

        def check_list(v: Any, path: str) -> list:
            if type(v) is not list:
                _fail(path, "list", v)
            return [inner(x, f"{path}[{i}]") for i, x in enumerate(v)]

        return check_list
    if origin is dict or tp is dict:
        return _check_dict
    if tp is list:
        return _check_list
    simple = {int: _check_int, float: _check_float, str: _check_str, bool: _check_bool, bytes: _check_bytes}
    if tp in simple:
        return simple[tp]
    if isinstance(tp, type) and dataclasses.is_dataclass(tp):
        return lambda v, path: _decode_struct(tp, v, path)  # type: ignore[arg-type]
    raise TypeError(f"unsupported wire type {tp!r}")


_SPECS: dict[type, list[tuple[str, Checker, bool]]] = {}


def _spec(cls: type) -> list[tuple[str, Checker, bool]]:
    spec = _SPECS.get(cls)
    if spec is None:
        hints = typing.get_type_hints(cls, vars(sys.modules[__name__]))
        spec = []
        for f in dataclasses.fields(cls):
            required = f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
            spec.append((f.name, _compile(hints[f.name], {}), required))
        _SPECS[cls] = spec
    return spec


def _decode_struct(cls: type, v: Any, path: str) -> Any:
    if type(v) is not list:
        _fail(path, f"{cls.__name__} array", v)
    spec = _spec(cls)
    kwargs = {}
    for i, (name, check, required) in enumerate(spec):
        if i < len(v):
            kwargs[name] = check(v[i], f"{path}.{name}")
        elif required:
            raise ProtocolError("bad_field", f"{path}: missing field {name!r}")
    return cls(**kwargs)


def _encode_struct(obj: Any) -> list:
    out = []
    for f in dataclasses.fields(obj):
        v = getattr(obj, f.name)
        if dataclasses.is_dataclass(v):
            v = _encode_struct(v)
        elif type(v) is list and v and dataclasses.is_dataclass(v[0]):
            v = [_encode_struct(x) for x in v]
        out.append(v)
    return out


# --------------------------------------------------------------------------------------------
# Nested structures


@dataclass(slots=True)
class SamplingParams:
    """How to sample. ``seed`` makes temperature > 0 sampling reproducible."""

    max_tokens: int = 16
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False


@dataclass(slots=True)
class MicroDescriptor:
    """One micro-request, sent once to the instance that runs it.

    The instance computes KV positions ``[start, end)`` of the sequence and emits ``emit_tokens`` tokens.
    ``prompt`` is always the full prompt. For role B, ``start`` equals the split point and the instance
    waits for a StartDecode carrying A's KV parameters before it computes anything. For role A,
    ``peer_addr`` is B's handoff inbox (RegisterWorker.handoff_addr): A sends its StartDecode there
    directly as well as to the broker; empty = through the broker only. ``early_tail`` (role A, when it and B
    pull early): how many positions before ``split`` the last early chunk ends (the broker's choice for this
    request's link and load; 0 = the worker's own default).
    """

    req_id: str
    role: str
    prompt: list[int]
    split: int
    start: int
    end: int
    emit_tokens: int
    peer: str | None
    sampling: SamplingParams
    ttft_slo_ms: float
    tbt_slo_ms: float
    arrival: float
    peer_addr: str = ""
    early_tail: int = 0


# --------------------------------------------------------------------------------------------
# Messages


@dataclass(slots=True)
class Message:
    TYPE: ClassVar[int] = 0


@dataclass(slots=True)
class ErrorReply(Message):
    """An error for the sender; ``req_id`` names the request it concerns, if any."""

    TYPE: ClassVar[int] = 1
    code: str
    message: str
    req_id: str | None = None


@dataclass(slots=True)
class SubmitRequest(Message):
    """Client -> broker: a new request. Give ``prompt`` token ids, or ``text`` for the broker to tokenize."""

    TYPE: ClassVar[int] = 10
    req_id: str
    prompt: list[int]
    sampling: SamplingParams
    slo_class: str = "default"
    text: str | None = None
    force_split: int | None = None  # pin the split point (only when the broker allows forced splits)


@dataclass(slots=True)
class AbortRequest(Message):
    """Client -> broker: stop a request; the broker aborts it on every instance that holds it."""

    TYPE: ClassVar[int] = 11
    req_id: str


@dataclass(slots=True)
class StatusRequest(Message):
    """Client -> broker: ask for the cluster's state (answered with StatusReply)."""

    TYPE: ClassVar[int] = 12
    nonce: str = ""


@dataclass(slots=True)
class StatusReply(Message):
    """Broker -> client: registered live instances and request counts."""

    TYPE: ClassVar[int] = 22
    nonce: str
    instances: list[str]
    policy: str
    active: int
    queued: int
    stats: dict


@dataclass(slots=True)
class Admitted(Message):
    """Broker -> client: the request was planned (instance A, optional B, split point and its kind)."""

    TYPE: ClassVar[int] = 20
    req_id: str
    instance_a: str
    instance_b: str | None
    split: int
    kind: str
    prompt_tokens: int


@dataclass(slots=True)
class TokenStream(Message):
    """Broker -> client: new tokens of one or more requests, batched per engine step.

    Each entry is ``[req_id, tokens, finish_reason or None]``.
    """

    TYPE: ClassVar[int] = 21
    entries: list[list]


@dataclass(slots=True)
class RegisterWorker(Message):
    """Worker -> broker: join the cluster (sent again after a broker restart)."""

    TYPE: ClassVar[int] = 30
    instance_id: str
    engine: str
    model: str
    kv_capacity_tokens: int
    block_size: int
    max_model_len: int
    kv_transport: str
    vocab_size: int
    eos_token_id: int
    kv_bytes_per_token: int = 0
    pool: str = "any"
    max_num_seqs: int = 0  # the engine's cap of running sequences (0: none known)
    handoff_addr: str = ""  # where peers send StartDecode directly (a PULL socket); empty = none
    early_pull_tail_tokens: int = 0  # > 0: as A it sends KvChunks, as B it pulls them early; A's last this-many
    # positions (its last prefill step for s <= p, its last decode steps for s > p) are computed while B reads the
    # rest (0: whole pull at the handoff)
    step_model: list[float] = field(default_factory=list)  # the step-latency model its local scheduler plans with:
    # [a, b, c, d, e] ms (dynaserve.costmodel.StepLatencyModel); the broker prices this instance with it. Empty: none
    # advertised (the broker's own --step-model or cost tables price it)


@dataclass(slots=True)
class LoadReport(Message):
    """Worker -> broker, every heartbeat: the live load the global scheduler plans with."""

    TYPE: ClassVar[int] = 31
    instance_id: str
    seq: int
    queued_prefill_tokens: int
    running_seqs: int
    decode_ctx_tokens: int
    pending_decode_tokens: int
    kv_used_tokens: int
    kv_capacity_tokens: int
    step_ms: float
    token_budget: int
    held_blocks: int
    active_requests: int
    step_scale: float = 1.0  # the local scheduler's correction: measured / modelled step time (LocalScheduler.observe);
    # the broker prices this instance with its advertised step model times this


@dataclass(slots=True)
class TokenBatch(Message):
    """Worker -> broker: the tokens one engine step produced, ``[req_id, tokens, finish or None]`` each."""

    TYPE: ClassVar[int] = 32
    entries: list[list]


@dataclass(slots=True)
class HandoffReady(Message):
    """Worker A -> broker: A's part is done; ``kv`` lets B pull the KV of ``num_tokens`` positions."""

    TYPE: ClassVar[int] = 33
    req_id: str
    kv: dict
    num_tokens: int
    tokens: list[int]


@dataclass(slots=True)
class MicroFailed(Message):
    """Worker -> broker: a micro-request failed (bad descriptor, KV transfer failure, engine error)."""

    TYPE: ClassVar[int] = 34
    req_id: str
    code: str
    message: str


@dataclass(slots=True)
class RegisterAck(Message):
    """Broker -> worker: registration accepted (or refused, with the reason)."""

    TYPE: ClassVar[int] = 40
    instance_id: str
    ok: bool
    reason: str
    heartbeat_ms: int


@dataclass(slots=True)
class DispatchMicro(Message):
    """Broker -> worker: run a micro-request (full descriptor, sent once)."""

    TYPE: ClassVar[int] = 41
    desc: MicroDescriptor


@dataclass(slots=True)
class StartDecode(Message):
    """Broker -> worker B: A finished; pull its KV with ``kv`` and continue after A's ``tokens``.

    Also sent by worker A straight to B's handoff inbox (the same fields), ahead of the broker's copy; B
    acts on whichever arrives first and drops the other.
    """

    TYPE: ClassVar[int] = 42
    req_id: str
    kv: dict
    num_tokens: int
    tokens: list[int]


@dataclass(slots=True)
class KvChunk(Message):
    """Worker A -> B's handoff inbox, while A still runs: positions ``[0, num_tokens)`` are in A's blocks
    that ``kv`` names, and B may pull them now, ahead of A's StartDecode. Advisory: B uses it only for a
    request it holds admitted and waiting, and keeps what it pulled only if A's StartDecode names the same
    blocks (A's request was not preempted meanwhile)."""

    TYPE: ClassVar[int] = 45
    req_id: str
    kv: dict
    num_tokens: int


@dataclass(slots=True)
class AbortMicro(Message):
    """Broker -> worker: drop a micro-request and free its blocks (also blocks held for a handoff)."""

    TYPE: ClassVar[int] = 43
    req_id: str


@dataclass(slots=True)
class Shutdown(Message):
    """Broker -> worker: finish now."""

    TYPE: ClassVar[int] = 44
    reason: str = ""


MESSAGE_TYPES: dict[int, type[Message]] = {
    cls.TYPE: cls
    for cls in (
        ErrorReply,
        SubmitRequest,
        AbortRequest,
        StatusRequest,
        StatusReply,
        Admitted,
        TokenStream,
        RegisterWorker,
        LoadReport,
        TokenBatch,
        HandoffReady,
        MicroFailed,
        RegisterAck,
        DispatchMicro,
        StartDecode,
        KvChunk,
        AbortMicro,
        Shutdown,
    )
}

CLIENT_TO_BROKER = (SubmitRequest, AbortRequest, StatusRequest)
MAX_WORKER_FRAMES = 64
"""Protocol frames one ZeroMQ message from a worker to the broker may carry, handled in order: a worker sends a
step's tokens, handoffs and failures as one message, so that they arrive together or not at all."""

WORKER_TO_BROKER = (RegisterWorker, LoadReport, TokenBatch, HandoffReady, MicroFailed)
BROKER_TO_WORKER = (RegisterAck, DispatchMicro, StartDecode, AbortMicro, Shutdown)
BROKER_TO_CLIENT = (Admitted, TokenStream, ErrorReply, StatusReply)
WORKER_TO_WORKER = (StartDecode, KvChunk)

_packer = msgpack.Packer(use_bin_type=True)


def encode(msg: Message) -> bytes:
    """Serialize a message into one frame."""
    return _packer.pack([PROTOCOL_VERSION, msg.TYPE, *_encode_struct(msg)])


def encode_token_entries(type_id: int, entries: list[list]) -> bytes:
    """Fast path for TokenBatch / TokenStream (hot: once per step): entries are already wire-shaped."""
    return _packer.pack([PROTOCOL_VERSION, type_id, entries])


def _check_entries(entries: list) -> None:
    for e in entries:
        if (
            type(e) is not list
            or len(e) < 3
            or type(e[0]) is not str
            or type(e[1]) is not list
            or (e[2] is not None and type(e[2]) is not str)
        ):
            raise ProtocolError("bad_field", "entries: each entry must be [req_id: str, tokens: list, finish: str|None]")
        for t in e[1]:
            if type(t) is not int:
                raise ProtocolError("bad_field", "entries: tokens must be ints")


def decode(frame: bytes, allowed: tuple[type[Message], ...] | None = None) -> Message:
    """Parse one frame. Raises ProtocolError with a clear message on anything malformed."""
    if len(frame) > MAX_FRAME_BYTES:
        raise ProtocolError("too_large", f"frame of {len(frame)} bytes exceeds {MAX_FRAME_BYTES}")
    try:
        obj = msgpack.unpackb(frame, raw=False, strict_map_key=True, use_list=True)
    except Exception as exc:  # msgpack raises several exception types
        raise ProtocolError("malformed", f"not a MessagePack frame: {type(exc).__name__}") from None
    if type(obj) is not list or len(obj) < 2:
        raise ProtocolError("malformed", "a message is an array [version, type, fields...]")
    version, type_id = obj[0], obj[1]
    if type(version) is not int or version != PROTOCOL_VERSION:
        raise ProtocolError(
            "protocol_version", f"protocol version {version!r} is not supported; this peer speaks {PROTOCOL_VERSION}"
        )
    cls = MESSAGE_TYPES.get(type_id) if type(type_id) is int else None
    if cls is None:
        raise ProtocolError("unknown_type", f"unknown message type {type_id!r}")
    if allowed is not None and cls not in allowed:
        raise ProtocolError("unexpected_type", f"{cls.__name__} is not accepted on this socket")
    if (cls is TokenBatch or cls is TokenStream) and len(obj) > 2 and type(obj[2]) is list:
        # Hot path (one message per engine step): _check_entries alone covers everything the generic
        # decoder checks here (each entry a list), without building a field path per entry. Anything it
        # rejects goes through the generic path below, which reports the same error as always.
        try:
            _check_entries(obj[2])
        except ProtocolError:
            pass
        else:
            return cls(obj[2])  # type: ignore[call-arg]
    try:
        msg = _decode_struct(cls, obj[2:], cls.__name__)
        if cls is TokenBatch or cls is TokenStream:
            _check_entries(msg.entries)  # type: ignore[attr-defined]
    except ProtocolError as exc:
        # name the request the bad message was about, so the sender can match the error to it
        fields = dataclasses.fields(cls)
        if fields and fields[0].name == "req_id" and len(obj) > 2 and type(obj[2]) is str and len(obj[2]) <= 256:
            exc.req_id = obj[2]
        raise
    return msg

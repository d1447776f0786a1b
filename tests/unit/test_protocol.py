"""The wire codec: round trips of every message type and rejection of every kind of malformed frame."""

from __future__ import annotations

import dataclasses

import msgpack
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from dynaserve import protocol as P


def _sampling() -> P.SamplingParams:
    return P.SamplingParams(
        max_tokens=64, temperature=0.7, top_p=0.9, seed=1234, stop_token_ids=[2, 7], ignore_eos=True
    )


def _descriptor() -> P.MicroDescriptor:
    return P.MicroDescriptor(
        req_id="r-7",
        role=P.ROLE_B,
        prompt=[5, 6, 7, 8],
        split=3,
        start=3,
        end=68,
        emit_tokens=64,
        peer="w0",
        sampling=_sampling(),
        ttft_slo_ms=2000.0,
        tbt_slo_ms=100.0,
        arrival=12.5,
    )


SAMPLES: dict[type[P.Message], P.Message] = {
    P.ErrorReply: P.ErrorReply("bad_field", "prompt: expected list of int", "r-1"),
    P.SubmitRequest: P.SubmitRequest("r-1", [1, 2, 3], _sampling(), "interactive", "hello", 2),
    P.AbortRequest: P.AbortRequest("r-1"),
    P.StatusRequest: P.StatusRequest("n-42"),
    P.StatusReply: P.StatusReply(
        "n-42", ["w0", "w1"], "dynaserve", 3, 1, {"instances": {"w0": {"kv_used_tokens": 128}}, "ok": True}
    ),
    P.Admitted: P.Admitted("r-1", "w0", "w1", 3, "prompt", 4),
    P.TokenStream: P.TokenStream([["r-1", [10, 11], None], ["r-2", [], P.FINISH_STOP]]),
    P.RegisterWorker: P.RegisterWorker("w0", "sim", "llama3-8b", 131072, 16, 32768, "nixl", 32000, 2, 512, "decode", 64,
                                         "tcp://127.0.0.1:5601", 128, [2.5, 0.02, 0.08, 1e-4, 0.0]),
    P.LoadReport: P.LoadReport("w0", 9, 100, 4, 2048, 60, 4096, 131072, 12.25, 512, 3, 5, 1.75),
    P.TokenBatch: P.TokenBatch([["r-1", [10], None], ["r-1", [11, 12], P.FINISH_HANDOFF]]),
    P.HandoffReady: P.HandoffReady(
        "r-1", {"agent": "w0", "meta": b"\x00\xffbin", "block_ids": [0, 1], "num_tokens": 17}, 17, [99]
    ),
    P.MicroFailed: P.MicroFailed("r-1", "kv_transfer_recompute", "KV pull failed"),
    P.RegisterAck: P.RegisterAck("w0", False, "duplicate instance id", 20),
    P.DispatchMicro: P.DispatchMicro(_descriptor()),
    P.StartDecode: P.StartDecode("r-1", {"agent": "w0", "meta": b"m", "block_ids": [4]}, 3, []),
    P.KvChunk: P.KvChunk("r-1", {"remote_engine_id": "e0", "remote_block_ids": [[3, 9]]}, 256),
    P.AbortMicro: P.AbortMicro("r-1"),
    P.Shutdown: P.Shutdown("maintenance"),
}


def _frame(*items: object) -> bytes:
    return msgpack.packb(list(items), use_bin_type=True)


def _wire(msg: P.Message) -> list:
    """The decoded MessagePack array of a message (to tamper with)."""
    return msgpack.unpackb(P.encode(msg), raw=False)


def _reject(frame: bytes, code: str, **kw: object) -> P.ProtocolError:
    with pytest.raises(P.ProtocolError) as info:
        P.decode(frame, **kw)  # type: ignore[arg-type]
    assert info.value.code == code, str(info.value)
    return info.value


# ----------------------------------------------------------------------------------- round trips


def test_samples_cover_every_message_type() -> None:
    assert set(SAMPLES) == set(P.MESSAGE_TYPES.values())
    assert len(P.MESSAGE_TYPES) == 18  # type ids are unique
    for cls in SAMPLES:
        assert P.MESSAGE_TYPES[cls.TYPE] is cls


@pytest.mark.parametrize("cls", list(SAMPLES), ids=lambda c: c.__name__)
def test_round_trip(cls: type[P.Message]) -> None:
    msg = SAMPLES[cls]
    frame = P.encode(msg)
    wire = msgpack.unpackb(frame, raw=False)
    assert wire[:2] == [P.PROTOCOL_VERSION, cls.TYPE]
    assert len(wire) == 2 + len(dataclasses.fields(cls))  # fields are positional, not a map
    out = P.decode(frame)
    assert type(out) is cls
    assert out == msg


def test_round_trip_keeps_nested_types() -> None:
    out = P.decode(P.encode(SAMPLES[P.DispatchMicro]))
    assert isinstance(out, P.DispatchMicro)
    assert isinstance(out.desc, P.MicroDescriptor)
    assert isinstance(out.desc.sampling, P.SamplingParams)
    assert out.desc.sampling.stop_token_ids == [2, 7]
    hand = P.decode(P.encode(SAMPLES[P.HandoffReady]))
    assert isinstance(hand, P.HandoffReady)
    assert type(hand.kv["meta"]) is bytes and hand.kv["meta"] == b"\x00\xffbin"


def test_defaults_are_optional_on_the_wire() -> None:
    # an old peer that sends only the required fields
    msg = P.decode(_frame(1, P.SubmitRequest.TYPE, "r", [1, 2], [8]))
    assert msg == P.SubmitRequest("r", [1, 2], P.SamplingParams(max_tokens=8))
    assert msg.slo_class == "default" and msg.text is None and msg.force_split is None
    assert P.decode(_frame(1, P.Shutdown.TYPE)) == P.Shutdown("")


def test_optional_fields_accept_none() -> None:
    msg = P.decode(_frame(1, P.Admitted.TYPE, "r", "w0", None, 7, "none", 4))
    assert isinstance(msg, P.Admitted) and msg.instance_b is None


def test_token_entries_fast_path_decodes_like_encode() -> None:
    entries = [["r-1", [1, 2, 3], None], ["r-2", [4], P.FINISH_LENGTH]]
    frame = P.encode_token_entries(P.TokenBatch.TYPE, entries)
    assert frame == P.encode(P.TokenBatch(entries))
    assert P.decode(frame) == P.TokenBatch(entries)


def test_fields_appended_later_default_for_older_peers() -> None:
    """A worker from before the step model and its correction were appended still registers and reports."""
    reg = P.decode(_frame(*_wire(SAMPLES[P.RegisterWorker])[:-1]))
    assert isinstance(reg, P.RegisterWorker) and reg.step_model == [] and reg.early_pull_tail_tokens == 128
    rep = P.decode(_frame(*_wire(SAMPLES[P.LoadReport])[:-1]))
    assert isinstance(rep, P.LoadReport) and rep.step_scale == 1.0 and rep.active_requests == 5
    wire = _wire(SAMPLES[P.RegisterWorker])
    wire[-1] = [2.5, "0.02"]
    with pytest.raises(P.ProtocolError) as err:
        P.decode(_frame(*wire))
    assert err.value.code == "bad_field" and "RegisterWorker.step_model[1]" in str(err.value)


def test_trailing_unknown_fields_are_accepted() -> None:
    wire = _wire(SAMPLES[P.LoadReport]) + ["a field from a newer peer", 7, {"x": 1}]
    assert P.decode(_frame(*wire)) == SAMPLES[P.LoadReport]
    # also inside nested structures
    wire = _wire(SAMPLES[P.DispatchMicro])
    wire[2][8].append("new sampling knob")
    wire[2].append(3.5)
    assert P.decode(_frame(*wire)) == SAMPLES[P.DispatchMicro]


def test_allowed_accepts_listed_types() -> None:
    frame = P.encode(SAMPLES[P.SubmitRequest])
    assert P.decode(frame, allowed=P.CLIENT_TO_BROKER) == SAMPLES[P.SubmitRequest]


# ----------------------------------------------------------------------------------- numbers


def test_int_is_accepted_for_float_fields_and_becomes_float() -> None:
    wire = _wire(SAMPLES[P.LoadReport])
    wire[2 + 8] = 12  # step_ms
    msg = P.decode(_frame(*wire))
    assert isinstance(msg, P.LoadReport)
    assert msg.step_ms == 12.0 and type(msg.step_ms) is float


def test_float_is_rejected_for_int_fields() -> None:
    wire = _wire(SAMPLES[P.LoadReport])
    wire[2 + 1] = 9.0  # seq
    err = _reject(_frame(*wire), "bad_field")
    assert "LoadReport.seq" in str(err)


@pytest.mark.parametrize(
    ("index", "name"), [(1, "seq"), (8, "step_ms")], ids=["bool_for_int", "bool_for_float"]
)
def test_bool_is_not_a_number(index: int, name: str) -> None:
    wire = _wire(SAMPLES[P.LoadReport])
    wire[2 + index] = True
    err = _reject(_frame(*wire), "bad_field")
    assert f"LoadReport.{name}" in str(err)


def test_int_is_not_a_bool() -> None:
    wire = _wire(SAMPLES[P.RegisterAck])
    wire[2 + 1] = 1  # ok
    _reject(_frame(*wire), "bad_field")


# ----------------------------------------------------------------------------------- rejections


@pytest.mark.parametrize(
    "frame",
    [b"", b"\xc1", b"\x92\x01", b"\xdc\x00\x05\x01", _frame(1, 11, "r") + b"\x00"],
    ids=["empty", "reserved_byte", "truncated_array", "truncated_array16", "trailing_bytes"],
)
def test_rejects_non_msgpack(frame: bytes) -> None:
    _reject(frame, "malformed")


def test_rejects_non_utf8_str() -> None:
    _reject(b"\x93\x01\x0b\xa2\xff\xfe", "malformed")


@pytest.mark.parametrize(
    "obj", [7, "hello", None, {"v": 1}, [], [1]], ids=["int", "str", "nil", "map", "empty_array", "short_array"]
)
def test_rejects_non_array_or_short(obj: object) -> None:
    _reject(msgpack.packb(obj, use_bin_type=True), "malformed")


@pytest.mark.parametrize("version", [0, 2, -1, "1", None, [1]])
def test_rejects_other_versions(version: object) -> None:
    wire = _wire(SAMPLES[P.AbortRequest])
    wire[0] = version
    err = _reject(_frame(*wire), "protocol_version")
    assert isinstance(err, ValueError)


@pytest.mark.parametrize("version", [True, 1.0], ids=["bool", "float"])
def test_version_must_be_an_int(version: object) -> None:
    wire = _wire(SAMPLES[P.AbortRequest])
    wire[0] = version
    _reject(_frame(*wire), "protocol_version")


@pytest.mark.parametrize("type_id", [0, 2, 99, 12345, -10, "10", 10.0, True, None])
def test_rejects_unknown_type_ids(type_id: object) -> None:
    _reject(_frame(1, type_id, "r"), "unknown_type")


def test_rejects_types_not_allowed_on_the_socket() -> None:
    frame = P.encode(SAMPLES[P.DispatchMicro])
    err = _reject(frame, "unexpected_type", allowed=P.CLIENT_TO_BROKER)
    assert "DispatchMicro" in str(err)
    _reject(P.encode(SAMPLES[P.SubmitRequest]), "unexpected_type", allowed=P.WORKER_TO_BROKER)
    _reject(P.encode(SAMPLES[P.AbortMicro]), "unexpected_type", allowed=())


@pytest.mark.parametrize(
    ("cls", "index", "value", "path"),
    [
        (P.AbortRequest, 0, 5, "AbortRequest.req_id"),
        (P.SubmitRequest, 1, [1, "2"], "SubmitRequest.prompt"),
        (P.SubmitRequest, 1, [1, 2.0], "SubmitRequest.prompt"),
        (P.SubmitRequest, 1, [1, True], "SubmitRequest.prompt"),
        (P.SubmitRequest, 1, "123", "SubmitRequest.prompt"),
        (P.SubmitRequest, 2, {"max_tokens": 1}, "SubmitRequest.sampling"),
        (P.SubmitRequest, 5, "3", "SubmitRequest.force_split"),
        (P.RegisterWorker, 3, "131072", "RegisterWorker.kv_capacity_tokens"),
        (P.StatusReply, 1, ["w0", 1], "StatusReply.instances[1]"),
        (P.StatusReply, 5, [["k", 1]], "StatusReply.stats"),
        (P.HandoffReady, 1, [1, 2], "HandoffReady.kv"),
        (P.HandoffReady, 3, None, "HandoffReady.tokens"),
        (P.Admitted, 2, 3, "Admitted.instance_b"),
        (P.TokenStream, 0, {"r": [1]}, "TokenStream.entries"),
        (P.TokenStream, 0, ["r", [1], None], "TokenStream.entries[0]"),
        (P.ErrorReply, 1, b"bytes", "ErrorReply.message"),
    ],
)
def test_rejects_wrong_field_types(cls: type[P.Message], index: int, value: object, path: str) -> None:
    wire = _wire(SAMPLES[cls])
    wire[2 + index] = value
    err = _reject(_frame(*wire), "bad_field")
    assert path in str(err)


def test_rejects_non_str_map_keys() -> None:
    wire = _wire(SAMPLES[P.StatusReply])
    wire[2 + 5] = {1: 2}
    _reject(_frame(*wire), "malformed")  # refused by the MessagePack parser already
    wire[2 + 5] = {b"k": 2}
    err = _reject(_frame(*wire), "bad_field")
    assert "StatusReply.stats" in str(err)


def test_rejects_wrong_nested_field_types() -> None:
    wire = _wire(SAMPLES[P.DispatchMicro])
    wire[2][8][4] = [2, "7"]  # desc.sampling.stop_token_ids
    err = _reject(_frame(*wire), "bad_field")
    assert "DispatchMicro.desc.sampling.stop_token_ids" in str(err)
    wire = _wire(SAMPLES[P.DispatchMicro])
    wire[2][9] = "2000"  # desc.ttft_slo_ms
    err = _reject(_frame(*wire), "bad_field")
    assert "DispatchMicro.desc.ttft_slo_ms" in str(err)


def _required(cls: type) -> list[int]:
    return [
        i
        for i, f in enumerate(dataclasses.fields(cls))
        if f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING
    ]


def test_only_status_request_and_shutdown_have_no_required_field() -> None:
    assert {cls for cls in SAMPLES if not _required(cls)} == {P.StatusRequest, P.Shutdown}


@pytest.mark.parametrize("cls", [c for c in SAMPLES if _required(c)], ids=lambda c: c.__name__)
def test_rejects_missing_required_fields(cls: type[P.Message]) -> None:
    fields = dataclasses.fields(cls)
    required = _required(cls)
    wire = _wire(SAMPLES[cls])[: 2 + required[-1]]  # drop the last required field and everything after
    err = _reject(_frame(*wire), "bad_field")
    assert f"missing field {fields[required[-1]].name!r}" in str(err)


def test_rejects_missing_nested_field() -> None:
    wire = _wire(SAMPLES[P.DispatchMicro])
    wire[2] = wire[2][:5]  # descriptor cut after `start`
    err = _reject(_frame(*wire), "bad_field")
    assert "missing field 'end'" in str(err)


def test_rejects_oversized_frames_before_parsing() -> None:
    big = _frame(1, P.StatusRequest.TYPE, "x" * P.MAX_FRAME_BYTES)
    assert len(big) > P.MAX_FRAME_BYTES
    _reject(big, "too_large")
    _reject(b"\x00" * (P.MAX_FRAME_BYTES + 1), "too_large")  # not even msgpack: size is checked first


def test_accepts_a_frame_of_exactly_the_limit() -> None:
    header = _frame(1, P.StatusRequest.TYPE, "")
    # str32 header (5 bytes) + payload; fill the frame to exactly MAX_FRAME_BYTES
    payload = P.MAX_FRAME_BYTES - (len(header) - 1) - 5
    frame = _frame(1, P.StatusRequest.TYPE, "y" * payload)
    assert len(frame) == P.MAX_FRAME_BYTES
    msg = P.decode(frame)
    assert isinstance(msg, P.StatusRequest) and len(msg.nonce) == payload


@pytest.mark.parametrize("cls", [P.TokenBatch, P.TokenStream], ids=lambda c: c.__name__)
@pytest.mark.parametrize(
    "entry",
    [
        ["r"],
        ["r", [1]],
        [1, [1], None],
        ["r", 5, None],
        ["r", [1, "2"], None],
        ["r", [1, 2.5], None],
        ["r", [1, False], None],
        ["r", [1], 3],
        ["r", [1], b"stop"],
        "r",
    ],
)
def test_rejects_malformed_token_entries(cls: type[P.Message], entry: object) -> None:
    frame = _frame(1, cls.TYPE, [["ok", [1], None], entry])
    _reject(frame, "bad_field")


def test_token_entries_accept_extra_trailing_items() -> None:
    entries = [["r", [1], None, {"logprobs": [0.5]}]]
    assert P.decode(_frame(1, P.TokenBatch.TYPE, entries)) == P.TokenBatch(entries)


# ----------------------------------------------------------------------------------- req_id on errors


def test_error_names_the_request_of_a_bad_submit() -> None:
    wire = _wire(SAMPLES[P.SubmitRequest])
    wire[2 + 1] = [1, "two"]
    err = _reject(_frame(*wire), "bad_field")
    assert err.req_id == "r-1"


def test_error_has_no_request_when_it_cannot_name_one() -> None:
    wire = _wire(SAMPLES[P.SubmitRequest])
    wire[2] = 42  # the req_id itself is bad
    assert _reject(_frame(*wire), "bad_field").req_id is None
    wire = _wire(SAMPLES[P.SubmitRequest])
    wire[2] = "x" * 257  # too long to echo back
    wire[3] = "bad"
    assert _reject(_frame(*wire), "bad_field").req_id is None
    # RegisterWorker's first field is not a request id
    wire = _wire(SAMPLES[P.RegisterWorker])
    wire[2 + 3] = "many"
    assert _reject(_frame(*wire), "bad_field").req_id is None
    # errors before the fields are parsed carry no request either
    assert _reject(_frame(2, P.SubmitRequest.TYPE, "r-1"), "protocol_version").req_id is None


def test_error_names_the_request_of_bad_micro_failed() -> None:
    err = _reject(_frame(1, P.MicroFailed.TYPE, "r-9", "code"), "bad_field")
    assert err.req_id == "r-9"


# ----------------------------------------------------------------------------------- fuzzing


_leaves = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.sampled_from([0.0, 1.5, -2.0, float("inf"), float("nan")]),
    st.sampled_from(["", "r", "stop", "w0"]),
    st.sampled_from([b"", b"\x00\xff"]),
)
_values = st.recursive(
    _leaves,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.sampled_from(["a", "kv"]), inner, max_size=2),
    max_leaves=8,
)
_flat = st.one_of(_leaves, st.lists(_leaves, max_size=3))
_type_ids = st.sampled_from(sorted(P.MESSAGE_TYPES)) | st.integers(-5, 60)


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.binary(max_size=64))
def test_random_bytes_only_raise_protocol_errors(frame: bytes) -> None:
    try:
        P.decode(frame)
    except P.ProtocolError:
        pass


@settings(max_examples=2000, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.one_of(_values, st.tuples(st.sampled_from([1, 1, 1, 0]), _type_ids, st.lists(_flat, max_size=13))))
def test_random_structures_only_raise_protocol_errors(obj: object) -> None:
    if isinstance(obj, tuple):  # [version, type, *fields]: reaches the field checkers
        version, type_id, fields = obj
        obj = [version, type_id, *fields]
    frame = msgpack.packb(obj, use_bin_type=True)
    try:
        msg = P.decode(frame, allowed=None)
    except P.ProtocolError:
        return
    assert type(msg) in P.MESSAGE_TYPES.values()


@settings(max_examples=200, deadline=None)
@given(st.sampled_from(list(SAMPLES)), st.data())
def test_mutated_valid_messages_only_raise_protocol_errors(cls: type[P.Message], data: st.DataObject) -> None:
    wire = _wire(SAMPLES[cls])
    i = data.draw(st.integers(2, len(wire) - 1), label="index")
    wire[i] = data.draw(_values, label="value")
    try:
        msg = P.decode(_frame(*wire))
    except P.ProtocolError:
        return
    assert type(msg) is cls

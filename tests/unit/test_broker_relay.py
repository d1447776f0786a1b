"""The broker's token relay (pure message handling, sockets replaced by recording channels)."""

from __future__ import annotations

import pytest

from broker.cluster_state import InstanceState
from broker.requests import BrokerRequest
from broker.server import Broker, BrokerConfig
from dynaserve import protocol as P
from dynaserve.split import Plan


class RecordingChannel:
    def __init__(self) -> None:
        self.sent: list[list[bytes]] = []

    def send(self, frames: list[bytes]) -> None:
        self.sent.append(frames)


def make_broker() -> Broker:
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w"))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    b.cluster.add(InstanceState(id="w0", kv_capacity_tokens=1 << 20))
    for iid, rid, client in (("1", "a", b"c1"), ("2", "b", b"c1"), ("3", "c", b"c2")):
        b.table.add(BrokerRequest(
            iid=iid, client=client, client_req_id=rid, prompt=[5], sampling=P.SamplingParams(max_tokens=4),
            plan=Plan.whole("w0", 1, 4), arrival=0.0, ttft_slo_ms=2000, tbt_slo_ms=100, predicted_output=4))
    return b


def client_entries(b: Broker) -> dict[bytes, list[list]]:
    out: dict[bytes, list[list]] = {}
    for client, frame in b.clients.sent:  # type: ignore[attr-defined]
        msg = P.decode(frame)
        assert isinstance(msg, P.TokenStream)
        out.setdefault(client, []).extend(msg.entries)
    return out


def test_one_message_per_client_per_batch_with_client_ids() -> None:
    b = make_broker()
    frame = P.encode_token_entries(P.TokenBatch.TYPE, [["1", [7], None], ["2", [8, 9], "length"], ["3", [1], None]])
    b._on_worker_frames([b"w0", frame])
    got = client_entries(b)
    assert len(b.clients.sent) == 2  # type: ignore[attr-defined]
    assert got[b"c1"] == [["a", [7], None], ["b", [8, 9], "length"]]
    assert got[b"c2"] == [["c", [1], None]]
    assert b.table.get("2") is None and b.table.get("1") is not None  # finished requests leave the table
    assert b.stats.tokens_relayed == 4


def test_entries_with_appended_fields_are_relayed() -> None:
    """Fields are only ever appended to the protocol: a newer worker's extra entry fields are ignored."""
    b = make_broker()
    frame = P.encode_token_entries(P.TokenBatch.TYPE, [["1", [7], "length"], ["2", [8], None, {"logprob": -0.1}]])
    b._on_worker_frames([b"w0", frame])
    assert client_entries(b)[b"c1"] == [["a", [7], "length"], ["b", [8], None]]


def test_handoff_finish_is_not_shown_to_clients() -> None:
    b = make_broker()
    frame = P.encode_token_entries(P.TokenBatch.TYPE, [["1", [7], P.FINISH_HANDOFF]])
    b._on_worker_frames([b"w0", frame])
    assert client_entries(b)[b"c1"] == [["a", [7], None]]
    assert b.table.get("1") is not None


def test_slo_infeasible_requests_are_rejected_with_a_typed_reason() -> None:
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w",
                            slo_reject_factor=2.0, ttft_slo_ms=500.0))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    b.cluster.add(InstanceState(id="w0", kv_capacity_tokens=1 << 20, max_model_len=1 << 20,
                                queued_prefill_tokens=500_000))  # minutes of prefill queued
    b._on_submit(b"c", P.SubmitRequest("r1", [5] * 100, P.SamplingParams(max_tokens=4)), 0.0)
    (client, frame), = b.clients.sent  # type: ignore[attr-defined]
    msg = P.decode(frame)
    assert isinstance(msg, P.ErrorReply) and msg.code == "slo_infeasible" and msg.req_id == "r1"
    b.cluster.instances["w0"].queued_prefill_tokens = 0  # an idle instance meets the SLO: admitted
    b._on_submit(b"c", P.SubmitRequest("r2", [5] * 100, P.SamplingParams(max_tokens=4)), 0.0)
    assert isinstance(P.decode(b.clients.sent[-1][1]), P.Admitted)  # type: ignore[attr-defined]


def test_table_knows_the_key_owning_each_client_identity() -> None:
    b = make_broker()  # requests were added without an owner (CURVE off): owner ""
    assert b.table.owner(b"c1") == "" and b.table.owner(b"nobody") is None
    req = BrokerRequest(iid="9", client=b"c3", client_req_id="z", prompt=[5], sampling=P.SamplingParams(max_tokens=4),
                        plan=None, arrival=0.0, ttft_slo_ms=2000, tbt_slo_ms=100, predicted_output=4, owner="alice")
    b.table.add(req)  # queued
    b.table.add(req)  # dispatched later: the same request again
    assert b.table.owner(b"c3") == "alice"
    b.table.pop("9")
    assert b.table.owner(b"c3") is None  # no running request: the identity is free
    b.table.pop("1")
    b.table.pop("2")
    assert b.table.owner(b"c1") is None and b.table.owner(b"c2") == ""


def test_ttft_slo_grows_with_the_prompt_when_asked() -> None:
    def admitted_slo(factor: float, prompt_len: int) -> float:
        b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w",
                                ttft_slo_ms=250.0, ttft_prefill_factor=factor))
        b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
        b.cluster.add(InstanceState(id="w0", kv_capacity_tokens=1 << 20, max_model_len=1 << 20))
        b._on_submit(b"c", P.SubmitRequest("r", [5] * prompt_len, P.SamplingParams(max_tokens=4)), 0.0)
        (req,) = b.table.by_iid.values()
        return req.ttft_slo_ms

    model = make_broker().pricing.model
    assert admitted_slo(0.0, 100) == admitted_slo(0.0, 20_000) == 250.0
    for p in (100, 20_000):  # 8192-token chunks: 20k tokens take three steps alone
        assert admitted_slo(4.0, p) == 250.0 + 4.0 * model.prefill_alone_ms(p, 8192)
    assert admitted_slo(4.0, 20_000) > admitted_slo(4.0, 100) > 250.0
    assert model.prefill_alone_ms(20_000) == sum(
        model.step_ms(n, 0, 0, model.chunk_attn(n, done)) for n, done in ((8192, 0), (8192, 8192), (3616, 16384)))


def _two_workers(direct: bool = True, tail: int = 0, auto: bool = True) -> Broker:
    """A broker with two registered workers (``tail``: their early-pull tail, 0 = no early pulls; ``auto``:
    the broker's --early-tail-auto, on by default)."""
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w",
                            allow_forced_splits=True, direct_handoff=direct, early_tail_auto=auto))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    for wid in ("w0", "w1"):
        b._on_worker_frames([wid.encode(), P.encode(P.RegisterWorker(
            wid, "sim", "m", 1 << 20, 16, 1 << 20, "nixl", 32000, 2, 131072, "any", 64, f"ipc:///tmp/inbox-{wid}",
            tail))])
    return b


def _dispatched(b: Broker) -> dict[str, P.MicroDescriptor]:
    out = {}
    for ident, frame in b.workers.sent:  # type: ignore[attr-defined]
        msg = P.decode(frame)
        if isinstance(msg, P.DispatchMicro):
            out[ident.decode()] = msg.desc
    return out


def test_a_is_told_the_early_pull_tail_the_broker_picked() -> None:
    """A 4,000-token PD split between two idle workers with early pulls (128-position tails, 16-position blocks):
    with --early-tail-auto (the default) A's descriptor carries the tail Pricing.early_tail picks for the link and
    A's load, B's none; with --no-early-tail-auto A is told its own; without early pulls, nothing."""
    for tail, auto in ((128, True), (128, False), (0, True)):
        b = _two_workers(tail=tail, auto=auto)
        w0, w1 = b.cluster.instances["w0"], b.cluster.instances["w1"]
        assert w0.block_size == 16
        want = b.pricing.early_tail(w0, w1, 4000, 4000, b.cfg.tbt_slo_ms)[0]
        b._on_submit(b"c", P.SubmitRequest("r", [5] * 4000, P.SamplingParams(max_tokens=8), force_split=4000), 0.0)
        descs = _dispatched(b)
        a_desc = next(d for d in descs.values() if d.role == P.ROLE_A)
        b_desc = next(d for d in descs.values() if d.role == P.ROLE_B)
        assert a_desc.early_tail == want and b_desc.early_tail == 0
        if not tail:
            assert want == 0
        elif auto:  # the whole prompt fits A's first step: a longer tail covers the first chunk's read
            assert want > 128 and (4000 - want) % 16 == 0
        else:
            assert want == 128


def test_a_is_told_b_handoff_inbox_unless_direct_handoffs_are_off() -> None:
    for direct in (True, False):
        b = _two_workers(direct)
        b._on_submit(b"c", P.SubmitRequest("r", [5] * 40, P.SamplingParams(max_tokens=8), force_split=40), 0.0)
        descs = _dispatched(b)
        (a, desc_a), = [(w, d) for w, d in descs.items() if d.role == P.ROLE_A]
        (bw, desc_b), = [(w, d) for w, d in descs.items() if d.role == P.ROLE_B]
        assert desc_a.peer == bw and desc_b.peer_addr == ""
        assert desc_a.peer_addr == (f"ipc:///tmp/inbox-{bw}" if direct else "")
        st = b._status_stats()["instances"]
        assert all(st[w]["handoff_addr"] == f"ipc:///tmp/inbox-{w}" for w in st)


def test_b_tokens_ahead_of_a_handoff_are_relayed_after_a_tokens() -> None:
    """B started from A's direct StartDecode and its first token reached the broker before A's last token and
    HandoffReady (another socket): the client still gets A's tokens first, then B's, each once."""
    b = _two_workers()
    b._on_submit(b"c", P.SubmitRequest("r", [5] * 40, P.SamplingParams(max_tokens=8), force_split=41), 0.0)
    descs = _dispatched(b)
    (a, desc_a), = [(w, d) for w, d in descs.items() if d.role == P.ROLE_A]
    bw, iid = desc_a.peer, desc_a.req_id
    assert bw is not None
    b.clients.sent.clear()  # type: ignore[attr-defined]
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [30], None]])])
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [31], None]])])
    assert client_entries(b) == {}  # held until A's handoff
    b._on_worker_frames([a.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [10, 11], P.FINISH_HANDOFF]])])
    b._on_worker_frames([a.encode(), P.encode(P.HandoffReady(iid, {"k": 1}, 41, [10, 11]))])
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [32], None]])])
    tokens = [t for e in client_entries(b)[b"c"] for t in e[1]]
    assert tokens == [10, 11, 30, 31, 32]
    relayed = [P.decode(f) for w, f in b.workers.sent if w == bw.encode()]  # type: ignore[attr-defined]
    assert any(isinstance(m, P.StartDecode) and m.req_id == iid for m in relayed)  # the broker's copy still goes
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [33, 34, 35], "length"]])])
    assert b.table.get(iid) is None and b.stats.finished == 1


def test_held_b_tokens_of_a_request_replanned_before_the_handoff_are_dropped() -> None:
    """A dies after its direct StartDecode but before its HandoffReady reached the broker: the request goes on
    elsewhere from the tokens the client has; what B produced meanwhile is never relayed."""
    b = _two_workers()
    b.cluster.add(InstanceState(id="w2", kv_capacity_tokens=1 << 20, max_model_len=1 << 20))
    b.vocabs["w2"] = 32000
    b._on_submit(b"c", P.SubmitRequest("r", [5] * 40, P.SamplingParams(max_tokens=8), force_split=41), 0.0)
    desc_a = next(d for d in _dispatched(b).values() if d.role == P.ROLE_A)
    a, bw, iid = next(w for w, d in _dispatched(b).items() if d.role == P.ROLE_A), desc_a.peer, desc_a.req_id
    assert bw is not None
    b._on_worker_frames([a.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [10], None]])])
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [30], None]])])
    b._declare_dead(a, "was killed", 1.0)
    b._on_worker_frames([bw.encode(), P.encode_token_entries(P.TokenBatch.TYPE, [[iid, [31], None]])])
    streams = [m for m in (P.decode(f) for _, f in b.clients.sent) if isinstance(m, P.TokenStream)]  # type: ignore[attr-defined]
    assert [t for m in streams for e in m.entries for t in e[1]] == [10]
    assert b.table.get(iid) is None and b.stats.replanned == 1


def test_registration_carries_early_pulls_and_refuses_a_negative_tail() -> None:
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w"))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    for wid, tail in (("w0", 128), ("w1", -1)):
        b._on_worker_frames([wid.encode(), P.encode(P.RegisterWorker(
            wid, "vllm", "m", 1 << 20, 16, 1 << 20, "nixl", 32000, 2, 512, "any", 64, "ipc:///tmp/inbox", tail))])
    assert b.cluster.instances["w0"].early_pull_tail_tokens == 128
    assert "w1" not in b.cluster.instances
    acks = {ident.decode(): P.decode(frame) for ident, frame in b.workers.sent}  # type: ignore[attr-defined]
    assert acks["w0"].ok and not acks["w1"].ok  # type: ignore[attr-defined]
    assert "early_pull_tail_tokens" in acks["w1"].reason  # type: ignore[attr-defined]


def test_a_worker_message_carries_several_frames_in_order() -> None:
    b = _two_workers()

    def report(seq: int, queued: int) -> bytes:
        return P.encode(P.LoadReport("w0", seq, queued, 0, 0, 0, 0, 1 << 20, 1.0, 512, 0, 0))

    b._on_worker_frames([b"w0", report(1, 100), report(2, 7)])
    assert b.cluster.instances["w0"].queued_prefill_tokens == 7  # both handled, the later one last
    bad = b.stats.bad_frames
    b._on_worker_frames([b"w0", *[report(3, 9)] * (P.MAX_WORKER_FRAMES + 1)])  # too many: refused whole
    b._on_worker_frames([b"w0"])
    assert b.stats.bad_frames == bad + 2 and b.cluster.instances["w0"].queued_prefill_tokens == 7
    b._on_worker_frames([b"w0", b"\xc1", report(4, 11)])  # a bad frame does not stop the ones after it
    assert b.stats.bad_frames == bad + 3 and b.cluster.instances["w0"].queued_prefill_tokens == 11


def test_registration_carries_the_step_model_and_reports_rescale_it() -> None:
    """A worker's advertised step model prices its instance (not the broker's cost tables), times the correction
    its reports carry; the status shows what each instance is priced with. A malformed model is refused."""
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w"))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    own = [3.0, 0.04, 0.08, 1e-4, 0.0]
    for wid, model in (("w0", own), ("w1", []), ("w2", [3.0, 0.0, 0.08, 1e-4, 0.0]), ("w3", [1.0, 2.0])):
        b._on_worker_frames([wid.encode(), P.encode(P.RegisterWorker(
            wid, "vllm", "m", 1 << 20, 16, 1 << 20, "nixl", 32000, 2, 512, "any", 64, "", 0, model))])
    acks = {ident.decode(): P.decode(frame) for ident, frame in b.workers.sent}  # type: ignore[attr-defined]
    assert acks["w0"].ok and acks["w1"].ok  # type: ignore[attr-defined]
    assert not acks["w2"].ok and "StepLatencyModel.b must be > 0" in acks["w2"].reason  # type: ignore[attr-defined]
    assert not acks["w3"].ok and "5 coefficients" in acks["w3"].reason  # type: ignore[attr-defined]
    assert set(b.cluster.instances) == {"w0", "w1"}
    w0, w1 = b.cluster.instances["w0"], b.cluster.instances["w1"]
    assert b.pricing.model_of(w0).coefficients() == tuple(own)
    assert b.pricing.model_of(w1) is b.pricing.model  # none advertised: the broker's own
    for seq, wid in enumerate(("w0", "w1")):
        b._on_worker_frames([wid.encode(), P.encode(P.LoadReport(wid, seq + 1, 0, 0, 0, 0, 0, 1 << 20, 6.0, 512, 0, 0,
                                                                  2.0))])
    assert b.pricing.model_of(w0).coefficients() == pytest.approx([2 * v for v in own])
    assert b.pricing.model_of(w1) is b.pricing.model
    status = b._status_stats()["instances"]
    assert status["w0"]["step_scale"] == 2.0
    assert status["w0"]["priced_step_model"] == pytest.approx([2 * v for v in own])
    assert status["w1"]["priced_step_model"] == pytest.approx(list(b.pricing.model.coefficients()))


def test_a_report_with_a_bad_step_scale_gets_an_error_and_still_counts() -> None:
    b = Broker(BrokerConfig(client_addr="ipc:///tmp/dynaserve-unit-c", worker_addr="ipc:///tmp/dynaserve-unit-w"))
    b.clients, b.workers = RecordingChannel(), RecordingChannel()  # type: ignore[assignment]
    b._on_worker_frames([b"w0", P.encode(P.RegisterWorker(
        "w0", "vllm", "m", 1 << 20, 16, 1 << 20, "nixl", 32000, 2, 512, "any", 64, "", 0, [3.0, 0.04, 0.08, 1e-4, 0.0]))])
    b._on_worker_frames([b"w0", P.encode(P.LoadReport("w0", 1, 0, 0, 0, 0, 0, 1 << 20, 6.0, 512, 0, 0, 3.0))])
    for seq, bad in enumerate((float("nan"), float("inf"), 0.0, -2.0)):
        b.workers.sent.clear()  # type: ignore[attr-defined]
        b._on_worker_frames([b"w0", P.encode(P.LoadReport("w0", seq + 2, 7 + seq, 0, 0, 0, 0, 1 << 20, 6.0, 512, 0, 0,
                                                          bad))])
        (ident, frame), = b.workers.sent  # type: ignore[attr-defined]
        err = P.decode(frame)
        assert ident == b"w0" and isinstance(err, P.ErrorReply) and err.code == "bad_field"
        assert "step_scale" in err.message
        w0 = b.cluster.instances["w0"]
        assert w0.queued_prefill_tokens == 7 + seq and w0.step_scale == 3.0  # the load counts, the price stays
        assert b._status_stats()["instances"]["w0"]["step_scale"] == 3.0

"""The broker's request table: one entry per admitted request, from plan to finish.

Lifecycle:
    admitted -> dispatched to A (and B, which waits) -> [A hands off -> B pulls KV and continues]
    -> finished (stop / length) | aborted (client) | failed (worker error)
    An instance lost mid-request (dead or restarted worker) re-plans the request: a new entry continues
    from the prompt plus the tokens already relayed, so the client's stream goes on without a gap.
The broker keeps the client's id, the plan and how many tokens it relayed; workers know requests by the
broker-assigned internal id, so two clients may use the same request id. With CURVE on, every request
records the client key that submitted it (``owner``), and the table knows which key owns each client
socket identity's running requests.
"""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field

from dynaserve.protocol import SamplingParams
from dynaserve.split import Plan


@dataclass(slots=True)
class BrokerRequest:
    iid: str  # internal id, unique in this broker
    client: bytes  # client socket identity
    client_req_id: str
    prompt: list[int]
    sampling: SamplingParams
    plan: Plan | None  # None while queued for capacity
    arrival: float
    ttft_slo_ms: float
    tbt_slo_ms: float
    predicted_output: int
    force_split: int | None = None
    owner: str = ""  # User-Id (client certificate name) of the key that submitted it; "" with CURVE off
    generated: list[int] = field(default_factory=list)  # tokens relayed to the client so far
    handed_off: bool = False
    # B's token entries that reached the broker before A's HandoffReady (B started from A's direct
    # StartDecode): relayed after A's last tokens, which come before the HandoffReady on A's socket
    held_b: list[list] = field(default_factory=list)
    replans: int = 0  # times this request was re-planned after losing an instance

    @property
    def tokens_relayed(self) -> int:
        return len(self.generated)

    def survives_loss_of(self, instance_id: str) -> bool:
        """True when the request no longer needs ``instance_id``: A after its handoff (B holds, or is
        pulling, everything it needs; a failed pull makes B recompute from the tokens it has)."""
        return self.plan is not None and self.plan.b is not None and self.handed_off and instance_id == self.plan.a

    def instances(self) -> tuple[str, ...]:
        if self.plan is None:
            return ()
        return (self.plan.a,) if self.plan.b is None else (self.plan.a, self.plan.b)


class RequestTable:
    """Internal id -> request, plus (client, client id) -> internal id, plus client -> owning key."""

    def __init__(self) -> None:
        self.by_iid: dict[str, BrokerRequest] = {}
        self.by_client: dict[tuple[bytes, str], str] = {}
        self._owners: dict[bytes, tuple[str, int]] = {}  # client identity -> (owner, requests in the table)
        self._ids = itertools.count(1)

    def new_iid(self) -> str:
        return format(next(self._ids), "x")

    def __len__(self) -> int:
        return len(self.by_iid)

    def add(self, req: BrokerRequest) -> None:
        """Enter ``req`` (again when it leaves the queue: a second add of the same request changes nothing)."""
        if req.iid not in self.by_iid:
            owner, n = self._owners.get(req.client, (req.owner, 0))
            self._owners[req.client] = (owner, n + 1)
        self.by_iid[req.iid] = req
        self.by_client[(req.client, req.client_req_id)] = req.iid

    def get(self, iid: str) -> BrokerRequest | None:
        return self.by_iid.get(iid)

    def find(self, client: bytes, client_req_id: str) -> BrokerRequest | None:
        iid = self.by_client.get((client, client_req_id))
        return None if iid is None else self.by_iid.get(iid)

    def pop(self, iid: str) -> BrokerRequest | None:
        req = self.by_iid.pop(iid, None)
        if req is not None:
            self.by_client.pop((req.client, req.client_req_id), None)
            owner, n = self._owners[req.client]
            if n > 1:
                self._owners[req.client] = (owner, n - 1)
            else:
                del self._owners[req.client]
        return req

    def owner(self, client: bytes) -> str | None:
        """The key that owns the running requests of socket identity ``client`` (None when it has none)."""
        entry = self._owners.get(client)
        return None if entry is None else entry[0]

    def on_instance(self, instance_id: str) -> list[BrokerRequest]:
        return [r for r in self.by_iid.values() if instance_id in r.instances()]

    def of_client(self, client: bytes) -> list[BrokerRequest]:
        return [r for r in self.by_iid.values() if r.client == client]

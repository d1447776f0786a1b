"""Fuzz the wire decoder and a live broker with malformed input.

Stage 1 (in process): at least ``--inputs`` generated frames, from a seeded generator: random bytes,
byte-level mutations of valid frames of every message type (flips, inserts, deletes, truncations),
structural mutations (a field replaced by a value of another type, huge or negative ints, NaN, deep
nesting, extension types, dropped or extra fields), wrong versions and type ids, nesting thousands of
levels deep, huge declared lengths, and oversized frames. Every frame is decoded with each socket's
``allowed`` tuple (and with none); anything but :class:`dynaserve.protocol.ProtocolError` is a failure.

Stage 2 (real processes): a broker and one simulated worker (LocalCluster over ipc). ``--live`` malformed
messages go to the broker's client socket and its worker socket, half each, including multipart
messages with the wrong number of frames, empty frames and structurally valid but hostile messages
(unknown request ids, registrations with absurd values). Then the broker must still be up, answer a
status request, and serve a normal request with exactly the reference tokens; handler exceptions in its
log are counted as failures.

Usage: python -m bench.fuzz_decoders [--inputs 100000] [--live 20000] [--seed 0] [--stage 1,2]
Exit status 1 if anything failed.
"""

from __future__ import annotations

import argparse
import asyncio
import math
import random
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterator
from typing import Any

import msgpack
import zmq

from dynaserve import protocol as P

ALLOWED: dict[str, tuple[type[P.Message], ...] | None] = {
    "client->broker": P.CLIENT_TO_BROKER,
    "worker->broker": P.WORKER_TO_BROKER,
    "broker->worker": P.BROKER_TO_WORKER + (P.ErrorReply,),
    "broker->client": P.BROKER_TO_CLIENT,
    "any": None,
}


def samples() -> list[P.Message]:
    """One valid message of every type."""
    sp = P.SamplingParams(8, 0.5, 0.9, 7, [2, 3], True)
    desc = P.MicroDescriptor("1", P.ROLE_A, [1, 2, 3, 4], 2, 0, 2, 1, "w1", sp, 2000.0, 100.0, 1.5)
    msgs: list[P.Message] = [
        P.ErrorReply("bad", "message", "r1"),
        P.SubmitRequest("r1", [5, 6, 7], sp, "default", None, None),
        P.SubmitRequest("r2", [], P.SamplingParams(), "default", "hello", 3),
        P.AbortRequest("r1"),
        P.StatusRequest("nonce"),
        P.StatusReply("nonce", ["w0", "w1"], "dynaserve", 1, 0, {"a": 1, "b": [1, 2]}),
        P.Admitted("r1", "w0", "w1", 5, "prompt", 10),
        P.TokenStream([["r1", [1, 2], None], ["r2", [], "stop"]]),
        P.RegisterWorker("fuzz", "sim", "m", 100000, 16, 4096, "nixl", 32000, 2, 128, "any"),
        P.LoadReport("fuzz", 1, 0, 0, 0, 0, 0, 100000, 1.5, 100, 0, 0),
        P.TokenBatch([["1", [5], None], ["2", [6, 7], "length"]]),
        P.HandoffReady("1", {"agent": b"x", "blocks": [1, 2]}, 10, [1]),
        P.MicroFailed("1", "engine", "boom"),
        P.RegisterAck("w0", True, "", 20),
        P.DispatchMicro(desc),
        P.StartDecode("1", {"k": 1}, 2, [3]),
        P.KvChunk("1", {"k": [[1]]}, 128),
        P.AbortMicro("1"),
        P.Shutdown("bye"),
    ]
    assert {type(m) for m in msgs} == set(P.MESSAGE_TYPES.values())
    return msgs


class Gen:
    """Seeded generator of malformed (and some valid) frames."""

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.valid = [P.encode(m) for m in samples()]
        self.objs = [msgpack.unpackb(f, raw=False) for f in self.valid]

    def value(self, depth: int = 0) -> Any:
        r = self.rng
        k = r.randrange(20)
        if k == 0:
            return None
        if k == 1:
            return r.choice([True, False])
        if k == 2:
            return r.choice([0, 1, -1, 2**63 - 1, -(2**63), 2**64 - 1, 2**32, -(2**31) - 1])
        if k == 3:
            return r.randrange(-1000, 100000)
        if k == 4:
            return r.choice([0.0, -0.0, math.nan, math.inf, -math.inf, 1e308, 5e-324, r.random()])
        if k == 5:
            return "".join(chr(r.randrange(1, 0x3000)) for _ in range(r.randrange(0, 12)))
        if k == 6:
            return r.choice(["", "stop", "length", "handoff", "A", "B", "full", "w0", "x" * 300, "default"])
        if k == 7:
            return r.randbytes(r.randrange(0, 16))
        if k == 8:
            return msgpack.ExtType(r.randrange(0, 128), r.randbytes(r.randrange(0, 8)))
        if k == 9:
            return msgpack.Timestamp(r.randrange(0, 2**34), r.randrange(0, 10**9))
        if k in (10, 11, 12) and depth < 4:
            return [self.value(depth + 1) for _ in range(r.randrange(0, 5))]
        if k == 13 and depth < 4:
            return {self.key(): self.value(depth + 1) for _ in range(r.randrange(0, 4))}
        if k == 14:
            return self.nested(r.randrange(1, 200))
        if k == 15:
            return [r.randrange(-5, 40000) for _ in range(r.randrange(0, 30))]
        if k == 16:
            return [[str(r.randrange(0, 10)), [r.randrange(0, 100)], r.choice([None, "stop", 3])]]
        return r.randrange(0, 50)

    def key(self) -> Any:
        return self.rng.choice(["a", "k", "", "blocks", b"bytes-key", "x" * 40])

    def nested(self, depth: int) -> Any:
        v: Any = self.rng.choice([1, "s", None])
        for _ in range(depth):
            v = [v] if self.rng.random() < 0.7 else {"k": v}
        return v

    def mutate_obj(self, obj: Any) -> Any:
        """Replace, delete or insert at a random place inside a decoded message."""
        r = self.rng
        if not isinstance(obj, list | dict) or r.random() < 0.15:
            return self.value()
        if isinstance(obj, dict):
            if not obj or r.random() < 0.3:
                obj[self.key()] = self.value()
            else:
                k = r.choice(list(obj))
                obj[k] = self.mutate_obj(obj[k])
            return obj
        op = r.randrange(6)
        if op == 0 and obj:
            del obj[r.randrange(len(obj))]
        elif op == 1:
            obj.insert(r.randrange(len(obj) + 1), self.value())
        elif op == 2:
            obj.append(self.value())
        elif op == 3 and obj:
            del obj[r.randrange(len(obj)):]
        elif obj:
            i = r.randrange(len(obj))
            obj[i] = self.mutate_obj(obj[i])
        return obj

    def structural(self) -> bytes:
        r = self.rng
        obj = msgpack.unpackb(r.choice(self.valid), raw=False)
        for _ in range(r.randrange(1, 4)):
            obj = self.mutate_obj(obj)
        if isinstance(obj, list) and obj and r.random() < 0.1:
            obj[0] = r.choice([0, 2, -1, 2**64 - 1, "1", None, 1.0])  # wrong version
        if isinstance(obj, list) and len(obj) > 1 and r.random() < 0.1:
            obj[1] = r.choice([0, 2, 13, 99, -1, 2**63, "10", None, True])  # wrong type id
        return msgpack.packb(obj, use_bin_type=True)

    def bytewise(self) -> bytes:
        r = self.rng
        b = bytearray(r.choice(self.valid))
        for _ in range(r.randrange(1, 5)):
            op = r.randrange(5)
            if op == 0 and b:
                b[r.randrange(len(b))] = r.randrange(256)
            elif op == 1:
                i = r.randrange(len(b) + 1)
                b[i:i] = r.randbytes(r.randrange(1, 8))
            elif op == 2 and b:
                i = r.randrange(len(b))
                del b[i:i + r.randrange(1, 8)]
            elif op == 3 and b:
                del b[r.randrange(len(b)):]  # truncated
            elif b:
                i = r.randrange(len(b))
                b[i:i] = b[i:i + r.randrange(1, 16)]  # duplicated run
        return bytes(b)

    def special(self) -> bytes:
        r = self.rng
        v = P.PROTOCOL_VERSION
        depth = r.choice([10, 100, 1000, 5000, 100000])
        return r.choice([
            b"",
            b"\x91" * depth + b"\xc0",  # arrays nested `depth` deep
            b"\x81\xa1k" * depth + b"\x01",  # maps nested `depth` deep
            bytes([0x93, v, 10]) + b"\x91" * depth + b"\x01",
            bytes([0x93, v, 10]) + b"\xdd\xff\xff\xff\xff",  # array32 claiming 4 G elements
            bytes([0x93, v, 11]) + b"\xdb\xff\xff\xff\xff" + b"a" * 10,  # str32 claiming 4 GB
            bytes([0x93, v, 11]) + b"\xc6\xff\xff\xff\xff",  # bin32 claiming 4 GB
            bytes([0x93, v, 11]) + b"\xdf\xff\xff\xff\xff",  # map32 claiming 4 G pairs
            bytes([0x93, v, 11, 0xcf]) + b"\xff" * 8,  # uint64 max where a str goes
            bytes([0x92, 0xcf]) + b"\xff" * 8 + b"\x0a",  # uint64 version
            bytes([0x93, v, 11, 0xc1]),  # reserved byte 0xc1
            bytes([0x93, v, 21, 0x91, 0x93, 0xa1, 0x31, 0x91, 0xcb]) + b"\x7f\xf8" + b"\x00" * 6 + b"\xc0",
            bytes([0x95, v, 32, 0x91]) + b"\x93\xa1x\x90\xc0" + b"\x01\x02",
            msgpack.packb([v, 10, "r", [1] * r.randrange(0, 5000), [1, 0.0, 1.0, None, [], False]]),
            msgpack.packb([v, 21, [["r", [2**64 - 1, -(2**63)], None]]]),
            msgpack.packb([v, 32, [["r", [1], None]] * r.randrange(1, 3000)]),
            msgpack.packb([v, 30, "w", "sim", "m", 2**63 - 1, 0, -1, "nixl", 0, -5, 2**63, "weird-pool"]),
            msgpack.packb({"version": v, "type": 10}),
            msgpack.packb([v]),
            msgpack.packb([[v, 10]]),
            msgpack.packb(list(range(10000))),
            msgpack.packb(r.randbytes(64)),
        ])

    def random_bytes(self) -> bytes:
        r = self.rng
        n = r.choice([r.randrange(0, 16), r.randrange(0, 256), r.randrange(0, 4096)])
        head = bytes([r.choice([0x90 + r.randrange(16), 0xdc, 0xdd, r.randrange(256)])])
        return head + r.randbytes(n)

    def frame(self) -> tuple[str, bytes]:
        k = self.rng.random()
        if k < 0.30:
            return "structural", self.structural()
        if k < 0.60:
            return "bytewise", self.bytewise()
        if k < 0.80:
            return "random", self.random_bytes()
        if k < 0.97:
            return "special", self.special()
        return "valid", self.rng.choice(self.valid)

    def frames(self, n: int) -> Iterator[tuple[str, bytes]]:
        for _ in range(n):
            yield self.frame()


def stage1(n: int, seed: int) -> int:
    gen = Gen(seed)
    kinds: Counter[str] = Counter()
    codes: Counter[str] = Counter()
    accepted = 0
    failures: list[str] = []
    calls = 0
    big = b"\x93\x01\x0a" + b"\x00" * (P.MAX_FRAME_BYTES + 1)  # oversized frames, checked a few times
    t0 = time.perf_counter()
    for i, (kind, frame) in enumerate(gen.frames(n)):
        if i % 50000 == 0:
            kind, frame = "oversized", big
        kinds[kind] += 1
        for name, allowed in ALLOWED.items():
            calls += 1
            try:
                P.decode(frame, allowed)
                accepted += 1
            except P.ProtocolError as exc:
                codes[exc.code] += 1
            except BaseException as exc:  # noqa: BLE001 - the point: nothing else may escape
                if isinstance(exc, KeyboardInterrupt):
                    raise
                failures.append(f"{name}: {type(exc).__name__}: {exc} on {frame[:80]!r}")
    dt = time.perf_counter() - t0
    print(f"stage 1: {n} inputs x {len(ALLOWED)} socket filters = {calls} decode calls in {dt:.1f} s "
          f"({calls / dt:,.0f}/s)")
    print(f"  inputs by kind: {dict(sorted(kinds.items()))}")
    print(f"  decoded: {accepted}; ProtocolError by code: {dict(sorted(codes.items()))}")
    print(f"  other exceptions: {len(failures)}")
    for f in failures[:20]:
        print("   ", f)
    return len(failures)


# ------------------------------------------------------------------------------------------- stage 2


def _malformed_messages(gen: Gen, n: int, worker_side: bool) -> Iterator[list[bytes]]:
    r = gen.rng
    for _ in range(n):
        k = r.random()
        if k < 0.15:  # wrong frame count: 2-5 frames, some empty
            yield [gen.frame()[1] if r.random() < 0.7 else b"" for _ in range(r.randrange(2, 6))]
        elif k < 0.20:
            yield [b""]
        elif worker_side and k < 0.30:  # hostile but well-formed worker messages from an unregistered id
            yield [r.choice(gen.valid)]
        else:
            yield [gen.frame()[1]]


async def _blast(addr: str, msgs: Iterator[list[bytes]], identity: bytes) -> tuple[int, int]:
    """Send every message (non-blocking, retrying on a full queue) and count replies; returns (sent, replies)."""
    ctx = zmq.Context.instance()
    sock = ctx.socket(zmq.DEALER)
    sock.setsockopt(zmq.IDENTITY, identity)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(addr)
    sent = replies = 0

    def drain() -> None:
        nonlocal replies
        while sock.poll(0):
            sock.recv_multipart()
            replies += 1

    try:
        for frames in msgs:
            while True:
                try:
                    sock.send_multipart(frames, zmq.NOBLOCK)
                    break
                except zmq.Again:
                    drain()
                    await asyncio.sleep(0.001)
            sent += 1
            if sent % 200 == 0:
                drain()
                await asyncio.sleep(0)
        deadline = time.monotonic() + 2.0
        while time.monotonic() < deadline:
            drain()
            await asyncio.sleep(0.05)
    finally:
        sock.close(0)
    return sent, replies


def stage2(n: int, seed: int) -> int:
    from dynaserve.client import DynaServeClient
    from dynaserve.cluster import ClusterConfig, LocalCluster
    from workers.engines.sim import reference_tokens

    cfg = ClusterConfig(workers=1, policy="dynaserve", transport="ipc", engine="sim", http_port=0)
    cluster = LocalCluster(cfg, broker_args=["--worker-timeout-ms", "1000"])
    cluster.start()
    failures = 0
    try:
        asyncio.run(cluster.wait_ready())
        gen = Gen(seed + 1)
        half = n // 2

        async def main() -> int:
            nonlocal gen
            t0 = time.perf_counter()
            per = half // 4
            jobs = [_blast(cluster.client_addr, _malformed_messages(gen, half - 3 * per if i == 0 else per, False),
                           f"fuzz-client-{i}".encode()) for i in range(4)]
            jobs += [_blast(cluster.worker_addr, _malformed_messages(gen, n - half - 3 * per if i == 0 else per,
                                                                     True), f"fuzz-{i}".encode()) for i in range(4)]
            results = await asyncio.gather(*jobs)
            dt = time.perf_counter() - t0
            c_sent = sum(s for s, _ in results[:4])
            w_sent = sum(s for s, _ in results[4:])
            c_rep = sum(rp for _, rp in results[:4])
            w_rep = sum(rp for _, rp in results[4:])
            print(f"stage 2: {c_sent + w_sent} malformed messages to a live broker in {dt:.1f} s: "
                  f"client socket {c_sent} (replies {c_rep}), worker socket {w_sent} (replies {w_rep})")
            await asyncio.sleep(2.5)  # bogus registrations time out (worker timeout 1 s)
            bad = 0
            async with DynaServeClient(cluster.client_addr) as c:
                st = await c.status(timeout=5.0)
                print(f"  broker after: instances {st.instances}, bad_frames {st.stats['bad_frames']}, "
                      f"rejected {st.stats['rejected']}")
                if st.instances != ["w0"]:
                    bad += 1
                    print("  FAIL: unexpected instances")
                for i in range(5):
                    prompt = [3 + (i * 7919 + j * 104729) % 31000 for j in range(30 + 10 * i)]
                    async with c.generate(prompt, max_tokens=16, ignore_eos=True) as stream:
                        toks = await asyncio.wait_for(stream.collect(), 30)
                    if toks != reference_tokens(prompt, 16):
                        bad += 1
                        print(f"  FAIL: request {i} returned wrong tokens")
            print(f"  normal requests after the fuzz: {5 - bad if bad <= 5 else 0}/5 correct")
            return bad

        failures += asyncio.run(main())
        cluster.check_alive()
        tracebacks = cluster.log("broker").count("handler failed")
        print(f"  broker handler exceptions in its log: {tracebacks}")
        failures += tracebacks
    except Exception as exc:  # noqa: BLE001 - report and fail
        print(f"  FAIL: {type(exc).__name__}: {exc}")
        failures += 1
    finally:
        cluster.stop()
    return failures


def main(argv: list[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--inputs", type=int, default=100_000, help="stage 1: generated frames")
    ap.add_argument("--live", type=int, default=20_000, help="stage 2: malformed messages to the live broker")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--stage", default="1,2", help="stages to run: 1, 2 or 1,2")
    ns = ap.parse_args(argv)
    stages: dict[str, Callable[[int, int], int]] = {"1": stage1, "2": stage2}
    counts = {"1": ns.inputs, "2": ns.live}
    failed = 0
    for s in ns.stage.split(","):
        failed += stages[s](counts[s], ns.seed)
    print("FAILED" if failed else "OK: only ProtocolError raised; broker served correctly afterwards")
    sys.exit(1 if failed else 0)


if __name__ == "__main__":
    main()

"""The client SDK's handling of connection-level error replies (no request id)."""

from __future__ import annotations

import asyncio

import pytest

from dynaserve import protocol as P
from dynaserve.client import DynaServeClient
from dynaserve.errors import DynaServeError


@pytest.mark.parametrize("code", ["forbidden", "protocol_version"])
def test_connection_refusal_fails_status_waiters_and_streams(code: str) -> None:
    async def main() -> None:
        client = DynaServeClient("ipc:///tmp/dynaserve-unit-client-errors")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        client._status_waiters["n"] = fut
        client._on_frames([P.encode(P.ErrorReply(code, "refused", None))])
        assert fut.done() and isinstance(fut.exception(), DynaServeError)
        assert client.connection_error is not None

    asyncio.run(main())


def test_request_errors_without_an_id_and_another_code_leave_waiters_alone() -> None:
    async def main() -> None:
        client = DynaServeClient("ipc:///tmp/dynaserve-unit-client-errors")
        fut: asyncio.Future = asyncio.get_running_loop().create_future()
        client._status_waiters["n"] = fut
        client._on_frames([P.encode(P.ErrorReply("invalid_request", "bad field", None))])
        assert not fut.done()
        fut.cancel()

    asyncio.run(main())

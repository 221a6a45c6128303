"""gateway/connection.py: the stalled-stream cut resets a real TCP connection (uvloop, as the gateway runs) and
drops what was queued for the client; where no server transport can be found it does nothing and says so."""

from __future__ import annotations

import asyncio
import errno
import socket
from typing import Any

import uvloop

from cocoon_faas.gateway.connection import RAW_SEND, abort_connection
from tests.sse_socket import server_end


class Cycle:
    """Stands where uvicorn's per-request cycle does: `send` is its bound method and it holds the transport."""

    def __init__(self, transport: Any) -> None:
        self.transport = transport

    async def send(self, message: Any) -> None:
        raise AssertionError("the cut sends nothing")


async def _cut(via_scope: bool) -> tuple[tuple[int, int] | None, tuple[int, int] | None, int]:
    lost = asyncio.Event()
    made: list[asyncio.Transport] = []

    class Flood(asyncio.Protocol):
        def connection_made(self, transport: Any) -> None:
            made.append(transport)
            transport.write(b"x" * 8_000_000)  # far more than both kernels' buffers: the rest waits in uvloop

        def connection_lost(self, exc: Exception | None) -> None:
            lost.set()

    server = await asyncio.get_running_loop().create_server(Flood, "127.0.0.1", 0)
    port = server.sockets[0].getsockname()[1]
    client = socket.socket()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 32 * 1024)
    client.setblocking(False)
    try:
        await asyncio.get_running_loop().sock_connect(client, ("127.0.0.1", port))
        while not made or (server_end(port, client) or (0, 0))[1] == 0:  # the server's send queue fills
            await asyncio.sleep(0.05)
        before = server_end(port, client)
        cycle = Cycle(made[0])

        async def wrapped(message: Any) -> None:  # a middleware's `send`: the raw one is in the scope
            await cycle.send(message)

        assert abort_connection({RAW_SEND: cycle.send} if via_scope else {}, wrapped if via_scope else cycle.send)
        await asyncio.wait_for(lost.wait(), 30)
        return before, server_end(port, client), client.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
    finally:
        client.close()
        server.close()


def test_the_cut_resets_the_connection_and_frees_its_kernel_buffers() -> None:
    for via_scope in (False, True):
        before, after, error = uvloop.run(_cut(via_scope))
        assert before is not None and before[1] > 0  # the kernel held bytes for a client that reads nothing
        assert after is None  # no socket left behind (a plain close or abort leaves one in FIN_WAIT1, queue and all)
        assert error == errno.ECONNRESET


def test_without_a_server_transport_nothing_happens() -> None:
    async def plain(message: Any) -> None:  # Starlette's TestClient, or another server's `send`
        pass

    class NoAbort:
        def get_extra_info(self, name: str) -> None:
            return None

    for send in (plain, Cycle(None).send, Cycle(NoAbort()).send):
        assert abort_connection({}, send) is False

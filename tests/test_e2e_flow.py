"""Stream flow control end to end: a real gateway, real Ray, the function in its sandbox, and a raw-socket client
that stops reading. The generator must wait for the client (not run to completion into the gateway's memory),
the gateway must hold at most its window for the stream, and the client must then get every item, in order."""

from __future__ import annotations

import errno
import socket
import time
import uuid
from pathlib import Path

import httpx
import pytest

from cocoon_faas.flow import chunk_cost
from cocoon_faas.ton.client import PayingClient
from tests.conftest import GatewayProc
from tests.sse_socket import SSESocket, kernel_send_buffer_max, produced, server_end, settled
from tests.test_e2e_payments import Caller, hold, ledger, ledger_call, summary

pytestmark = pytest.mark.e2e

WINDOW = 1024 * 1024  # COCOON_STREAM_WINDOW_BYTES's default, which the session gateway runs with
SIZE = 32 * 1024
N = 1500  # ~48 MiB if the generator ran to completion
FULL = WINDOW // chunk_cost(SIZE + 32)  # a paused generator has produced at least a window's worth
STALL = 20  # COCOON_STREAM_STALL_S of the session gateway (tests/conftest.py)
TCP_ESTABLISHED = 1  # a state in /proc/net/tcp
READ_AHEAD = 8 + 2  # the executor's queue of a plain generator, the item in the producer's hand, one being sent


def buffered(gw: GatewayProc) -> float:
    text = httpx.get(gw.url + "/metrics", timeout=30).text
    return float(next(line.split()[1] for line in text.splitlines()
                      if line.startswith("cocoon_stream_buffered_bytes ")))


def allowed_ahead(client: SSESocket) -> int:
    """Items the producer may be ahead of what the client has read: the gateway's window and one item, the SSE
    framing of what uvicorn and both kernels' socket buffers hold, and the replica's read-ahead."""
    item = chunk_cost(SIZE + 32)
    in_sockets = kernel_send_buffer_max() + client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF)
    uvicorn_buffer = 64 * 1024 + item
    return (WINDOW + item + in_sockets + uvicorn_buffer) // SIZE + 1 + READ_AHEAD


def test_a_client_that_stops_reading_pauses_the_generator_then_gets_every_item(gateway: GatewayProc) -> None:
    tag = uuid.uuid4().hex
    client = SSESocket(gateway.port, "/fn/flood", {"tag": tag, "n": N, "size": SIZE}, gateway.headers())
    try:
        first = client.events(3)
        assert client.status == 200 and [e[1]["i"] for e in first] == [0, 1, 2]
        ahead = settled(gateway, tag, FULL) - len(first)  # the client now reads nothing
        assert 0 < ahead <= allowed_ahead(client), (ahead, allowed_ahead(client))
        held = buffered(gateway)
        assert 0 < held <= WINDOW + chunk_cost(SIZE + 32)  # what the gateway process holds for this stream
        rest = client.events(N + 1)  # the client reads again: everything, in order, intact, then `end`
        items = [d for e, d in first + rest if e == "message"]
        assert [x["i"] for x in items] == list(range(N)) and all(len(x["pad"]) == SIZE for x in items)
        assert rest[-1][0] == "end" and rest[-1][1]["items"] == N
        assert produced(gateway, tag) == N
    finally:
        client.close()
    assert buffered(gateway) == 0


def paused_stream(gw: GatewayProc, tag: str, headers: dict[str, str] | None = None) -> tuple[SSESocket, int]:
    """A flood stream whose client read two items and then stopped; the producer's count once it paused."""
    client = SSESocket(gw.port, "/fn/flood", {"tag": tag, "n": N, "size": SIZE}, headers or gw.headers())
    try:
        assert len(client.events(2)) == 2
        stalled = settled(gw, tag, FULL)
        assert stalled < N
    except BaseException:
        client.close()
        raise
    return client, stalled


def wait_unbuffered(gw: GatewayProc, within: float) -> None:
    deadline = time.monotonic() + within
    while buffered(gw) > 0 and time.monotonic() < deadline:
        time.sleep(0.25)
    assert buffered(gw) == 0


def test_a_client_that_stops_reading_and_leaves_frees_the_stream(gateway: GatewayProc) -> None:
    tag = uuid.uuid4().hex
    client, stalled = paused_stream(gateway, tag)
    client.close()  # leaves with the stream paused
    wait_unbuffered(gateway, 30)
    assert settled(gateway, tag) == stalled  # the generator was stopped, not resumed into the void
    with httpx.Client(timeout=60) as c:  # the replica serves the next stream in full
        r = c.post(gateway.url + "/fn/flood", json={"tag": tag, "n": 3, "size": 10}, headers=gateway.headers())
        assert r.status_code == 200 and r.text.count("data: ") == 4


def test_a_paid_client_that_never_reads_again_is_cut_its_connection_reset_and_its_hold_released(
        gateway: GatewayProc, tmp_path: Path) -> None:
    """Flow control pauses the generator; COCOON_STREAM_STALL_S then ends the call (well before the function's
    120 s time limit), so a client that holds its connection open without reading holds neither the replica nor
    its money, nor the connection: the gateway resets it, dropping what uvicorn and the kernel had queued for it."""
    caller = Caller(tmp_path / "caller", gateway)
    caller.cli("wallet", "create")
    caller.cli("wallet", "faucet", "10")
    caller.cli("channel", "open", "--deposit", "5")
    payer = PayingClient(caller.signer())
    headers, ticket = payer.headers(hold(gateway, "flood"))
    tag = uuid.uuid4().hex
    client, stalled = paused_stream(gateway, tag, headers)
    try:
        call_id = client.headers["x-cocoon-call-id"]
        end = server_end(gateway.port, client.sock)
        assert end is not None and end[0] == TCP_ESTABLISHED and end[1] > 0  # the kernel holds bytes for it
        assert ledger_call(gateway, call_id)["status"] == "held"
        deadline = time.monotonic() + STALL + 60  # < the 120 s time limit: without the cut this runs out
        while ledger_call(gateway, call_id)["status"] == "held" and time.monotonic() < deadline:
            time.sleep(0.5)
        payer.settle(ticket, None)
        row = ledger_call(gateway, call_id)
        assert row["status"] == "released" and row["charged"] == 0  # released once, at the cut
        assert summary(gateway, payer.signer.channel_id)["reserved"] == 0
        assert ledger(gateway, verify=True)["verify"]["ok"]
        wait_unbuffered(gateway, 30)
        assert settled(gateway, tag) == stalled  # the generator was stopped, not resumed
        # the gateway's socket for this client is gone from the kernel (reset, nothing queued left behind), not
        # a graceful close still waiting for the client to read what uvicorn and the kernel buffered
        assert server_end(gateway.port, client.sock) is None
        assert client.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR) == errno.ECONNRESET
    finally:
        client.close()

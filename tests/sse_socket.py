"""A raw-socket SSE client for flow-control tests: it reads only when told to, through a small receive buffer,
so the test knows exactly how much of a stream the client has taken (tests/test_e2e_flow.py)."""

from __future__ import annotations

import json
import socket
import time
from pathlib import Path
from typing import Any

import httpx

from tests.conftest import GatewayProc

RCVBUF = 32 * 1024


class SSESocket:
    """POST a streaming call over a plain socket; `events(k)` reads until k more events are complete."""

    def __init__(self, port: int, path: str, body: dict[str, Any], headers: dict[str, str] | None = None) -> None:
        self.sock = socket.socket()
        self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, RCVBUF)  # before connect: no autotuning
        self.sock.connect(("127.0.0.1", port))
        self.sock.settimeout(60)
        data = json.dumps(body).encode()
        head = "".join(f"{k}: {v}\r\n" for k, v in (headers or {}).items())
        self.sock.sendall(f"POST {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Type: application/json\r\n"
                          f"Content-Length: {len(data)}\r\n{head}\r\n".encode() + data)
        self._raw = bytearray()
        self._body = bytearray()
        self.status = 0
        self.headers: dict[str, str] = {}
        self.done = False
        self.bytes_read = 0

    def _recv(self) -> None:
        got = self.sock.recv(65536)
        if not got:
            raise ConnectionError("the gateway closed the connection")
        self.bytes_read += len(got)
        self._raw += got

    def _parse(self) -> None:
        if not self.status:
            end = self._raw.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = self._raw[:end].decode().split("\r\n")
            self.status = int(lines[0].split()[1])
            self.headers = {k.lower(): v.strip() for k, v in (x.split(":", 1) for x in lines[1:])}
            del self._raw[:end + 4]
        while not self.done:  # chunked transfer encoding
            eol = self._raw.find(b"\r\n")
            if eol < 0:
                return
            size = int(self._raw[:eol], 16)
            if len(self._raw) < eol + 2 + size + 2:
                return
            self._body += self._raw[eol + 2:eol + 2 + size]
            del self._raw[:eol + 2 + size + 2]
            self.done = size == 0

    def events(self, k: int) -> list[tuple[str, Any]]:
        """The next k events (fewer if the stream ends), each (event name, parsed data)."""
        out: list[tuple[str, Any]] = []
        while len(out) < k:
            self._parse()
            end = self._body.find(b"\n\n")
            if end >= 0:
                block = bytes(self._body[:end]).decode()
                del self._body[:end + 2]
                event, data = "message", None
                for line in block.split("\n"):
                    if line.startswith("event:"):
                        event = line[6:].strip()
                    elif line.startswith("data:"):
                        data = json.loads(line[5:].strip())
                out.append((event, data))
                continue
            if self.done:
                break
            self._recv()
        return out

    def close(self) -> None:
        self.sock.close()


def kernel_send_buffer_max() -> int:
    """The most a TCP socket's send buffer may grow to here (tcp_wmem's max): bytes the gateway's kernel may
    hold for a client that stopped reading, beyond anything the gateway process itself holds."""
    try:
        return int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, IndexError, ValueError):
        return 4 * 1024 * 1024


def server_end(port: int, client: socket.socket) -> tuple[int, int] | None:
    """The server's end of `client`'s connection in the kernel's socket table (Linux /proc/net/tcp, loopback IPv4):
    (TCP state, bytes in its send queue), or None once that socket is gone."""
    mine = client.getsockname()[1]
    for line in Path("/proc/net/tcp").read_text().splitlines()[1:]:
        f = line.split()
        if int(f[1].split(":")[1], 16) == port and int(f[2].split(":")[1], 16) == mine:
            return int(f[3], 16), int(f[4].split(":")[0], 16)
    return None


def produced(gw: GatewayProc, tag: str) -> int:
    """How many items the generator of stream `tag` has yielded (a concurrent call on the same replica)."""
    with httpx.Client(timeout=60) as c, c.stream("POST", gw.url + "/fn/flood", json={"tag": tag, "probe": True},
                                                  headers=gw.headers()) as r:
        assert r.status_code == 200, r.read()
        for line in r.iter_lines():
            if line.startswith("data: "):
                return int(line.split('"produced":')[1].rstrip("}"))
    raise AssertionError("the probe answered no item")


def settled(gw: GatewayProc, tag: str, at_least: int = 0) -> int:
    """The producer's count once it stops moving (the generator is waiting for credit, or done). `at_least`: a
    count below it is not a pause yet (a generator waits only once it has filled the window), so a producer merely
    slowed by a busy machine is not mistaken for a paused one."""
    last, stable = produced(gw, tag), 0
    while stable < 4 or last < at_least:
        time.sleep(0.25)
        now = produced(gw, tag)
        stable = stable + 1 if now == last else 0
        last = now
    return last

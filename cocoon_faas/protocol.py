"""The gateway↔replica data path: length-prefixed frames multiplexed over one persistent TCP connection.

Ray places and supervises replicas, but a Ray task round trip per call costs more than the whole call budget, so
calls travel over a direct connection the gateway keeps open to each replica (Ray Serve's "direct ingress" idea).
Many calls share one connection; each frame names its call.

Frame (big-endian)::

    u32 length      bytes after this field: 13 + len(meta) + len(body)
    u64 call        call number, chosen by the gateway, unique per connection
    u8  type        CALL, CANCEL, RESULT, ERROR, CHUNK, END, PING, PONG, HELLO, UNLOCK, GRANT, LOAD, READY, STATS,
                    CREDIT
    u32 meta_len    length of meta
    meta            small JSON object (routing facts: timeout, kind, exec time, error type)
    body            opaque bytes: JSON arguments/results, or a sealed envelope the gateway cannot read

The gateway never parses `body` of a confidential call and never unpickles anything. What a replica sends is
untrusted: the gateway hands `meta` bytes to a strict decoder (`gateway/replica_wire.py`) instead of `json.loads`.

Control frames: HELLO opens every gateway connection (body: the per-replica secret given at actor creation; the
replica answers HELLO, or closes the connection); UNLOCK (body: a code-key grant) and GRANT (body: a peer's
attestation document) replace Ray method calls whose results the gateway would have had to unpickle. LOAD and
READY run between a replica actor and its sandboxed child only (docs/security.md). STATS (call 0, unsolicited,
meta: a `replica_context.LoadReport`) carries an engine's load: child -> actor -> every gateway connection.
CREDIT (body: u64 bytes) flows against a stream's CHUNKs, from the receiving end to the sending one: the
stream window of `cocoon_faas/flow.py`.
"""

from __future__ import annotations

import asyncio
import json
import re
import struct
from collections.abc import Callable
from typing import Any

HEADER = struct.Struct("!IQBI")
MAX_FRAME = 256 * 1024 * 1024
MAX_META = 1024 * 1024  # meta is routing facts and bounded logs; anything bigger is a broken or hostile peer
# What a replica's answer may carry, shared by the sandbox child (which shapes its frames to it), the actor's link
# (which reduces the child's frames to it) and the gateway (gateway/replica_wire.py, which refuses anything else)
MAX_LOG_LINES = 1024
NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_.:-]{0,127}$")  # an error type or exception class name
HANDOFF = struct.Struct("!Q")  # actor -> child hand-off message: the call number of the HELLO the child answers

CALL, CANCEL, RESULT, ERROR, CHUNK, END, PING, PONG, HELLO, UNLOCK, GRANT, LOAD, READY, STATS, CREDIT = range(1, 16)
TYPE_NAMES = {CALL: "CALL", CANCEL: "CANCEL", RESULT: "RESULT", ERROR: "ERROR", CHUNK: "CHUNK", END: "END",
              PING: "PING", PONG: "PONG", HELLO: "HELLO", UNLOCK: "UNLOCK", GRANT: "GRANT", LOAD: "LOAD",
              READY: "READY", STATS: "STATS", CREDIT: "CREDIT"}

_EMPTY_META = b"{}"


def encode(call: int, ftype: int, meta: dict[str, Any] | None = None, body: bytes = b"") -> bytes:
    m = json.dumps(meta, separators=(",", ":")).encode() if meta else _EMPTY_META
    return HEADER.pack(HEADER.size - 4 + len(m) + len(body), call, ftype, len(m)) + m + body


def json_meta(ftype: int, raw: bytes) -> Any:
    """The default meta decoder, for peers that trust each other's meta (a replica reading its gateway)."""
    return json.loads(raw) if len(raw) > 2 else {}


class FrameTooLarge(ValueError):
    """Raised (to the connection's loss callback) when a peer sends a frame over the receiver's limit."""

    def __init__(self, length: int, limit: int) -> None:
        super().__init__(f"bad frame: {length} bytes, over the {limit}-byte limit")
        self.length, self.limit = length, limit


class FrameProtocol(asyncio.Protocol):
    """Splits a byte stream into frames and hands each to `on_frame(call, type, meta, body)`.

    `decode_meta(type, raw)` turns meta bytes into the value handed on; it raises ValueError for meta it refuses,
    which closes the connection (the gateway passes its strict decoder for replica frames)."""

    def __init__(
        self,
        on_frame: Callable[[int, int, Any, bytes], None],
        on_lost: Callable[[Exception | None], None] | None = None,
        decode_meta: Callable[[int, bytes], Any] = json_meta,
        max_frame: int = MAX_FRAME,
    ) -> None:
        self._max_frame = max_frame
        self._on_frame = on_frame
        self._on_lost = on_lost
        self._decode = decode_meta
        self._buf = bytearray()
        self._out: list[bytes] = []
        self._wrote = False  # send_now wrote a frame in this loop pass
        self.transport: asyncio.Transport | None = None
        self.closed = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        sock = transport.get_extra_info("socket")
        if sock is not None:
            import socket

            try:
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            except OSError:
                pass

    def data_received(self, data: bytes) -> None:
        # Frames usually arrive whole: they are then cut from `data` itself (one copy of each body) instead of
        # appended to the buffer, sliced out of it and moved down (three); only a partial frame is buffered.
        held = self._buf
        if held:
            held += data
            buf: bytes | bytearray = held
        else:
            buf = data
        hsize = HEADER.size
        pos = 0
        n = len(buf)
        with memoryview(buf) as view:
            while n - pos >= hsize:
                length, call, ftype, mlen = HEADER.unpack_from(buf, pos)
                if length > self._max_frame and mlen <= MAX_META:  # a result too big, not a broken peer
                    self._fail(FrameTooLarge(length, self._max_frame))
                    return
                if length > self._max_frame or mlen > MAX_META or mlen > length - (hsize - 4):
                    self._fail(ValueError(f"bad frame: length {length}, meta {mlen}"))
                    return
                end = pos + 4 + length
                if end > n:
                    break
                mstart = pos + hsize
                try:
                    meta = self._decode(ftype, bytes(view[mstart:mstart + mlen]))
                except (ValueError, RecursionError) as exc:  # JSONDecodeError is a ValueError
                    self._fail(ValueError(f"bad frame meta ({TYPE_NAMES.get(ftype, ftype)}): {exc}"))
                    return
                body = bytes(view[mstart + mlen:end])
                pos = end
                self._on_frame(call, ftype, meta, body)
                if self.closed:
                    return
        if held:
            if pos:
                del held[:pos]
        elif pos < n:
            held += data[pos:] if pos else data

    def send(self, data: bytes) -> None:
        """Queue a frame; frames queued in one loop pass go out in one write (one syscall under load)."""
        if self.transport is None or self.closed:
            raise ConnectionError("replica connection is closed")
        if not self._out:
            asyncio.get_running_loop().call_soon(self._flush)
        self._out.append(data)

    def send_now(self, data: bytes) -> None:
        """Write the first frame of a loop pass at once, and batch the rest of that pass into one write: for a
        local socket pair, where one loop pass of latency per hop costs more than a syscall (the sandbox relay)
        when calls come one by one, and a syscall per frame costs throughput when many come together."""
        if self.transport is None or self.closed:
            raise ConnectionError("connection is closed")
        if self._out:  # keep order behind frames already queued in this pass
            self._out.append(data)
        elif self._wrote:
            self._out.append(data)
            asyncio.get_running_loop().call_soon(self._flush)
        else:
            self.transport.write(data)
            self._wrote = True
            asyncio.get_running_loop().call_soon(self._next_pass)

    def _next_pass(self) -> None:
        self._wrote = False

    def _flush(self) -> None:
        out, self._out = self._out, []
        if self.transport is not None and not self.closed and out:
            self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def _fail(self, exc: Exception) -> None:
        self._buf = bytearray()  # not cleared in place: `data_received` may still hold a view of it
        if self.transport is not None:
            self.transport.close()
        self.connection_lost(exc)

    def abort(self, reason: str) -> None:
        """Drop the connection now (a peer that broke the protocol or failed authentication)."""
        self._fail(ConnectionError(reason))

    def connection_lost(self, exc: Exception | None) -> None:
        if self.closed:
            return
        self.closed = True
        if self._on_lost is not None:
            self._on_lost(exc)


def dump_result(value: Any) -> bytes:
    """A function's result or streamed item as the JSON body of a RESULT/CHUNK frame (no NaN or infinity)."""
    try:
        return json.dumps(value, separators=(",", ":"), allow_nan=False).encode()
    except (TypeError, ValueError) as exc:
        raise TypeError(
            f"the function returned a value that is not JSON-serializable ({exc}); return dicts, lists, "
            "strings, numbers, booleans or None"
        ) from None

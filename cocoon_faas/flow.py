"""Stream flow control: a credit window per streamed call, with the same rules at both ends of each hop.

A stream's items travel child (user generator, in the sandbox) -> replica actor -> gateway -> client. Without
push-back a client that reads slowly makes every hop before it buffer what the generator yields, without bound.
Each hop that carries a stream (gateway<->replica over TCP, actor<->child over the sandbox socket) therefore runs
a byte window, like HTTP/2's per-stream flow control:

* the receiver announces the window ``W`` in the CALL meta (``"w"``); the gateway's comes from
  COCOON_STREAM_WINDOW_BYTES, and the actor hands the child the same ``W``;
* every CHUNK costs ``len(body) + CHUNK_OVERHEAD`` (the overhead stands for what an item costs a receiver beyond
  its bytes, so a flood of tiny items is bounded too);
* the sender may send a CHUNK only while what it sent and was not yet credited (``outstanding``) is below ``W``:
  so at most ``W`` plus one item is ever in flight or queued at the receiver, whatever the function yields;
* the receiver credits bytes back (a CREDIT frame, body: u64 big-endian) as its consumer takes items, in batches
  of at least ``W/2``; a blocked sender has ``outstanding >= W``, so once everything is consumed a credit is due
  and the stream cannot deadlock.

Both ends check the other: a CHUNK beyond the window, or a credit that is not a positive u64 or that returns more
than was sent and not yet credited, is a protocol violation (`FlowError`), never clamped or trusted. The gateway
drops a replica that overruns its window; a replica drops a gateway connection that sends a bad credit; the actor
fails a call whose sandbox overruns. END, RESULT and ERROR frames are not counted (one per call).
"""

from __future__ import annotations

import asyncio
import struct
from typing import Any

CHUNK_OVERHEAD = 512
MIN_WINDOW = 1
MAX_WINDOW = 1 << 40  # far above any sane setting; a hostile "w" cannot mean "unbounded"
MAX_CREDIT = 1 << 48  # one credit returns at most a window plus one item
_U64 = struct.Struct("!Q")


class FlowError(ValueError):
    """Raised when a peer breaks the stream window: a CHUNK beyond it, or a malformed or excessive credit."""


def chunk_cost(body_len: int) -> int:
    """What one streamed item counts against the window."""
    return body_len + CHUNK_OVERHEAD


def credit_body(n: int) -> bytes:
    return _U64.pack(n)


def decode_credit(body: bytes) -> int:
    """A CREDIT frame's body: exactly 8 bytes, a positive count no larger than MAX_CREDIT."""
    if len(body) != _U64.size:
        raise FlowError(f"a CREDIT frame's body is 8 bytes (u64 big-endian), got {len(body)}")
    (n,) = _U64.unpack(body)
    if not 1 <= n <= MAX_CREDIT:
        raise FlowError(f"a credit must be between 1 and {MAX_CREDIT} bytes, got {n}")
    return n


def window_of(meta: dict[str, Any]) -> Window | None:
    """The window a CALL's meta announces (``"w"``), or None when it announces none (not a stream, or a peer
    without flow control: then nothing is sent back and the sender never waits)."""
    w = meta.get("w")
    if w is None:
        return None
    if isinstance(w, bool) or not isinstance(w, int) or not MIN_WINDOW <= w <= MAX_WINDOW:
        raise FlowError(f"a stream window (\"w\") must be an integer between {MIN_WINDOW} and {MAX_WINDOW}, "
                        f"got {w!r}")
    return Window(w)


class Window:
    """One call's window on one hop. A sender calls `sent` per CHUNK, `granted` per CREDIT it receives and
    awaits `room()` when `open` is false; a receiver calls `received` per CHUNK and `consumed` when its consumer
    took an item (a non-zero answer is the credit to send back)."""

    __slots__ = ("window", "outstanding", "pending_credit", "_waiter")

    def __init__(self, window: int) -> None:
        self.window = window
        self.outstanding = 0  # bytes sent/received and not yet credited
        self.pending_credit = 0  # receiver: bytes consumed and not yet credited back
        self._waiter: asyncio.Future[None] | None = None

    @property
    def open(self) -> bool:
        return self.outstanding < self.window

    # -- sender ----------------------------------------------------------------------------------------------
    def sent(self, body_len: int) -> None:
        self.outstanding += chunk_cost(body_len)

    def granted(self, credit: int) -> None:
        """Apply a decoded credit; a credit for more than is outstanding is refused (the peer cannot have
        consumed bytes it never got)."""
        if credit > self.outstanding:
            raise FlowError(f"a credit of {credit} bytes exceeds the {self.outstanding} bytes sent and not yet "
                            "credited")
        self.outstanding -= credit
        w = self._waiter
        if w is not None and self.open and not w.done():
            w.set_result(None)

    async def pace(self, body_len: int, timeout: float) -> None:
        """Count a CHUNK just sent; when that spent the window, wait for credit (the reader taking items).
        Raises asyncio.TimeoutError after `timeout` seconds: the call's time limit covers waiting too."""
        self.sent(body_len)
        if not self.open:
            await asyncio.wait_for(self.room(), max(timeout, 0.001))

    async def room(self) -> None:
        """Wait until the window is open again (a credit arrived)."""
        while not self.open:
            self._waiter = asyncio.get_running_loop().create_future()
            try:
                await self._waiter
            finally:
                self._waiter = None

    # -- receiver --------------------------------------------------------------------------------------------
    def received(self, body_len: int) -> None:
        """Count an arriving CHUNK; raises FlowError when the sender had no window left for it."""
        if self.outstanding >= self.window:
            raise FlowError(f"a stream item arrived beyond the window ({self.outstanding} bytes outstanding, "
                            f"window {self.window})")
        self.outstanding += chunk_cost(body_len)

    def consumed(self, body_len: int) -> int:
        """The consumer took an item: the credit to send back now (0: keep batching)."""
        self.pending_credit += chunk_cost(body_len)
        if self.pending_credit < max(1, self.window // 2):
            return 0
        credit, self.pending_credit = self.pending_credit, 0
        self.outstanding -= credit
        return credit

    @property
    def buffered(self) -> int:
        """Receiver: bytes received and not yet taken by the consumer."""
        return self.outstanding - self.pending_credit


__all__ = ["CHUNK_OVERHEAD", "FlowError", "Window", "chunk_cost", "credit_body", "decode_credit", "window_of"]

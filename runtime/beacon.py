"""A sandbox child's liveness page, shared with its actor: who ends a child whose every thread is stuck.

The child's `Watchdog` (runtime/executor.py) is a thread: it ends the process when a call runs on past its end plus
the interrupt grace. A thread needs the GIL, and one C call that holds the GIL throughout (a `ctypes.PyDLL`
function, a C extension that never releases it, a catastrophic regular expression) stops every thread of the
child, its watchdog included. So the watchdog also writes, on a page of memory the actor mapped too (a memfd the
actor created and passed down, never a file on the node's disk):

* `beat`: the monotonic time of its last tick (it ticks every half second or faster while calls are watched);
* `due`: the earliest time the child would end itself, the least over watched calls of `stop_by + grace`
  (0 when no call is watched). A call's own start writes it at once when it is the new least, so a call that
  enters such a C call on its first instruction is covered.

The actor (runtime/sandbox_link.py) reads the page every second and kills the child when both are stale: `due`
has passed by `MARGIN_S` and no tick has come for `MARGIN_S`, on two reads in a row. A healthy child has ended
itself by then (its watchdog fires within a tick of `due`); a stuck one cannot. CLOCK_MONOTONIC is the same
clock on both sides (the sandbox has no time namespace).

The page holds numbers the child writes, and the child runs tenant code: it can write anything there. All it can
achieve is its own end (a `due` in the past with no beat) or postponing it (a `beat` kept fresh): the latter is
no worse than a child that keeps its watchdog thread alive while ignoring interrupts, which the watchdog
already catches, since tenant code holding the GIL cannot write the page either.
"""

from __future__ import annotations

import mmap
import os
import struct
import time

SIZE = 16
_LAYOUT = struct.Struct("=dd")  # beat, due: two naturally aligned float64 (single stores on x86-64 and arm64)
_DUE = struct.Struct("=d")
MARGIN_S = 2.0  # past `due`, and since the last beat, before the actor ends a child that cannot end itself


class Beacon:
    """One mapping of the page: the child writes it, the actor reads it."""

    __slots__ = ("fd", "_map", "_stale_reads")

    def __init__(self, fd: int) -> None:
        self.fd = fd
        self._map = mmap.mmap(fd, SIZE)
        self._stale_reads = 0

    @classmethod
    def create(cls) -> Beacon:
        """The actor's side: a new anonymous page (no file on disk), to pass to the child as `fd`."""
        fd = os.memfd_create("cocoon-beacon")  # close-on-exec: Popen(pass_fds=) hands it to the child only
        os.ftruncate(fd, SIZE)
        return cls(fd)

    # -- the child's side ------------------------------------------------------------------------------------
    def tick(self, due: float) -> None:
        if not self._map.closed:
            _LAYOUT.pack_into(self._map, 0, time.monotonic(), due)

    def set_due(self, due: float) -> None:
        if not self._map.closed:
            _DUE.pack_into(self._map, 8, due)

    # -- the actor's side ------------------------------------------------------------------------------------
    def read(self) -> tuple[float, float]:
        """(beat, due); (0, 0) once closed."""
        if self._map.closed:
            return 0.0, 0.0
        beat, due = _LAYOUT.unpack_from(self._map, 0)
        return beat, due

    def stuck(self, now: float) -> bool:
        """Whether the child is past its own end with no thread able to end it: true on the second read in a row
        that finds `due` passed by MARGIN_S and no beat for MARGIN_S (one read could see a half-written page)."""
        beat, due = self.read()
        if 0.0 < due < now - MARGIN_S and beat < now - MARGIN_S:
            self._stale_reads += 1
        else:
            self._stale_reads = 0
        return self._stale_reads >= 2

    def close(self) -> None:
        try:
            self._map.close()
        except (BufferError, ValueError):
            pass
        try:
            os.close(self.fd)
        except OSError:
            pass


__all__ = ["MARGIN_S", "SIZE", "Beacon"]

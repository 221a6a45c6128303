"""Functions that exercise the platform's edges in the end-to-end tests."""

import asyncio
import os
import socket
import time
import uuid
from pathlib import Path

import cocoon_faas as cocoon


@cocoon.function(cpu=0.25, timeout=1, max_concurrency=2)
def too_slow(seconds: float = 5.0) -> dict:
    end = time.monotonic() + seconds
    while time.monotonic() < end:  # a Python loop, so an interrupt lands at once
        time.sleep(0.01)
    return {"done": True}


@cocoon.function(cpu=0.25, timeout=60, max_concurrency=1, max_replicas=1)
def busy(seconds: float, marker: str = "", check: str = "") -> dict:
    """Loops in Python; writes /tmp/`marker` when it finishes (the sandbox's own /tmp: one replica), so a later
    call with `check` tells an interrupted call from a done one."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        time.sleep(0.01)
    if marker:
        Path("/tmp", marker).write_text("finished")
    return {"slept": seconds, "found": bool(check) and Path("/tmp", check).exists()}


@cocoon.function(cpu=0.25, timeout=30, retries=2, max_concurrency=4, min_replicas=2, max_replicas=2, network=True)
def crash_once(port: int) -> dict:
    """Kills its own process the first time; the retry on another replica succeeds. Replicas share no files, so
    a loopback server of the test (reachable: network=True) remembers which replica asked first."""
    me = Path("/tmp/replica-id")
    if not me.exists():
        me.write_text(uuid.uuid4().hex)
    ident = me.read_text()
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(ident.encode() + b"\n")
        first = s.makefile().readline().strip()
    if first == ident:
        os._exit(1)
    return {"id": ident, "first_id": first}


@cocoon.function(cpu=0.25, timeout=30, max_concurrency=2)
def slow_stream(n: int = 3, gap: float = 0.6):
    for i in range(n):
        yield {"i": i, "t": time.time()}
        time.sleep(gap)


@cocoon.function(gpu="H100", cpu=0.25, timeout=5)
def needs_h100() -> str:
    return "never runs on a CPU cluster"


@cocoon.function(cpu=0.25, timeout=10, max_concurrency=16)
def echo(data: str = "", n: int = 0) -> dict:
    return {"len": len(data), "n": n}


@cocoon.function(cpu=0.25, timeout=30, max_concurrency=1, min_replicas=0, max_replicas=3)
def scalable(seconds: float = 0.5) -> str:
    """Returns an id of the replica that ran it (its pid is 2 in every sandbox: each has its own PID namespace)."""
    time.sleep(seconds)
    me = Path("/tmp/replica-id")
    if not me.exists():
        me.write_text(uuid.uuid4().hex)
    return me.read_text()


_PRODUCED: dict[str, int] = {}


@cocoon.function(cpu=0.25, timeout=120, max_concurrency=4, max_replicas=1)
def flood(tag: str, n: int = 0, size: int = 32768, probe: bool = False):
    """Yields `n` items of `size` bytes as fast as it can, counting under `tag` how many it produced; a call with
    `probe` (same replica: max_replicas=1, and concurrent) yields that count, so a test sees how far the
    generator ran ahead of a client that stopped reading."""
    if probe:
        yield {"produced": _PRODUCED.get(tag, 0)}
        return
    for i in range(n):
        _PRODUCED[tag] = i + 1
        yield {"i": i, "pad": "x" * size}


_PROCESS: dict[str, str] = {}  # empty in each process that loads the function (cloudpickle copies it by value)


# The session gateway runs every app here plus examples/hello.py on COCOON_RAY_NUM_CPUS=8 and must keep room for
# tests/test_e2e_openai.py's Chat (cpu=1): the four stubborn variants, which only sleep, ask for 0.1 each.
@cocoon.function(cpu=0.1, timeout=2, max_concurrency=2, max_replicas=1)
def stubborn(hang: bool = False) -> dict:
    """With `hang`, ignores its time limit's interrupt (catches everything, forever): the platform must still end
    it by replacing the process. Without, says which process answered."""
    while hang:
        try:
            try:
                while True:
                    time.sleep(0.05)
            except BaseException:  # noqa: BLE001 - the point: a function that swallows the interrupt
                pass
        except BaseException:  # noqa: BLE001
            pass
    return {"boot": _PROCESS.setdefault("boot", uuid.uuid4().hex)}


async def _stuck_async(mode: str) -> dict:
    if mode == "swallow":  # catches its cancellation (time limit, cancel) and goes on, forever
        while True:
            try:
                await asyncio.sleep(0.05)
            except BaseException:  # noqa: BLE001 - the point
                pass
    while mode == "block":  # blocks the event loop: no timer of the process runs, no frame is read
        time.sleep(0.05)
    return {"boot": _PROCESS.setdefault("boot", uuid.uuid4().hex)}


@cocoon.function(cpu=0.1, timeout=2, max_concurrency=2, max_replicas=1)
async def stubborn_swallow(hang: bool = False) -> dict:
    """`stubborn` as an async function that swallows its CancelledError (with `hang`)."""
    return await _stuck_async("swallow" if hang else "")


@cocoon.function(cpu=0.1, timeout=2, max_concurrency=2, max_replicas=1)
async def stubborn_block(hang: bool = False) -> dict:
    """`stubborn` as an async function that blocks its event loop with `time.sleep` (with `hang`)."""
    return await _stuck_async("block" if hang else "")


@cocoon.function(cpu=0.1, timeout=2, max_concurrency=2, max_replicas=1)
def stubborn_gil(hang: bool = False) -> dict:
    """`stubborn` in one C call that holds the GIL (with `hang`): no thread of its process runs, the watchdog's
    included, so only the actor, from outside, can end it."""
    if hang:
        import ctypes

        ctypes.PyDLL(None).sleep(3600)  # PyDLL keeps the GIL for the whole call
    return {"boot": _PROCESS.setdefault("boot", uuid.uuid4().hex)}

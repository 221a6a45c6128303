"""What a replica's runtime tells the function's code about the current call, and the load the code reports back.

Inside a replica (the sandboxed child, or the actor itself with COCOON_SANDBOX=off) the runtime sets, for each
call, `caller_tag()`: an opaque tag of who made the call (the gateway's keyed hash of the developer behind the API
key or of the paying channel, per function; never the key or the channel itself), and once, the function's
`max_concurrency`. Code that serves many calls at once, such as `cocoon_faas.llm.Engine`, registers itself as a
load source; the runtime polls `current_load()` (`watch`) and sends a changed `LoadReport` towards the gateway's
autoscaler: the child to its actor, which reduces it (`LoadReport.reduce`) and forwards it to every gateway
connection, where `gateway/replica_wire.py` decodes it strictly. All of it is tenant-controlled: docs/security.md
("The LLM engine") says what a lying report can and cannot do.

Pure Python, no torch: the runtime imports this before any tenant code.
"""

from __future__ import annotations

import asyncio
import weakref
from collections.abc import Callable
from contextvars import ContextVar, Token
from dataclasses import dataclass, fields
from typing import Any, Protocol

MAX_COUNT = 1_000_000  # no engine queues or holds more; larger numbers are clamped, not trusted
MAX_CALLER_TAG = 64
WATCH_INTERVAL_S = 0.25

_caller: ContextVar[str] = ContextVar("cocoon_caller", default="")
_max_concurrency = 0


@dataclass(frozen=True)
class LoadReport:
    """An engine's load: requests queued in it, sequences in its batch (of `max_seqs`), KV-cache blocks in the
    pool and how many are held or promised to admitted sequences (`kv_used`; cached prefixes that can be evicted
    do not count), and its queue's bound (`max_waiting`). Several engines in one replica report their sum."""

    waiting: int = 0
    running: int = 0
    max_seqs: int = 1
    kv_blocks: int = 0
    kv_used: int = 0
    max_waiting: int = 0

    @property
    def kv_occupancy(self) -> float:
        return min(1.0, self.kv_used / self.kv_blocks) if self.kv_blocks else 0.0

    @property
    def saturated(self) -> bool:
        """Requests wait in the engine: it admits whenever the KV pool and the batch allow, so its pool (or batch)
        cannot take the next one, and a call sent there now would queue behind them."""
        return self.waiting > 0

    def utilization(self) -> float:
        """The replica's load in replicas' worth. Not saturated: the fuller of its batch and its KV pool. Saturated:
        one (full) plus its queue counted in batches of what it runs now (when long requests fill the KV pool,
        a replica holds few at a time, and so does the next one)."""
        if not self.saturated:
            return max(self.running / max(self.max_seqs, 1), self.kv_occupancy)
        return 1.0 + self.waiting / max(self.running, 1)

    def to_json(self) -> dict[str, int]:
        return {f.name: getattr(self, f.name) for f in fields(self)}

    def __add__(self, other: LoadReport) -> LoadReport:
        return LoadReport(*(min(MAX_COUNT, getattr(self, f.name) + getattr(other, f.name)) for f in fields(self)))

    @classmethod
    def clamped(cls, counts: dict[str, int]) -> LoadReport:
        """From integers (missing ones 0) put in range: counts in [0, MAX_COUNT], `kv_used` at most `kv_blocks`,
        `running` at most `max_seqs` (at least 1)."""
        d = {f.name: max(0, min(MAX_COUNT, counts.get(f.name, 0))) for f in fields(cls)}
        d["max_seqs"] = max(d["max_seqs"], 1)
        d["running"] = min(d["running"], d["max_seqs"])
        d["kv_used"] = min(d["kv_used"], d["kv_blocks"])
        return cls(**d)

    @classmethod
    def reduce(cls, value: Any) -> LoadReport | None:
        """A report from tenant code (the sandboxed child), reduced: fields that are not integers are dropped
        (None when nothing is left), the rest `clamped`."""
        if not isinstance(value, dict):
            return None
        got = {f.name: value[f.name] for f in fields(cls)
               if isinstance(value.get(f.name), int) and not isinstance(value.get(f.name), bool)}
        return cls.clamped(got) if got else None


class LoadSource(Protocol):
    def load_report(self) -> LoadReport: ...


_sources: weakref.WeakSet[Any] = weakref.WeakSet()


def add_load_source(source: LoadSource) -> None:
    """Report `source.load_report()` to the autoscaler (held weakly; `remove_load_source` when it closes)."""
    _sources.add(source)


def remove_load_source(source: LoadSource) -> None:
    _sources.discard(source)


def current_load() -> LoadReport | None:
    """The sum of every live source's report; None when nothing in this process reports load."""
    total: LoadReport | None = None
    for source in list(_sources):
        r = source.load_report()
        total = r if total is None else total + r
    return total


async def watch(send: Callable[[LoadReport], None], interval: float = WATCH_INTERVAL_S) -> None:
    """Poll `current_load()` and `send` each report that differs from the last one sent (runs until cancelled).
    Idle engines cost one comparison per interval and no frame. When the last source goes (closed), an empty
    report says so: the gateway must not keep steering by a closed engine's last numbers."""
    last: LoadReport | None = None
    while True:
        r = current_load()
        if r is None and last is not None:
            r = LoadReport()
        if r is not None and r != last:
            send(r)
            last = r
        await asyncio.sleep(interval)


# -- per call ------------------------------------------------------------------------------------------------
def caller_tag() -> str:
    """The current call's opaque caller tag ("" outside a call, or when the gateway sent none). Stable for one
    caller of one function; different functions see different tags for the same caller."""
    return _caller.get()


def set_caller(tag: Any) -> Token[str]:
    """Runtime only: set the caller tag of the call running in this context (bounded; non-strings become "")."""
    return _caller.set(tag[:MAX_CALLER_TAG] if isinstance(tag, str) else "")


def reset_caller(token: Token[str]) -> None:
    _caller.reset(token)


# -- per replica ----------------------------------------------------------------------------------------------
def set_max_concurrency(n: int) -> None:
    """Runtime only: the function's `max_concurrency` (an engine's default number of sequences in the batch)."""
    global _max_concurrency
    _max_concurrency = n


def max_concurrency() -> int:
    """The function's `max_concurrency` inside a replica; 0 outside one."""
    return _max_concurrency


__all__ = ["LoadReport", "LoadSource", "add_load_source", "caller_tag", "current_load", "max_concurrency",
           "remove_load_source", "reset_caller", "set_caller", "set_max_concurrency", "watch"]

"""The holds sweeper: a paid call's hold never outlives the call.

The call path settles every hold (charge or release) when its call ends. This is the backstop for a path that
missed it (a bug, a task that died with its event loop's cancellation, a stream whose generator was never
closed): every ``interval`` seconds, holds older than their function's time limit plus ``grace`` are released
(not charged: nothing proves the call ran), so a caller's channel can always close. A hold is released with the
same ``status='held'`` guard as the call path's settle, so a late settle and the sweep cannot both book it.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass

from cocoon_faas.gateway.payments import Hold, PaymentGate

log = logging.getLogger("cocoon.holds")


@dataclass(frozen=True)
class StaleHold:
    """A hold past its deadline, as the sweeper saw it."""

    hold: Hold
    age_s: float
    limit_s: float


def stale_holds(gate: PaymentGate, now: float, limit_for: Callable[[str], float], grace_s: float) -> list[StaleHold]:
    """Holds whose age exceeds their function's limit (``limit_for(function)``, seconds) plus ``grace_s``."""
    rows = gate.ledger.query("SELECT call_id, channel_id, seqno, hold, function, created_at FROM pay_calls "
                             "WHERE status='held'")
    out = []
    for call_id, channel_id, seqno, amount, function, created in rows:
        limit = limit_for(str(function)) + grace_s
        age = now - float(created)
        if age > limit:
            out.append(StaleHold(Hold(str(call_id), int(channel_id), int(seqno), int(amount), str(function)),
                                 age, limit))
    return out


def sweep_once(gate: PaymentGate, limit_for: Callable[[str], float], grace_s: float,
               now: float | None = None) -> list[StaleHold]:
    """Release every stale hold; returns what was released."""
    stale = stale_holds(gate, time.time() if now is None else now, limit_for, grace_s)
    for s in stale:
        gate.release(s.hold)
        log.warning("released hold of call %s on channel %d (%d nanoton): held %.0fs, past its %.0fs limit",
                    s.hold.call_id, s.hold.channel_id, s.hold.amount, s.age_s, s.limit_s)
    return stale


async def sweep_forever(gate: PaymentGate, limit_for: Callable[[str], float], grace_s: float,
                        interval_s: float) -> None:
    """Run as a gateway task: sweep every ``interval_s``; an error in one sweep is logged, never fatal."""
    while True:
        await asyncio.sleep(interval_s)
        try:
            await asyncio.to_thread(sweep_once, gate, limit_for, grace_s)
        except Exception:  # noqa: BLE001 - the sweeper must outlive its own bugs and a busy ledger
            log.exception("sweeping stale holds failed; retrying in %.0fs", interval_s)

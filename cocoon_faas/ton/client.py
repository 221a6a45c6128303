"""The caller's side of a channel (party A): sign cumulative states for calls, kept on disk.

Each call gets a fresh state ``seqno+1`` whose ``sent`` covers everything charged so far plus every hold in
flight, this call's included (so concurrent calls each carry a state that pays for all of them, and the
gateway may see them in any order). ``sent`` never decreases. The header value is the base64 BOC of the
``SignedSemiChannel`` (``X-Cocoon-Payment``). State lives in ``$COCOON_HOME/channels/<id>.json``.
"""

from __future__ import annotations

import atexit
import base64
import json
import os
import threading
from dataclasses import asdict, dataclass
from pathlib import Path

from cocoon_faas.errors import PaymentRequiredError
from cocoon_faas.ton.channel import SemiChannel, SemiChannelBody, SignedSemiChannel
from cocoon_faas.ton.keys import PrivateKey

HEADER = "X-Cocoon-Payment"
CHARGE_HEADER = "X-Cocoon-Charge"


@dataclass
class _Saved:
    channel_id: int
    deposit: int
    seqno: int = 0
    sent: int = 0
    charged: int = 0
    counterparty_seqno: int = 0
    counterparty_sent: int = 0


@dataclass(frozen=True)
class Ticket:
    """One signed state handed out for one call; give it back to `complete` with the charge."""

    seqno: int
    hold: int
    header: str
    state: SignedSemiChannel


class ChannelSigner:
    """Signs payment states for one channel; thread-safe; persists before handing a state out."""

    def __init__(self, path: Path, key: PrivateKey, channel_id: int | None = None, deposit: int | None = None):
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}
        self._dirty = False
        atexit.register(self.flush)
        if self.path.exists():
            self._s = _Saved(**json.loads(self.path.read_text()))
        else:
            if channel_id is None or deposit is None:
                raise PaymentRequiredError(f"no channel state at {self.path}; open one with "
                                           "`cocoon channel open --deposit 5`")
            self._s = _Saved(channel_id, deposit)
            self._save()

    @property
    def channel_id(self) -> int:
        return self._s.channel_id

    @property
    def deposit(self) -> int:
        return self._s.deposit

    @property
    def charged(self) -> int:
        return self._s.charged

    @property
    def seqno(self) -> int:
        return self._s.seqno

    @property
    def sent(self) -> int:
        return self._s.sent

    def _save(self) -> None:
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps(asdict(self._s)))
        os.replace(tmp, self.path)

    def state_for(self, seqno: int, sent: int) -> SignedSemiChannel:
        cp = SemiChannelBody(self._s.counterparty_seqno, self._s.counterparty_sent)
        return SemiChannel(self._s.channel_id, SemiChannelBody(seqno, sent), cp).sign(self.key)

    def sign_for_call(self, hold: int) -> Ticket:
        """A new state covering all charges, all holds in flight and `hold`; raises 402 past the deposit."""
        with self._lock:
            want = self._s.charged + sum(self._inflight.values()) + hold
            sent = max(self._s.sent, want)
            if sent > self._s.deposit:
                raise PaymentRequiredError(
                    f"channel {self._s.channel_id} has {self._s.deposit - self._s.sent} nanoton of credit left, "
                    f"this call may cost {hold}; close it and open a new one with a larger deposit",
                    needed=sent - self._s.deposit)
            self._s.seqno += 1
            self._s.sent = sent
            state = self.state_for(self._s.seqno, sent)
            self._save()
            self._inflight[self._s.seqno] = hold
        header = base64.b64encode(state.to_boc()).decode()
        return Ticket(state.state.data.seqno, hold, header, state)

    def complete(self, ticket: Ticket, charged: int) -> None:
        """Release the ticket's hold and book what the gateway charged (0 for a failed call)."""
        with self._lock:
            self._inflight.pop(ticket.seqno, None)
            self._s.charged += min(charged, ticket.hold)
            # not saved here: the next signed state saves it, and a lost booking is harmless (the gateway's
            # count is what a close uses, checked against the signed `sent`); `flush()` saves now
            self._dirty = True

    def flush(self) -> None:
        with self._lock:
            if self._dirty:
                self._save()

    def latest(self) -> SignedSemiChannel:
        """The state for the current seqno and sent (what a close or a dispute would use)."""
        with self._lock:
            return self.state_for(self._s.seqno, self._s.sent)


class PayingClient:
    """Attach a payment to calls: ``headers = pc.headers(hold)``; after the response ``pc.settle(...)``."""

    def __init__(self, signer: ChannelSigner):
        self.signer = signer

    def headers(self, hold: int) -> tuple[dict[str, str], Ticket]:
        ticket = self.signer.sign_for_call(hold)
        return {HEADER: ticket.header}, ticket

    def settle(self, ticket: Ticket, response_headers: dict[str, str] | None) -> int:
        """Book the charge the gateway reported (0 if it reported none: failed calls are not charged)."""
        raw = (response_headers or {}).get(CHARGE_HEADER) or (response_headers or {}).get(CHARGE_HEADER.lower())
        charged = int(raw) if raw else 0
        self.signer.complete(ticket, charged)
        return charged

"""The caller's side of a channel (party A): sign cumulative states for calls, kept on disk.

Each call gets a fresh state ``seqno+1`` whose ``sent`` covers everything charged so far plus every hold in
flight, this call's included (so concurrent calls each carry a state that pays for all of them, and the
gateway may see them in any order). ``sent`` never decreases. The header value is the base64 BOC of the
``SignedSemiChannel`` (``X-Cocoon-Payment``). State lives in ``$COCOON_HOME/channels/<id>.json``.

The state file is not written per call: the signer leases a block of seqnos and a ceiling on ``sent``
(``lease_seqno``, ``lease_sent``), writes the lease once, and signs within it. A process that dies mid-lease
resumes at the lease's end, so a seqno is never signed twice and ``sent`` never goes down; a clean exit
(``flush``) writes the exact figures and gives the rest of the lease back. States are serialised from a
`StateTemplate` and signed with libsodium (PyNaCl), byte for byte what the cell path builds.

One process signs for a channel at a time: every state's ``sent`` must cover all of the channel's charges, which
only the process that booked them knows, and two processes leasing from one file would sign the same seqnos. A
lease (or a forced close's state) is taken under an exclusive lock on ``<id>.lock`` beside the state file, held
until ``flush`` gives the lease back (or the process ends), after re-reading the file so the lease starts past
anything another process signed and books what it charged. A second process that wants to sign meanwhile gets a
409 ``channel_busy`` naming the process that holds the channel, before anything is signed or sent. Signers in
one process share the lock.
"""

from __future__ import annotations

import atexit
import base64
import errno
import fcntl
import json
import os
import sys
import threading
from binascii import b2a_base64
from collections.abc import Mapping
from dataclasses import asdict, dataclass
from pathlib import Path

from nacl.bindings import crypto_sign, crypto_sign_seed_keypair

from cocoon_faas.errors import ConflictError, InvalidRequestError, PaymentRequiredError
from cocoon_faas.pricing import CHARGE_HEADER
from cocoon_faas.ton.channel import SemiChannelBody, SignedSemiChannel, StateTemplate
from cocoon_faas.ton.keys import PrivateKey

HEADER = "X-Cocoon-Payment"
LEASE_SEQNOS = 256  # seqnos per state-file write
LEASE_HOLDS = 8  # headroom of `sent` per lease, in holds of the call that takes the lease


@dataclass
class _Saved:
    channel_id: int
    deposit: int
    seqno: int = 0
    sent: int = 0
    charged: int = 0
    counterparty_seqno: int = 0
    counterparty_sent: int = 0
    lease_seqno: int = 0  # seqnos up to this one may have been signed
    lease_sent: int = 0  # and `sent` up to this much
    limit: int = 0  # the most a state may send (deposit less the channel's fine); 0: the deposit


def _load_saved(path: Path) -> _Saved:
    """A signer's file, refused with the fix when damaged (it holds what was signed: never guess it)."""
    try:
        raw = json.loads(path.read_text())
        saved = _Saved(**raw)
        if not all(isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in asdict(saved).values()):
            raise TypeError("a field is not a non-negative integer")
    except (OSError, ValueError, TypeError) as exc:
        raise InvalidRequestError(f"the channel's signing state {path} is damaged ({exc}); restore it from your "
                                  "newest copy, then close cooperatively (`cocoon channel close`): it records the "
                                  "seqno and amount you signed, and a forced close with an older one is stale, "
                                  "so the operator's watchtower challenges it and the contract fines you") from None
    return saved


class _ChannelLock:
    """The process's hold on one channel's lock file: an flock shared by the signers of this process."""

    _held: dict[str, _ChannelLock] = {}
    _guard = threading.Lock()

    def __init__(self, key: str, fd: int) -> None:
        self.key, self.fd, self.holders = key, fd, 0

    @classmethod
    def claim(cls, state_path: Path, channel_id: int) -> _ChannelLock:
        path = state_path.with_suffix(".lock")
        path.parent.mkdir(parents=True, exist_ok=True)
        key = str(path.resolve())
        with cls._guard:
            lock = cls._held.get(key)
            if lock is None:
                fd = os.open(path, os.O_RDWR | os.O_CREAT, 0o600)
                try:
                    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError as exc:
                    holder = os.pread(fd, 512, 0).decode(errors="replace").strip() or "another process"
                    os.close(fd)
                    if exc.errno not in (errno.EWOULDBLOCK, errno.EAGAIN, errno.EACCES):
                        raise
                    raise ConflictError(
                        f"channel {channel_id} is in use by {holder}, which signs its payment states: one process "
                        "pays from a channel at a time (each state must cover every charge on it). Stop that process "
                        "first, send these calls through it (e.g. `cocoon proxy`), or pay from another channel "
                        "(another COCOON_HOME with `cocoon channel open`)", problem="channel_busy",
                        channel_id=channel_id) from None
                os.ftruncate(fd, 0)
                os.pwrite(fd, f"pid {os.getpid()} ({' '.join(sys.argv)[:200]})".encode(), 0)
                lock = cls._held[key] = cls(key, fd)
            lock.holders += 1
            return lock

    def release(self) -> None:
        with self._guard:
            self.holders -= 1
            if self.holders > 0:
                return
            del self._held[self.key]
            os.ftruncate(self.fd, 0)
            os.close(self.fd)  # closing the descriptor drops the flock


@dataclass(frozen=True)
class Ticket:
    """One signed state handed out for one call; give it back to `complete` with the charge."""

    seqno: int
    hold: int
    header: str  # base64 of the state's BOC: what the call sends

    @property
    def state(self) -> SignedSemiChannel:
        """The signed state the header carries, read back from it (a call needs only the header, so the state's
        objects are made only when asked for)."""
        return SignedSemiChannel.from_boc(base64.b64decode(self.header))


class ChannelSigner:
    """Signs payment states for one channel; thread-safe; persists before handing a state out."""

    def __init__(self, path: Path, key: PrivateKey, channel_id: int | None = None, deposit: int | None = None,
                 limit: int | None = None):
        self.path = Path(path)
        self.key = key
        self._lock = threading.Lock()
        self._inflight: dict[int, int] = {}  # seqno -> hold of each call in flight
        self._inflight_sum = 0  # their total, kept beside them (read on every call)
        self._dirty = False
        self._claim: _ChannelLock | None = None  # held from taking a lease until flush() gives it back
        if self.path.exists():
            self._s = _load_saved(self.path)
            self._catch_up(self._s)
        else:
            if channel_id is None or deposit is None:
                raise PaymentRequiredError(f"no channel state at {self.path}; open one with "
                                           "`cocoon channel open --deposit 5`")
            self._s = _Saved(channel_id, deposit, limit=deposit if limit is None else limit)
            self._save()
        self._lease_released()
        self._template = StateTemplate(self._s.channel_id, SemiChannelBody(self._s.counterparty_seqno,
                                                                           self._s.counterparty_sent))
        self._sk = crypto_sign_seed_keypair(key.to_bytes())[1]
        atexit.register(self.flush)  # once the state is loaded: a signer that failed to load has nothing to save

    @property
    def channel_id(self) -> int:
        return self._s.channel_id

    @property
    def deposit(self) -> int:
        return self._s.deposit

    @property
    def limit(self) -> int:
        """The most any state may send: the deposit less the fine that must fit beside it."""
        return self._s.limit or self._s.deposit

    @property
    def charged(self) -> int:
        return self._s.charged

    @property
    def seqno(self) -> int:
        return self._s.seqno

    @property
    def sent(self) -> int:
        return self._s.sent

    def _lease_released(self) -> None:
        self._s.lease_seqno, self._s.lease_sent = self._s.seqno, self._s.sent

    def _take_channel(self) -> None:
        """Hold the channel's lock (raises 409 channel_busy when another process does) and catch up with what the
        file says another process signed and booked since this signer read it. Called under self._lock."""
        if self._claim is not None:
            return
        self._claim = _ChannelLock.claim(self.path, self._s.channel_id)
        if self.path.exists():
            self._catch_up(_load_saved(self.path))

    def _catch_up(self, disk: _Saved) -> None:
        """Resume past what `disk` records: a lease not given back may have been signed and sent in full, so its
        end counts as signed; charges booked there are ours too. Seqno, `sent` and `charged` never go down."""
        self._s.seqno = max(self._s.seqno, disk.seqno, disk.lease_seqno)
        self._s.sent = max(self._s.sent, disk.sent, disk.lease_sent)
        self._s.charged = max(self._s.charged, disk.charged)

    def _give_channel(self) -> None:
        """Let other processes sign, unless calls are in flight (their bookings come later). Under self._lock."""
        if self._claim is not None and not self._inflight:
            self._claim.release()
            self._claim = None

    def _sign(self, message: bytes) -> bytes:
        return crypto_sign(message, self._sk)[:64]

    def _save(self) -> None:
        self._dirty = False
        self.path.parent.mkdir(parents=True, exist_ok=True)
        tmp = self.path.with_suffix(f".tmp{threading.get_ident()}")
        tmp.write_text(json.dumps(asdict(self._s)))
        os.replace(tmp, self.path)

    def state_for(self, seqno: int, sent: int) -> SignedSemiChannel:
        return self._template.build(seqno, sent, self._sign)[1]

    def sign_for_call(self, hold: int) -> Ticket:
        """A new state covering all charges, all holds in flight and `hold`; raises 402 past the deposit."""
        with self._lock:
            fresh = self._claim is None
            if fresh:  # this process takes the channel (and catches up with the file) before it signs
                self._take_channel()
            want = self._s.charged + self._inflight_sum + hold
            sent = max(self._s.sent, want)
            if sent > self.limit:
                if fresh:
                    self._give_channel()
                raise PaymentRequiredError(
                    f"channel {self._s.channel_id} has {self.limit - self._s.sent} nanoton of credit left, "
                    f"this call may cost {hold}; close it and open a new one with a larger deposit",
                    needed=sent - self.limit)
            seqno = self._s.seqno = self._s.seqno + 1
            self._s.sent = sent
            if seqno > self._s.lease_seqno or sent > self._s.lease_sent:  # durable before it leaves
                self._s.lease_seqno = seqno + LEASE_SEQNOS - 1
                self._s.lease_sent = min(self.limit, sent + LEASE_HOLDS * hold)
                self._save()
            self._inflight[seqno] = hold
            self._inflight_sum += hold
        return Ticket(seqno, hold, b2a_base64(self._template.boc(seqno, sent, self._sign), newline=False).decode())

    def complete(self, ticket: Ticket, charged: int) -> None:
        """Release the ticket's hold and book what the gateway charged (0 for a failed call)."""
        with self._lock:
            self._inflight_sum -= self._inflight.pop(ticket.seqno, 0)
            self._s.charged += min(charged, ticket.hold)
            # not saved here: the next lease or `flush()` saves it, and a lost booking is harmless (the
            # gateway's count is what a close uses, checked against the signed `sent`)
            self._dirty = True

    def flush(self) -> None:
        """Write the exact figures and give back the unused lease (at exit; before a close)."""
        with self._lock:
            if self._dirty or self._s.lease_seqno != self._s.seqno or self._s.lease_sent != self._s.sent:
                self._lease_released()
                self._save()
            self._give_channel()

    def close_state(self, sent: int) -> SignedSemiChannel:
        """A fresh state (next seqno, saved before it leaves) sending `sent`: what a forced close commits. `sent`
        may be below earlier states' (the charges, not the holds that covered calls in flight); the operator's
        watchtower contests a close that pays less than was charged, and the contract then fines the caller."""
        with self._lock:
            if not 0 <= sent <= self.limit:
                raise ValueError(f"sent must be within 0..{self.limit}")
            self._take_channel()
            seqno = self._s.seqno = self._s.seqno + 1
            self._lease_released()
            self._save()
            self._give_channel()  # saved exactly, no lease left out: another process may sign (and be refused)
        return self.state_for(seqno, sent)

    def resync(self, newest: SignedSemiChannel, charged: int) -> dict[str, int]:
        """Catch up with the gateway's newest state of this channel when this file fell behind it (restored from
        a backup, or the home used from another machine). Only a state this key signed for this channel is
        taken: the seqno and `sent` never go down, and the gateway's `charged` is booked only up to what was
        signed (all the operator could claim anyway). Returns the figures before and after."""
        data, counterparty = newest.state.data, newest.state.counterparty
        if newest.state.channel_id != self._s.channel_id or not newest.is_signed_by(self.key.public_key()):
            raise InvalidRequestError(f"the gateway's newest state is not one this wallet signed for channel "
                                      f"{self._s.channel_id}; nothing was changed: check COCOON_GATEWAY_URL")
        if counterparty is not None and counterparty.sent != 0:
            raise InvalidRequestError("the gateway's newest state claims the operator paid this caller; nothing "
                                      "was changed")
        if data.sent > self.limit:
            raise InvalidRequestError(f"the gateway's newest state sends {data.sent}, beyond this channel's limit "
                                      f"{self.limit}; nothing was changed")
        with self._lock:
            self._take_channel()
            try:
                before = {"seqno": self._s.seqno, "sent": self._s.sent, "charged": self._s.charged}
                self._s.seqno = max(self._s.seqno, data.seqno)
                self._s.sent = max(self._s.sent, data.sent)
                self._s.charged = max(self._s.charged, min(charged, self._s.sent))
                self._lease_released()
                self._save()
            finally:
                self._give_channel()
        return {**{f"{k}_before": v for k, v in before.items()},
                "seqno": self._s.seqno, "sent": self._s.sent, "charged": self._s.charged}

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

    def settle(self, ticket: Ticket, response_headers: Mapping[str, str] | None) -> int:
        """Book the charge the gateway reported (0 if it reported none: failed calls are not charged). Takes the
        response's headers as they are (httpx's are case-insensitive; a plain dict is looked up both ways)."""
        headers = response_headers or {}
        raw = headers.get(CHARGE_HEADER) or headers.get(CHARGE_HEADER.lower())
        charged = int(raw) if raw else 0
        self.signer.complete(ticket, charged)
        return charged

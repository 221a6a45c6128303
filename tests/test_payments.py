"""PaymentGate + Ledger: verification errors, holds, charges, conservation, crash recovery."""

from __future__ import annotations

import base64
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cocoon_faas.errors import ConflictError, PaymentError, PaymentRequiredError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import FeePolicy, PaymentGate, provider_earnings
from cocoon_faas.ton.channel import SemiChannel, SemiChannelBody, SignedSemiChannel
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey

OP = PrivateKey(b"\x07" * 32)
CALLER = PrivateKey(b"\x08" * 32)
DEPOSIT = 10**9


def _setup(tmp_path: Path, cid: int = 1) -> tuple[Ledger, PaymentGate, ChannelSigner]:
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.add_channel(cid, CALLER.public_key(), OP.public_key(), "0:" + "00" * 32, "alice", DEPOSIT)
    gate = PaymentGate(ledger, OP, FeePolicy(bps=1000))
    return ledger, gate, ChannelSigner(tmp_path / f"caller-{cid}.json", CALLER, cid, DEPOSIT)


def _snapshot(ledger: Ledger) -> tuple[object, ...]:
    return tuple(ledger.query(f"SELECT * FROM {t} ORDER BY 1") for t in
                 ("pay_channels", "pay_states", "pay_calls", "pay_charges", "pay_balances"))


def test_paid_call_charges_split_and_conserves(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    t = signer.sign_for_call(1_000_000)
    hold = gate.authorize(t.header, "c1", "embed", 1_000_000)
    total = gate.settle(hold, "prov-1", 500_000, "dev-1", 100_000)
    assert total == 500_000 + 100_000 + 60_000  # 10% fee
    signer.complete(t, total)
    bal = ledger.balances()
    assert bal["caller"] == {"alice": total} and bal["provider"] == {"prov-1": 500_000}
    assert bal["developer"] == {"dev-1": 100_000} and bal["operator"] == {"operator": 60_000}
    assert ledger.verify()["ok"]
    with pytest.raises(ConflictError):
        gate.settle(hold, "prov-1", 1, "dev-1", 0)  # never twice
    assert ledger.balances() == bal


def test_charge_never_exceeds_hold(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    hold = gate.authorize(signer.sign_for_call(1000).header, "c1", "f", 1000)
    assert gate.settle(hold, "p", 900, "d", 500) == 1000
    (prov, roy, op), = ledger.query("SELECT provider_nanoton, royalty_nanoton, operator_nanoton FROM pay_charges")
    assert (prov, roy, op) == (900, 100, 0)
    assert ledger.verify()["ok"]


def test_bad_states_change_nothing(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    t1 = signer.sign_for_call(1000)
    gate.authorize(t1.header, "c1", "f", 1000)
    before = _snapshot(ledger)
    cases = {
        "replayed": (t1.header, 409),
        "forged": (base64.b64encode(SemiChannel(1, SemiChannelBody(50, 5000), SemiChannelBody())
                                    .sign(PrivateKey(b"\x09" * 32)).to_boc()).decode(), 401),
        "foreign": (base64.b64encode(SemiChannel(99, SemiChannelBody(5, 5000), SemiChannelBody())
                                     .sign(CALLER).to_boc()).decode(), 400),
        "stale": (base64.b64encode(SemiChannel(1, SemiChannelBody(7, 10), SemiChannelBody())
                                   .sign(CALLER).to_boc()).decode(), 409),
        "malformed": ("not base64!", 400),
    }
    for problem, (header, status) in cases.items():
        with pytest.raises(PaymentError) as ei:
            gate.authorize(header, f"x-{problem}", "f", 10)
        assert ei.value.details["problem"] == problem and ei.value.status == status, problem
    with pytest.raises(PaymentRequiredError) as ei:  # credit left: 1000 held of 1000 sent
        gate.authorize(base64.b64encode(signer.state_for(10, 1500).to_boc()).decode(), "x-poor", "f", 700)
    assert ei.value.details["needed"] == 200 and ei.value.status == 402
    with pytest.raises(PaymentRequiredError):  # beyond the deposit
        gate.authorize(base64.b64encode(signer.state_for(11, DEPOSIT + 1).to_boc()).decode(), "x-dep", "f", 1)
    assert _snapshot(ledger) == before


def test_a_tampered_state_is_refused_whichever_reader_parses_it(tmp_path: Path) -> None:
    """The gateway reads the SDK's states with the fast reader (counterparty cells reused by their bytes): a state
    changed by one bit anywhere, in the part the fast reader reads or in a shape only pytoniq-core reads, is refused
    as forged or malformed, exactly as the general path refuses it, and changes nothing."""
    from pytoniq_core import Cell

    ledger, gate, signer = _setup(tmp_path)
    good = signer.sign_for_call(1000)
    gate.authorize(good.header, "c-good", "f", 1000)  # the counterparty cell is now a known one
    before = _snapshot(ledger)
    ticket = signer.sign_for_call(1000)
    boc = base64.b64decode(ticket.header)
    for i in range(11, len(boc)):  # each byte of the two cells (descriptors and the signature included)
        for bit in (0x01, 0x80):
            bad = bytearray(boc)
            bad[i] ^= bit
            try:
                general: SignedSemiChannel | None = SignedSemiChannel.from_cell(Cell.one_from_boc(bytes(bad)))
            except Exception:  # noqa: BLE001 - pytoniq-core refuses it: so must the gateway
                general = None
            if general is not None and general.is_signed_by(CALLER.public_key()):
                # the same signed state in another encoding (a descriptor bit pytoniq-core ignores): read the same
                assert general.state == ticket.state.state, (i, bit)
                got = SignedSemiChannel.from_boc(bytes(bad))
                assert got == general and got.signed_hash() == general.signed_hash(), (i, bit)
                continue
            with pytest.raises(PaymentError) as ei:
                gate.authorize(base64.b64encode(bytes(bad)).decode(), f"x-{i}-{bit}", "f", 10)
            assert ei.value.details["problem"] in ("forged", "malformed", "foreign", "stale"), (i, bit)
    assert _snapshot(ledger) == before


def test_concurrent_states_out_of_order(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    tickets = [signer.sign_for_call(10_000) for _ in range(8)]  # 8 calls in flight, signed ahead
    holds = [gate.authorize(t.header, f"c{t.seqno}", "f", 10_000) for t in reversed(tickets)]
    assert ledger.reserved(1) == 80_000
    for h, t in zip(holds, reversed(tickets), strict=True):
        signer.complete(t, gate.settle(h, "p", 5000, "d", 0) if t.seqno % 2 else 0)
        if t.seqno % 2 == 0:
            gate.release(h)
    assert ledger.reserved(1) == 0
    assert ledger.channel(1).charged == signer.charged == 4 * 5500
    assert ledger.verify()["ok"]
    # a state below the newest one, never used, still pays (reordering), but only once
    late = signer.sign_for_call(100)
    newer = signer.sign_for_call(100)
    gate.authorize(newer.header, "n", "f", 100)
    gate.authorize(late.header, "l", "f", 100)
    with pytest.raises(PaymentError):
        gate.authorize(late.header, "l2", "f", 100)


def test_verify_detects_tampering(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    h = gate.authorize(signer.sign_for_call(5000).header, "c1", "f", 5000)
    gate.settle(h, "p", 1000, "d", 0)
    assert ledger.verify()["ok"]
    with ledger.transaction() as db:
        db.execute("UPDATE pay_balances SET amount = amount + 1 WHERE party='provider'")
    report = ledger.verify()
    assert not report["ok"] and any("conserved" in p for p in report["problems"])


def test_provider_earnings(tmp_path: Path) -> None:
    ledger, gate, signer = _setup(tmp_path)
    for i in range(3):
        h = gate.authorize(signer.sign_for_call(10_000).header, f"c{i}", "f", 10_000)
        gate.settle(h, "prov-A", 3000, "d", 0)
    assert provider_earnings(ledger) == [{"provider_id": "prov-A", "earned": 9000, "paid": 0, "due": 9000}]
    # payouts through the operator's channels: tests/test_payouts.py


_WORKER = r"""
import sys, time
from pathlib import Path
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
home = Path(sys.argv[1])
ledger = Ledger(home / "ledger.db")
gate = PaymentGate(ledger, PrivateKey(b"\x07" * 32))
signer = ChannelSigner(home / "caller-1.json", PrivateKey(b"\x08" * 32))
i = 0
while True:
    t = signer.sign_for_call(1000)
    h = gate.authorize(t.header, f"k{i}", "f", 1000)
    print("served", h.call_id, flush=True)
    signer.complete(t, gate.settle(h, "p", 500, "d", 100))
    i += 1
"""


def test_crash_mid_load_then_verify(tmp_path: Path) -> None:
    ledger, gate, _ = _setup(tmp_path)
    ledger.close()
    proc = subprocess.Popen([sys.executable, "-c", _WORKER, str(tmp_path)], stdout=subprocess.PIPE, text=True)
    served = 0
    deadline = time.time() + 30
    while served < 200 and time.time() < deadline:
        if proc.stdout and proc.stdout.readline().startswith("served"):
            served += 1
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert served >= 200
    ledger = Ledger(tmp_path / "ledger.db")
    gate = PaymentGate(ledger, OP)  # restart: held calls are released, not charged
    report = ledger.verify()
    assert report["ok"], report["problems"]
    charged_calls = ledger.query("SELECT COUNT(*) FROM pay_calls WHERE status='charged'")[0][0]
    assert report["charges"] == charged_calls >= served - 1
    assert ledger.query("SELECT COUNT(*) FROM pay_calls WHERE status='held'")[0][0] == 0
    # every served call has its state on disk
    assert ledger.query("SELECT COUNT(*) FROM pay_calls c JOIN pay_states s ON s.channel_id=c.channel_id AND "
                        "s.seqno=c.seqno")[0][0] == ledger.query("SELECT COUNT(*) FROM pay_calls")[0][0]
    del gate


def test_receipt_payload_is_the_sorted_json_byte_for_byte() -> None:
    """The receipt is written straight to bytes on the paid path; it must equal what the JSON encoder makes of the
    receipt's dict (sorted keys, no spaces, ASCII escapes): clients check the signature over these bytes."""
    import json
    import random

    from cocoon_faas.gateway.billing import receipt_payload
    from cocoon_faas.gateway.payments import Hold
    from cocoon_faas.pricing import Usage

    rnd = random.Random(11)

    def text() -> str:
        return "".join(rnd.choice(["a", "Z", "é", '"', "\\", "\n", "\t", "\u2028", "\x00", "😀", "/", "-"])
                       for _ in range(rnd.randint(0, 12)))

    for _ in range(3000):
        hold = Hold(text(), rnd.randint(0, 2**63 - 1), rnd.randint(0, 2**63 - 1), 5, text())
        exec_ms = rnd.choice([rnd.random() * 10 ** rnd.randint(-6, 9), 0.0, 1e-7, 0.1, float(rnd.randint(0, 10**6)),
                              rnd.randint(0, 10**6), float("inf")])
        usage = rnd.choice([None, Usage(rnd.randint(0, 10**6), rnd.randint(0, 10**6), rnd.randint(0, 99))])
        measurement, provider, charge = text(), text(), rnd.randint(0, 10**15)
        d = {"call_id": hold.call_id, "function": hold.function, "measurement": measurement,
             "channel_id": hold.channel_id, "seqno": hold.seqno, "exec_ms": exec_ms, "charge": charge,
             "provider": provider}
        if usage is not None:
            d["usage"] = usage.to_json()
        want = json.dumps(d, sort_keys=True, separators=(",", ":")).encode()
        assert receipt_payload(hold, measurement, exec_ms, charge, provider, usage) == want, d


def test_a_tickets_state_is_the_state_its_header_carries(tmp_path: Path) -> None:
    """A ticket keeps only the header it sends; its `state` reads the header back: the same signed state the
    general cell path builds for that seqno and sent, signed by the caller, and the in-flight total the signer
    keeps beside its tickets follows every hold and release."""
    _, _, signer = _setup(tmp_path)
    tickets = [signer.sign_for_call(1000 + i) for i in range(3)]
    for t in tickets:
        ref = SignedSemiChannel(t.state.signature, SemiChannel(1, SemiChannelBody(t.seqno, t.state.state.data.sent),
                                                               SemiChannelBody()))
        assert t.state == ref and base64.b64decode(t.header) == ref.to_boc()
        assert t.state.is_signed_by(CALLER.public_key())
    assert tickets[-1].state.state.data.sent == 1000 + 1001 + 1002  # every hold in flight is covered
    signer.complete(tickets[1], 500)
    nxt = signer.sign_for_call(10)
    assert signer.charged == 500 and nxt.state.state.data.sent == max(3003, 500 + 1000 + 1002 + 10)
    for t in (tickets[0], tickets[2], nxt):
        signer.complete(t, 0)
    assert signer.sign_for_call(7).state.state.data.sent == 3003  # sent never decreases

"""The caller's signer: template-built states equal the cell path, seqno leases survive a crash."""

from __future__ import annotations

import base64
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from cocoon_faas.errors import InvalidRequestError
from cocoon_faas.gateway.ledger import Ledger
from cocoon_faas.gateway.payments import PaymentGate
from cocoon_faas.ton.channel import SemiChannel, SemiChannelBody, SignedSemiChannel, StateTemplate
from cocoon_faas.ton.client import LEASE_SEQNOS, ChannelSigner
from cocoon_faas.ton.keys import PrivateKey

KEY, OP = PrivateKey(b"\x08" * 32), PrivateKey(b"\x07" * 32)


def test_template_bytes_equal_pytoniq_core() -> None:
    rng = random.Random(11)
    for _ in range(600):
        cp = SemiChannelBody(rng.getrandbits(rng.choice([0, 8, 64])), rng.getrandbits(rng.choice([0, 1, 8, 40, 119])))
        cid = rng.getrandbits(rng.choice([1, 64, 128]))
        seqno, sent = rng.getrandbits(rng.choice([0, 1, 64])), rng.getrandbits(rng.choice([0, 7, 9, 64, 119]))
        boc, st = StateTemplate(cid, cp).build(seqno, sent, KEY.sign)
        ref = SemiChannel(cid, SemiChannelBody(seqno, sent), cp).sign(KEY)
        assert boc == ref.to_boc()
        assert st == ref and st.signed_hash() == ref.state.to_cell().hash
        assert SignedSemiChannel.from_boc(boc).is_signed_by(KEY.public_key())


def test_signer_states_verify_and_match_cell_path(tmp_path: Path) -> None:
    s = ChannelSigner(tmp_path / "c.json", KEY, 77, 10**12)
    t = s.sign_for_call(1000)
    ref = SemiChannel(77, SemiChannelBody(1, 1000), SemiChannelBody(0, 0)).sign(KEY)
    assert base64.b64decode(t.header) == ref.to_boc() and t.state.signature == ref.signature


def _saved(path: Path) -> dict[str, int]:
    return dict(json.loads(path.read_text()))


def test_lease_written_once_per_block_and_skipped_after_crash(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    first = s.sign_for_call(1000)
    lease = _saved(path)
    assert lease["lease_seqno"] == LEASE_SEQNOS and lease["lease_sent"] >= 1000
    for _ in range(10):
        s.complete(s.sign_for_call(1000), 10)
    assert _saved(path) == lease  # within the lease: no write per call
    last_seqno, last_sent = s.seqno, s.sent
    assert first.seqno == 1 and last_seqno == 11
    # the process dies without flushing: a new signer resumes past the whole lease
    s2 = ChannelSigner(path, KEY)
    t = s2.sign_for_call(1000)
    assert t.seqno == LEASE_SEQNOS + 1 > last_seqno and t.state.state.data.sent >= last_sent
    assert _saved(path)["lease_seqno"] == 2 * LEASE_SEQNOS


def test_flush_gives_the_lease_back(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    for _ in range(3):
        s.complete(s.sign_for_call(1000), 10)
    s.flush()
    saved = _saved(path)
    assert saved["seqno"] == saved["lease_seqno"] == 3 and saved["sent"] == saved["lease_sent"] == s.sent
    assert saved["charged"] == 30
    assert ChannelSigner(path, KEY).sign_for_call(1000).seqno == 4


def test_resumed_signer_is_accepted_by_the_gateway(tmp_path: Path) -> None:
    """After a crash mid-lease the next state is neither stale nor a replay at the gateway."""
    ledger = Ledger(tmp_path / "ledger.db")
    ledger.add_channel(5, KEY.public_key(), OP.public_key(), "0:" + "00" * 32, "caller", 10**12)
    gate = PaymentGate(ledger, OP)
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    for i in range(20):
        t = s.sign_for_call(10_000)
        s.complete(t, gate.settle(gate.authorize(t.header, f"a{i}", "f", 10_000), "p", 3000, "d", 0))
    s2 = ChannelSigner(path, KEY)  # no flush: as after SIGKILL
    for i in range(3):
        t = s2.sign_for_call(10_000)
        gate.settle(gate.authorize(t.header, f"b{i}", "f", 10_000), "p", 3000, "d", 0)
    assert ledger.verify()["ok"]


_OTHER_PROCESS = """
import json, sys
from pathlib import Path
from cocoon_faas.errors import ConflictError
from cocoon_faas.ton.client import ChannelSigner
from cocoon_faas.ton.keys import PrivateKey
s = ChannelSigner(Path(sys.argv[1]), PrivateKey(bytes.fromhex(sys.argv[2])))
try:
    t = s.sign_for_call(1000)
except ConflictError as exc:
    print(json.dumps({"refused": exc.message, "problem": exc.details.get("problem"), "status": exc.status}))
    sys.exit(0)
s.complete(t, 7)
s.flush()
print(json.dumps({"seqno": t.seqno, "sent": t.state.state.data.sent}))
"""


def _other_process(path: Path) -> dict[str, Any]:
    r = subprocess.run([sys.executable, "-c", _OTHER_PROCESS, str(path), KEY.to_bytes().hex()],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 0, r.stderr
    return dict(json.loads(r.stdout))


def test_one_process_signs_for_a_channel_at_a_time(tmp_path: Path) -> None:
    """Two processes leasing from one state file would sign the same seqnos, each with a `sent` blind to the
    other's charges: the second is refused with channel_busy (naming the holder) before it signs anything, and
    once the first gives its lease back the second signs past it and books on top of its charges."""
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    for _ in range(3):
        s.complete(s.sign_for_call(1000), 10)
    busy = _other_process(path)
    assert busy["status"] == 409 and busy["problem"] == "channel_busy"
    assert f"pid {os.getpid()}" in busy["refused"] and "one process pays from a channel at a time" in busy["refused"]
    assert _saved(path)["lease_seqno"] == LEASE_SEQNOS  # the refused process wrote nothing
    s.flush()  # gives the lease back (nothing in flight): the channel is free
    other = _other_process(path)
    assert other["seqno"] == 4 and other["sent"] >= 30 + 1000  # past ours, covering our charges and its hold
    assert _saved(path)["charged"] == 37
    # this process signs again: it takes the channel back and catches up with what the other signed and booked
    t = s.sign_for_call(1000)
    assert t.seqno == 5 and t.state.state.data.sent >= max(other["sent"], 37 + 1000)
    assert s.charged == 37
    assert _other_process(path)["problem"] == "channel_busy"
    s.complete(t, 0)
    s.flush()


def test_a_forced_close_state_leaves_the_channel_free(tmp_path: Path) -> None:
    """close_state signs once and saves exactly: it takes the channel only while it signs, so the next process
    (the CLI's next call, refused by the gateway on a closing channel) is not told the channel is busy."""
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    s.complete(s.sign_for_call(1000), 10)
    s.flush()
    closing = s.close_state(10)
    assert closing.state.data.seqno == 2 and _saved(path)["seqno"] == 2
    assert _other_process(path)["seqno"] == 3


def test_resync_takes_only_a_newer_state_this_key_signed(tmp_path: Path) -> None:
    path = tmp_path / "c.json"
    s = ChannelSigner(path, KEY, 5, 10**12)
    s.complete(s.sign_for_call(1000), 10)
    s.flush()
    cp = SemiChannelBody(0, 0)
    for forged in (SemiChannel(5, SemiChannelBody(90, 50_000), cp).sign(OP),  # not this key's
                   SemiChannel(6, SemiChannelBody(90, 50_000), cp).sign(KEY),  # another channel's
                   SemiChannel(5, SemiChannelBody(90, 50_000), SemiChannelBody(0, 1)).sign(KEY)):  # operator "paid"
        with pytest.raises(InvalidRequestError, match="nothing was changed"):
            s.resync(forged, 40_000)
    assert (s.seqno, s.sent, s.charged) == (1, 1000, 10) and _saved(path)["seqno"] == 1
    out = s.resync(SemiChannel(5, SemiChannelBody(90, 50_000), cp).sign(KEY), 60_000)
    # caught up; the gateway's charges are booked only up to what this key signed
    assert out["seqno_before"] == 1 and (s.seqno, s.sent, s.charged) == (90, 50_000, 50_000)
    assert _saved(path)["seqno"] == 90 and s.sign_for_call(1000).seqno == 91
    s.resync(SemiChannel(5, SemiChannelBody(3, 10), cp).sign(KEY), 0)  # an older state changes nothing
    assert (s.seqno, s.sent, s.charged) == (91, 51_000, 50_000)
